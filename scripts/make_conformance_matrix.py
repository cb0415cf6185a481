"""Regenerate the conformance matrix in docs/conformance.md (maintainer tooling).

    python scripts/make_conformance_matrix.py [--docs PATH] [--json PATH] [--quick] [--backends PATTERNS]

Runs ours and every installed anchor (scipy, torch, jax, cupy) on every
installed backend and device, and replaces the text between the markers
``<!-- conformance-matrix:start -->`` and ``<!-- conformance-matrix:end -->``.
The default --docs is docs/conformance.md of the checkout this file is in,
whatever the current folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

START, END = "<!-- conformance-matrix:start -->", "<!-- conformance-matrix:end -->"
COMMAND = "python scripts/make_conformance_matrix.py"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"


def replace_block(text: str, block: str) -> str:
    """``text`` with the marked block replaced (appended when there is none)."""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        return head + START + "\n" + block + "\n" + END + rest.split(END, 1)[1]
    return text + ("\n" if text else "") + START + "\n" + block + "\n" + END + "\n"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("SCIPY_ARRAY_API", "1")
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default=str(DOCS), help="the Markdown file to update (default: %(default)s)")
    parser.add_argument("--json", help="also write the full JSON report here")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backends")
    args = parser.parse_args(argv)
    from lse_dispatch.conformance import run
    from lse_dispatch.conformance._report import to_markdown

    impls = ["ours"] + [i for i in ("scipy", "torch", "jax", "cupy") if importlib.util.find_spec(i) is not None]
    result = run(impls, backends=args.backends, quick=args.quick)
    if args.json:
        result.to_json(args.json)
    command = COMMAND + (" --quick" if args.quick else "") + (f" --backends {args.backends}" if args.backends else "")
    path = Path(args.docs)
    path.write_text(replace_block(path.read_text() if path.exists() else "", to_markdown(result, title="Matrix",
                                                                                       command=command)))
    print(f"wrote {path}: {dict(result.totals())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
