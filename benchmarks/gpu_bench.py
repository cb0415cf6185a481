"""GPU benchmark: lse_dispatch against torch, JAX and CuPy on one GPU, in one process.

    python benchmarks/gpu_bench.py [--max-exp 28] [--repeats 20] [--json PATH]
    python benchmarks/gpu_bench.py --dry-run      # CPU, tiny sizes: checks the script only
    python benchmarks/gpu_bench.py --without jax  # leave JAX's columns out (each size compiles two programs)

float32, sizes 2**10 .. 2**max_exp (every second power), three layouts:
``flat`` (one vector), ``rows4096`` (rows of 4096, the issue's targets) and
``rows1024`` (rows of 1024, the layout of the earlier table in docs/gpu/).
Times are medians of ``repeats`` timings with CUDA events after warm-up;
the implementations of one case are timed one after another, interleaved
repeat by repeat, so that clock and thermal drift hit them alike.

Printed and written to JSON:

* forward, all three ops: ``torch.triton`` (lse_dispatch on torch CUDA
  tensors; the trace is checked once per case) against torch's own
  function; ``cupy-fused`` (lse_dispatch on CuPy arrays) and cupyx's
  logsumexp; JAX's own under jit and lse_dispatch under jit;
* forward + backward of all three ops (torch);
* the fraction of the read-once bound: the bytes an op must move (its input
  read once, plus its output written once) over the measured copy bandwidth
  (a device-to-device copy, bytes read plus written), against its time;
* host overhead per call: wall time per call of a loop of calls on a
  2**10-entry input (no synchronisation inside the loop), torch.triton,
  torch's own, cupy-fused and cupyx;
* every target of issue 13, met or missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np

OPS = ("logsumexp", "softmax", "log_softmax")
LAYOUTS = {"flat": None, "rows4096": 4096, "rows1024": 1024}


def _optional(name):
    try:
        return __import__(name)
    except Exception:  # absent or broken: its columns are left out
        return None


class Clock:
    """Times ``fn`` on the device (CUDA events), or by wall clock in a dry run."""

    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda

    def interleaved(self, fns: dict, repeats: int) -> dict:
        """Median seconds per call of each function, the functions interleaved repeat by repeat."""
        torch = self.torch
        for fn in fns.values():  # warm-up: compilation, caches, allocator
            for _ in range(3):
                fn()
        self.sync()
        times = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                if self.cuda:
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    stop.record()
                    stop.synchronize()
                    times[name].append(start.elapsed_time(stop) * 1e-3)
                else:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        return {name: statistics.median(values) for name, values in times.items()}

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()


def copy_bandwidth(torch, clock, n: int) -> float:
    """Bytes per second of a device-to-device copy of ``n`` float32 (read + write counted)."""
    device = "cuda" if clock.cuda else "cpu"
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    seconds = clock.interleaved({"copy": lambda: dst.copy_(src)}, repeats=20)["copy"]
    return 2 * src.numel() * 4 / seconds


def _trace_ran(lse_dispatch, fn, expected: str) -> str:
    with lse_dispatch.trace() as seen:
        fn()
    ran = seen.implementations[-1] if seen.implementations else "?"
    if ran != expected:
        print(f"  note: expected {expected}, ran {ran}: {seen.records[-1] if seen.records else ''}", flush=True)
    return ran


def _forward_cases(torch, lse_dispatch, xt, axis_dim):
    ours = {op: getattr(lse_dispatch, op) for op in OPS}
    native = {"logsumexp": torch.logsumexp, "softmax": torch.softmax, "log_softmax": torch.log_softmax}
    return {op: (lambda op=op: ours[op](xt, axis=-1), lambda op=op: native[op](xt, axis_dim)) for op in OPS}


def _backward_cases(torch, lse_dispatch, xt):
    x = xt.detach().clone().requires_grad_(True)
    native = {"logsumexp": torch.logsumexp, "softmax": torch.softmax, "log_softmax": torch.log_softmax}
    grads = {}
    for op in OPS:
        g_shape = x.shape[:-1] if op == "logsumexp" else x.shape
        grads[op] = torch.ones(g_shape, device=x.device, dtype=x.dtype) * 0.5

    def ours(op):
        return lambda: getattr(lse_dispatch, op)(x, axis=-1).backward(grads[op])

    def theirs(op):
        return lambda: native[op](x, -1).backward(grads[op])

    return x, {op: (ours(op), theirs(op)) for op in OPS}


def host_overhead(torch, lse_dispatch, cupy, cupyx, device: str, calls: int = 300) -> dict:
    """Wall seconds per call over ``calls`` calls on 2**10 entries (median of 5 loops)."""
    xt = torch.randn(2**10, device=device)
    fns = {"torch.triton": lambda: lse_dispatch.logsumexp(xt, axis=-1),
           "torch.logsumexp": lambda: torch.logsumexp(xt, -1),
           "torch.triton softmax": lambda: lse_dispatch.softmax(xt, axis=-1),
           "torch.softmax": lambda: torch.softmax(xt, -1)}
    if cupy is not None:
        xc = cupy.asarray(xt.cpu().numpy())
        fns["cupy-fused"] = lambda: lse_dispatch.logsumexp(xc, axis=-1)
        fns["cupy-fused softmax"] = lambda: lse_dispatch.softmax(xc, axis=-1)
        if cupyx is not None:
            fns["cupyx logsumexp"] = lambda: cupyx.scipy.special.logsumexp(xc, axis=-1)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
        if cupy is not None:
            cupy.cuda.Device().synchronize()

    return {name: wall_per_call(fn, calls, sync) for name, fn in fns.items()}


def wall_per_call(fn, calls: int, sync) -> float:
    """Wall seconds per call of ``fn`` over a loop of ``calls`` calls closed by one
    ``sync()`` (median of 5 loops, after a warm-up)."""
    for _ in range(min(20, calls)):
        fn()
    sync()
    loops = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        loops.append((time.perf_counter() - t0) / calls)
    return statistics.median(loops)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--max-exp", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the interpreter: checks the script")
    parser.add_argument("--without", default="", help="contenders to leave out, comma-separated: jax, cupy")
    options = parser.parse_args(argv)
    if options.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        options.max_exp = min(options.max_exp, 12)
        options.repeats = 2
    import torch

    import lse_dispatch

    cuda = torch.cuda.is_available() and not options.dry_run
    if not cuda and not options.dry_run:
        print("no CUDA device: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    without = set(filter(None, options.without.split(",")))
    cupy = _optional("cupy") if cuda and "cupy" not in without else None
    cupyx = None
    if cupy is not None:
        try:
            import cupyx.scipy.special

            cupyx = sys.modules["cupyx"]
        except Exception:
            cupyx = None
    jax = _optional("jax") if cuda and "jax" not in without else None
    if jax is not None:
        try:
            jax.devices("gpu")
        except Exception as exc:  # no GPU plugin: its columns are left out
            print(f"jax: no GPU ({exc}); its columns are left out", flush=True)
            jax = None
    clock = Clock(torch, cuda)
    choice = lse_dispatch.use("torch.triton") if options.dry_run else lse_dispatch.use("auto")
    with choice:
        return _run(options, torch, lse_dispatch, cupy, cupyx, jax, clock, device)


def _run(options, torch, lse_dispatch, cupy, cupyx, jax, clock, device) -> int:
    bandwidth = copy_bandwidth(torch, clock, 2**28 if clock.cuda else 2**20)
    name = torch.cuda.get_device_name() if clock.cuda else "cpu (dry run)"
    print(f"device: {name}  copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    versions = {"torch": torch.__version__}
    for module in ("triton", "jax", "cupy"):
        found = sys.modules.get(module) or _optional(module)
        versions[module] = getattr(found, "__version__", None) if found else None
    jitted = {}
    if jax is not None:
        jitted = {op: (jax.jit(getattr(jax.nn, op), static_argnames=("axis",)),
                       jax.jit(getattr(lse_dispatch, op), static_argnames=("axis",))) for op in OPS}
    rows = []
    for exponent in range(10, options.max_exp + 1, 2):
        n = 2**exponent
        for layout, width in LAYOUTS.items():
            if width is not None and n < width * 4:
                continue  # fewer than four rows: the flat case covers it
            shape = (n,) if width is None else (n // width, width)
            host = np.random.default_rng(exponent).standard_normal(shape, dtype=np.float32)
            xt = torch.from_numpy(host).to(device)
            entry = {"n": n, "layout": layout, "forward": {}, "backward": {}, "ran": {}}
            forward = _forward_cases(torch, lse_dispatch, xt, -1)
            for op, (ours, theirs) in forward.items():
                entry["ran"][op] = _trace_ran(lse_dispatch, ours, "torch.triton")
                fns = {"ours": ours, "torch": theirs}
                if cupy is not None:
                    xc = cupy.asarray(host)
                    fns["cupy-fused"] = lambda op=op, xc=xc: getattr(lse_dispatch, op)(xc, axis=-1)
                    if op == "logsumexp" and cupyx is not None:
                        fns["cupyx"] = lambda xc=xc: cupyx.scipy.special.logsumexp(xc, axis=-1)
                entry["forward"][op] = clock.interleaved(fns, options.repeats)
                if jax is not None:
                    xj = jax.device_put(host, jax.devices("gpu")[0])
                    native_jit, ours_jit = jitted[op]
                    timings = {}
                    for label, fn in (("jax.nn (jit)", native_jit), ("ours jax (jit)", ours_jit)):
                        fn(xj, axis=-1).block_until_ready()
                        samples = []
                        for _ in range(options.repeats):
                            t0 = time.perf_counter()
                            fn(xj, axis=-1).block_until_ready()
                            samples.append(time.perf_counter() - t0)
                        timings[label] = statistics.median(samples)
                    entry["forward"][op].update(timings)
                    del xj
            if n <= 2**28:
                x, backward = _backward_cases(torch, lse_dispatch, xt)
                for op, (ours, theirs) in backward.items():
                    entry["backward"][op] = clock.interleaved({"ours": ours, "torch": theirs}, options.repeats)
                del x
            out_bytes = {"logsumexp": 4 * (n // (width or n)), "softmax": 4 * n, "log_softmax": 4 * n}
            entry["bound"] = {op: (4 * n + out_bytes[op]) / bandwidth for op in OPS}
            rows.append(entry)
            for op in OPS:
                t = entry["forward"][op]
                line = (f"2^{exponent:<2} {layout:<8} {op:<11} ours {t['ours'] * 1e6:9.1f} us  torch {t['torch'] * 1e6:9.1f} us"
                        f"  ratio {t['ours'] / t['torch']:5.2f}  {entry['bound'][op] / t['ours']:5.0%} of bound")
                if "cupy-fused" in t:
                    line += f"  | cupy-fused {t['cupy-fused'] * 1e6:9.1f} us ({entry['bound'][op] / t['cupy-fused']:4.0%})"
                if "cupyx" in t:
                    line += f"  cupyx {t['cupyx'] * 1e6:9.1f}"
                if "jax.nn (jit)" in t:
                    line += f"  | jax.nn {t['jax.nn (jit)'] * 1e6:9.1f}  ours-jax {t['ours jax (jit)'] * 1e6:9.1f}"
                if op in entry["backward"]:
                    b = entry["backward"][op]
                    line += (f"  | fwd+bwd ours {b['ours'] * 1e6:9.1f} torch {b['torch'] * 1e6:9.1f}"
                             f" ratio {b['ours'] / b['torch']:5.2f}")
                print(line, flush=True)
            del xt
            if clock.cuda:
                torch.cuda.empty_cache()
            if cupy is not None:
                cupy.get_default_memory_pool().free_all_blocks()
    overhead = host_overhead(torch, lse_dispatch, cupy, cupyx, device, calls=300 if clock.cuda else 3)
    print("host overhead, wall us per call on 2^10 entries (loop of 300, no sync inside): "
          + "  ".join(f"{k} {v * 1e6:.1f}" for k, v in overhead.items()), flush=True)
    verdicts = targets(rows, overhead)
    for line in verdicts:
        print(line, flush=True)
    if options.json:
        meta = {"device": name, "copy_bandwidth": bandwidth, "versions": versions, "repeats": options.repeats,
                "dry_run": options.dry_run}
        with open(options.json, "w") as handle:
            json.dump({"meta": meta, "rows": rows, "host_overhead": overhead, "targets": verdicts}, handle, indent=1)
    return 0


def targets(rows, overhead) -> list[str]:
    """Issue 13's targets, each met or missed, with the worst case."""
    out = []

    def verdict(label, pairs, limit, *, at_least=False, unit="x"):
        # pairs: (case, value); met when every value is within the limit.
        if not pairs:
            out.append(f"{label}: not measured")
            return
        worst = min(pairs, key=lambda p: p[1]) if at_least else max(pairs, key=lambda p: p[1])
        met = all((v >= limit) if at_least else (v <= limit) for _, v in pairs)
        misses = [case for case, v in pairs if not ((v >= limit) if at_least else (v <= limit))]
        shown = f"{worst[1]:.0%}" if at_least else f"{worst[1]:.2f}{unit}"
        out.append(f"{label}: {'met' if met else 'MISSED'} (worst {shown} at {worst[0]}"
                   + (f"; missed at {len(misses)} of {len(pairs)}: {', '.join(misses[:6])}" if misses else "") + ")")

    big = [r for r in rows if 2**20 <= r["n"] <= 2**28 and r["layout"] in ("flat", "rows4096")]
    small = [r for r in rows if r["n"] <= 2**16 and r["layout"] in ("flat", "rows4096")]
    case = lambda r, op: f"2^{r['n'].bit_length() - 1} {r['layout']} {op}"  # noqa: E731
    verdict("torch CUDA forward, 2^20..2^28, flat and rows4096: ours / torch <= 1.1x",
            [(case(r, op), r["forward"][op]["ours"] / r["forward"][op]["torch"]) for r in big for op in OPS], 1.1)
    verdict("torch CUDA forward+backward, softmax and log_softmax, 2^20..2^28: ours / torch <= 1.2x",
            [(case(r, op), r["backward"][op]["ours"] / r["backward"][op]["torch"])
             for r in big for op in ("softmax", "log_softmax") if op in r["backward"]], 1.2)
    verdict("torch CUDA small calls, 2^10..2^16, forward: ours / torch <= 1.5x",
            [(case(r, op), r["forward"][op]["ours"] / r["forward"][op]["torch"]) for r in small for op in OPS], 1.5)
    top = [r for r in rows if r["n"] == max(x["n"] for x in rows) and r["layout"] in ("flat", "rows4096")]
    verdict(f"CuPy logsumexp and softmax at 2^{top[0]['n'].bit_length() - 1 if top else '?'}: >= 80% of the read-once bound",
            [(case(r, op), r["bound"][op] / r["forward"][op]["cupy-fused"])
             for r in top for op in ("logsumexp", "softmax") if "cupy-fused" in r["forward"][op]], 0.8, at_least=True)
    verdict("host overhead per call (wall time per call on 2^10 entries), CuPy and torch: <= 20 us",
            [(name, seconds * 1e6) for name, seconds in overhead.items()
             if name in ("torch.triton", "cupy-fused", "torch.triton softmax", "cupy-fused softmax")], 20.0,
            unit=" us")
    verdict("JAX GPU (jit): ours / jax.nn <= 1.25x (act only beyond)",
            [(case(r, op), r["forward"][op]["ours jax (jit)"] / r["forward"][op]["jax.nn (jit)"])
             for r in rows for op in OPS if "jax.nn (jit)" in r["forward"][op]], 1.25)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
