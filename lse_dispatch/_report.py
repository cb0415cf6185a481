"""lse-dispatch report: check every installed backend against the oracle.

For each installed backend, each of its devices and each dtype it offers, run
the three functions on the built-in catalogue (lse_dispatch.cases) and
compare with the mpmath oracle or the contract's stated values.  Prints one
row per (backend, device, dtype) and exits 1 on any deviation, 2 on a usage
error.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

from . import backends, cases
from ._progress import Progress
from .backends._target import Target

__all__ = ["Row", "main", "run_report"]


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


class UsageError(ValueError):
    """A backend or device that cannot be checked here (one line, exit 2)."""


def _check_one(target: Target, dtype: str, case: cases.Case, row: Row) -> None:
    start = time.perf_counter()
    try:
        verdict = cases.run_case(case, dtype, target)
    except Exception as exc:  # a crash is a deviation, reported, not raised
        row.failures.append(f"{case.id}: raised {type(exc).__name__}: {exc}")
        return
    finally:
        row.seconds += time.perf_counter() - start
    row.checked += 1
    if case.family == "special-values":
        row.special_total += 1
        row.special_passed += verdict.passed
    else:
        row.worst_ulps = max(row.worst_ulps, verdict.worst_ulps)
    if not verdict.passed:
        row.failures.append(f"{case.id}: {verdict.detail}")


def targets(names: list[str] | None = None, devices: list[str] | None = None) -> list[Target]:
    """One target per backend and device; JAX with x64 on (float64 needs it;
    float32 results are unaffected by it).  Raises :class:`UsageError` for an
    unknown or uninstalled backend and for devices that match nothing."""
    if names is None:
        specs = backends.installed()
    else:
        specs = []
        for name in names:
            try:
                spec = backends.get(name)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            if not spec.installed():
                installed = ", ".join(s.name for s in backends.installed())
                raise UsageError(f"backend {name!r} is not installed here (installed: {installed})")
            specs.append(spec)
    found = [
        Target(spec, device, x64=True if spec.name == "jax" else None)
        for spec in specs
        for device in spec.devices()
        if devices is None or device.label in devices
    ]
    if not found:
        raise UsageError(f"no installed backend has a device {', '.join(devices or [])}")
    return found


def _plan(target: Target, long_cases: bool) -> list[tuple[str, cases.Case]]:
    dtypes = [d for d in target.spec.dtypes if d in target.dtypes]  # the backend's own order
    return [
        (dtype, case)
        for dtype in dtypes
        for case in cases.CASES
        if cases.applies(case, dtype, target) is None and (long_cases or not case.id.startswith("accuracy/long-"))
    ]


def run_report(
    names: list[str] | None = None, *, devices: list[str] | None = None, long_cases: bool = True,
    progress: Progress | None = None,
) -> list[Row]:
    """Run the catalogue on the named (default: all installed) backends and devices."""
    chosen = targets(names, devices)
    plans = [(target, _plan(target, long_cases)) for target in chosen]
    if progress is not None:
        progress.total = sum(len(plan) for _, plan in plans)
    rows: list[Row] = []
    for target, plan in plans:
        with target.scope():
            by_dtype: dict[str, Row] = {}
            for dtype, case in plan:
                row = by_dtype.setdefault(dtype, Row(target.name, target.device.label, dtype))
                if progress is not None:
                    progress.step(f"{target.label} {dtype} {case.id}")
                _check_one(target, dtype, case, row)
        rows.extend(by_dtype.values())
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lse-dispatch report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", help="comma-separated backends (default: every installed one): "
                        + ", ".join(backends.BUILTIN))
    parser.add_argument("--devices", help="comma-separated device labels, e.g. cpu,cuda,gpu (default: all)")
    parser.add_argument("--quick", action="store_true", help="skip the 2**20-entry accuracy cases")
    return parser


def main(argv: list[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    names = [n.strip() for n in options.backends.split(",") if n.strip()] if options.backends else None
    devices = [d.strip() for d in options.devices.split(",") if d.strip()] if options.devices else None
    try:
        with Progress(0, "report") as progress:
            rows = run_report(names, devices=devices, long_cases=not options.quick, progress=progress)
    except UsageError as exc:
        print(f"lse-dispatch report: {exc}", file=sys.stderr)
        return 2
    print(_format(rows))
    failures = [(row, failure) for row in rows for failure in row.failures]
    for row, failure in failures:
        print(f"DEVIATION {row.backend}/{row.device}/{row.dtype}: {failure}")
    worst = max((row.worst_ulps for row in rows if row.dtype in ("float32", "float64")), default=0.0)
    print(
        f"\n{len(rows)} backend/device/dtype combinations, {len(cases.CASES)} catalogue cases, worst "
        f"float32/float64 error {worst:.2f} ulps (budget {cases.ULP_BUDGET['float64']:.0f}), "
        f"{len(failures)} deviations"
    )
    return 1 if failures else 0
