"""lse-dispatch bench: lse_dispatch against the functions it replaces, judged by the speed targets.

Every implementation of a case is timed in the same process, interleaved
round robin (so that load from other processes hits all of them alike), and
reported as the median.  The targets of the fused-kernel issue (NumPy and
torch CPU) and of the JAX-in-jit issue are printed as met or missed with the
measured ratio, beside the thread counts and the load average.  The
lse_dispatch column times whatever kernel ``auto`` picks and names it (from
``lse_dispatch.trace``).  Results go to bench.json and a plot to bench.png
in --out.

Usage (from a source checkout; this file is not installed):

    lse-dispatch bench [--quick] [--out DIR] [--repeats N] [--only numpy,torch,jax] [--threads N]
    lse-dispatch bench --render DIR/bench.json     # Markdown tables of a run
    python benchmarks/bench.py ...                 # the same
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["main"]

OPS = ("logsumexp", "softmax", "log_softmax")
OURS = "lse_dispatch"


@dataclass(frozen=True)
class Case:
    """One input: ``role`` ties it to the targets (quick mode has smaller
    cases in the same roles); ``grad`` times forward plus backward."""

    label: str
    shape: tuple[int, ...]
    axis: int | None
    role: str
    dtype: str = "float32"
    grad: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


def _both(label, shape, axis, role):
    return (Case(label, shape, axis, role), Case(label + " fwd+bwd", shape, axis, role, grad=True))


_BIG, _LONG = (4096, 4096), (10**7,)
FULL_CASES = {
    "numpy": (
        Case("(4096, 4096) axis -1", _BIG, -1, "large"), Case("(4096, 4096) axis 0", _BIG, 0, "large"),
        Case("(10^7,)", _LONG, None, "large"), Case("(64, 1000) axis -1", (64, 1000), -1, "medium"),
        Case("(4096, 4096) axis -1 float64", _BIG, -1, "large64", "float64"),
        Case("(10^7,) float64", _LONG, None, "large64", "float64"),
        Case("(100, 3) axis -1 float64", (100, 3), -1, "small64", "float64"),
        Case("(200, 3) axis -1 float64", (200, 3), -1, "small64", "float64"),
        Case("(10,)", (10,), -1, "tiny"),
    ),
    "torch": (
        Case("(4096, 4096) axis -1", _BIG, -1, "large"), Case("(4096, 4096) axis 0", _BIG, 0, "large"),
        Case("(10^7,)", _LONG, None, "large"), Case("(64, 1000) axis -1", (64, 1000), -1, "medium"),
        *_both("(32, 4096) axis -1", (32, 4096), -1, "head"),
        *_both("(8, 128, 128) axis -1", (8, 128, 128), -1, "head"),
        Case("(10,)", (10,), -1, "tiny"),
    ),
    "jax": (
        *_both("(32, 4096) axis -1", (32, 4096), -1, "jit"), *_both("(4096, 4096) axis -1", _BIG, -1, "jit"),
        *_both("(8, 128, 128) axis -1", (8, 128, 128), -1, "jit"),
        *_both("(1024, 128) axis -1", (1024, 128), -1, "jit"),
    ),
}
QUICK_CASES = {
    "numpy": (
        Case("(128, 128) axis -1", (128, 128), -1, "large"), Case("(128, 128) axis 0", (128, 128), 0, "large"),
        Case("(16, 100) axis -1", (16, 100), -1, "medium"),
        Case("(128, 128) axis -1 float64", (128, 128), -1, "large64", "float64"),
        Case("(100, 3) axis -1 float64", (100, 3), -1, "small64", "float64"), Case("(10,)", (10,), -1, "tiny"),
    ),
    "torch": (
        Case("(128, 128) axis -1", (128, 128), -1, "large"), Case("(16, 100) axis -1", (16, 100), -1, "medium"),
        *_both("(4, 256) axis -1", (4, 256), -1, "head"), Case("(10,)", (10,), -1, "tiny"),
    ),
    "jax": _both("(4, 256) axis -1", (4, 256), -1, "jit"),
}


@dataclass(frozen=True)
class Goal:
    """A target: ``ours / reference <= limit`` (``faster``: reference / ours
    >= limit) on the cases of ``role``; ``kind`` "overhead" compares the
    difference in microseconds, "memory" the peak extra bytes in % of the
    input, "residuals" the bytes saved for the backward pass.  A
    ``stretch`` goal (the issue's moonshot) is printed but not counted."""

    name: str
    group: str
    role: str
    reference: str
    limit: float
    ops: tuple[str, ...] = OPS
    kind: str = "ratio"
    stretch: bool = False


GOALS = (
    Goal("numpy: <= 1.0x bare np.exp", "numpy", "large", "bare np.exp", 1.0),
    Goal("numpy moonshot: <= 0.5x bare np.exp", "numpy", "large", "bare np.exp", 0.5, ("logsumexp",), stretch=True),
    Goal("numpy: <= 1.5x bare np.exp", "numpy", "medium", "bare np.exp", 1.5),
    Goal("numpy: >= 3x faster than SciPy", "numpy", "large", "scipy.special", 3.0, kind="faster"),
    Goal("numpy float64: <= 1.5x bare np.exp", "numpy", "large64", "bare np.exp", 1.5),
    Goal("numpy float64: <= 1.0x SciPy", "numpy", "small64", "scipy.special", 1.0, ("softmax", "log_softmax")),
    Goal("numpy 10 entries: <= 5 us over max/exp/sum/log", "numpy", "tiny", "bare max/exp/sum/log", 5.0,
         kind="overhead"),
    Goal("numpy: peak extra memory <= 10% of the input", "numpy", "large", "", 10.0, kind="memory"),
    Goal("numpy float64: peak extra memory <= 10% of the input", "numpy", "large64", "", 10.0, kind="memory"),
    Goal("torch CPU: <= 1.0x torch's own", "torch", "large", "torch", 1.0),
    Goal("torch CPU: <= 1.5x torch's own", "torch", "medium", "torch", 1.5),
    Goal("torch CPU: <= 1.5x torch's own", "torch", "head", "torch", 1.5),
    Goal("torch CPU 10 entries: <= 2x torch's own", "torch", "tiny", "torch", 2.0),
    Goal("jax in the user's jit: <= 1.25x jax.nn", "jax", "jit", "jax.nn", 1.25),
    Goal("jax: residual bytes under grad <= jax.nn's", "jax", "jit", "jax.nn", 1.0, kind="residuals"),
)


@dataclass
class Timing:
    op: str
    case: str
    role: str
    size: int
    nbytes: int
    group: str
    implementation: str
    median_s: float
    samples: int
    cpu_median_s: float | None = None  # process CPU time: less sensitive to other load
    peak_extra_bytes: int | None = None
    residual_bytes: int | None = None
    kernel: str = ""  # what auto ran (lse_dispatch only)


@dataclass
class Verdict:
    name: str
    op: str
    case: str
    measured: float
    limit: float
    unit: str
    met: bool
    detail: str = ""
    stretch: bool = False


@dataclass
class Report:
    command: str
    quick: bool
    machine: dict
    versions: dict
    timings: list[Timing] = field(default_factory=list)
    targets: list[Verdict] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Implementations: group(op, case) -> {name: (convert(numpy data), call(arg))}


def _kernel(fn, arg) -> str:
    """Which implementation ``auto`` runs for ``fn(arg)`` (empty if unknown)."""
    import lse_dispatch

    try:
        with lse_dispatch.trace() as recorded:
            fn(arg)
        return ",".join(dict.fromkeys(recorded.implementations))
    except Exception:
        return ""


def numpy_group(op: str, case: Case) -> dict:
    import lse_dispatch

    fn, axis = getattr(lse_dispatch, op), case.axis

    def bare_sequence(x):
        m = np.max(x, axis=axis, keepdims=True)
        e = np.exp(x - m)
        total = np.sum(e, axis=axis, keepdims=True)
        if op == "softmax":
            return e / total
        if op == "log_softmax":
            return x - m - np.log(total)
        return np.squeeze(m + np.log(total), axis=axis)

    impls = {OURS: lambda x: fn(x, axis=axis), "bare np.exp": np.exp}
    if case.role == "tiny":
        impls["bare max/exp/sum/log"] = bare_sequence
    try:
        import scipy.special

        impls["scipy.special"] = (lambda f: lambda x: f(x, axis=axis))(getattr(scipy.special, op))
    except ImportError:
        pass
    return {name: (lambda data: data, call) for name, call in impls.items()}


def torch_group(op: str, case: Case) -> dict:
    try:
        import torch
    except ImportError:
        return {}
    import lse_dispatch

    dim = -1 if case.axis is None else case.axis
    ours = getattr(lse_dispatch, op)
    native = {"logsumexp": torch.logsumexp, "softmax": torch.softmax, "log_softmax": torch.log_softmax}[op]
    forward = {OURS: lambda x: ours(x, axis=case.axis), "torch": lambda x: native(x, dim)}
    if not case.grad:
        return {name: (torch.from_numpy, call) for name, call in forward.items()}
    weights = torch.from_numpy(np.random.default_rng(1).standard_normal(case.shape).astype(case.dtype))

    def with_backward(f):
        def run(x):
            y = f(x)
            (grad,) = torch.autograd.grad((y * weights[..., 0] if y.dim() < x.dim() else y * weights).sum(), x)
            return grad

        return run

    convert = lambda data: torch.from_numpy(data).requires_grad_(True)  # noqa: E731
    return {name: (convert, with_backward(call)) for name, call in forward.items()}


def _jax_functions(op: str, case: Case):
    import jax
    import jax.numpy as jnp

    import lse_dispatch

    ours, native = getattr(lse_dispatch, op), getattr(jax.nn, op)
    forward = {OURS: lambda x: ours(x, axis=case.axis), "jax.nn": lambda x: native(x, axis=case.axis)}
    if not case.grad:
        return forward
    out_shape = case.shape[:-1] if op == "logsumexp" else case.shape
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape).astype(case.dtype))
    return {name: jax.value_and_grad(lambda x, f=f: jnp.sum(f(x) * weights)) for name, f in forward.items()}


def jax_group(op: str, case: Case) -> dict:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return {}
    out = {}
    for name, f in _jax_functions(op, case).items():
        compiled = jax.jit(f)  # the user's jit around our call
        out[name] = (lambda data: jax.device_put(jnp.asarray(data)),
                     lambda x, c=compiled: jax.block_until_ready(c(x)))
    return out


def residual_bytes(op: str, case: Case) -> dict[str, int]:
    """Bytes each implementation saves for the backward pass of ``sum(f(x))``
    under ``jax.grad``, read from ``jax.ad_checkpoint.print_saved_residuals``
    (one ``f32[64,512] <where from>`` line per saved array)."""
    import contextlib
    import io
    import re

    import jax.numpy as jnp
    from jax.ad_checkpoint import print_saved_residuals

    x = jnp.zeros(case.shape, dtype=case.dtype)
    out = {}
    for name, f in _jax_functions(op, Case(case.label, case.shape, case.axis, case.role, case.dtype)).items():
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            print_saved_residuals(lambda x_, f=f: jnp.sum(f(x_)), x)
        total = 0
        for bits, dims in re.findall(r"^[a-z]+(\d+)\[([\d,]*)\]", text.getvalue(), flags=re.MULTILINE):
            total += math.prod(int(d) for d in dims.split(",") if d) * int(bits) // 8
        out[name] = total
    return out


GROUPS = {"numpy": numpy_group, "torch": torch_group, "jax": jax_group}


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


def time_interleaved(calls: dict, repeats: int, floor_s: float) -> dict[str, tuple[float, int, float]]:
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


def peak_extra(call, arg) -> int:
    """Peak bytes allocated during one call, as tracemalloc sees them (NumPy
    reports its allocations to it).  Only allocations made after ``start`` count,
    so no ``gc.collect`` first: with torch and JAX loaded one took 0.13 s, two
    thirds of a quick run's time."""
    tracemalloc.start()
    try:
        result = call(arg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak


def measure(report: Report, group: str, case: Case, op: str, repeats: int, floor_s: float,
            collect: bool = True) -> None:
    """Time every implementation of ``op`` on ``case`` in ``group``, interleaved."""
    data = np.random.default_rng(0).standard_normal(case.shape).astype(case.dtype)
    calls, kernels = {}, {}
    for name, (convert, call) in GROUPS[group](op, case).items():
        arg = convert(data)
        call(arg)  # warm up: imports, compilation
        calls[name] = (call, arg)
        if name == OURS and group != "jax":
            kernels[name] = _kernel(call, arg)
    residuals = residual_bytes(op, case) if group == "jax" and case.grad else {}
    for name, (median, count, cpu) in time_interleaved(calls, repeats, floor_s).items():
        peak = peak_extra(*calls[name]) if group == "numpy" and name in (OURS, "scipy.special") else None
        report.timings.append(Timing(op, case.label, case.role, case.size, case.nbytes, group, name, median, count,
                                     cpu, peak, residuals.get(name), kernels.get(name, "")))
    calls.clear()
    if collect:  # cycles freed before the next case (0.1 to 0.5 s a collection with torch and JAX loaded)
        gc.collect()


# ---------------------------------------------------------------------------
# Targets


def _judge(goal: Goal, ours: Timing, ref: Timing | None) -> Verdict | None:
    if goal.kind == "memory":
        if ours.peak_extra_bytes is None:
            return None
        output = ours.nbytes if ours.op != "logsumexp" else 0  # the output itself does not count
        measured = 100 * (ours.peak_extra_bytes - output) / ours.nbytes
        return Verdict(goal.name, ours.op, ours.case, measured, goal.limit, "%", measured <= goal.limit,
                       "beyond the output" if output else "")
    if ref is None:
        return None
    if goal.kind == "residuals":
        if ours.residual_bytes is None or ref.residual_bytes is None:
            return None
        ratio = ours.residual_bytes / max(ref.residual_bytes, 1)
        return Verdict(goal.name, ours.op, ours.case, ratio, goal.limit, "x", ratio <= goal.limit,
                       f"{ours.residual_bytes} / {ref.residual_bytes} bytes")
    if goal.kind == "overhead":
        extra = (ours.median_s - ref.median_s) * 1e6
        return Verdict(goal.name, ours.op, ours.case, extra, goal.limit, "us", extra <= goal.limit,
                       f"{OURS} - {ref.implementation}")
    top, bottom = (ref, ours) if goal.kind == "faster" else (ours, ref)
    ratio = top.median_s / bottom.median_s
    met = ratio >= goal.limit if goal.kind == "faster" else ratio <= goal.limit
    cpu = top.cpu_median_s / bottom.cpu_median_s if bottom.cpu_median_s else math.nan
    return Verdict(goal.name, ours.op, ours.case, ratio, goal.limit, "x", met,
                   f"{top.implementation} / {bottom.implementation}; CPU-time ratio {cpu:.2f}")


def judge_targets(report: Report) -> None:
    """Append a :class:`Verdict` for every goal that has its measurements."""
    for goal in GOALS:
        for ours in report.timings:
            if (ours.group, ours.role, ours.implementation) != (goal.group, goal.role, OURS) or ours.op not in goal.ops:
                continue
            ref = next((t for t in report.timings if (t.group, t.case, t.op, t.implementation)
                        == (goal.group, ours.case, ours.op, goal.reference)), None)
            verdict = _judge(goal, ours, ref)
            if verdict is not None:
                verdict.stretch = goal.stretch
                report.targets.append(verdict)


# ---------------------------------------------------------------------------
# Output


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


#: The group's native function: ratios in the tables and the plot are to it.
NATIVE = {"numpy": "scipy.special", "torch": "torch", "jax": "jax.nn"}


def print_report(report: Report, out) -> None:
    mode = "QUICK SMOKE TEST (small cases; ratios do not measure the targets)" if report.quick else "full"
    print(f"lse-dispatch bench, {mode}: median wall time per call, ratio to the native function "
          f"({', '.join(f'{g}: {n}' for g, n in NATIVE.items())}), median process CPU time", file=out)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in report.machine.items()), file=out)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()), file=out)
    for (group, case, op), rows in _grouped(report.timings).items():
        base = next((t for t in rows if t.implementation == NATIVE[group]), None)
        print(f"\n{group}  {op}  {case}", file=out)
        for t in rows:
            ratio = f"{t.median_s / base.median_s:6.2f}x" if base else "       "
            extra = f"  peak {t.peak_extra_bytes / t.nbytes:5.2f}x input" if t.peak_extra_bytes is not None else ""
            extra += f"  residuals {t.residual_bytes} B" if t.residual_bytes is not None else ""
            extra += f"  [{t.kernel}]" if t.kernel else ""
            print(f"  {t.implementation:<22} {format_time(t.median_s):>10}  {ratio}  cpu "
                  f"{format_time(t.cpu_median_s or 0.0):>10}{extra}", file=out)
    print("\ntargets" + (" (smoke test: the quick cases are not the targets' cases)" if report.quick else "") + ":",
          file=out)
    for v in report.targets:
        relation = ">=" if "faster" in v.name else "<="
        verdict = ("met" if v.met else "missed" if v.stretch else "MISSED").ljust(6)
        print(f"  {verdict} {v.name:<48} {v.op:<12} {v.case:<30} "
              f"{v.measured:8.2f} {v.unit} ({relation} {v.limit:g}) {v.detail}", file=out)
    print("\n" + _tally([asdict(v) for v in report.targets], report.quick), file=out)


def _tally(targets: list[dict], quick: bool) -> str:
    """``N of M targets met`` (stretch goals counted apart)."""
    counted = [t for t in targets if not t.get("stretch")]
    stretch = [t for t in targets if t.get("stretch")]
    text = f"{sum(t['met'] for t in counted)} of {len(counted)} targets met"
    if stretch:
        text += f" (stretch goals, not counted: {sum(t['met'] for t in stretch)} of {len(stretch)})"
    return text + (" (smoke test)" if quick else "")


def _grouped(timings: list[Timing]) -> dict:
    grouped: dict[tuple[str, str, str], list[Timing]] = {}
    for t in timings:
        grouped.setdefault((t.group, t.case, t.op), []).append(t)
    return grouped


def render_markdown(data: dict, previous: dict | None = None) -> str:
    """Markdown tables (timings, targets) of a ``bench.json`` document.

    With ``previous`` (another run's document), each target gets the figure
    that run measured for it ("was"; blank for targets it did not have).
    """
    timings = [Timing(**t) for t in data["timings"]]
    lines = [f"Command: `{data['command'].strip()}`; machine: "
             + ", ".join(f"{k} {v}" for k, v in data["machine"].items())
             + "; versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".", ""]
    if data.get("quick"):
        lines += ["**Quick mode: a smoke test on small cases; the ratios do not measure the targets.**", ""]
    lines += ["| backend | op | case | implementation | median | ratio to native | CPU time | peak extra (x input) "
              "| kernel |", "|---|---|---|---|---|---|---|---|---|"]
    for (group, case, op), rows in _grouped(timings).items():
        base = next((t for t in rows if t.implementation == NATIVE[group]), None)
        for t in rows:
            ratio = f"{t.median_s / base.median_s:.2f}x" if base else ""
            peak = f"{t.peak_extra_bytes / t.nbytes:.2f}" if t.peak_extra_bytes is not None else ""
            lines.append(f"| {group} | {op} | {case} | {t.implementation} | {format_time(t.median_s)} | {ratio} | "
                         f"{format_time(t.cpu_median_s or 0.0)} | {peak} | {t.kernel} |")
    was = {(v["name"], v["op"], v["case"]): v for v in (previous or {}).get("targets", [])}
    was_head, was_rule = (" was |", "---|") if previous else ("", "")
    lines += ["", f"| target | op | case | measured | limit | verdict |{was_head} compared |",
              f"|---|---|---|---|---|---|{was_rule}---|"]
    for v in data["targets"]:
        relation = ">=" if "faster" in v["name"] else "<="
        verdict = "met" if v["met"] else "missed (stretch)" if v.get("stretch") else "**missed**"
        before = ""
        if previous:
            old = was.get((v["name"], v["op"], v["case"]))
            before = f" {old['measured']:.2f} {old['unit']} |" if old else " |"
        lines.append(f"| {v['name']} | {v['op']} | {v['case']} | {v['measured']:.2f} {v['unit']} | "
                     f"{relation} {v['limit']:g} {v['unit']} | {verdict} |{before} {v['detail']} |")
    lines += ["", _tally(data["targets"], data.get("quick", False)) + "."]
    if previous:
        lines += [f"Previous run (\"was\"): {_tally(previous['targets'], previous.get('quick', False))}; "
                  f"`{previous['command'].strip()}`; load average at start "
                  f"{previous['machine'].get('load average at start', '?')}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Running


def _versions() -> dict:
    import lse_dispatch

    found = {"lse_dispatch": lse_dispatch.__version__, "numpy": np.__version__}
    for name in ("scipy", "torch", "jax", "numba"):
        if name in sys.modules or _installed(name):
            try:
                found[name] = __import__(name).__version__
            except ImportError:
                pass
    return found


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def machine_info(groups: list[str]) -> dict:
    """CPUs, thread counts of each library timed, and the load average."""
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.machine()}
    if hasattr(os, "getloadavg"):
        # Other processes share the CPUs: the 1-minute load says how much.
        info["load average at start"] = round(os.getloadavg()[0], 2)
    if "torch" in groups and _installed("torch"):
        import torch

        info["torch threads"] = torch.get_num_threads()
    if _installed("numba"):
        # The fused kernels' own threads (Python threads; numba's threading
        # layer is never started: numba.get_num_threads() would start it, and
        # its OpenMP layer raised torch's intra-op threads from 1 to 2 in this
        # process, which made every torch figure of earlier runs two threads
        # against our one).
        from lse_dispatch.backends import _fused_cpu

        info["fused kernel threads"] = ", ".join(
            f"{library} {_fused_cpu.get_num_threads(library)}" for library in ("numpy", "torch")
            if library == "numpy" or ("torch" in groups and _installed("torch")))
    if "jax" in groups:
        info["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "(unset: XLA's default threads)")
    return info


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lse-dispatch bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small cases, few repeats: a smoke test in seconds")
    parser.add_argument("--out", default="lse-dispatch-bench", help="folder for bench.json and bench.png")
    parser.add_argument("--repeats", type=int, default=None, help="samples per implementation (default 9, quick 2)")
    parser.add_argument("--only", default="numpy,torch,jax", help="comma-separated groups: numpy, torch, jax")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (torch.set_num_threads) for both sides")
    parser.add_argument("--render", metavar="JSON", help="print an existing bench.json as Markdown tables and exit")
    parser.add_argument("--previous", metavar="JSON", help="with --render: another run's bench.json, shown as 'was'")
    parser.add_argument("--plot", metavar="PNG", help="with --render: also draw that run's plot into PNG")
    return parser


def run(groups: list[str], quick: bool, repeats: int, progress=None) -> Report:
    """Measure every case of ``groups`` and judge the targets."""
    report = Report(command="", quick=quick, machine=machine_info(groups), versions=_versions())
    table = QUICK_CASES if quick else FULL_CASES
    jobs = [(group, case, op) for group in groups for case in table[group] for op in OPS]
    floor_s = 0.0005 if quick else 0.02
    for group, case, op in jobs:
        if progress is not None:
            progress.step(f"{group} {op} {case.label}")
        measure(report, group, case, op, repeats, floor_s, collect=not quick)
    judge_targets(report)
    if hasattr(os, "getloadavg"):
        report.machine["load average at end"] = round(os.getloadavg()[0], 2)
    if "torch" in groups and _installed("torch"):
        import torch

        # What the torch figures ran with, to the end (see machine_info).
        report.machine["torch threads at end"] = torch.get_num_threads()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.render:
        previous = json.loads(Path(args.previous).read_text()) if args.previous else None
        data = json.loads(Path(args.render).read_text())
        print(render_markdown(data, previous), end="")
        if args.plot and not _plot(_report_of(data), Path(args.plot)):
            print("no matplotlib: no plot", file=sys.stderr)
        return 0
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; expected some of {', '.join(GROUPS)}")
    if args.threads is not None and _installed("torch"):
        import torch

        torch.set_num_threads(args.threads)
    from lse_dispatch._progress import Progress

    table = QUICK_CASES if args.quick else FULL_CASES
    with Progress(sum(len(table[g]) * len(OPS) for g in groups), "bench") as progress:
        report = run(groups, args.quick, args.repeats or (2 if args.quick else 9), progress)
    report.command = "lse-dispatch bench " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print_report(report, sys.stdout)
    (out / "bench.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
    plotted = _plot(report, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}" if plotted else " (no matplotlib: no plot)"))
    return 0


def _report_of(data: dict) -> Report:
    """The :class:`Report` a ``bench.json`` holds."""
    fields = {**data, "timings": [Timing(**t) for t in data["timings"]],
              "targets": [Verdict(**v) for v in data["targets"]]}
    return Report(**fields)


def _plot(report: Report, path: Path) -> bool:
    """Draw the plot with ``bench_plot.py`` (beside this file)."""
    import importlib.util

    name = "_lse_dispatch_bench_plot"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("bench_plot.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module.plot(report, path)


if __name__ == "__main__":
    sys.exit(main())
