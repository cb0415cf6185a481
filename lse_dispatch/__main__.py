"""The lse-dispatch command: report, conformance and bench.

Each subcommand lives in its own module and is imported only when run.
``bench`` is maintainer tooling: it lives in ``benchmarks/bench.py`` of a
source checkout, not in the installed package, and is loaded from there.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["main"]

#: subcommand -> (module, one-line help); a module path ending in .py is a
#: file of the source checkout.
SUBCOMMANDS = {
    "report": ("lse_dispatch._report", "check every installed backend against the mpmath oracle"),
    "conformance": ("lse_dispatch.conformance.cli", "run the conformance suite against an implementation"),
    "bench": ("benchmarks/bench.py", "time lse_dispatch against the native functions (needs a source checkout)"),
}

BENCH_MISSING = (
    "lse-dispatch bench: the benchmark is maintainer tooling and is not part of the installed package; "
    "run it from a source checkout (bash scripts/dev.sh bench, or lse-dispatch bench inside the checkout)"
)


def _version() -> str:
    from . import __version__

    return __version__


def _usage() -> str:
    lines = ["usage: lse-dispatch [--version] {" + ",".join(SUBCOMMANDS) + "} [options]", ""]
    lines += [f"  {name:<12} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "lse-dispatch SUBCOMMAND --help shows a subcommand's options."]
    return "\n".join(lines)


def checkout_file(relative: str) -> Path | None:
    """``relative`` in the source checkout this package runs from (an
    editable install), else in the current folder; ``None`` if in neither."""
    here = Path(__file__).resolve().parent.parent
    for root in (here, Path.cwd()):
        candidate = root / relative
        if candidate.is_file() and (root / "pyproject.toml").is_file():
            return candidate
    return None


def load_checkout_module(relative: str):
    """Import a file of the source checkout as a module (``None`` if absent)."""
    path = checkout_file(relative)
    if path is None:
        return None
    name = "_lse_dispatch_" + Path(relative).stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def _unknown(word: str) -> str:
    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"lse-dispatch: unknown subcommand {word!r}{hint} (choose from {', '.join(SUBCOMMANDS)})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"lse-dispatch {_version()}")
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(_unknown(argv[0]), file=sys.stderr)
        return 2
    target = SUBCOMMANDS[argv[0]][0]
    if target.endswith(".py"):
        module = load_checkout_module(target)
        if module is None:
            print(BENCH_MISSING, file=sys.stderr)
            return 2
    else:
        module = importlib.import_module(target)
    try:
        return int(module.main(argv[1:]) or 0)
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        # Python flushes stdout at exit; point it at devnull so that the
        # closed pipe raises no second error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
