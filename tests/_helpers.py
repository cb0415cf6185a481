"""Shared test helpers: running a catalogue case on a backend, ulp bounds."""

from __future__ import annotations

import numpy as np

import lse_dispatch
from lse_dispatch import cases

FUNCTIONS = {
    "logsumexp": lse_dispatch.logsumexp,
    "softmax": lse_dispatch.softmax,
    "log_softmax": lse_dispatch.log_softmax,
}


def run_case(backend, case, dtype: str, inputs: dict):
    """Run ``case`` on ``backend`` in ``dtype``; return NumPy results.

    Checks namespace, device, dtype and shape of every result on the way.
    """
    a = backend.asarray(inputs["a"], dtype)
    kwargs = dict(case.kwargs)
    if "b" in inputs:
        kwargs["b"] = backend.asarray(inputs["b"], dtype)
    if "where" in inputs:
        kwargs["where"] = backend.asarray(np.asarray(inputs["where"], dtype=bool), "bool")
    out = backend.call(FUNCTIONS[case.op], a, **kwargs)
    parts = out if kwargs.get("return_sign") else (out,)
    want_shape = expected_shape(case.op, np.shape(inputs["a"]), kwargs.get("axis"), kwargs.get("keepdims", False))
    for part in parts:
        backend.check_array(part, dtype, want_shape)
    got = tuple(backend.to_numpy(part) for part in parts)
    return got if kwargs.get("return_sign") else got[0]


def expected_shape(op: str, shape: tuple, axis, keepdims: bool) -> tuple:
    """The result shape the contract promises."""
    if op != "logsumexp":
        return tuple(shape)
    ndim = len(shape)
    axes = range(ndim) if axis is None else [ax % ndim for ax in (axis if isinstance(axis, tuple) else (axis,))]
    if keepdims:
        return tuple(1 if ax in axes else n for ax, n in enumerate(shape))
    return tuple(n for ax, n in enumerate(shape) if ax not in axes)


def case_inputs(case, dtype: str) -> dict:
    """The case's inputs, made once per process where the catalogue caches them."""
    make = getattr(cases, "inputs", None)
    return make(case, dtype) if make is not None else case.make(dtype)


def ulp(value, dtype: str) -> np.ndarray:
    """One ulp of ``dtype`` at ``|value|``, the larger one at a binade edge.

    A result within k ulps of an exact value just above a power of two may
    itself sit just below it, where the spacing is half as large; taking the
    spacing a few ulps further out covers both sides.  Below the smallest
    normal number the unit is that number, as in the contract (and in
    ``oracle.ulp_error``): XLA and GPUs flush subnormal results to zero.
    """
    info = np.finfo(np.float32 if dtype == "bfloat16" else dtype)
    eps = 2.0**-7 if dtype == "bfloat16" else float(info.eps)
    # bfloat16 has float32's exponent range, so the same smallest normal.
    smallest_normal = float(info.smallest_normal)
    magnitude = np.abs(np.asarray(value, dtype=np.float64)) * (1 + 8 * eps)
    exponent = np.floor(np.log2(np.maximum(magnitude, smallest_normal)))
    return np.where(magnitude < smallest_normal, smallest_normal, 2.0**exponent * eps)
