"""lse-dispatch conformance: run the suite from the command line.

Exits 0 when nothing failed unexpectedly, 1 when something did, 2 on a usage
error.  A progress line goes to stderr on a terminal only; the results (one
line per implementation and target, each unexpected failure with a command
that re-runs it, the totals) go to stdout; --json and --markdown write
reports.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections import Counter

__all__ = ["main"]

IMPL_HELP = """\
what to test; repeatable.  Built in: ours (default), scipy, torch, jax, cupy,
anchors (those of scipy, torch, jax, cupy that are installed).  Your own
functions: 'mymod' (its logsumexp, softmax and log_softmax, whichever it has),
'mymod:f,mymod:g,mymod:h' (positional: logsumexp, softmax, log_softmax; give
one or two for a prefix, e.g. 'mymod:f' is logsumexp only) or
'softmax=mymod:g,log_softmax=mymod:h' (named: any subset).  Modules are found
as python -m finds them: the current folder first."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lse-dispatch conformance",
        description="Run the conformance suite: accuracy, overflow, special values, API, metadata, "
        "invariants, laziness, differentiation and input safety, on every installed backend and device.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each unexpected failure is printed with a command that runs exactly that check again.",
    )
    parser.add_argument("--impl", action="append", metavar="IMPL", help=IMPL_HELP)
    parser.add_argument("--name", help="label for your --impl (also the stem of its xfail file)")
    parser.add_argument("--xfail", metavar="TOML", help="expected-failures file (overrides the implementation's own)")
    parser.add_argument("--backends", help="comma-separated patterns: numpy, numpy:readonly, torch:cpu, "
                                           "array_api_strict:device1, ... (default: $LSE_CONFORMANCE_BACKENDS or all)")
    parser.add_argument("--device", help="device patterns: cpu, cuda, gpu, device1 (default: $LSE_CONFORMANCE_DEVICE)")
    parser.add_argument("--family", action="append", help="run only this family; repeatable")
    parser.add_argument("--check", action="append", metavar="PATTERN", help="run only check ids matching; repeatable")
    parser.add_argument("--dtype", action="append", help="run only this dtype; repeatable")
    parser.add_argument("--quick", action="store_true", help="skip the 2**20-entry checks, 10 hypothesis examples")
    parser.add_argument("--max-examples", type=int, help="hypothesis examples per invariant check")
    parser.add_argument("--json", metavar="PATH", help="write the JSON report here")
    parser.add_argument("--markdown", metavar="PATH", help="write the Markdown report here")
    parser.add_argument("--list", action="store_true", help="list the targets and checks, run nothing")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line, even on a terminal")
    return parser


def _impls(args) -> list:
    """The implementations named by ``--impl`` (loaded: errors surface here)."""
    from ._impls import BUILTIN, load

    chosen = []
    for value in args.impl or ["ours"]:
        if value == "anchors":
            names = [n for n in ("scipy", "torch", "jax", "cupy") if importlib.util.find_spec(n) is not None]
            chosen += [load(n, xfail=args.xfail) for n in names]
        elif value in BUILTIN:
            chosen.append(load(value, xfail=args.xfail))
        else:
            chosen.append(load(value, name=args.name, xfail=args.xfail))
    return chosen


class _Display:
    """Feeds the progress line from the runner's events."""

    def __init__(self, progress) -> None:
        self.progress = progress

    def __call__(self, event: dict) -> None:
        job = event["job"]
        self.progress.total = event["total"]
        self.progress.step(f"{job.impl.name} {job.target.label} {job.check.id} {job.dtype}")


def _summary(result) -> list[str]:
    lines = []
    for (impl, target), counts in _by_target(result).items():
        lines.append(f"{impl:<10} {target:<28} " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for impl in result.implementations:
        missing = [op for op in ("logsumexp", "softmax", "log_softmax") if op not in impl.get("functions", [])]
        if missing:
            lines.append(f"{impl['name']}: no {', '.join(missing)}: their checks did not run")
    if importlib.util.find_spec("hypothesis") is None and any(r.family == "invariants" for r in result.records):
        lines.append("hypothesis is not installed: invariants ran seeded random examples without shrinking")
    for record in result.failures():
        lines += [f"FAIL {record.impl} {record.target} {record.check} {record.dtype}: {record.detail[:300]}",
                  f"  rerun: {record.rerun}"]
    return lines


def _by_target(result) -> dict:
    table: dict[tuple[str, str], Counter] = {}
    for record in result.records:
        table.setdefault((record.impl, record.target), Counter())[record.status] += 1
    return table


def _list(targets) -> int:
    from ._registry import registry

    print("targets: " + ", ".join(f"{t.label} ({'/'.join(t.dtypes)})" for t in targets))
    for check in registry():
        print(f"{check.id:<52} {check.family:<16} {check.what}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # SciPy reads SCIPY_ARRAY_API once, at import: set it before anything imports SciPy.
    os.environ.setdefault("SCIPY_ARRAY_API", "1")
    args = _parser().parse_args(argv)
    from lse_dispatch._progress import Progress

    from . import _runner
    from ._targets import select

    try:
        targets = select(args.backends, args.device)
        impls = _impls(args)
        if args.list:
            return _list(targets)
        with Progress(0, "conformance", enabled=False if args.quiet else None) as progress:
            result = _runner.run(impls, backends=args.backends, device=args.device, families=args.family,
                                 checks=args.check, dtypes=args.dtype, quick=args.quick,
                                 max_examples=args.max_examples, xfail=args.xfail, progress=_Display(progress))
    except (ValueError, ImportError, RuntimeError) as exc:
        print(f"lse-dispatch conformance: {exc}", file=sys.stderr)
        return 2
    if args.json:
        result.to_json(args.json)
    if args.markdown:
        result.to_markdown(args.markdown)
    print("\n".join(_summary(result)))
    totals = result.totals()
    print(", ".join(f"{n} {s}" for s, n in sorted(totals.items())) + f" in {result.seconds:.1f} s"
          + ("" if result.ok else f"; {totals['fail']} unexpected failure(s)"))
    return 0 if result.ok else 1
