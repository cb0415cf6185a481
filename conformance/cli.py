"""``lse-dispatch conformance``: run the suite from the command line.

Exits 0 when nothing failed unexpectedly, 1 when something did, 2 on a usage
error.  Progress goes to stderr; ``--json`` and ``--markdown`` write reports.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lse-dispatch conformance",
        description="Run the conformance suite: accuracy, overflow, special values, API, metadata, "
        "invariants, laziness, differentiation and input safety, on every installed backend and device.",
    )
    parser.add_argument("--impl", action="append", metavar="IMPL",
                        help="ours (default), scipy, torch, jax, cupy, 'anchors' (the installed ones of "
                             "scipy, torch, jax, cupy), or mod:logsumexp,mod:softmax,mod:log_softmax; repeatable")
    parser.add_argument("--name", help="label for a --impl triple (also the stem of its xfail file)")
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
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    return parser


class Progress:
    """A one-line counter on a terminal; one summary line per target otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.current = None
        self.counts: dict[str, int] = {}
        self.started = time.perf_counter()

    def __call__(self, event: dict) -> None:
        record = event["record"]
        key = (record.impl, record.target)
        if key != self.current:
            self.flush()
            self.current, self.counts, self.started = key, {}, time.perf_counter()
        self.counts[record.status] = self.counts.get(record.status, 0) + 1
        if self.tty:
            text = f"[{event['done']:>5}/{event['total']}] {record.impl} {record.target} {record.check} {record.dtype}"
            self.stream.write("\r" + text[:110].ljust(110))
            self.stream.flush()
        if record.status == "fail":
            self.stream.write(("\n" if self.tty else "") + f"FAIL {record.impl} {record.target} {record.check} "
                              f"{record.dtype}: {record.detail[:200]}\n")

    def flush(self) -> None:
        if self.current is None:
            return
        summary = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
        prefix = "\r" if self.tty else ""
        self.stream.write(f"{prefix}{self.current[0]:<8} {self.current[1]:<28} {summary} "
                          f"({time.perf_counter() - self.started:.1f} s)".ljust(110 if self.tty else 0) + "\n")
        self.stream.flush()
        self.current = None


def _impls(args) -> list:
    from ._impls import BUILTIN

    chosen = []
    for value in args.impl or ["ours"]:
        if value == "anchors":
            for name in ("scipy", "torch", "jax", "cupy"):
                try:
                    chosen.append(BUILTIN[name]())
                except ImportError:
                    continue
        else:
            chosen.append(value)
    if args.name or args.xfail:
        from ._impls import load

        chosen = [load(c, name=args.name, xfail=args.xfail) if not isinstance(c, str) or c not in BUILTIN or args.xfail
                  else c for c in chosen]
    return chosen


def main(argv: list[str] | None = None) -> int:
    # SciPy reads SCIPY_ARRAY_API once, at import: set it before anything imports SciPy.
    os.environ.setdefault("SCIPY_ARRAY_API", "1")
    args = _parser().parse_args(argv)
    from . import _runner
    from ._checks import registry
    from ._targets import select

    try:
        targets = select(args.backends, args.device)
        impls = _impls(args)
    except (ValueError, ImportError, RuntimeError, AttributeError) as exc:
        print(f"lse-dispatch conformance: {exc}", file=sys.stderr)
        return 2
    if args.list:
        print("targets: " + ", ".join(f"{t.label} ({'/'.join(t.dtypes)})" for t in targets))
        for check in registry():
            print(f"{check.id:<52} {check.family:<16} {check.what}")
        return 0
    progress = None if args.quiet else Progress()
    try:
        result = _runner.run(impls, backends=args.backends, device=args.device, families=args.family,
                             checks=args.check, dtypes=args.dtype, quick=args.quick,
                             max_examples=args.max_examples, progress=progress)
    except (ValueError, ImportError, RuntimeError) as exc:
        print(f"lse-dispatch conformance: {exc}", file=sys.stderr)
        return 2
    if progress is not None:
        progress.flush()
    if args.json:
        result.to_json(args.json)
    if args.markdown:
        result.to_markdown(args.markdown)
    totals = result.totals()
    print(", ".join(f"{n} {s}" for s, n in sorted(totals.items())) + f" in {result.seconds:.1f} s"
          + ("" if result.ok else f"; {totals['fail']} unexpected failure(s)"))
    return 0 if result.ok else 1
