"""The ``lse-dispatch`` command: ``report``, ``bench`` and ``conformance``.

Each subcommand lives in its own module and is imported only when run.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "report": ("lse_dispatch._report", "check every installed backend against the mpmath oracle"),
    "bench": ("lse_dispatch._bench", "time lse_dispatch against each backend's native functions"),
    "conformance": ("lse_dispatch.conformance.cli", "run the conformance suite against an implementation"),
}


def _usage() -> str:
    lines = ["usage: lse-dispatch {" + ",".join(SUBCOMMANDS) + "} [options]", ""]
    lines += [f"  {name:<12} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
