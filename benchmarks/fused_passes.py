"""The compiled row kernel pass by pass: what each pass over a line costs, on one thread.

    python benchmarks/fused_passes.py [--shapes 32x4096,1024x128] [--repeats 9]

For float32 rows it times, in microseconds a call (median of ``--repeats``):

* ``max``: the integer-keyed max of every row (``_row_max``);
* ``sum f64``: the terms and their sum in float64 lanes (``_row_sum_fast``,
  what logsumexp runs); ``sum f32``: the float32 terms (``_row_sum_single``,
  log_softmax), and ``sum f32+store`` with each term stored (softmax);
* ``scale``: softmax's output pass over the stored terms, ``lsm out``:
  log_softmax's ``(x - m) - L``;
* ``softmax``, ``log_softmax``: the whole compiled forward (``_items``, what
  ``torch.fused`` runs), ``backward``: the fused softmax backward;

beside a bare ``np.exp`` and, when torch is installed, torch's softmax and
log_softmax and softmax's backward (``torch._softmax_backward_data``) on one
intra-op thread.  The
per-pass drivers are compiled here (numba, not cached): the first line takes
a few seconds.  Maintainer tooling: it calls private functions of
``lse_dispatch.backends._numba_kernels``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def _median_us(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= 0.02:
                break
        samples.append(elapsed / calls * 1e6)
    return statistics.median(samples)


def _drivers():
    from numba import njit

    from lse_dispatch.backends import _numba_kernels as k

    options = {"cache": False, "nogil": True, "error_model": "numpy", "_nrt": False}

    @njit(**options)
    def max_pass(x, mask):
        first, total = np.int64(0), 0.0
        for i in range(x.shape[0]):
            m, _ = k._row_max(x, mask, False, i, first, x.shape[1])
            total += m
        return total

    @njit(**options)
    def sum_pass(x, mask, out, store):
        first, total = np.int64(0), 0.0
        for i in range(x.shape[0]):
            _, rest = k._row_sum_fast(x, mask, False, i, first, x.shape[1], 3.0, out, store)
            total += rest
        return total

    @njit(**options)
    def sum32_pass(x, mask, out, store, buffer):
        first, total = np.int64(0), 0.0
        s, _ = k._shift32(3.0)
        for i in range(x.shape[0]):
            _, rest = k._row_sum_single(x, mask, False, i, first, x.shape[1], 3.0, s, out, store, buffer)
            total += rest
        return total

    @njit(**options)
    def output_pass(x, mask, out, mode):
        first = np.int64(0)
        for i in range(x.shape[0]):
            k._row_output(x, mask, False, i, first, x.shape[1], 3.0, 2.0, 0.5, out, mode, True)
        return out[0, 0]

    return k, max_pass, sum_pass, sum32_pass, output_pass


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="32x4096,1024x128", help="rows x entries, comma-separated")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    from lse_dispatch.backends import _fused_cpu

    _fused_cpu.warm_up(("float32",))
    k, max_pass, sum_pass, sum32_pass, output_pass = _drivers()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        torch = None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"float32 rows, one thread, median of {args.repeats} (us a call); load average {load:.2f}")
    for spec in args.shapes.split(","):
        rows, n = (int(v) for v in spec.lower().split("x"))
        x = np.random.default_rng(0).standard_normal((rows, n)).astype(np.float32)
        out = np.empty_like(x)
        buffer = np.empty(k.CHUNK)
        mask, _ = _fused_cpu._nothing(x.dtype)
        backward = _fused_cpu._compiled("float32", "backward")
        geometry = _fused_cpu._geometry(x.shape, (1,), 4, k.SOFTMAX)
        log_geometry = _fused_cpu._geometry(x.shape, (1,), 4, k.LOG_SOFTMAX)
        y = np.exp(x - x.max(axis=1, keepdims=True))
        y /= y.sum(axis=1, keepdims=True)
        g = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
        timed = {
            "max": lambda: max_pass(x, mask),
            "sum f64": lambda: sum_pass(x, mask, out, False),
            "sum f32": lambda: sum32_pass(x, mask, out, False, buffer),
            "sum f32+store": lambda: sum32_pass(x, mask, out, True, buffer),
            "scale": lambda: output_pass(x, mask, out, k.SOFTMAX),
            "lsm out": lambda: output_pass(x, mask, out, k.LOG_SOFTMAX),
            "softmax": lambda: _fused_cpu._Lines(x, geometry, None, k.SOFTMAX, 1),
            "log_softmax": lambda: _fused_cpu._Lines(x, log_geometry, None, k.LOG_SOFTMAX, 1),
            "backward": lambda: backward(y, g, mask, False, 1, False, out, 0, rows),
            "np.exp": lambda: np.exp(x),
        }
        if torch is not None:
            tx, ty, tg = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(g)
            timed["torch softmax"] = lambda: torch.softmax(tx, -1)
            timed["torch log_softmax"] = lambda: torch.log_softmax(tx, -1)
            timed["torch backward"] = lambda: torch._softmax_backward_data(tg, ty, -1, torch.float32)
        medians = {name: _median_us(fn, args.repeats) for name, fn in timed.items()}
        figures = ", ".join(f"{name} {value:.1f}" for name, value in medians.items())
        print(f"({rows}, {n}): {figures}; softmax {medians['softmax'] * 1e3 / rows:.0f} ns a row")


if __name__ == "__main__":
    main()
