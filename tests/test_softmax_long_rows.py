"""softmax on long rows where no wider accumulator exists (float64).

The former compensated form ``exp(hi) * (1 + lo)`` with ``hi = (x - m) -
log1p(c - 1 + r)`` could not recover the rounding of ``log1p`` itself, half
an ulp of a number near ``log n``: measured 5.7 ulps at n = 50,000 and 7.8
ulps at n = 2**20 on this row (numpy, float64).  ``softmax_from_state`` now
divides ``exp(x - m)`` by ``c + r``, whose error does not grow with ``log n``.
"""

from __future__ import annotations

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import oracle

mpmath = pytest.importorskip("mpmath")


def _row(n):
    x = np.zeros(n)
    x[0] = 0.5
    with mpmath.workprec(200):
        total = mpmath.exp(mpmath.mpf(0.5)) + (n - 1)
        exact = np.array([mpmath.exp(mpmath.mpf(0.5)) / total, 1 / total], dtype=object)
    return x, exact


@pytest.mark.parametrize("n", [50_000, 2**20])
def test_float64_softmax_of_a_long_row(backend, n):
    if "float64" not in backend.dtypes:
        pytest.skip(f"{backend.id} has no float64")
    if n > 50_000 and backend.id not in ("numpy", "torch", "jax:x64", "dask"):
        pytest.skip("2**20 entries on one variant per library")
    x, exact = _row(n)
    got = backend.to_numpy(backend.call(lse_dispatch.softmax, backend.asarray(x, "float64")))
    errors = oracle.ulp_error(got[[0, 1]], exact, np.float64)
    assert errors.max() <= 4.0, errors
