"""logsumexp over a 4 GB numpy.memmap file with a bounded amount of extra memory.

    python examples/memmap_lse.py --path /tmp/lse-4gb.f64 --gigabytes 4 --block-mib 32

Writes the file once (random N(0, 1) float64, in 64 MiB pieces), then runs
``logsumexp_blocked`` over a read-only memmap while a thread samples the
process's memory every 5 ms from /proc/self/status:

* RssAnon -- anonymous memory: every allocation (the blocks' temporaries);
* RssFile -- pages of the mapped file, which the kernel may drop at any time;

and tracemalloc records the peak of NumPy's own buffers.  The result is
checked against log(n) + 1/2 and against Dask's tree reduction over the same
memmap.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
import tracemalloc

import numpy as np

from lse_dispatch import logsumexp_blocked


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class MemorySampler:
    def __init__(self, interval=0.005):
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._running = False

    def __enter__(self):
        self.baseline = {field: _status_kib(field) for field in self.peak}
        self.peak = dict(self.baseline)
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            for field in self.peak:
                self.peak[field] = max(self.peak[field], _status_kib(field))
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()

    def extra_mib(self, field):
        return (self.peak[field] - self.baseline[field]) / 1024


def write_file(path, entries):
    array = np.memmap(path, dtype=np.float64, mode="w+", shape=(entries,))
    rng = np.random.default_rng(2026)
    step = 8 * 2**20  # 64 MiB of float64
    for start in range(0, entries, step):
        stop = min(entries, start + step)
        array[start:stop] = rng.standard_normal(stop - start)
    array.flush()
    del array


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="/tmp/lse-4gb.f64")
    parser.add_argument("--gigabytes", type=float, default=4.0, help="file size in GB (1e9 bytes)")
    parser.add_argument("--block-mib", type=float, default=32.0)
    parser.add_argument("--budget-mib", type=float, default=256.0)
    args = parser.parse_args(argv)

    entries = int(args.gigabytes * 1e9) // 8
    if not os.path.exists(args.path) or os.path.getsize(args.path) != entries * 8:
        print(f"writing {entries * 8 / 1e9:.2f} GB to {args.path} ...", flush=True)
        write_file(args.path, entries)
    array = np.memmap(args.path, dtype=np.float64, mode="r", shape=(entries,))
    block_bytes = int(args.block_mib * 2**20)
    logsumexp_blocked(array[: 2**16], block_bytes=block_bytes)  # imports, first calls

    tracemalloc.start()
    with MemorySampler() as memory:
        start = time.perf_counter()
        value = float(logsumexp_blocked(array, block_bytes=block_bytes))
        elapsed = time.perf_counter() - start
    _, numpy_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    print(f"file: {array.nbytes / 1e9:.2f} GB float64 ({array.nbytes / 2**30:.2f} GiB), blocks of {args.block_mib:g} MiB")
    print(f"logsumexp_blocked = {value!r}  (log(n) + 1/2 = {math.log(entries) + 0.5!r})")
    print(f"time {elapsed:.1f} s, {array.nbytes / 1e9 / elapsed:.2f} GB/s")
    print(f"peak extra anonymous memory (RssAnon): {memory.extra_mib('RssAnon'):.0f} MiB "
          f"(budget {args.budget_mib:g} MiB)")
    print(f"peak tracemalloc (NumPy buffers): {numpy_peak / 2**20:.0f} MiB")
    print(f"peak extra file-backed pages (RssFile, reclaimable): {memory.extra_mib('RssFile'):.0f} MiB; "
          f"VmRSS +{memory.extra_mib('VmRSS'):.0f} MiB")

    import dask.array as da

    from lse_dispatch import logsumexp

    tree = float(logsumexp(da.from_array(array, chunks=block_bytes // 8)).compute(scheduler="threads"))
    print(f"Dask tree over the same memmap = {tree!r}; difference {abs(tree - value) / np.spacing(value):.0f} ulp")
    within = memory.extra_mib("RssAnon") <= args.budget_mib
    print("within budget" if within else "OVER BUDGET")
    return 0 if within else 1


if __name__ == "__main__":
    raise SystemExit(main())
