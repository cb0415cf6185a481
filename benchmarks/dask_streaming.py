"""What ``OnlineLogSumExp`` costs on a stream of Dask chunks: building the graph, and running it.

    python benchmarks/dask_streaming.py [--chunks 300] [--rows 4] [--width 10] [--repeats 3]

Each run folds ``--chunks`` lazy chunks of shape ``(rows, width)`` into a new
``OnlineLogSumExp(axis=1)`` (``update``, which only builds the graph), takes
``result()`` and computes it with the synchronous scheduler.  Prints, per run,
the milliseconds per ``update``, the seconds of ``compute`` and the number of
tasks in the result's graph, then the medians.  Run it from a build's folder
to time that build (as ``ab_versions.py`` does).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import dask
import dask.array as da
import numpy as np

from lse_dispatch import OnlineLogSumExp


def _run(chunks: int, rows: int, width: int, seed: int) -> tuple[float, float, int]:
    rng = np.random.default_rng(seed)
    pieces = [da.from_array(rng.normal(size=(rows, width)) - 30.0, chunks=(max(1, rows // 2), width))
              for _ in range(chunks)]
    start = time.perf_counter()
    running = OnlineLogSumExp(axis=1)
    for piece in pieces:
        running.update(piece)
    result = running.result()
    built = time.perf_counter()
    tasks = len(dict(result.__dask_graph__()))
    dask.compute(result, scheduler="sync")
    done = time.perf_counter()
    return (built - start) / chunks * 1e3, done - built, tasks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=300)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--width", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.chunks} chunks of ({args.rows}, {args.width}) float64; load average {load:.2f}")
    runs = []
    for seed in range(args.repeats):
        per_update, compute, tasks = _run(args.chunks, args.rows, args.width, seed)
        runs.append((per_update, compute))
        print(f"  run {seed}: update {per_update:.2f} ms each, compute {compute:.2f} s, {tasks} tasks")
    print(f"median: update {statistics.median(r[0] for r in runs):.2f} ms each, "
          f"compute {statistics.median(r[1] for r in runs):.2f} s")


if __name__ == "__main__":
    main()
