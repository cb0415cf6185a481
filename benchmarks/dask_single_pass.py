"""Single-pass Dask logsumexp against two-pass methods, side by side on one cluster.

    python benchmarks/dask_single_pass.py --gigabytes 2 --chunk-mib 64 --repeats 3

Methods, each on the same lazily generated random float64 array and the same
2-worker LocalCluster (loopback, 1 thread per worker):

* ``single-pass``: ``lse_dispatch.logsumexp`` (one tree reduction over the state);
* ``scipy``: ``scipy.special.logsumexp`` in array-API mode (``SCIPY_ARRAY_API=1``
  is set before SciPy is imported), which takes the max and then the sum;
* ``generic-two-pass``: lse-dispatch's generic array-API path on the same array.

After a warm-up on a small slice, runs are interleaved and the median wall time of each is reported, with each
method's peak worker RSS, and the ratio single-pass / scipy.
"""

from __future__ import annotations

import os

os.environ["SCIPY_ARRAY_API"] = "1"  # before anything imports SciPy

import argparse
import math
import statistics
import time

import dask.array as da
import numpy as np
import scipy
import scipy.special
from dask.distributed import Client, LocalCluster

from lse_dispatch import _generic, logsumexp
from lse_dispatch._call import prepare


def _reset_peak(dask_worker):
    import threading

    import psutil

    process = psutil.Process()
    old = getattr(dask_worker, "_bench_memory", None)
    if old is not None:
        old["running"] = False
    record = {"peak": process.memory_info().rss, "running": True}

    def sample():
        while record["running"]:
            record["peak"] = max(record["peak"], process.memory_info().rss)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    dask_worker._bench_memory = record


def _read_peak(dask_worker):
    record = dask_worker._bench_memory
    record["running"] = False
    return record["peak"]


def _generic_two_pass(x):
    value, _ = _generic.logsumexp(prepare("logsumexp", x, axis=None))
    return value


METHODS = {
    "single-pass": logsumexp,
    "scipy": scipy.special.logsumexp,
    "generic-two-pass": _generic_two_pass,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--chunk-mib", type=float, default=64.0)
    parser.add_argument("--columns", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-limit", default="8GiB")
    args = parser.parse_args(argv)

    rows = math.ceil(args.gigabytes * 1e9 / 8 / args.columns)
    chunk_rows = max(1, int(args.chunk_mib * 2**20 / 8 / args.columns))
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address="127.0.0.1:0", memory_limit=args.memory_limit,
    ) as cluster, Client(cluster) as client:
        x = da.random.default_rng(7).standard_normal((rows, args.columns), chunks=(chunk_rows, args.columns))
        print(f"array: {x.nbytes / 1e9:.2f} GB float64 generated lazily, {x.npartitions} chunks of "
              f"{chunk_rows * args.columns * 8 / 2**20:.0f} MiB; cluster: 2 processes x 1 thread, "
              f"memory limit {args.memory_limit}; scipy {scipy.__version__}")
        lazy = {name: method(x) for name, method in METHODS.items()}
        for name, value in lazy.items():
            if not isinstance(value, da.Array):
                raise SystemExit(f"{name} did not return a Dask array ({type(value).__name__})")
        # Warm-up on a small slice: imports and first-call costs on the workers.
        small = x[: 2 * chunk_rows]
        for method in METHODS.values():
            client.compute(method(small)).result()
        times = {name: [] for name in METHODS}
        peaks = {name: [] for name in METHODS}
        values = {}
        for _ in range(args.repeats):
            for name, value in lazy.items():
                client.run(_reset_peak)
                start = time.perf_counter()
                values[name] = np.asarray(client.compute(value).result()).item()
                times[name].append(time.perf_counter() - start)
                peaks[name].append(max(client.run(_read_peak).values()))
        print(f"{'method':<18} {'median s':>9} {'runs (s)':<26} {'peak worker RSS':>16}  value")
        for name in METHODS:
            runs = ", ".join(f"{t:.2f}" for t in times[name])
            print(f"{name:<18} {statistics.median(times[name]):>9.2f} {runs:<26} "
                  f"{max(peaks[name]) / 2**20:>12.0f} MiB  {values[name]!r}")
        ratio = statistics.median(times["single-pass"]) / statistics.median(times["scipy"])
        generic = statistics.median(times["single-pass"]) / statistics.median(times["generic-two-pass"])
        print(f"ratio single-pass / scipy two-pass = {ratio:.2f}")
        print(f"ratio single-pass / generic two-pass = {generic:.2f}")
        assert np.isclose(values["single-pass"], values["scipy"], rtol=1e-12, atol=0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
