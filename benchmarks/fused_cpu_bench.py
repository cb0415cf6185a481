"""Issue 17's targets for the compiled CPU kernels (numpy.fused, torch.fused), in one run.

    python benchmarks/fused_cpu_bench.py [--repeats 7] [--threads 2] [--quick] [--no-first-call]

Every case times its implementations interleaved (round robin, ``--repeats``
rounds; small inputs repeat the call enough for a sample of about 2 ms) and
compares medians of wall time: ours against a bare ``np.exp`` of the input,
``scipy.special``, or torch's own function, with the same thread count on
both sides (``--threads``: numba's and torch's pools).  Each target is printed
as met or missed with its ratio, and with the implementation the dispatcher
chose (checked with ``trace()``).  Then the first-call costs: ``import
lse_dispatch``, and a first fused call in a fresh process compiling cold (an
empty ``NUMBA_CACHE_DIR``) and loading from that cache.  The load average is
printed at the start and at the end: on a shared machine, compare within one
run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def _load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _sample(function, inner):
    start = time.perf_counter()
    for _ in range(inner):
        function()
    return (time.perf_counter() - start) / inner


def _interleaved(functions, repeats):
    """Median seconds per call of each function, sampled round robin."""
    for function in functions.values():
        function()  # warm
    once = min(_sample(f, 1) for f in functions.values())
    inner = max(1, int(2e-3 / max(once, 1e-7)))
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            samples[name].append(_sample(function, inner))
    return {name: statistics.median(values) for name, values in samples.items()}


def _ran(call):
    import lse_dispatch

    with lse_dispatch.trace() as seen:
        call()
    return seen.records[-1].implementation if seen.records else "-"


RESULTS = []


def _target(group, case, op, ratio, limit, implementation, unit="x"):
    met = ratio <= limit
    RESULTS.append(met)
    print(f"{group:<34} {case:<24} {op:<12} {ratio:8.2f} {unit} (<= {limit:g}) {'met' if met else 'MISSED':<7} "
          f"ran {implementation}", flush=True)


def numpy_targets(repeats, quick):
    import scipy.special as special

    import lse_dispatch

    ours = {"logsumexp": lambda x, axis: lse_dispatch.logsumexp(x, axis=axis),
            "softmax": lambda x, axis: lse_dispatch.softmax(x, axis=axis),
            "log_softmax": lambda x, axis: lse_dispatch.log_softmax(x, axis=axis)}
    scipy_ops = {"logsumexp": special.logsumexp, "softmax": special.softmax, "log_softmax": special.log_softmax}
    rng = np.random.default_rng(0)
    large = [((4096, 4096), -1), ((4096, 4096), 0), ((10**7,), None)]
    if quick:
        large = [((1024, 1024), -1), ((1024, 1024), 0), ((10**6,), None)]
    for dtype, limit in (("float32", 1.0), ("float64", 1.5)):
        for shape, axis in large + [((64, 1000), -1)]:
            x = rng.standard_normal(shape).astype(dtype)
            small = shape == (64, 1000)
            for op in ours:
                timing = _interleaved({"ours": lambda: ours[op](x, axis), "exp": lambda: np.exp(x),
                                       "scipy": lambda: scipy_ops[op](x, axis=axis)}, repeats)
                ran = _ran(lambda: ours[op](x, axis))
                case = f"{shape} axis {axis}"
                if dtype == "float32" or not small:
                    _target(f"numpy {dtype}: vs bare np.exp", case, op, timing["ours"] / timing["exp"],
                            1.5 if small else limit, ran)
                if dtype == "float32" and not small:
                    _target("numpy float32: scipy / ours", case, op, 3.0 / (timing["scipy"] / timing["ours"]), 1.0,
                            ran + f" ({timing['scipy'] / timing['ours']:.2f}x faster; >= 3x is the target)")
    for shape in ((100, 3), (200, 3)):
        x = rng.standard_normal(shape)
        for op in ("softmax", "log_softmax"):
            timing = _interleaved({"ours": lambda: ours[op](x, 1), "scipy": lambda: scipy_ops[op](x, axis=1)}, repeats)
            _target("numpy float64: vs scipy.special", f"{shape} axis 1", op, timing["ours"] / timing["scipy"], 1.0,
                    _ran(lambda: ours[op](x, 1)))
    x = rng.standard_normal(10).astype(np.float32)

    def bare():
        m = np.max(x)
        np.log(np.sum(np.exp(x - m))) + m

    for op in ours:
        timing = _interleaved({"ours": lambda: ours[op](x, None), "bare": bare}, repeats)
        over = (timing["ours"] - timing["bare"]) * 1e6
        _target("numpy tiny: us over max/exp/sum/log", "(10,)", op, over, 5.0, _ran(lambda: ours[op](x, None)), "us")


def torch_targets(repeats, quick):
    import torch

    import lse_dispatch

    ours = {"logsumexp": lambda x, d: lse_dispatch.logsumexp(x, axis=d),
            "softmax": lambda x, d: lse_dispatch.softmax(x, axis=d),
            "log_softmax": lambda x, d: lse_dispatch.log_softmax(x, axis=d)}
    theirs = {"logsumexp": lambda x, d: torch.logsumexp(x, dim=d if d is not None else tuple(range(x.ndim))),
              "softmax": lambda x, d: torch.softmax(x, dim=d if d is not None else 0),
              "log_softmax": lambda x, d: torch.log_softmax(x, dim=d if d is not None else 0)}
    gen = torch.Generator().manual_seed(0)
    large = [((4096, 4096), -1), ((4096, 4096), 0), ((10**7,), -1)]
    if quick:
        large = [((1024, 1024), -1), ((1024, 1024), 0), ((10**6,), -1)]
    cases = [(shape, d, 1.0) for shape, d in large] + [((64, 1000), -1, 1.5), ((32, 4096), -1, 1.5),
                                                       ((8, 128, 128), -1, 1.5), ((10,), -1, 2.0)]
    for shape, d, limit in cases:
        x = torch.randn(shape, generator=gen)
        for op in ours:
            timing = _interleaved({"ours": lambda: ours[op](x, d), "torch": lambda: theirs[op](x, d)}, repeats)
            _target("torch float32: vs torch's own", f"{shape} dim {d}", op, timing["ours"] / timing["torch"], limit,
                    _ran(lambda: ours[op](x, d)))
    for shape in ((32, 4096), (8, 128, 128)):
        x = torch.randn(shape, generator=gen)
        g = torch.randn(shape, generator=gen)
        for op in ("softmax", "log_softmax"):
            leaf = x.clone().requires_grad_(True)

            def forward_backward(function):
                leaf.grad = None
                function(leaf).backward(g)

            timing = _interleaved({"ours": lambda: forward_backward(lambda t: ours[op](t, -1)),
                                   "torch": lambda: forward_backward(lambda t: theirs[op](t, -1))}, repeats)
            _target("torch float32: forward + backward", f"{shape} dim -1", op, timing["ours"] / timing["torch"], 1.5,
                    _ran(lambda: ours[op](leaf, -1)))


def first_call_costs():
    """Seconds: import lse_dispatch; first fused call compiling cold; the same loading from the cache."""
    code_import = "import time; t = time.perf_counter(); import lse_dispatch; print(time.perf_counter() - t)"
    imports = [float(subprocess.run([sys.executable, "-c", code_import], capture_output=True, text=True,
                                    check=True).stdout) for _ in range(3)]
    print(f"import lse_dispatch: {statistics.median(imports) * 1e3:.0f} ms (median of 3 fresh processes; numba not imported)")
    code = ("import time, numpy as np, lse_dispatch; x = np.ones((1024, 1024), np.float32)\n"
            "t = time.perf_counter()\n"
            "with lse_dispatch.trace() as seen: lse_dispatch.logsumexp(x, axis=-1)\n"
            "print(time.perf_counter() - t, seen.records[0].implementation)")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("cold (compiles one signature)", "from the on-disk cache"):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            seconds, ran = out.stdout.split()
            print(f"first logsumexp call on (1024, 1024) float32, {label}: {float(seconds):.2f} s, ran {ran}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smaller large cases (smoke test)")
    parser.add_argument("--no-first-call", action="store_true")
    parser.add_argument("--only", default="numpy,torch")
    args = parser.parse_args(argv)

    import numba

    from lse_dispatch.backends import _fused_cpu

    _fused_cpu.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    print(f"load average at start: {_load():.2f}; threads: {args.threads} (numba layer: ", end="")
    _fused_cpu.warm_up()
    print(f"{numba.threading_layer()}); numba {numba.__version__}; repeats {args.repeats}", flush=True)
    if "numpy" in args.only:
        numpy_targets(args.repeats, args.quick)
    if "torch" in args.only:
        import torch

        torch.set_num_threads(args.threads)
        torch_targets(args.repeats, args.quick)
    if not args.no_first_call:
        first_call_costs()
    print(f"{sum(RESULTS)} of {len(RESULTS)} targets met; load average at the end: {_load():.2f}")


if __name__ == "__main__":
    main()
