"""Shared test helpers: the public functions by name, a tolerance unit, dtypes by name.

Running a catalogue case is ``lse_dispatch.cases.run_case`` (the runner that
``lse-dispatch report`` and the conformance suite use); ulps are
``lse_dispatch.oracle.ulp``.
"""

from __future__ import annotations

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
