"""The contract table of issue 2, one parametrized test per row, on every backend.

Rows the catalogue (``test_catalogue.py``) does not cover: dtype rules, every
form of ``axis`` and ``keepdims``, axis errors, 2-D slices where one row is
special and the others must stay accurate, broadcasting ``b`` and ``where``,
weights spanning 1e-300..1e300 and complex input.  Values come from the
mpmath oracle or are stated here; never from another backend.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import AxisError, log_softmax, logsumexp, oracle, softmax
from lse_dispatch.cases import ULP_BUDGET, round_to

from ._helpers import FUNCTIONS
from ._helpers import need_dtype as _need
from ._helpers import np_dtype as _np_dtype

REAL_DTYPES = ("float16", "bfloat16", "float32", "float64")


def assert_oracle(got, exact, dtype: str, what: str = "") -> None:
    """Every entry of ``got`` within the ulp budget of the oracle's ``exact``."""
    errors = oracle.ulp_error(got, exact, _np_dtype(dtype))
    worst = float(np.max(errors)) if errors.size else 0.0
    assert worst <= ULP_BUDGET[dtype], f"{what}: {worst:.3g} ulps (budget {ULP_BUDGET[dtype]}); got {got!r}"


def exact_for(op: str, a, axis=None, b=None, where=None):
    if op == "logsumexp":
        return oracle.exact_logsumexp(a, axis=axis, b=b, where=where)
    if op == "log_softmax":
        return oracle.exact_log_softmax(a, axis=axis, where=where)
    return oracle.exact_softmax(a, axis=axis, where=where)


def _values(shape, seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


OPS = ("logsumexp", "softmax", "log_softmax")


# -- 1. namespace, device, dtype ----------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", REAL_DTYPES)
def test_keeps_namespace_device_and_floating_dtype(backend, op, dtype):
    _need(backend, dtype)
    a = round_to(_values((3, 5)), dtype)
    out = backend.call(FUNCTIONS[op], backend.asarray(a, dtype), axis=-1)
    backend.check_array(out, dtype, (3,) if op == "logsumexp" else (3, 5))
    assert_oracle(backend.to_numpy(out), exact_for(op, a, axis=-1), dtype, f"{op} {dtype}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
def test_integer_and_bool_become_default_float(backend, op, dtype):
    if dtype == "int64" and backend.name == "jax" and not backend.x64:
        pytest.skip("JAX without x64 has no int64")
    values = np.array([[3, 0, -2, 7], [1, 1, 0, -5]]) if dtype != "bool" else np.array([[True, False, True, True]])
    out = backend.call(FUNCTIONS[op], backend.asarray(values, dtype), axis=1)
    default = backend.default_float()
    backend.check_array(out, default)
    name = str(default).split(".")[-1].removeprefix("dtype('").removesuffix("')")
    assert_oracle(backend.to_numpy(out), exact_for(op, values.astype(np.float64), axis=1), name, f"{op} of {dtype}")


def test_result_type_of_a_and_b(backend):
    _need(backend, "float64")
    a = round_to([0.5, -1.0, 2.0], "float32")
    b = np.array([0.1, 3.0, 2.5])
    out = backend.call(logsumexp, backend.asarray(a, "float32"), b=backend.asarray(b, "float64"))
    backend.check_array(out, "float64", ())
    assert_oracle(backend.to_numpy(out), oracle.exact_logsumexp(a, b=b), "float64")


# -- 2. axis and keepdims ------------------------------------------------------

AXES = [None, 0, 1, -1, 2, (0, 2), (-1, 0), (0, 1, 2), ()]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=repr)
def test_logsumexp_axis_and_keepdims(backend, axis, keepdims):
    dtype = "float64" if "float64" in backend.dtypes else "float32"
    a = round_to(_values((2, 3, 4), seed=1), dtype)
    out = backend.call(logsumexp, backend.asarray(a, dtype), axis=axis, keepdims=keepdims)
    exact = oracle.exact_logsumexp(a, axis=axis if axis != () else ())
    axes = tuple(range(3)) if axis is None else tuple(ax % 3 for ax in (axis if isinstance(axis, tuple) else (axis,)))
    if keepdims:
        shape = tuple(1 if ax in axes else n for ax, n in enumerate(a.shape))
        exact = exact.reshape(shape)
    else:
        shape = tuple(n for ax, n in enumerate(a.shape) if ax not in axes)
    backend.check_array(out, dtype, shape)
    assert_oracle(backend.to_numpy(out), exact, dtype, f"axis={axis!r} keepdims={keepdims}")


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", AXES, ids=repr)
def test_softmax_axis(backend, op, axis):
    dtype = "float64" if "float64" in backend.dtypes else "float32"
    a = round_to(_values((2, 3, 4), seed=2), dtype)
    out = backend.call(FUNCTIONS[op], backend.asarray(a, dtype), axis=axis)
    backend.check_array(out, dtype, a.shape)
    assert_oracle(backend.to_numpy(out), exact_for(op, a, axis=axis), dtype, f"{op} axis={axis!r}")


def test_axis_empty_tuple_reduces_nothing(backend):
    """``axis=()``: logsumexp is the input itself, softmax is 1, log_softmax 0."""
    dtype = "float32"
    a = round_to(_values((2, 3), seed=3), dtype)
    x = backend.asarray(a, dtype)
    np.testing.assert_array_equal(backend.to_numpy(backend.call(logsumexp, x, axis=())), a)
    np.testing.assert_array_equal(backend.to_numpy(backend.call(softmax, x, axis=())), np.ones((2, 3)))
    np.testing.assert_array_equal(backend.to_numpy(backend.call(log_softmax, x, axis=())), np.zeros((2, 3)))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    ("axis", "named"),
    [(2, "2"), (-3, "-3"), ((0, 0), "0"), ((1, -1), "1"), ((0, 5), "5")],
    ids=["out-of-range", "negative-out-of-range", "duplicate", "duplicate-negative", "tuple-out-of-range"],
)
def test_bad_axis_raises_naming_it(backend, op, axis, named):
    x = backend.asarray(np.zeros((2, 3)), "float32")
    with pytest.raises(AxisError, match=rf"axis.*(?<![\w-]){re.escape(named)}(?!\w)") as info:
        backend.call(FUNCTIONS[op], x, axis=axis)
    assert isinstance(info.value, ValueError) and isinstance(info.value, IndexError)


# -- 3. empty input --------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis", "result_shape"),
    [((0,), None, ()), ((3, 0), 1, (3,)), ((0, 3), 0, (3,)), ((0, 3), 1, (0,)), ((2, 0, 2), (1, 2), (2,))],
    ids=str,
)
def test_empty_reduction(backend, shape, axis, result_shape):
    dtype = "float32"
    x = backend.asarray(np.zeros(shape), dtype)
    value, sign = backend.call(logsumexp, x, axis=axis, return_sign=True)
    backend.check_array(value, dtype, result_shape)
    backend.check_array(sign, dtype, result_shape)
    np.testing.assert_array_equal(backend.to_numpy(value), np.full(result_shape, -np.inf))
    np.testing.assert_array_equal(backend.to_numpy(sign), np.zeros(result_shape))
    plain = backend.call(logsumexp, x, axis=axis)
    np.testing.assert_array_equal(backend.to_numpy(plain), np.full(result_shape, -np.inf))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 3)], ids=str)
def test_softmax_of_empty_is_empty(backend, op, shape):
    out = backend.call(FUNCTIONS[op], backend.asarray(np.zeros(shape), "float32"), axis=-1)
    backend.check_array(out, "float32", shape)
    assert backend.to_numpy(out).shape == shape


# -- 4-6. NaN, +inf, nothing included: only the affected slice changes ----------

_ROWS = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 0.0, -3.0, 2.5], [-0.5, 3.0, 1.5, -2.0]])


def _with_row(row):
    a = _ROWS.copy()
    a[1] = row
    return a


def _check_other_rows(got, a, op, dtype, where=None):
    exact = exact_for(op, a[[0, 2]], axis=1, where=None if where is None else where[[0, 2]])
    assert_oracle(got[[0, 2]], exact, dtype, f"{op}: rows without the special row")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("row", [[1.0, np.nan, 0.0, 2.0], [np.nan] * 4, [np.inf, np.nan, 0, 0], [-np.inf, np.nan, -np.inf, 0]],
                         ids=["one-nan", "all-nan", "nan-and-inf", "nan-and-neg-inf"])
def test_nan_makes_its_slice_nan(backend, op, row):
    dtype = "float32"
    a = _with_row(row)
    got = backend.to_numpy(backend.call(FUNCTIONS[op], backend.asarray(a, dtype), axis=1))
    assert np.isnan(got[1]).all(), got[1]
    _check_other_rows(got, a, op, dtype)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pos_inf_limits(backend, k):
    dtype = "float32"
    row = np.array([np.inf] * k + [1.0, -np.inf, 1e30][: 4 - k])
    a = _with_row(row)
    x = backend.asarray(a, dtype)
    at_inf = row == np.inf
    lse = backend.to_numpy(backend.call(logsumexp, x, axis=1))
    assert lse[1] == np.inf
    _check_other_rows(lse, a, "logsumexp", dtype)
    sm = backend.to_numpy(backend.call(softmax, x, axis=1))
    mp = oracle._mp()
    assert_oracle(sm[1][at_inf], np.array([mp.mpf(1) / k] * k, dtype=object), dtype, "1/k")
    assert (sm[1][~at_inf] == 0).all(), sm[1]
    _check_other_rows(sm, a, "softmax", dtype)
    lsm = backend.to_numpy(backend.call(log_softmax, x, axis=1))
    assert_oracle(lsm[1][at_inf], np.array([-oracle._mp().log(k)] * k, dtype=object), dtype, "-log k")
    assert (lsm[1][~at_inf] == -np.inf).all(), lsm[1]
    _check_other_rows(lsm, a, "log_softmax", dtype)


@pytest.mark.parametrize("how", ["all-neg-inf", "where", "b-zero", "where-and-b"])
def test_nothing_included(backend, how):
    dtype = "float32"
    a = _ROWS.copy()
    where = np.ones(a.shape, bool)
    b = np.ones(a.shape)
    if how == "all-neg-inf":
        a[1] = -np.inf
    if how in ("where", "where-and-b"):
        where[1] = False
        a[1] = [np.nan, np.inf, -np.inf, 1.0]
    if how in ("b-zero", "where-and-b"):
        b[1] = 0.0
        a[1] = [np.nan, np.inf, -np.inf, 1.0] if how == "b-zero" else a[1]
    x = backend.asarray(a, dtype)
    kw = {}
    if how in ("where", "where-and-b"):
        kw["where"] = backend.asarray(where, "bool")
    lse_kw = dict(kw)
    if how in ("b-zero", "where-and-b"):
        lse_kw["b"] = backend.asarray(b, dtype)
    value, sign = backend.call(logsumexp, x, axis=1, return_sign=True, **lse_kw)
    value, sign = backend.to_numpy(value), backend.to_numpy(sign)
    assert value[1] == -np.inf and sign[1] == 0, (value, sign)
    assert_oracle(value[[0, 2]], oracle.exact_logsumexp(a[[0, 2]], axis=1), dtype)
    np.testing.assert_array_equal(sign[[0, 2]], [1.0, 1.0])
    if how in ("b-zero", "where-and-b"):
        return  # softmax takes no weights
    sm = backend.to_numpy(backend.call(softmax, x, axis=1, **kw))
    lsm = backend.to_numpy(backend.call(log_softmax, x, axis=1, **kw))
    np.testing.assert_array_equal(sm[1], np.zeros(4))
    np.testing.assert_array_equal(lsm[1], np.full(4, -np.inf))
    _check_other_rows(sm, a, "softmax", dtype)
    _check_other_rows(lsm, a, "log_softmax", dtype)


# -- 7. weights b -----------------------------------------------------------------


def _exact_sign(a, b, axis):
    mp = oracle._mp()
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    a, b = np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1)
    out = np.empty(a.shape[:-1])
    with mp.workprec(200):
        for index in np.ndindex(out.shape):
            total = mp.fsum(mp.mpf(float(w)) * mp.exp(mp.mpf(float(x))) for x, w in zip(a[index], b[index]) if w != 0)
            out[index] = float(mp.sign(total))
    return out


@pytest.mark.parametrize("b_shape", [(3, 4), (4,), (3, 1), ()], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weights_broadcast_and_negative(backend, dtype, b_shape):
    _need(backend, dtype)
    a = round_to(_ROWS, dtype)
    rng = np.random.default_rng(4)
    b = round_to(rng.uniform(-2, 2, size=b_shape) if b_shape else -1.5, dtype)
    x, w = backend.asarray(a, dtype), backend.asarray(b, dtype)
    value, sign = backend.call(logsumexp, x, axis=1, b=w, return_sign=True)
    backend.check_array(value, dtype, (3,))
    backend.check_array(sign, dtype, (3,))
    value, sign = backend.to_numpy(value), backend.to_numpy(sign)
    assert_oracle(value, oracle.exact_logsumexp(a, axis=1, b=b), dtype, "log|sum|")
    want_sign = _exact_sign(a, b, 1)
    np.testing.assert_array_equal(sign, want_sign)
    plain = backend.to_numpy(backend.call(logsumexp, x, axis=1, b=w))
    assert np.isnan(plain[want_sign < 0]).all()
    np.testing.assert_array_equal(plain[want_sign > 0], value[want_sign > 0])


def test_zero_weight_excludes_inf_and_nan(backend):
    dtype = "float32"
    a = np.array([[np.nan, 1.0, np.inf], [np.inf, 0.5, -1.0], [2.0, np.nan, 0.0]])
    b = np.array([[0.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, -3.0]])
    value, sign = backend.call(logsumexp, backend.asarray(a, dtype), axis=1, b=backend.asarray(b, dtype), return_sign=True)
    value, sign = backend.to_numpy(value), backend.to_numpy(sign)
    kept = np.where(b != 0, a, 0.0)
    assert_oracle(value, oracle.exact_logsumexp(kept, axis=1, b=b), dtype)
    np.testing.assert_array_equal(sign, _exact_sign(kept, b, 1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weights_spanning_the_exponent_range(backend, dtype):
    """Weights 1e-300..1e300 (float64; 1e-37..1e37 in float32) stay accurate.

    The shift by the max of ``a + log|b|`` keeps every term representable.
    The inputs are well-conditioned (the test checks its own condition
    number): ``a`` is small, so ``a + log|b|`` loses nothing to cancellation,
    and negative weights sit on terms far below the max.
    """
    _need(backend, dtype)
    top = 300 if dtype == "float64" else 37
    rng = np.random.default_rng(5)
    exponents = np.linspace(-top, top, 41)
    signs = np.where(exponents < top - 20, rng.choice([1.0, -1.0], 41), 1.0)
    b = round_to(10.0**exponents * signs, dtype)
    a = round_to(rng.uniform(-3, 3, 41), dtype)
    exact = oracle.exact_logsumexp(a, b=b)
    mp = oracle._mp()
    with mp.workprec(200):
        terms = [mp.mpf(float(w)) * mp.exp(mp.mpf(float(x))) for x, w in zip(a, b)]
        total = mp.fsum(terms)
        # Relative condition number of log|sum| in a and b.
        cond = float((mp.fsum(abs(t) for t in terms) * (1 + max(abs(a))) / abs(total)) / abs(exact))
    assert cond < 2, cond
    x, w = backend.asarray(a, dtype), backend.asarray(b, dtype)
    value, sign = backend.call(logsumexp, x, b=w, return_sign=True)
    assert_oracle(backend.to_numpy(value), exact, dtype, "wide weights")
    assert float(backend.to_numpy(sign)) == _exact_sign(a, b, 0)
    # Only the smallest and the largest weight, on equal exponents.
    if dtype == "float64":
        a2, b2 = np.array([1.5, 1.5, 0.0]), np.array([1e-300, 1e300, -1e-300])
        got = backend.to_numpy(backend.call(logsumexp, backend.asarray(a2, dtype), b=backend.asarray(b2, dtype)))
        assert_oracle(got, oracle.exact_logsumexp(a2, b=b2), dtype, "1e-300..1e300")


# -- 8. where --------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("where_shape", [(3, 4), (4,), (3, 1), ()], ids=str)
def test_where_broadcasts_and_excludes(backend, op, where_shape):
    dtype = "float32"
    a = _ROWS.copy()
    rng = np.random.default_rng(6)
    where = rng.random(where_shape) < 0.6 if where_shape else np.array(True)
    if where_shape == (3, 4):
        where[:, 0] = True  # every row keeps an entry
        a[~where] = np.nan  # excluded NaNs must not leak
    out = backend.call(FUNCTIONS[op], backend.asarray(a, dtype), axis=1, where=backend.asarray(where, "bool"))
    backend.check_array(out, dtype, (3,) if op == "logsumexp" else (3, 4))
    assert_oracle(backend.to_numpy(out), exact_for(op, a, axis=1, where=where), dtype, f"{op} where{where_shape}")


# -- 9. complex --------------------------------------------------------------------


def _exact_complex(z, b=None):
    """log(sum b exp(z)), principal branch, and (log|sum|, phase)."""
    mp = oracle._mp()
    with mp.workprec(200):
        weights = [1] * len(z) if b is None else b
        total = mp.fsum(mp.mpf(float(w)) * mp.exp(mp.mpc(complex(v))) for v, w in zip(z, weights))
        return complex(mp.log(total)), float(mp.log(abs(total))), complex(total / abs(total))


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
@pytest.mark.parametrize(
    ("z", "b"),
    [
        ([0.5 + 1.0j, -1.0 + 2.5j, 2.0 - 0.5j], None),
        ([10.0j], None),  # principal branch: 10 - 4 pi
        ([3.0 + 3.0j, 3.0 - 3.0j], None),  # imaginary part exactly pi
        ([1.0 + 0.25j, 0.5 - 0.5j, -2.0 + 1.0j], [2.0, -0.5, 1.5]),
    ],
    ids=["generic", "wraps", "at-pi", "weights"],
)
def test_complex_as_scipy_defines_it(backend, dtype, z, b):
    if dtype not in backend.complex_dtypes:
        pytest.skip(f"{backend.id} has no {dtype}")
    z = np.asarray(z).astype(dtype).astype(np.complex128)
    real = "float32" if dtype == "complex64" else "float64"
    eps = float(np.finfo(real).eps)
    principal, log_abs, phase = _exact_complex(z, b)
    kw = {} if b is None else {"b": backend.asarray(np.asarray(b), real)}
    out = backend.call(logsumexp, backend.asarray(z, dtype), **kw)
    backend.check_array(out, dtype, ())
    got = complex(backend.to_numpy(out))
    # The sums here have no cancellation (condition number below 3), so the
    # result is good to a few eps relative to its magnitude.
    assert abs(got - principal) <= 8 * eps * max(1.0, abs(principal)), (got, principal)
    assert -math.pi < got.imag <= math.pi + 4 * eps * math.pi
    value, sign = backend.call(logsumexp, backend.asarray(z, dtype), return_sign=True, **kw)
    value, sign = backend.to_numpy(value), complex(backend.to_numpy(sign))
    assert abs(float(value) - log_abs) <= 8 * eps * max(1.0, abs(log_abs))
    assert abs(sign - phase) <= 8 * eps


def test_public_names():
    assert set(lse_dispatch.__all__) >= {"logsumexp", "softmax", "log_softmax"}
