"""Every float32 ``d`` in ``[-87, 88]`` through the fused kernels' float32 exponential.

    python scripts/expf_exhaustive.py

Prints the worst relative error of ``_term32`` and ``_stored_term32`` (normal
results) against float64 ``exp`` (itself within ``2**-52``), in units of
``2**-24``, with the input where it occurs, and checks both against
``EXPF_ERROR`` and against each other.  About 2.2 billion inputs: half a minute
on two threads (numba; maintainer tooling, not part of the test suite, which
checks every 61st input).
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from lse_dispatch.backends import _numba_kernels as K


@njit(cache=False, nogil=True)
def _worst(first, last, negative):
    worst, where, differ = 0.0, np.float32(0.0), 0
    sign = np.int64(1) << 31 if negative else np.int64(0)
    for bits in range(first, last):
        d = K._from_bits32(bits | sign)
        exact = math.exp(np.float64(d))
        t, stored = np.float64(K._term32(d)), np.float64(K._stored_term32(d))
        error = max(abs(t / exact - 1.0), abs(stored / exact - 1.0))
        if error > worst:
            worst, where = error, d
        differ += t != stored
    return worst, where, differ


def main() -> int:
    start = time.perf_counter()
    ranges = [(True, int(np.array(np.float32(87.0)).view(np.int32)) + 1),
              (False, int(np.array(np.float32(88.0)).view(np.int32)) + 1)]
    pieces = [(negative, lo, min(lo + (1 << 24), last)) for negative, last in ranges for lo in range(0, last, 1 << 24)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: (p[0], *_worst(p[1], p[2], p[0])), pieces))
    worst = max(results, key=lambda r: r[1])
    differ = sum(r[3] for r in results)
    inputs = sum(hi - lo for _, lo, hi in pieces)
    print(f"{inputs} float32 inputs in [-87, 88], {time.perf_counter() - start:.1f} s")
    print(f"worst relative error {worst[1] * 2**24:.4f} * 2**-24 at d = {float(worst[2])!r}; "
          f"EXPF_ERROR = {K.EXPF_ERROR * 2**24:.4f} * 2**-24; _term32 and _stored_term32 differ on {differ}")
    return 0 if worst[1] <= K.EXPF_ERROR and differ == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
