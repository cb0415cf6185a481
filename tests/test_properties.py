"""Property tests (hypothesis) on every backend.

Inputs are multiples of 2**-8 with magnitude below 64 and shifts are
integers below 512, so that ``x + c`` is exact in float32 and float64
(at most 18 significant bits).  Tolerances follow from the 4-ulp contract of
each result, not from trial and error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lse_dispatch import log_softmax, logsumexp, softmax
from lse_dispatch.cases import ULP_BUDGET

from ._helpers import ulp

BUDGET = ULP_BUDGET["float32"]
assert BUDGET == ULP_BUDGET["float64"]


@st.composite
def problems(draw):
    """(values, axis, dtype): 1-D or 2-D, exact in float32."""
    # A few shapes, so that jit traces are reused across examples.
    shape = draw(st.sampled_from([(1,), (7,), (12,), (3, 4), (2, 9)]))
    ndim = len(shape)
    steps = draw(hnp.arrays(np.int32, shape, elements=st.integers(-(2**14), 2**14)))
    axis = draw(st.sampled_from([None, 0, -1] + ([1, (0, 1)] if ndim == 2 else [])))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    return steps.astype(np.float64) / 256, axis, dtype


def _count(shape, axis):
    if axis is None:
        return math.prod(shape)
    axes = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(shape[ax] for ax in axes)


def _max(a, axis):
    return np.max(a, axis=axis)


def _skip_missing(backend, dtype):
    from hypothesis import assume

    assume(dtype in backend.dtypes)


@pytest.fixture
def backend(backend):
    """Every backend; JAX under jit only.

    Eager JAX compiles every primitive anew for each shape (about 4 s per
    shape here), which random shapes turn into minutes; the jit variants
    (``jax:jit``, ``jax:x64:jit``) run the same properties through the same
    code, and eager JAX runs the catalogue and the contract tests.
    """
    if backend.name == "jax" and not backend.jit:
        pytest.skip("properties run on JAX under jit (jax:jit, jax:x64:jit); eager JAX compiles per shape")
    return backend


@given(problem=problems(), shift=st.integers(-512, 512))
def test_shift_invariance(backend, problem, shift):
    a, axis, dtype = problem
    _skip_missing(backend, dtype)
    got = backend.to_numpy(backend.call(logsumexp, backend.asarray(a, dtype), axis=axis)).astype(np.float64)
    moved = backend.to_numpy(backend.call(logsumexp, backend.asarray(a + shift, dtype), axis=axis)).astype(np.float64)
    # exact lse(a + c) = exact lse(a) + c; each result is within 4 ulps of its own.
    difference = np.array([math.fsum([m, -g, -shift]) for m, g in zip(np.ravel(moved), np.ravel(got))])
    bound = BUDGET * (ulp(moved, dtype) + ulp(got, dtype))
    assert (np.abs(difference) <= np.ravel(bound)).all(), (got, moved, shift)


@given(problem=problems())
def test_between_max_and_max_plus_log_n(backend, problem):
    a, axis, dtype = problem
    _skip_missing(backend, dtype)
    got = backend.to_numpy(backend.call(logsumexp, backend.asarray(a, dtype), axis=axis)).astype(np.float64)
    top = _max(a, axis)
    n = _count(a.shape, axis)
    # m + log1p(nonnegative) never rounds below m.
    assert (got >= top).all(), (got, top)
    assert (got <= top + math.log(n) + BUDGET * ulp(top + math.log(n), dtype)).all(), (got, top, n)


@given(problem=problems())
def test_softmax_sums_to_one(backend, problem):
    a, axis, dtype = problem
    _skip_missing(backend, dtype)
    p = backend.to_numpy(backend.call(softmax, backend.asarray(a, dtype), axis=axis)).astype(np.float64)
    assert p.shape == a.shape
    assert (p >= 0).all() and (p <= 1).all()
    axes = tuple(range(a.ndim)) if axis is None else axis if isinstance(axis, tuple) else (axis,)
    moved = np.moveaxis(p, [ax % a.ndim for ax in axes], list(range(-len(axes), 0)))
    flat = moved.reshape(moved.shape[: a.ndim - len(axes)] + (-1,))
    n = flat.shape[-1]
    eps = float(np.finfo(dtype).eps)
    # Each entry within 4 ulps (<= 4 eps relative, or 4 subnormal units) of
    # the exact p_i, which sum to 1; the fsum is correctly rounded.
    tol = BUDGET * eps + BUDGET * n * float(np.finfo(dtype).smallest_subnormal) + 2.0**-53
    for row in flat.reshape(-1, n):
        assert abs(math.fsum(row) - 1.0) <= tol, math.fsum(row) - 1.0


@given(problem=problems())
def test_exp_of_log_softmax_is_softmax(backend, problem):
    a, axis, dtype = problem
    _skip_missing(backend, dtype)
    x = backend.asarray(a, dtype)
    p = backend.to_numpy(backend.call(softmax, x, axis=axis)).astype(np.float64)
    logp = backend.to_numpy(backend.call(log_softmax, x, axis=axis)).astype(np.float64)
    # log_softmax within 4 ulps moves exp by a factor exp(4 ulp(logp));
    # softmax itself is within 4 ulps of the same exact value; exp in float64
    # adds one float64 ulp.
    from_log = np.exp(logp)
    slack = np.expm1(BUDGET * ulp(logp, dtype))
    bound = from_log * slack + BUDGET * ulp(p, dtype) + 2 * np.spacing(from_log)
    assert (np.abs(from_log - p) <= bound * (1 + 1e-12)).all(), np.max(np.abs(from_log - p) / bound)
