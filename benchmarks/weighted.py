"""Weighted logsumexp on NumPy against ``scipy.special.logsumexp``: ratios in one run.

    python benchmarks/weighted.py [--rounds 7] [--budget 0.2]

For each case (shape, dtype, reduced axis -1, weights uniform on [0, 2)) the
three callables run interleaved -- ``scipy.special.logsumexp``, lse_dispatch
as it dispatches (``numpy.fused`` once numba's code is loaded: ``warm_up``
runs first) and lse_dispatch's generic path (``backend="generic"``, what
every weighted call ran before ``numpy.fused`` took ``b``) -- one timing of
each per round; the figures are the medians over ``--rounds`` rounds, in
microseconds a call, with the ratios to SciPy.  Each timing repeats the call
enough times to last about ``--budget`` seconds.  Single-threaded on both
sides: the fused kernel's threads are set to 1 (SciPy's NumPy calls use one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import scipy.special

import lse_dispatch
from lse_dispatch.backends import _fused_cpu

CASES = [((10,), "float64"), ((10,), "float32"), ((100, 3), "float64"), ((200, 3), "float64"),
         ((64, 1000), "float64"), ((64, 1000), "float32"), ((4096, 1024), "float64"), ((4096, 1024), "float32")]


def _timing(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.2, help="seconds a timing should last")
    args = parser.parse_args(argv)
    _fused_cpu.warm_up()
    _fused_cpu.set_num_threads(1)
    rng = np.random.default_rng(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"weighted logsumexp, axis -1, b uniform on [0, 2); medians of {args.rounds} interleaved rounds, "
          f"microseconds a call; one thread; load average {load:.2f}")
    print(f"{'case':22s} {'scipy':>10s} {'ours':>10s} {'generic':>10s} {'ours/scipy':>11s} {'generic/scipy':>14s}")
    for shape, dtype in CASES:
        a = rng.standard_normal(shape).astype(dtype)
        b = rng.uniform(0.0, 2.0, shape).astype(dtype)
        callables = {
            "scipy": lambda: scipy.special.logsumexp(a, axis=-1, b=b),
            "ours": lambda: lse_dispatch.logsumexp(a, axis=-1, b=b),
            "generic": lambda: lse_dispatch.logsumexp(a, axis=-1, b=b, backend="generic"),
        }
        with lse_dispatch.trace() as seen:
            callables["ours"]()
        number = {name: max(1, int(args.budget / (_timing(fn, 1) * 1e-6 + 1e-9))) for name, fn in callables.items()}
        times = {name: [] for name in callables}
        for _ in range(args.rounds):
            for name, fn in callables.items():
                times[name].append(_timing(fn, number[name]))
        median = {name: statistics.median(values) for name, values in times.items()}
        case = f"{shape} {dtype}"
        print(f"{case:22s} {median['scipy']:10.1f} {median['ours']:10.1f} {median['generic']:10.1f} "
              f"{median['ours'] / median['scipy']:11.2f} {median['generic'] / median['scipy']:14.2f}"
              f"   ({seen.records[-1].implementation})")
    _fused_cpu.set_num_threads(None)


if __name__ == "__main__":
    main()
