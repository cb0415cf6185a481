"""Wrong values found by checks written outside this suite, and their families.

Differential fuzzing against mpmath and other projects' test suites found
these; each case is here with the family it belongs to, on every backend it
concerns, against the oracle where a value is involved:

1. float32 with weights: the exponent ``a + log|b|`` must be formed in the
   float64 accumulator (the entry at the max then counts as exactly 1);
2. subnormal weights on JAX (XLA flushes subnormal operands) and on CuPy
   (float32 kernels compiled with ``-ftz=true``; found on an H200), and huge
   weights on entries whose ``exp(a - m)`` is subnormal or 0;
3. Hessians in ``a`` with ``b == 0`` on a ``+inf`` or NaN entry;
4. NumPy masked arrays and matrices;
6. Dask arrays of unknown chunk sizes with ``b`` or ``where``;
7. the sign of a complex sum with ``+inf`` terms, Python integers beyond
   int64, the bounded per-type cache;
8. ``jax.debug_nans``: NaN-free input never creates a NaN.

(5, contained plugin kernels, is in ``test_dispatch_plugins.py``.)
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import log_softmax, logsumexp, oracle, softmax

mpmath = pytest.importorskip("mpmath")

ULPS = 4.0

# torch's own forward-AD setup (torch.func.hessian) still calls torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script.*` is deprecated:DeprecationWarning")


def _f32(values):
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def _ulps(got, a, b, dtype, **kw):
    exact = oracle.exact_logsumexp(a, b=b, **kw)
    return float(np.max(oracle.ulp_error(got, exact, dtype)))


# -- 1. float32 with weights -----------------------------------------------------

REPORTED = [
    # logsumexp([1], b=[e**-1 rounded]) = 1 + log(b) = 2.49e-8; was 0.0.
    ([1.0], [0.36787945]),
    # was -1.09e-7 for -4.226e-8.
    ([-1.2622875, -1.6318495], [2.9706955, 0.8144275]),
    # signed weights, condition number 77: was 42.7 ulps off.
    ([2.0975153] * 3, [1.0175668, -2.139016, 1.1774211]),
]


def _needs_float64(backend):
    if "float64" not in backend.dtypes:
        pytest.skip(f"{backend.id} has no float64 accumulator (float32 weights are exempt there)")


@pytest.mark.parametrize("a, b", REPORTED, ids=["one-entry", "two-entries", "signed"])
def test_float32_weights_reported(backend, a, b):
    _needs_float64(backend)
    a, b = _f32(a), _f32(b)
    value, sign = backend.call(logsumexp, backend.asarray(a, "float32"), b=backend.asarray(b, "float32"), return_sign=True)
    backend.check_array(value, "float32", ())
    assert _ulps(backend.to_numpy(value), a, b, "float32") <= ULPS
    assert float(backend.to_numpy(sign)) == float(np.sign(sum(w * math.exp(x) for x, w in zip(a, b))))


# float32 with weights whose logsumexp is near 0 because the rest is tiny (no
# cancellation): the float64 state's max, narrowed to float32, folded the count
# into the rest as (c + r) exp(m - m'), which rounded 1 + r in float64.  SciPy
# had them right.
NEAR_ZERO_FLOAT32_WEIGHTED = {
    "unit-weights": ([0.0, -40.0], [1.0, 1.0]),  # 4.25e-18; was 0.0
    "unit-weights-1000-ulps": ([0.0, -27.6], [1.0, 1.0]),  # 1.03e-12; was 1012 ulps off
    "huge-weight": ([0.0, -120.0], [1.0, 3e38]),  # 2.30e-14; was 0.4 % off
    "shifted": ([3.5, -40.0], [1.0, 1.0]),  # m = 3.5 is exact in float32: rest kept as is
    # m = log(1 + 2**-23) is no float32: the narrowed max moves by m - m', which
    # matters at a quarter of an ulp of the result here.
    "inexact-max": ([0.0, -40.0], [1.0 + 2.0**-23, 1.0]),
}


@pytest.mark.parametrize("case", list(NEAR_ZERO_FLOAT32_WEIGHTED))
def test_float32_weights_keep_a_tiny_rest(backend, case):
    if case == "huge-weight":
        # Without float64 exp(-120) underflows in float32: the scaled term of
        # test_huge_weight_whose_exp_underflows_counts, whose bound is wider.
        _needs_float64(backend)
    a, b = (_f32(values) for values in NEAR_ZERO_FLOAT32_WEIGHTED[case])
    value = backend.call(logsumexp, backend.asarray(a, "float32"), b=backend.asarray(b, "float32"))
    assert _ulps(backend.to_numpy(value), a, b, "float32") <= ULPS


def _float32_weight_family(seed: int):
    """Random float32 (a, b) whose sums cancel to near 0 or in sign.

    ``a + log|b|`` sits near a common value ``c``, so the result is near
    ``c + log k`` and, with ``c = -log k``, near 0, where every rounding of
    an exponent shows; signed weights cancel up to a condition number of
    about 1e5, which float64 terms absorb (1e5 * 2**-53 is far below a
    float32 ulp).
    """
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 6))
    a = _f32(rng.uniform(-3, 3, k))
    target = -math.log(k) + rng.normal(scale=1e-3)
    b = _f32(np.exp(target - a) * rng.uniform(0.999, 1.001, k))
    if seed % 2:
        b[0] = -b[0]
        b = _f32(b)
    return a, b


@pytest.mark.parametrize("seed", range(12))
def test_float32_weights_family(backend, seed):
    _needs_float64(backend)
    a, b = _float32_weight_family(seed)
    exact = oracle.exact_logsumexp(a, b=b)
    total = sum(w * math.exp(x) for x, w in zip(a, b))
    condition = sum(abs(w) * math.exp(x) for x, w in zip(a, b)) / abs(total)
    assert condition < 1e5
    value, _ = backend.call(logsumexp, backend.asarray(a, "float32"), b=backend.asarray(b, "float32"), return_sign=True)
    err = float(oracle.ulp_error(backend.to_numpy(value), exact, "float32").max())
    assert err <= ULPS, (a, b, err)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_weights_stay_within_one_ulp(backend, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.id} has no {dtype}")
    a = oracle_round([1.0, -0.5, 0.25], dtype)
    b = oracle_round([0.37, 0.8, -0.3], dtype)
    value, _ = backend.call(logsumexp, backend.asarray(a, dtype), b=backend.asarray(b, dtype), return_sign=True)
    assert _ulps(backend.to_numpy(value).astype(np.float64), a, b, dtype) <= 1.0


def oracle_round(values, dtype):
    from lse_dispatch.cases import round_to

    return round_to(values, dtype)


def test_weighted_state_keeps_the_compute_dtype():
    """The float64 exponents are narrowed back: the state of float32 input has a float32 max."""
    a, b = np.float32([1.0, 2.0]), np.float32([0.5, 0.25])
    state = lse_dispatch.lse_state(a, b=b)
    assert state.max.dtype == np.float32 and state.rest.dtype == np.float64
    assert lse_dispatch.lse_finalize(state).dtype == np.float32
    huge = lse_dispatch.lse_state(np.float32([3e38, 1.0]), b=np.float32([0.5, 1.0]))
    assert float(lse_dispatch.lse_finalize(huge)) == pytest.approx(3e38 + math.log(0.5), rel=2**-23)


# -- 2. subnormal weights ------------------------------------------------------------


def test_subnormal_weights_count(backend):
    _needs_float64(backend)
    a, b = np.array([16.5]), np.array([1e-310])
    value = backend.call(logsumexp, backend.asarray(a, "float64"), b=backend.asarray(b, "float64"))
    assert _ulps(backend.to_numpy(value), a, b, "float64") <= ULPS  # -697.30138
    a, b = np.array([-np.inf, np.inf]), np.array([1.0, 1e-310])
    value, sign = backend.call(logsumexp, backend.asarray(a, "float64"), b=backend.asarray(b, "float64"), return_sign=True)
    assert (float(backend.to_numpy(value)), float(backend.to_numpy(sign))) == (math.inf, 1.0)
    a, b = np.array([16.5, 0.0, 1.0]), np.array([-1e-310, 5e-324, 0.0])
    value, sign = backend.call(logsumexp, backend.asarray(a, "float64"), b=backend.asarray(b, "float64"), return_sign=True)
    assert _ulps(backend.to_numpy(value), a, b, "float64") <= ULPS
    assert float(backend.to_numpy(sign)) == -1.0


def test_float32_subnormal_weights_count(backend):
    a, b = np.array([16.5]), _f32([1e-40])
    value = backend.call(logsumexp, backend.asarray(a, "float32"), b=backend.asarray(b, "float32"))
    # log(1e-40) + 16.5 = -75.6: within the contract whether or not float64 exists.
    assert _ulps(backend.to_numpy(value), a, b, "float32") <= ULPS


# (a, b, dtype, y): a huge weight on an entry whose exp(a - m) is subnormal or 0 while
# its term |b| exp(a - m) counts; y = a - m + s ln 2 is where the term's exp is taken
# (2**-s the smallest normal number of the accumulator, _state._weighted_terms).
HUGE_WEIGHT_UNDERFLOWING_EXP = {
    # 1.7e-16; was 0.0 on every backend (SciPy 1.17 too).
    "float64-zero": ([0.0, -745.5], [1.0, 1e308], "float64", -745.5 + 1022 * math.log(2)),
    # 4.19e-22; was 0.26 % off: exp(-740) kept 7 bits.
    "float64-few-bits": ([0.0, -740.0], [1.0, 1e300], "float64", -740 + 1022 * math.log(2)),
    # 5.08e-127: exp(a - m) is 0 for some 290 units of a beyond the normal range.
    "float64-far": ([0.0, -1000.0], [1.0, 1e308], "float64", -1000 + 1022 * math.log(2)),
    # float32 without a float64 accumulator (JAX without x64): 1.116e-5 and
    # 2.3e-14, both were 0.0 (exp(-100) flushed); float64 accumulators had them right.
    "float32": ([0.0, -100.0], [1.0, 3e38], "float32", -100 + 126 * math.log(2)),
    "float32-far": ([0.0, -120.0], [1.0, 3e38], "float32", -120 + 126 * math.log(2)),
}


@pytest.mark.parametrize("case", list(HUGE_WEIGHT_UNDERFLOWING_EXP))
def test_huge_weight_whose_exp_underflows_counts(backend, case):
    """Found 2026-11-30 by reading the weighted terms' forms for what the subnormal-weight fix had not covered.

    The term is formed as ``(|b| 2**-s) exp((a - m) + s ln 2)``: within ``u (|y| + 1)``
    relatively (``_state._weighted_terms``), so the bound is the contract's 4 ulps plus
    ``|y|`` (the condition number in ``a`` is ``|a_i|``-sized here: 745, 100).  Dask
    merges the states of its blocks, and a block's state keeps its max as the rounded
    exponent ``e = a + log|b|``: there the term carries the roundings of ``log|b|`` and
    ``e``, ``(|log|b|| + |e|) / 2`` ulps of it.
    """
    a, b, dtype, y = HUGE_WEIGHT_UNDERFLOWING_EXP[case]
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.id} has no {dtype}")
    a, b = np.asarray(a), np.asarray(b, dtype).astype(np.float64)
    if backend.spec.name == "dask":
        e = a[1] + math.log(b[1])
        y = (abs(math.log(b[1])) + abs(e)) / 2
    value = backend.call(logsumexp, backend.asarray(a, dtype), b=backend.asarray(b, dtype))
    assert _ulps(backend.to_numpy(value), a, b, dtype) <= ULPS + abs(y)
    value, sign = backend.call(logsumexp, backend.asarray(a, dtype), b=backend.asarray(-b, dtype), return_sign=True)
    assert _ulps(backend.to_numpy(value), a, b, dtype) <= ULPS + abs(y)
    assert float(backend.to_numpy(sign)) == -1.0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_weights_read_from_bits_match_the_plain_form(dtype):
    """The bit-reading ``weight_parts`` (JAX, CuPy) agrees with the plain one where nothing is flushed.

    Run on NumPy, whose operations keep subnormals: zero, signed zero,
    subnormal, normal, huge and infinite weights of each width.
    """
    from lse_dispatch._numerics import Numerics
    from lse_dispatch.backends.cupy import CupyNumerics

    info = np.finfo(dtype)
    tiny, sub = float(info.smallest_normal), float(info.smallest_subnormal)
    values = [0.0, -0.0, sub, -sub, 3 * sub, tiny / 2, -tiny / 2, tiny, 1.0, -2.5, 1e-3, float(info.max), math.inf, -math.inf]
    b = np.asarray(values, dtype=dtype)
    assert CupyNumerics.bitcast is not Numerics.bitcast
    for accumulator in (np.float64, dtype):
        plain = Numerics().weight_parts(np, b, accumulator)
        with np.errstate(divide="ignore"):
            bits = CupyNumerics().weight_parts(np, b, accumulator)
        np.testing.assert_array_equal(bits[0], plain[0])
        np.testing.assert_array_equal(bits[1], plain[1])
        # log|b| to an ulp of the accumulator (the subnormal ones through n * 2**-k).
        np.testing.assert_allclose(bits[2], plain[2], rtol=2 * np.finfo(accumulator).eps, atol=0)


# (x64, a, b): a subnormal weight that dominates the sum (float64, and float32 without x64).
SUBNORMAL_UNDER_JIT = {
    "float64": (True, [760.0, 0.0, 1.0], [1e-310, 1.0, 2.0]),
    "float32": (False, [100.0, 0.0, 1.0], [1e-40, 1.0, 2.0]),
    "float32-negative": (False, [90.0, 0.0, 1.0], [-3e-42, 1.0, 2.0]),
}


def _subnormal_weight_under_jit(case: str, closed_over: bool):
    """Eager and jitted ``(value, d/da, d/db)`` of a logsumexp whose weight is subnormal (XLA's CPU backend)."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    x64, a, b = SUBNORMAL_UNDER_JIT[case]
    with jax.enable_x64(x64), jax.default_device(jax.devices("cpu")[0]):  # measured on XLA's CPU backend
        a, b = jnp.array(a), jnp.array(b)
        f = lambda a, b: logsumexp(a, b=b, return_sign=True)[0]  # noqa: E731
        want = (f(a, b), jax.grad(f)(a, b), jax.grad(f, argnums=1)(a, b))
        if closed_over:
            # The weight is a constant of the compiled program: XLA folds what it can of it.
            got = (jax.jit(lambda a: f(a, b))(a), jax.jit(jax.grad(lambda a: f(a, b)))(a),
                   jax.jit(jax.grad(lambda b: f(a, b)))(b))
        else:
            got = (jax.jit(f)(a, b), jax.jit(jax.grad(f))(a, b), jax.jit(jax.grad(f, argnums=1))(a, b))
        return [np.asarray(w) for w in want], [np.asarray(g) for g in got]


@pytest.mark.parametrize("closed_over", [False, True], ids=["argument", "closed-over"])
@pytest.mark.parametrize("case", list(SUBNORMAL_UNDER_JIT))
def test_subnormal_weight_under_jit(case, closed_over):
    """Found 2026-11-30: a closed-over subnormal weight was dropped (46.2 became 0.0).

    XLA rewrote the constant (its bits folded to 0, or the whole constant
    replaced by ``iota``); the weight now counts as a constant, as an
    argument and outside jit, in the value and both gradients.
    """
    (value, grad_a, grad_b), (got_value, got_a, got_b) = _subnormal_weight_under_jit(case, closed_over)
    x64, a, b = SUBNORMAL_UNDER_JIT[case]
    rtol = 1e-14 if x64 else 2e-6
    # The subnormal entry's term, exp(a + log|b|), is formed in Python's float64.
    subnormal_term = math.copysign(math.exp(a[0] + math.log(abs(b[0]))), b[0])
    exact = math.log(math.exp(a[1]) * b[1] + math.exp(a[2]) * b[2] + subnormal_term)
    assert float(value) == pytest.approx(exact, rel=rtol)
    np.testing.assert_allclose(got_value, value, rtol=rtol)
    np.testing.assert_allclose(got_a, grad_a, rtol=rtol)
    np.testing.assert_allclose(got_b, grad_b, rtol=rtol)


def test_subnormal_weight_under_jit_without_jax_private_trace_state(monkeypatch):
    """``JaxNumerics.weights`` reads whether JAX is staging from a private module; without it, the public test."""
    pytest.importorskip("jax")
    from lse_dispatch.backends import _jax_numerics

    def missing():
        raise AttributeError("no trace_ctx in this JAX")

    monkeypatch.setattr(_jax_numerics, "_staging_from_trace_context", missing)
    (value, grad_a, grad_b), (got_value, got_a, got_b) = _subnormal_weight_under_jit("float32", True)
    np.testing.assert_allclose(got_value, value, rtol=2e-6)
    np.testing.assert_allclose(got_a, grad_a, rtol=2e-6)
    np.testing.assert_allclose(got_b, grad_b, rtol=2e-6)


@pytest.mark.parametrize("dtype, tiny", [("float16", 1e-6), ("bfloat16", 1e-39), ("float32", 1e-40)])
def test_subnormal_weight_and_input_both_closed_over(dtype, tiny):
    """Nothing traced: the call runs the ``jax.jit`` kernel, staged into the user's program with both constants."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    with jax.default_device(jax.devices("cpu")[0]):
        a = jnp.array([100.0, 0.0, 1.0], dtype=dtype)  # the b = [tiny, 1, 2] of these dtypes looks like iota to XLA
        b = jnp.array([tiny, 1.0, 2.0], dtype=dtype)
        want = float(logsumexp(a, b=b))
        got = float(jax.jit(lambda: logsumexp(a, b=b))())
    exact = math.log(float(b[0]) * math.exp(float(a[0])) + 1 + 2 * math.e)
    assert want == pytest.approx(exact, rel=float(jnp.finfo(dtype).eps))
    assert got == want


def test_complex_weights_that_look_like_iota_under_jit():
    """XLA (jax 0.10.2, CPU) aborted the process rewriting ``abs`` of the closed-over constant ``[0, 1, 2]`` (complex)."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    with jax.default_device(jax.devices("cpu")[0]):
        a, b = jnp.array([1.0, 2.0, 3.0]), jnp.array([0, 1, 2], dtype=jnp.complex64)
        got = jax.jit(lambda a: logsumexp(a, b=b))(a)
    np.testing.assert_allclose(np.asarray(got), math.log(math.exp(2) + 2 * math.exp(3)), rtol=1e-6)


def test_gradient_at_a_subnormal_weight():
    """The weights of the derivative rules see subnormal b too (d lse/d a of one entry is 1)."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    with jax.enable_x64(True):
        b = jnp.array([1e-310, 1.0])
        grad = jax.grad(lambda a: logsumexp(a, b=b))(jnp.array([760.0, 0.0]))
        # exp(760) * 1e-310 = 1.0e20 dominates exp(0) * 1: the gradient is (1 - 1e-20, 1e-20).
        np.testing.assert_allclose(np.asarray(grad), [1.0, 0.0], atol=1e-15)


# -- 3. Hessians with b == 0 on +inf or NaN --------------------------------------------

EXPECTED_HESSIAN = np.array([[0.0, 0.0, 0.0], [0.0, 0.19661193324148185, -0.19661193324148185],
                             [0.0, -0.19661193324148185, 0.19661193324148185]])


@pytest.mark.parametrize("first", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("how", ["autograd", "torch.func"])
def test_torch_hessian_ignores_an_excluded_nonfinite_entry(first, how):
    torch = pytest.importorskip("torch")
    x = torch.tensor([first, 2.0, 3.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    f = lambda a: logsumexp(a, b=b)  # noqa: E731
    hessian = torch.autograd.functional.hessian(f, x) if how == "autograd" else torch.func.hessian(f)(x)
    np.testing.assert_allclose(hessian.numpy(), EXPECTED_HESSIAN, rtol=1e-12, atol=0)
    # The gradient in b is still the limit: +inf at the +inf entry.
    bg = b.clone().requires_grad_(True)
    (grad_b,) = torch.autograd.grad(logsumexp(x, b=bg), bg)
    assert float(grad_b[0]) == (math.inf if first == math.inf else float(grad_b[0])) or math.isnan(first)


@pytest.mark.parametrize("first", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jax_hessian_ignores_an_excluded_nonfinite_entry(first, jit):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    with jax.enable_x64(True):
        b = jnp.array([0.0, 1.0, 1.0])
        hessian = jax.hessian(lambda a: logsumexp(a, b=b))
        hessian = jax.jit(hessian) if jit else hessian
        np.testing.assert_allclose(np.asarray(hessian(jnp.array([first, 2.0, 3.0]))), EXPECTED_HESSIAN, rtol=1e-12, atol=0)


# -- 4. NumPy masked arrays and matrices ------------------------------------------


def test_masked_entries_are_excluded_like_where():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked = np.ma.masked_array([0.0, 1000.0], mask=[0, 1])
        assert float(logsumexp(masked)) == 0.0
        x = np.ma.array([1.0, 2.0, 3.0], mask=[0, 1, 0])
        where = np.array([True, False, True])
        for fn in (softmax, log_softmax):
            out = fn(x)
            assert isinstance(out, np.ma.MaskedArray)
            np.testing.assert_array_equal(np.ma.getmaskarray(out), [False, True, False])
            np.testing.assert_array_equal(np.ma.getdata(out), fn(np.array([1.0, 2.0, 3.0]), where=where))
        # All masked: the contract's empty sum; a masked weight excludes too.
        assert float(logsumexp(np.ma.array([1.0, 2.0], mask=[1, 1]))) == -math.inf
        weights = np.ma.array([1.0, 5.0, 3.0], mask=[0, 1, 0])
        assert float(logsumexp(np.array([1.0, 2.0, 3.0]), b=weights)) == float(logsumexp([1.0, 3.0], b=[1.0, 3.0]))
        # A masked where counts as False where masked.
        mask_of_where = np.ma.array([True, True, True], mask=[0, 1, 0])
        assert float(logsumexp([1.0, 2.0, 3.0], where=mask_of_where)) == float(logsumexp([1.0, 3.0]))


def test_matrices_compute_as_ndarrays():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        m = np.matrix([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    row = np.asarray(m)
    out = softmax(m, axis=1)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, softmax(row, axis=1))
    np.testing.assert_array_equal(logsumexp(m, axis=1), logsumexp(row, axis=1))


# -- 6. Dask arrays with unknown chunk sizes ------------------------------------------


def _unknown_chunks():
    da = pytest.importorskip("dask.array")
    x = da.from_array(np.arange(10.0), chunks=3)
    return x[x > 2], np.arange(3.0, 10.0)


@pytest.mark.parametrize("op", ["logsumexp", "softmax", "log_softmax"])
def test_dask_unknown_chunks_with_where(op):
    x, values = _unknown_chunks()
    where = values > 4
    out = getattr(lse_dispatch, op)(x, where=x > 4).compute()
    exact = getattr(oracle, f"exact_{op}")(values, where=where)
    assert float(oracle.ulp_error(out, exact, "float64").max()) <= ULPS


@pytest.mark.parametrize("weights", ["scalar", "derived"])
def test_dask_unknown_chunks_with_b(weights):
    x, values = _unknown_chunks()
    b, b_values = (2.0, np.full(7, 2.0)) if weights == "scalar" else (x - 2.5, values - 2.5)
    out = logsumexp(x, b=b).compute()
    assert _ulps(out, values, b_values, "float64") <= ULPS


def test_dask_unknown_against_known_chunks_names_the_argument():
    da = pytest.importorskip("dask.array")
    x, _ = _unknown_chunks()
    with pytest.raises(ValueError, match=r"argument 'a' .* unknown extents .* 'b' with shape \(7,\)"):
        logsumexp(x, b=da.ones(7, chunks=3))
    with pytest.raises(ValueError, match=r"'where' with shape \(7,\) has known ones"):
        softmax(x, where=da.ones(7, chunks=3, dtype=bool))


# -- 7. smaller ones ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_infinite_terms_have_a_defined_phase(backend, dtype):
    if dtype not in backend.complex_dtypes:
        pytest.skip(f"{backend.id} has no {dtype}")
    z = np.array([np.inf + 1j, 0.0, 2.0 - 1.0j])
    value, sign = backend.call(logsumexp, backend.asarray(z, dtype), return_sign=True)
    assert float(backend.to_numpy(value)) == math.inf
    tolerance = 4 * float(np.finfo(np.float32 if dtype == "complex64" else np.float64).eps)
    assert abs(complex(backend.to_numpy(sign)) - complex(math.cos(1), math.sin(1))) <= tolerance
    principal = complex(backend.to_numpy(backend.call(logsumexp, backend.asarray(z, dtype))))
    assert principal.real == math.inf and abs(principal.imag - 1.0) <= tolerance
    # Two +inf terms: the phase of e^{1j} + e^{2j}, i.e. 1.5.
    both = backend.asarray(np.array([np.inf + 1j, np.inf + 2j]), dtype)
    assert abs(complex(backend.to_numpy(backend.call(logsumexp, both))).imag - 1.5) <= tolerance
    # Nothing included: -inf with sign 0, no warning.
    value, sign = backend.call(logsumexp, backend.asarray(np.array([-np.inf + 1j, -np.inf]), dtype), return_sign=True)
    assert float(backend.to_numpy(value)) == -math.inf and complex(backend.to_numpy(sign)) == 0


def _complex_dtype(backend, case: str) -> str:
    """The complex dtype a case's name ends with; the test skips where ``backend`` has none."""
    dtype = case.rsplit("-", 1)[1]
    if dtype not in backend.complex_dtypes:
        pytest.skip(f"{backend.id} has no {dtype}")
    return dtype


def _exact_complex_lse(a, b) -> complex:
    """``log(sum b e^a)`` (principal branch) in 400 bits: enough for sums within 1e-100 of 1."""
    with mpmath.workprec(400):
        terms = (mpmath.mpc(complex(w)) * mpmath.exp(mpmath.mpc(complex(x))) for x, w in zip(a, b))
        return complex(mpmath.log(mpmath.fsum(terms)))


# (a, b) with complex weights where b exp(a - m) loses what exp(a - m) loses.
COMPLEX_EXTREME_WEIGHTS = {
    # |b| subnormal and dominant: exp(a - m) overflowed (NaN on NumPy), the weight flushed on JAX.
    "subnormal-complex128": ([760.0, 0.0, 1.0], [2e-310 + 1e-310j, 1, 2]),
    "subnormal-complex64": ([100.0, 0.0, 1.0], [3e-41 + 1e-40j, 1, 2]),
    # |b| huge, exp(a - m) subnormal or 0: a few bits left (NumPy), flushed (JAX).
    "huge-complex128": ([-12.0, -720.0], [1, 1.7e308j]),
    "huge-complex64": ([-12.0, -100.0], [1, 3e38j]),
    # |b| itself overflows: inf instead of a finite result.
    "overflowing-abs-complex128": ([0.0, 1.0], [1.5e308 + 1.5e308j, 1]),
    "overflowing-abs-complex64": ([0.0, 1.0], [3e38 + 3e38j, 1]),
}


@pytest.mark.parametrize("case", list(COMPLEX_EXTREME_WEIGHTS))
def test_complex_extreme_weights_count(backend, case):
    """Found 2026-11-30, the first cases by the review of the subnormal weights, the others by fuzzing the complex path."""
    dtype = _complex_dtype(backend, case)
    a, b = COMPLEX_EXTREME_WEIGHTS[case]
    real = np.float32 if dtype == "complex64" else np.float64
    a, b = np.asarray(a, real), np.asarray(b, dtype)
    exact = _exact_complex_lse(a, b)
    value = complex(backend.to_numpy(backend.call(logsumexp, backend.asarray(a, real.__name__), b=backend.asarray(b, dtype))))
    # In units of the result, at least 1: a - m rounds (|a - m| up to 714 here).
    tolerance = 16 * float(np.finfo(real).eps) * max(1.0, abs(exact))
    assert abs(value - exact) <= tolerance, (value, exact)


# (a, b, condition): complex sums near 1, whose log is near 0.  log|S| rounded
# |S| = 1 + 4.25e-18 to 1 and gave 0 for all of them (SciPy 1.17 too); now
# log1p of |S|**2 - 1 formed from the terms at the max and the rest.
COMPLEX_NEAR_ZERO = {
    "rest-complex128": ([0.0, -40.0], None, 40),
    "rest-complex64": ([0.0, -40.0], None, 40),
    "imaginary-rest-complex128": ([0.0, -30.0], [1.0, 2j], 30),
    "phase-in-a-complex128": ([0.0, -20.0 + 1j], None, 20),
    # A huge weight whose exp(a - m) underflows: 0 on NumPy and torch before
    # (exp(-745.5) is 0 there), as for real weights.
    "huge-weight-complex128": ([0.0, -745.5], [1.0, 1e308], 745.5),
}


@pytest.mark.parametrize("case", list(COMPLEX_NEAR_ZERO))
def test_complex_sums_near_one_keep_their_log(backend, case):
    """Found 2026-11-30 while fixing the real weights' underflow.  Bound: 4 eps times the
    condition number in ``a`` (``|a_i| p_i / |lse|``, the weight of the small entry)."""
    dtype = _complex_dtype(backend, case)
    values, weights, condition = COMPLEX_NEAR_ZERO[case]
    real = np.float32 if dtype == "complex64" else np.float64
    a = np.asarray(values, dtype)
    b = None if weights is None else np.asarray(weights, dtype)
    exact = _exact_complex_lse(a, np.ones_like(a) if b is None else b)
    kwargs = {} if b is None else {"b": backend.asarray(b, dtype)}
    value = complex(backend.to_numpy(backend.call(logsumexp, backend.asarray(a, dtype), **kwargs)))
    assert abs(value - exact) <= 4 * condition * float(np.finfo(real).eps) * abs(exact), (value, exact)


# (a, b) whose terms have a - m far below 0 and weights that bring them up to
# the max's (found by benchmarks/fuzz_complex.py, seed 3, on 2026-11-30).
COMPLEX_ROUNDED_DIFFERENCES = {
    # Re a - m = -608.5 rounded: 208 eps in the term's magnitude, 31 eps (86 eps
    # absolute) in the phase of the sum.
    "huge-weights-complex128": ([0.0729855949553662 - 3.90994700867415j, 7.740153740084057j],
                                [-3.950857613599256e263 + 5.264282518233153e263j,
                                 1.0585363124709168e264 + 1.5957706673692172e264j]),
    # A subnormal weight's exponent d - s ln 2 rounded (d = 100.6): 5.8 eps in the phase.
    "subnormal-weight-complex64": ([-9.631731033325195j, -59.42512893676758 + 8.105170249938965j],
                                   [1.401298464324817e-44j, 1.1128422672193873e-18 + 5.032215295012285e-19j]),
    # A weight near 2.8e34: where the library flushes (XLA) its term is
    # (b / |b|) exp(d + log|b|), and a rounded log|b| (79.3) cost 18.6 eps
    # (benchmarks/fuzz_complex.py --library jax --seed 21).
    "huge-weight-log-complex64": ([49.241214752197266, 0.031791605055332184, 0.0, 0.0, -0.0],
                                  [-2487705665536 + 3540850573312j, 2.5301367713836953e-05 + 7.021746114332927e-06j,
                                   7.162634876175877e-23 - 9.069420231355621e-23j,
                                   2.809621533109871e+34 + 2.052075638911548e+33j, 64688564 - 12427979j]),
}


@pytest.mark.parametrize("case", list(COMPLEX_ROUNDED_DIFFERENCES))
def test_complex_terms_take_the_exact_difference(backend, case):
    """Bound: 4 eps of each part (at least 1); both were 5.8 to 31 eps with ``a - m`` rounded."""
    dtype = _complex_dtype(backend, case)
    values, weights = COMPLEX_ROUNDED_DIFFERENCES[case]
    a, b = np.asarray(values, dtype), np.asarray(weights, dtype)
    exact = _exact_complex_lse(a, b)
    value = complex(backend.to_numpy(backend.call(logsumexp, backend.asarray(a, dtype), b=backend.asarray(b, dtype))))
    eps = float(np.finfo(dtype).eps)
    assert abs(value.real - exact.real) <= 4 * eps * max(1.0, abs(exact.real)), (value, exact)
    assert abs(value.imag - exact.imag) <= 4 * eps * max(1.0, abs(exact.imag)), (value, exact)


@pytest.mark.parametrize("library", ["jax", "torch"])
def test_complex_weight_gradient_at_a_zero_weight(library):
    """The complex path's own derivatives: no NaN from the branches a zero weight does not take."""
    a, b = np.array([1.0, 2.0, 0.5]), np.array([1 + 1j, 0, 2 - 0.5j])
    total = np.sum(b * np.exp(a))
    want_a = np.real(b * np.exp(a) / total)  # d Re(lse) / d a
    # |d Re(lse) / d b|; at the zero weight the complex path gives 0 (it excludes the entry), not
    # the limit exp(a) / total that the real path's rules give (docs/autodiff.md).
    want_b = np.where(b != 0, np.exp(a) / total, 0)
    if library == "jax":
        jax = pytest.importorskip("jax")
        jnp = pytest.importorskip("jax.numpy")
        with jax.enable_x64(True):
            f = lambda a, b: jnp.real(logsumexp(a, b=b))  # noqa: E731
            got_a, got_b = (np.asarray(g) for g in jax.grad(f, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b)))
    else:
        torch = pytest.importorskip("torch")
        ta = torch.tensor(a, requires_grad=True)
        tb = torch.tensor(b, requires_grad=True)
        logsumexp(ta, b=tb).real.backward()
        got_a, got_b = ta.grad.numpy(), tb.grad.numpy()
    np.testing.assert_allclose(got_a, want_a, rtol=1e-12)
    np.testing.assert_allclose(np.abs(got_b), np.abs(want_b), rtol=1e-12)


def test_python_integers_beyond_int64():
    assert float(logsumexp([2**70, 1])) == float(2**70)
    assert float(logsumexp(2**70)) == float(2**70)
    assert complex(logsumexp([2**70, 1j])) == complex(2**70)
    with pytest.raises(ValueError, match="argument 'a' holds an integer too large for float64"):
        logsumexp([2**2000])


def test_the_per_type_cache_is_bounded():
    from lse_dispatch import _dispatch

    for index in range(_dispatch._TYPE_CACHE_SIZE + 50):
        subclass = type(f"Sub{index}", (np.ndarray,), {})
        logsumexp(np.zeros(3).view(subclass))
    assert len(_dispatch._BACKENDS_OF_TYPE) <= _dispatch._TYPE_CACHE_SIZE


# -- 8. jax.debug_nans -----------------------------------------------------------------


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "x64"])
@pytest.mark.parametrize("jit", ["jit", "disable_jit"])
@pytest.mark.parametrize("op", ["logsumexp", "softmax", "log_softmax"])
def test_debug_nans_never_fires_on_nan_free_input(op, jit, x64):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    fn = getattr(lse_dispatch, op)
    scalar_fn = (lambda x: fn(x)) if op == "logsumexp" else (lambda x: fn(x)[0])
    x = jnp.array([1.0, 2.0, 3.0])
    b = jnp.array([0.5, 0.0, 2.0])
    with jax.enable_x64(x64), jax.debug_nans(True):
        context = jax.disable_jit() if jit == "disable_jit" else _nothing()
        with context:
            for f in (fn, jax.grad(scalar_fn), jax.jit(fn)):
                f(x)
            if op == "logsumexp":
                fn(x, b=b, return_sign=True)
                fn(x, where=b > 0)
                jax.grad(lambda a: fn(a, b=b))(x)
                jax.hessian(lambda a: fn(a, b=b))(x)
            else:
                fn(x, where=b > 0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# Lines whose every other entry lies more than the dtype's exp range below the
# max: the rest is made of subnormal terms, which XLA (and CuPy's float32)
# flush, and ``log1p`` of it is what log_softmax gives at the max (found by
# benchmarks/fuzz_kernels.py on 2026-11-30; JAX float32 with a mask gave
# 4.6219944e-38 for 4.6819694e-38, 2.1e5 ulps).
FLUSHED_RESTS = {
    "float32": [-85.96741, -90.37746, 0.0, -102.634445, -93.07198, 5.0],
    "float64": [-706.5, -708.5, 0.0, -709.0, -720.0, 5.0],
}


@pytest.mark.parametrize("dtype", list(FLUSHED_RESTS))
@pytest.mark.parametrize("masked", [False, True])
def test_a_rest_of_flushed_terms_still_counts(backend, dtype, masked):
    if dtype == "float64":
        _needs_float64(backend)
    a = np.asarray(FLUSHED_RESTS[dtype], dtype)
    if not masked:
        a = a[:-1]
    where = np.arange(a.size) < 5
    kwargs = {"where": backend.asarray(where, "bool")} if masked else {}
    for op in (logsumexp, log_softmax):
        got = backend.to_numpy(backend.call(op, backend.asarray(a, dtype), **kwargs))
        exact = (oracle.exact_logsumexp if op is logsumexp else oracle.exact_log_softmax)(
            a.astype(np.float64), where=where if masked else None)
        errors = oracle.ulp_error(got, exact, dtype)
        assert np.max(errors) <= ULPS, (op.__name__, float(np.max(errors)))


@pytest.mark.parametrize("dtype", list(FLUSHED_RESTS))
@pytest.mark.parametrize("signs", ["positive", "mixed"])
def test_a_weighted_rest_of_flushed_terms_still_counts(backend, dtype, signs):
    """The same lines with weights (JAX float32 under jit: 571 ulps for ``a = [0, -80, -90]``, ``b = 1``)."""
    if dtype == "float64":
        _needs_float64(backend)
    a = np.asarray(FLUSHED_RESTS[dtype][:-1], dtype)
    b = np.ones_like(a)
    if signs == "mixed":
        b[::2] = -1.0
        b[2] = 1.0  # the max's own weight: the total stays positive
    got = backend.to_numpy(backend.call(logsumexp, backend.asarray(a, dtype), b=backend.asarray(b, dtype)))
    exact = oracle.exact_logsumexp(a.astype(np.float64), b=b.astype(np.float64))
    errors = oracle.ulp_error(got, exact, dtype)
    assert np.max(errors) <= ULPS, float(np.max(errors))
