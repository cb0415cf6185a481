"""Regenerate the conformance matrix in docs/conformance.md.

    python -m lse_dispatch.conformance.make_readme_matrix [--docs PATH] [--json PATH] [--quick]

Runs ours and every installed anchor (scipy, torch, jax, cupy) on every
installed backend and device, and replaces the text between the markers
``<!-- conformance-matrix:start -->`` and ``<!-- conformance-matrix:end -->``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

START, END = "<!-- conformance-matrix:start -->", "<!-- conformance-matrix:end -->"
COMMAND = "python -m lse_dispatch.conformance.make_readme_matrix"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("SCIPY_ARRAY_API", "1")
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="docs/conformance.md")
    parser.add_argument("--json", help="also write the full JSON report here")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backends")
    args = parser.parse_args(argv)
    from . import cli, run
    from ._report import to_markdown

    impls = ["ours"] + [i for i in ("scipy", "torch", "jax", "cupy") if _installed(i)]
    progress = cli.Progress()
    result = run(impls, backends=args.backends, quick=args.quick, progress=progress)
    progress.flush()
    if args.json:
        result.to_json(args.json)
    command = COMMAND + (" --quick" if args.quick else "") + (f" --backends {args.backends}" if args.backends else "")
    block = to_markdown(result, title="Matrix", command=command)
    path = Path(args.docs)
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + START + "\n" + block + "\n" + END + rest.split(END, 1)[1]
    else:
        text = text + ("\n" if text else "") + START + "\n" + block + "\n" + END + "\n"
    path.write_text(text)
    print(f"wrote {path}: {dict(result.totals())}")
    return 0


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
