"""GPU benchmark: lse_dispatch against torch, JAX and CuPy on one GPU, one run.

    python benchmarks/gpu_bench.py [--json PATH]

For float32 sizes 2**10 .. 2**28, as one flat vector and as rows of 1024
(reduced along the last axis), times with device events (median of repeats,
after warm-up) and prints, per size, each implementation's time, its
fraction of the read-once HBM bound (input bytes over the measured
device-to-device copy bandwidth, reads and writes counted) and its ratio to the fastest native one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import cupy  # noqa: E402
import cupyx.scipy.special  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import lse_dispatch  # noqa: E402


def _time_cupy(fn, repeats=30):
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e-3)
    return statistics.median(times)


def _time_torch(fn, repeats=30):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) * 1e-3)
    return statistics.median(times)


def _time_jax(fn, repeats=30):
    import time

    for _ in range(3):
        fn().block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn().block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    src = cupy.random.random(2**28, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    seconds = _time_cupy(lambda: dst.__setitem__(slice(None), src), repeats=20)
    return 2 * src.nbytes / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--max-exp", type=int, default=28)
    options = parser.parse_args(argv)
    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {bandwidth / 1e12:.2f} TB/s")
    jax_lse = jax.jit(jax.nn.logsumexp, static_argnames=("axis",))
    jax_softmax = jax.jit(jax.nn.softmax, static_argnames=("axis",))
    ours_jax = jax.jit(lse_dispatch.logsumexp, static_argnames=("axis",))
    rows = []
    for exponent in range(10, options.max_exp + 1, 2):
        n = 2**exponent
        for layout, shape in (("flat", (n,)), ("rows", (n // 1024, 1024))):
            host = np.random.default_rng(exponent).standard_normal(shape, dtype=np.float32)
            xc = cupy.asarray(host)
            xt = torch.from_numpy(host).cuda()
            xj = jax.device_put(host, jax.devices("gpu")[0])
            times = {
                "lse_dispatch (cupy fused)": _time_cupy(lambda: lse_dispatch.logsumexp(xc, axis=-1)),
                "lse_dispatch (torch cuda)": _time_torch(lambda: lse_dispatch.logsumexp(xt, axis=-1)),
                "lse_dispatch (jax gpu, jit)": _time_jax(lambda: ours_jax(xj, axis=-1)),
                "torch.logsumexp": _time_torch(lambda: torch.logsumexp(xt, dim=-1)),
                "jax.nn.logsumexp (jit)": _time_jax(lambda: jax_lse(xj, axis=-1)),
                "cupyx.scipy.special.logsumexp": _time_cupy(lambda: cupyx.scipy.special.logsumexp(xc, axis=-1)),
                "softmax: lse_dispatch (cupy)": _time_cupy(lambda: lse_dispatch.softmax(xc, axis=-1)),
                "softmax: lse_dispatch (torch cuda)": _time_torch(lambda: lse_dispatch.softmax(xt, axis=-1)),
                "softmax: torch.softmax": _time_torch(lambda: torch.softmax(xt, dim=-1)),
                "softmax: jax.nn.softmax (jit)": _time_jax(lambda: jax_softmax(xj, axis=-1)),
            }
            read_bound = 4 * n / bandwidth  # the copy moved `bandwidth` bytes/s, reads and writes together
            native = min(times["torch.logsumexp"], times["jax.nn.logsumexp (jit)"], times["cupyx.scipy.special.logsumexp"])
            native_softmax = min(times["softmax: torch.softmax"], times["softmax: jax.nn.softmax (jit)"])
            rows.append({"n": n, "layout": layout, "times": times, "read_bound": read_bound,
                         "native": native, "native_softmax": native_softmax})
            best = times["lse_dispatch (cupy fused)"]
            print(
                f"2^{exponent:<2} {layout:<4} fused {best * 1e6:9.1f} us  "
                f"{read_bound / best:5.0%} of read-once bound  "
                f"{best / native:5.2f}x fastest native ({native * 1e6:.1f} us)  | "
                + "  ".join(f"{k}: {v * 1e6:.1f}" for k, v in times.items())
            , flush=True)
            del xc, xt, xj
            cupy.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()
    if options.json:
        meta = {"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth,
                "torch": torch.__version__, "jax": jax.__version__, "cupy": cupy.__version__,
                "driver": cupy.cuda.runtime.driverGetVersion()}
        with open(options.json, "w") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
