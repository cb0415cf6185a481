"""Shared test helpers: the public functions by name, a tolerance unit, dtypes by name.

Running a catalogue case is ``lse_dispatch.cases.run_case`` (the runner that
``lse-dispatch report`` and the conformance suite use); ulps are
``lse_dispatch.oracle.ulp``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import oracle

FUNCTIONS = {
    "logsumexp": lse_dispatch.logsumexp,
    "softmax": lse_dispatch.softmax,
    "log_softmax": lse_dispatch.log_softmax,
}


def ulp(value, dtype: str) -> np.ndarray:
    """One ulp of ``dtype`` at ``|value|``, the larger one at a binade edge.

    A result within k ulps of an exact value just above a power of two may
    itself sit just below it, where the spacing is half as large; taking the
    unit (``oracle.ulp``) a few ulps further out covers both sides.
    """
    eps = 2.0 ** (1 - oracle.FORMATS[oracle.dtype_name(dtype)][0])
    return oracle.ulp(np.abs(np.asarray(value, dtype=np.float64)) * (1 + 8 * eps), dtype)


def np_dtype(dtype: str):
    """The NumPy dtype of a dtype name (bfloat16 through ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def need_dtype(backend, dtype: str) -> None:
    """Skip unless ``backend`` (a test target) has ``dtype``."""
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.id} has no {dtype}")


INF, NAN = math.inf, math.nan
#: (input, logsumexp, softmax, log_softmax) of one line, exact: the contract's
#: limits, which every kernel is held to (padded with -inf by the callers).
LIMIT_ROWS = [
    ([INF, 1.0, INF], INF, [0.5, 0.0, 0.5], [-math.log(2), -INF, -math.log(2)]),
    ([-INF, -INF, -INF], -INF, [0.0, 0.0, 0.0], [-INF, -INF, -INF]),
    ([-INF, 0.0, -INF], 0.0, [0.0, 1.0, 0.0], [-INF, 0.0, -INF]),
    ([NAN, 0.0, 1.0], NAN, [NAN, NAN, NAN], [NAN, NAN, NAN]),
    ([INF, NAN, 0.0], NAN, [NAN, NAN, NAN], [NAN, NAN, NAN]),
    ([0.0, NAN, 1.0], NAN, [NAN, NAN, NAN], [NAN, NAN, NAN]),
    ([1.0e30, 1.0e30, -1.0e30], 1.0e30 + math.log(2), [0.5, 0.5, 0.0], [-math.log(2), -math.log(2), -2.0e30]),
]
