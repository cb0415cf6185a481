"""``lse-dispatch bench``: lse_dispatch against each backend's own functions.

Every implementation of a case is timed in the same run, interleaved round
robin (so that load from other processes hits all of them alike), and
reported as the median.  The speed targets of the dispatch issue are printed
as met or missed with the measured ratio; results go to ``bench.json`` and a
plot of time against size to ``bench.png`` in ``--out``.

Usage::

    lse-dispatch bench [--quick] [--out DIR] [--repeats N] [--only numpy,torch,jax]
    lse-dispatch bench --render DIR/bench.json     # Markdown tables of a run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["main"]

OPS = ("logsumexp", "softmax", "log_softmax")


@dataclass(frozen=True)
class Case:
    label: str
    shape: tuple[int, ...]
    axis: int | None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def tiny(self) -> bool:
        return self.size <= 16


FULL_CASES = (
    Case("(4096, 4096) axis -1", (4096, 4096), -1),
    Case("(4096, 4096) axis 0", (4096, 4096), 0),
    Case("(10^7,)", (10**7,), None),
    Case("(64, 1000) axis -1", (64, 1000), -1),
    Case("(10,)", (10,), -1),
)
QUICK_CASES = (
    Case("(128, 128) axis -1", (128, 128), -1),
    Case("(128, 128) axis 0", (128, 128), 0),
    Case("(10,)", (10,), -1),
)

# Targets of the dispatch issue: (group, what is compared, limit).
MEMORY_TARGET_BYTES = 64 * 2**20


@dataclass
class Timing:
    op: str
    case: str
    size: int
    group: str
    implementation: str
    median_s: float
    samples: int
    peak_extra_bytes: int | None = None
    cpu_median_s: float | None = None  # process CPU time: less sensitive to other load


@dataclass
class Target:
    name: str
    op: str
    case: str
    measured: float
    limit: float
    unit: str
    met: bool
    detail: str = ""


@dataclass
class Report:
    command: str
    quick: bool
    machine: dict
    versions: dict
    timings: list[Timing] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Implementations: name -> (group, make(x_numpy, axis) -> callable or None)


def _numpy_implementations(op: str, case: Case):
    import lse_dispatch

    fn = getattr(lse_dispatch, op)
    axis = case.axis

    def shift_by_max(x):
        m = np.max(x, axis=axis, keepdims=True)
        e = np.exp(x - m)
        total = np.sum(e, axis=axis, keepdims=True)
        if op == "softmax":
            return e / total
        if op == "log_softmax":
            return x - m - np.log(total)
        return np.squeeze(m + np.log(total), axis=axis)

    impls = {
        "lse_dispatch (auto)": lambda x: fn(x, axis=axis),
        "lse_dispatch (generic)": lambda x: fn(x, axis=axis, backend="generic"),
        "bare np.exp": np.exp,
        "NumPy shift-by-max": shift_by_max,
    }
    try:
        import scipy.special as special

        scipy_fn = getattr(special, op)
        impls["scipy.special"] = lambda x: scipy_fn(x, axis=axis)
    except ImportError:
        pass
    return {name: (lambda data: data, call) for name, call in impls.items()}


def _torch_implementations(op: str, case: Case):
    try:
        import torch
    except ImportError:
        return {}
    import lse_dispatch

    fn = getattr(lse_dispatch, op)
    axis = case.axis
    dim = -1 if axis is None else axis  # the 1-D cases
    native = {"logsumexp": torch.logsumexp, "softmax": torch.softmax, "log_softmax": torch.log_softmax}[op]
    convert = lambda data: torch.from_numpy(data)  # noqa: E731  (shares memory)
    return {
        "lse_dispatch (auto)": (convert, lambda x: fn(x, axis=axis)),
        f"torch.{op}": (convert, lambda x: native(x, dim)),
    }


def _jax_implementations(op: str, case: Case):
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return {}
    import lse_dispatch

    fn = getattr(lse_dispatch, op)
    axis = case.axis
    native = getattr(jax.nn, op)
    ours_jit = jax.jit(lambda x: fn(x, axis=axis))
    native_jit = jax.jit(lambda x: native(x, axis=axis))

    def ready(call):
        return lambda x: jax.block_until_ready(call(x))

    convert = lambda data: jax.device_put(jnp.asarray(data))  # noqa: E731
    return {
        "lse_dispatch (eager, jax.jit kernel)": (convert, ready(lambda x: fn(x, axis=axis))),
        "jax.jit(lse_dispatch)": (convert, ready(ours_jit)),
        f"jax.jit(jax.nn.{op})": (convert, ready(native_jit)),
    }


GROUPS: dict[str, Callable] = {
    "numpy": _numpy_implementations,
    "torch": _torch_implementations,
    "jax": _jax_implementations,
}


# ---------------------------------------------------------------------------
# Timing


def _calls_per_sample(call, arg, floor_s: float) -> int:
    """How many calls make one sample last at least ``floor_s``."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            call(arg)
        elapsed = time.perf_counter() - start
        if elapsed >= floor_s or number >= 1 << 16:
            return number
        number *= 2 if elapsed <= 0 else max(2, min(10, int(floor_s / elapsed) + 1))


def _time_interleaved(calls: dict, repeats: int, floor_s: float) -> dict[str, tuple[float, int, float]]:
    """Median wall and CPU seconds per call of each entry, sampled round robin."""
    numbers = {name: _calls_per_sample(call, arg, floor_s) for name, (call, arg) in calls.items()}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(repeats):
        # Rotate the order so that no implementation always runs first.
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            call, arg = calls[name]
            number = numbers[name]
            cpu, start = time.process_time(), time.perf_counter()
            for _ in range(number):
                call(arg)
            samples[name].append(((time.perf_counter() - start) / number, (time.process_time() - cpu) / number))
    return {
        name: (statistics.median(w for w, _ in values), len(values), statistics.median(c for _, c in values))
        for name, values in samples.items()
    }


def _peak_extra(call, arg) -> int:
    """Peak bytes NumPy allocates during one call, as tracemalloc sees them."""
    gc.collect()
    tracemalloc.start()
    try:
        result = call(arg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak


# ---------------------------------------------------------------------------
# Targets


def _ratio_target(report, name, op, case, numerator, denominator, limit, *, group, above=False):
    times = {(t.group, t.implementation): t.median_s for t in report.timings if t.op == op and t.case == case.label}
    if (group, numerator) not in times or (group, denominator) not in times:
        return
    cpu = {(t.group, t.implementation): t.cpu_median_s for t in report.timings if t.op == op and t.case == case.label}
    top, bottom = (denominator, numerator) if above else (numerator, denominator)
    ratio = times[(group, top)] / times[(group, bottom)]
    met = ratio >= limit if above else ratio <= limit
    cpu_ratio = cpu[(group, top)] / cpu[(group, bottom)] if cpu[(group, bottom)] else math.nan
    detail = f"{top} / {bottom}; CPU-time ratio {cpu_ratio:.2f}"
    report.targets.append(Target(name, op, case.label, ratio, limit, "x", met, detail))


def _targets(report: Report, cases) -> None:
    for case in cases:
        for op in OPS:
            if case.tiny:
                times = {(t.group, t.implementation): t for t in report.timings
                         if t.op == op and t.case == case.label}
                ours, plain = times.get(("numpy", "lse_dispatch (auto)")), times.get(("numpy", "NumPy shift-by-max"))
                if ours and plain:
                    overhead_us = (ours.median_s - plain.median_s) * 1e6
                    report.targets.append(Target(
                        "numpy tiny: dispatch overhead", op, case.label, overhead_us, 10.0, "us",
                        overhead_us <= 10.0, "lse_dispatch (auto) - NumPy shift-by-max"))
                _ratio_target(report, "torch tiny: <= 3x torch's own", op, case,
                              "lse_dispatch (auto)", f"torch.{op}", 3.0, group="torch")
                continue
            _ratio_target(report, "numpy: <= 1.5x bare np.exp", op, case,
                          "lse_dispatch (auto)", "bare np.exp", 1.5, group="numpy")
            _ratio_target(report, "numpy: >= 3x faster than SciPy", op, case,
                          "lse_dispatch (auto)", "scipy.special", 3.0, group="numpy", above=True)
            _ratio_target(report, "torch CPU: <= 1.25x torch's own", op, case,
                          "lse_dispatch (auto)", f"torch.{op}", 1.25, group="torch")
            _ratio_target(report, "jax jit: <= 1.25x jax.nn", op, case,
                          "jax.jit(lse_dispatch)", f"jax.jit(jax.nn.{op})", 1.25, group="jax")
            input_bytes = case.size * 4
            if input_bytes >= MEMORY_TARGET_BYTES:
                for t in report.timings:
                    if (t.op, t.case, t.group, t.implementation) == (op, case.label, "numpy", "lse_dispatch (auto)"):
                        extra = t.peak_extra_bytes - (input_bytes if op != "logsumexp" else 0)
                        fraction = extra / input_bytes
                        report.targets.append(Target(
                            "numpy: peak extra memory <= 10% of the input", op, case.label,
                            100 * fraction, 10.0, "%", fraction <= 0.10,
                            "beyond the output" if op != "logsumexp" else ""))


# ---------------------------------------------------------------------------
# Output


def _print_report(report: Report, out) -> None:
    print(f"lse-dispatch bench ({'quick' if report.quick else 'full'}), float32: median wall time per call "
          "(targets), ratio to the group's reference, median process CPU time", file=out)
    print(f"machine: {report.machine}", file=out)
    print(f"versions: {report.versions}", file=out)
    cases = list(dict.fromkeys(t.case for t in report.timings))
    reference = {"numpy": "bare np.exp", "torch": "torch.", "jax": "jax.jit(jax.nn."}
    for case in cases:
        for op in OPS:
            rows = [t for t in report.timings if t.case == case and t.op == op]
            if not rows:
                continue
            print(f"\n{op}  {case}", file=out)
            for group in GROUPS:
                members = [t for t in rows if t.group == group]
                base = next((t for t in members if t.implementation.startswith(reference[group])), None)
                for t in members:
                    ratio = f"{t.median_s / base.median_s:6.2f}x" if base else "      "
                    memory = ""
                    if t.peak_extra_bytes is not None:
                        memory = f"  peak {t.peak_extra_bytes / (t.size * 4):6.2f}x input"
                    cpu = f"  cpu {_format_time(t.cpu_median_s):>10}" if t.cpu_median_s is not None else ""
                    print(f"  {group:<6} {t.implementation:<38} {_format_time(t.median_s):>10}  {ratio}{cpu}{memory}",
                          file=out)
    print("\ntargets:", file=out)
    for target in report.targets:
        mark = "met   " if target.met else "MISSED"
        relation = ">=" if "faster" in target.name else "<="
        print(f"  {mark} {target.name:<46} {target.op:<12} {target.case:<22} "
              f"{target.measured:8.2f} {target.unit} ({relation} {target.limit:g}) {target.detail}", file=out)
    met = sum(t.met for t in report.targets)
    print(f"\n{met} of {len(report.targets)} targets met", file=out)


def _format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def _plot(report: Report, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(OPS), figsize=(6 * len(OPS), 5), sharey=True)
    for ax, op in zip(axes, OPS):
        series: dict[str, list[tuple[int, float, bool]]] = {}
        for t in report.timings:
            if t.op == op:
                series.setdefault(f"{t.group}: {t.implementation}", []).append(
                    (t.size, t.median_s, "axis 0" in t.case))
        for label, points in sorted(series.items()):
            line = sorted((s, v) for s, v, axis0 in points if not axis0)
            (handle,) = ax.plot([s for s, _ in line], [v for _, v in line], marker="o", label=label)
            extra = [(s, v) for s, v, axis0 in points if axis0]
            if extra:
                ax.plot([s for s, _ in extra], [v for _, v in extra], marker="s", linestyle="none",
                        markerfacecolor="none", color=handle.get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("elements (float32); hollow squares: reduction along axis 0")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median seconds per call")
    axes[-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("lse-dispatch bench: " + ", ".join(f"{k} {v}" for k, v in report.machine.items()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _versions() -> dict:
    import lse_dispatch

    found = {"lse_dispatch": lse_dispatch.__version__, "numpy": np.__version__}
    for name in ("scipy", "torch", "jax"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    return found


def _machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.machine()}
    if hasattr(os, "getloadavg"):
        # Other processes share the CPUs: the 1-minute load says how much.
        info["load average at start"] = round(os.getloadavg()[0], 2)
    try:
        import torch

        info["torch threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def render_markdown(data: dict) -> str:
    """Markdown tables (timings, targets) of a ``bench.json`` document."""
    lines = [f"Command: `{data['command'].strip()}`; machine: "
             + ", ".join(f"{k} {v}" for k, v in data["machine"].items())
             + "; versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".", ""]
    reference = {"numpy": "bare np.exp", "torch": "torch.", "jax": "jax.jit(jax.nn."}
    lines += ["| op | case | backend | implementation | median | ratio | CPU time | peak extra (x input) |",
              "|---|---|---|---|---|---|---|---|"]
    for t in data["timings"]:
        base = next((u for u in data["timings"] if (u["op"], u["case"], u["group"]) == (t["op"], t["case"], t["group"])
                     and u["implementation"].startswith(reference[t["group"]])), None)
        ratio = f"{t['median_s'] / base['median_s']:.2f}x" if base else ""
        peak = f"{t['peak_extra_bytes'] / (t['size'] * 4):.2f}" if t["peak_extra_bytes"] is not None else ""
        cpu = _format_time(t["cpu_median_s"]) if t.get("cpu_median_s") is not None else ""
        lines.append(f"| {t['op']} | {t['case']} | {t['group']} | {t['implementation']} | "
                     f"{_format_time(t['median_s'])} | {ratio} | {cpu} | {peak} |")
    lines += ["", "| target | op | case | measured | limit | verdict | compared |", "|---|---|---|---|---|---|---|"]
    for t in data["targets"]:
        relation = ">=" if "faster" in t["name"] else "<="
        verdict = "met" if t["met"] else "**missed**"
        lines.append(f"| {t['name']} | {t['op']} | {t['case']} | {t['measured']:.2f} {t['unit']} | "
                     f"{relation} {t['limit']:g} {t['unit']} | {verdict} | {t['detail']} |")
    met = sum(t["met"] for t in data["targets"])
    lines += ["", f"{met} of {len(data['targets'])} targets met."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lse-dispatch bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small cases, few repeats: a smoke test in seconds")
    parser.add_argument("--out", default="lse-dispatch-bench", help="directory for bench.json and bench.png")
    parser.add_argument("--repeats", type=int, default=None, help="samples per implementation (default 9, quick 3)")
    parser.add_argument("--only", default="numpy,torch,jax", help="comma-separated groups to run")
    parser.add_argument("--render", metavar="JSON", help="print an existing bench.json as Markdown tables and exit")
    args = parser.parse_args(argv)
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())), end="")
        return 0

    cases = QUICK_CASES if args.quick else FULL_CASES
    repeats = args.repeats or (2 if args.quick else 9)
    floor_s = 0.0005 if args.quick else 0.02
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown group(s) {', '.join(sorted(unknown))}; expected some of {', '.join(GROUPS)}")

    report = Report(
        command="lse-dispatch bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        quick=args.quick,
        machine=_machine(),
        versions=_versions(),
    )
    rng = np.random.default_rng(0)
    for case in cases:
        data = rng.standard_normal(case.shape, dtype=np.float32)
        for op in OPS:
            calls, owners = {}, {}
            for group in groups:
                for name, (convert, call) in GROUPS[group](op, case).items():
                    arg = convert(data)
                    call(arg)  # warm up: imports, jit compilation
                    calls[(group, name)] = (call, arg)
            medians = _time_interleaved(calls, repeats, floor_s)
            for (group, name), (median, count, cpu) in medians.items():
                peak = None
                if group == "numpy" and name != "lse_dispatch (generic)":
                    call, arg = calls[(group, name)]
                    peak = _peak_extra(call, arg)
                report.timings.append(Timing(op, case.label, case.size, group, name, median, count, peak, cpu))
            del calls, owners
            gc.collect()
    _targets(report, cases)
    if hasattr(os, "getloadavg"):
        report.machine["load average at end"] = round(os.getloadavg()[0], 2)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _print_report(report, sys.stdout)
    (out / "bench.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
    plotted = _plot(report, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}" if plotted else " (no matplotlib: no plot)"))
    return 0
