"""A loop of small calls in a fresh process: when the compiled kernels load, and what each call costs.

    python benchmarks/first_calls.py [--library torch] [--op softmax] [--shape 32,4096]
        [--dtype float32] [--calls 3000] [--warm-up]

The compiled CPU kernels (``numpy.fused``, ``torch.fused``) load on first
use; until then a dtype's calls below ``FIRST_CALL_ELEMENTS`` entries run the
other kernels, and they add up: the call that takes their entries past
``CUMULATIVE_ELEMENTS``, or their time past ``CUMULATIVE_SECONDS``, loads the code (docs/fused_cpu.md, "Compile
latency").  This runs ``--calls`` calls of one operation in a new Python
process, as a user's loop would (torch with one intra-op thread), and prints
the medians of the first and last 500 calls, the slowest call (the one that
loads the code), the total, the library's own function on the same input,
and which kernel ran at the end.  ``--warm-up`` calls
``lse_dispatch.warm_up()`` first, as start-up code would.  The machine's load
average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent("""
    import json, statistics, sys, time
    library, op, dtype = sys.argv[1], sys.argv[2], sys.argv[6]
    shape, calls, warm = tuple(map(int, sys.argv[3].split(","))), int(sys.argv[4]), sys.argv[5] == "1"
    import numpy as np
    import lse_dispatch
    if library == "torch":
        import torch
        torch.set_num_threads(1)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(dtype))
        native = {"softmax": lambda: torch.softmax(x, -1), "log_softmax": lambda: torch.log_softmax(x, -1),
                  "logsumexp": lambda: torch.logsumexp(x, -1)}[op]
    else:
        import scipy.special
        x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        native = lambda: getattr(scipy.special, op)(x, axis=-1)
    loaded = lse_dispatch.warm_up() if warm else ()
    f = getattr(lse_dispatch, op)
    times = []
    start = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        f(x, axis=-1)
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    with lse_dispatch.trace() as seen:
        f(x, axis=-1)
    theirs = []
    for _ in range(300):
        t = time.perf_counter()
        native()
        theirs.append(time.perf_counter() - t)
    head = times[:500]
    tail = times[-500:]
    print(json.dumps({"total_s": total, "first_median_s": statistics.median(head),
                      "last_median_s": statistics.median(tail), "slowest_s": max(times),
                      "slowest_call": times.index(max(times)) + 1, "native_median_s": statistics.median(theirs),
                      "at_end": seen.implementations[-1], "warm_up": list(loaded)}))
""")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=("numpy", "torch"), default="torch")
    parser.add_argument("--op", choices=("softmax", "log_softmax", "logsumexp"), default="softmax")
    parser.add_argument("--shape", default="32,4096", help="comma-separated extents (reduced axis -1)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--warm-up", action="store_true", help="call lse_dispatch.warm_up() before the loop")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    done = subprocess.run([sys.executable, "-c", _CHILD, args.library, args.op, args.shape, str(args.calls),
                           "1" if args.warm_up else "0", args.dtype], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return done.returncode
    r = json.loads(done.stdout.strip().splitlines()[-1])
    us = 1e6
    print(f"# {args.library} {args.op} ({args.shape}) {args.dtype}, {args.calls} calls in a fresh process"
          f"{', after lse_dispatch.warm_up() ' + str(tuple(r['warm_up'])) if args.warm_up else ''}; load average {load}")
    print(f"total {r['total_s']:.2f} s; first 500 calls median {r['first_median_s'] * us:.0f} us; "
          f"last 500 median {r['last_median_s'] * us:.0f} us; slowest call {r['slowest_s']:.2f} s "
          f"(call {r['slowest_call']}); native {r['native_median_s'] * us:.0f} us; kernel at the end: {r['at_end']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
