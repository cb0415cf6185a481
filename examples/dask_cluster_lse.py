"""logsumexp of a lazily generated >= 10 GB array on a 2-worker Dask cluster.

Starts a ``dask.distributed.LocalCluster`` (2 worker processes, loopback),
builds a random float64 array that never exists in full anywhere, reduces it
with ``lse_dispatch.logsumexp`` (one tree reduction over the mergeable state)
while a progress bar runs, and reports each worker's peak resident memory,
sampled every 20 ms inside the worker process.

    python examples/dask_cluster_lse.py --gigabytes 10 --chunk-mib 100

For N(0, 1) entries, logsumexp is close to log(n) + 1/2 (E exp(X) = e^{1/2}),
which the script prints as a sanity check.
"""

from __future__ import annotations

import argparse
import math
import time

import dask.array as da
from dask.distributed import Client, LocalCluster, progress

from lse_dispatch import logsumexp


def _start_sampler(dask_worker):
    """Sample this worker process's RSS every 20 ms (runs inside the worker)."""
    import threading

    import psutil

    process = psutil.Process()
    rss = process.memory_info().rss
    record = {"baseline": rss, "peak": rss, "running": True}

    def sample():
        while record["running"]:
            record["peak"] = max(record["peak"], process.memory_info().rss)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    dask_worker._lse_memory = record


def _stop_sampler(dask_worker):
    record = dask_worker._lse_memory
    record["running"] = False
    return {"baseline": record["baseline"], "peak": record["peak"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=10.0, help="array size in GB (1e9 bytes)")
    parser.add_argument("--chunk-mib", type=float, default=100.0, help="chunk size in MiB")
    parser.add_argument("--columns", type=int, default=25_000)
    parser.add_argument("--memory-limit", default="6GiB", help="memory limit per worker")
    args = parser.parse_args(argv)

    rows = math.ceil(args.gigabytes * 1e9 / 8 / args.columns)
    chunk_rows = max(1, int(args.chunk_mib * 2**20 / 8 / args.columns))
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit=args.memory_limit,
    ) as cluster, Client(cluster) as client:
        x = da.random.default_rng(2026).standard_normal((rows, args.columns), chunks=(chunk_rows, args.columns))
        print(f"array: shape {x.shape}, {x.nbytes / 1e9:.2f} GB float64, {x.npartitions} chunks of "
              f"{chunk_rows * args.columns * 8 / 2**20:.0f} MiB, generated lazily on the workers")
        print(f"cluster: 2 worker processes x 1 thread on 127.0.0.1, memory limit {args.memory_limit} each")
        result = logsumexp(x)
        client.run(_start_sampler)
        start = time.perf_counter()
        future = client.compute(result)
        progress(future)
        value = float(future.result())
        elapsed = time.perf_counter() - start
        memory = client.run(_stop_sampler)
        print()
        print(f"logsumexp = {value!r}  (log(n) + 1/2 = {math.log(x.size) + 0.5!r})")
        print(f"wall time {elapsed:.1f} s, {x.nbytes / 1e9 / elapsed:.2f} GB/s")
        for address, record in sorted(memory.items()):
            print(
                f"worker {address}: peak RSS {record['peak'] / 2**20:.0f} MiB "
                f"(baseline {record['baseline'] / 2**20:.0f} MiB, +{(record['peak'] - record['baseline']) / 2**20:.0f} MiB)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
