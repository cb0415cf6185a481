"""``lse-dispatch report``: check every installed backend against the oracle.

For each installed backend, each of its devices and each dtype it offers, run
the three functions on the built-in catalogue (:mod:`lse_dispatch.cases`) and
compare with the mpmath oracle or the contract's stated values.  Prints one
row per (backend, device, dtype) and exits 1 on any deviation.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import backends, cases
from ._api import log_softmax, logsumexp, softmax

__all__ = ["Row", "main", "run_report"]

FUNCTIONS = {"logsumexp": logsumexp, "softmax": softmax, "log_softmax": log_softmax}


@dataclass
class Row:
    """The outcome on one backend, device and dtype."""

    backend: str
    device: str
    dtype: str
    checked: int = 0
    worst_ulps: float = 0.0
    special_passed: int = 0
    special_total: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _to_numpy(spec, result):
    if isinstance(result, tuple):
        return tuple(np.asarray(spec.to_numpy(r), dtype=np.float64) for r in result)
    return np.asarray(spec.to_numpy(result), dtype=np.float64)


def _check_one(spec, device, dtype: str, case: cases.Case, row: Row) -> None:
    inputs = cases.inputs(case, dtype)
    args = {}
    for name, value in inputs.items():
        if name == "where":
            args[name] = spec.namespace().asarray(value, device=device.device)
        else:
            args[name] = spec.from_numpy(value, dtype, device)
    first = args.pop("a")
    start = time.perf_counter()
    try:
        result = FUNCTIONS[case.op](first, **args, **case.kwargs)
        got = _to_numpy(spec, result)
    except Exception as exc:  # a crash is a deviation, reported, not raised
        row.failures.append(f"{case.id}: raised {type(exc).__name__}: {exc}")
        return
    finally:
        row.seconds += time.perf_counter() - start
    verdict = cases.evaluate(case, dtype, inputs, got)
    row.checked += 1
    if case.family == "special-values":
        row.special_total += 1
        row.special_passed += verdict.passed
    else:
        row.worst_ulps = max(row.worst_ulps, verdict.worst_ulps)
    if not verdict.passed:
        row.failures.append(f"{case.id}: {verdict.detail}")


def run_report(
    names: list[str] | None = None, *, devices: list[str] | None = None, long_cases: bool = True, progress=None
) -> list[Row]:
    """Run the catalogue on the named (default: all installed) backends and devices."""
    specs = backends.installed() if names is None else [backends.get(n) for n in names]
    rows: list[Row] = []
    for spec in specs:
        if spec.name == "jax":
            import jax

            # float64 needs x64; float32 results are unaffected by it.
            jax.config.update("jax_enable_x64", True)
        for device in spec.devices():
            if devices is not None and device.label not in devices:
                continue
            for dtype in spec.dtypes:
                row = Row(spec.name, device.label, dtype)
                for case in cases.cases(dtype=dtype):
                    if not long_cases and case.id.startswith("accuracy/long-"):
                        continue
                    _check_one(spec, device, dtype, case, row)
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def _format(rows: list[Row]) -> str:
    header = "| backend | device | dtype | checks | worst error (ulps) | special-value rows | time (s) | result |"
    lines = [header, "|---|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(
            f"| {row.backend} | {row.device} | {row.dtype} | {row.checked} | {row.worst_ulps:.2f} | "
            f"{row.special_passed}/{row.special_total} | {row.seconds:.2f} | {'ok' if row.ok else 'FAIL'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lse-dispatch report", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", help="comma-separated backends (default: every installed one)")
    parser.add_argument("--devices", help="comma-separated device labels, e.g. cuda,gpu (default: all)")
    parser.add_argument("--quick", action="store_true", help="skip the 2**20-entry accuracy cases")
    options = parser.parse_args(argv)
    names = options.backends.split(",") if options.backends else None

    def progress(row: Row) -> None:
        print(f"  {row.backend:>16} {row.device:<10} {row.dtype:<8} {'ok' if row.ok else 'FAIL'}", file=sys.stderr)

    print(f"checking {len(cases.CASES)} catalogue cases per dtype against the mpmath oracle", file=sys.stderr)
    devices = options.devices.split(",") if options.devices else None
    rows = run_report(names, devices=devices, long_cases=not options.quick, progress=progress)
    print(_format(rows))
    failures = [(row, failure) for row in rows for failure in row.failures]
    for row, failure in failures:
        print(f"DEVIATION {row.backend}/{row.device}/{row.dtype}: {failure}")
    worst = max((row.worst_ulps for row in rows if row.dtype in ("float32", "float64")), default=0.0)
    print(
        f"\n{len(rows)} backend/device/dtype combinations, worst float32/float64 error {worst:.2f} ulps "
        f"(budget {cases.ULP_BUDGET['float64']:.0f}), {len(failures)} deviations"
    )
    return 1 if failures else 0
