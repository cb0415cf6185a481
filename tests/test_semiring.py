"""logcumsumexp and logmatmulexp (issue 12): accuracy against mpmath, limits, API, on every backend.

Values come from the mpmath oracle (``oracle.exact_logcumsumexp``,
``oracle.exact_logmatmulexp``) or are stated here; never from another
backend.  The hard cases are the issue's: one dominant entry, ties, offsets
of 1e4, long axes (2**16), ``-inf`` entries; for logmatmulexp wide dynamic
ranges and dominant pairs away from the row and column maxima.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import AxisError, logcumsumexp, logmatmulexp, oracle, semiring
from lse_dispatch.cases import ULP_BUDGET, round_to

from ._helpers import Adapter
from ._helpers import need_dtype as _need

pytestmark = [
    # torch's forward-AD setup (gradcheck's check_forward_ad) still calls torch.jit.script.
    pytest.mark.filterwarnings("ignore:`torch.jit.script.*` is deprecated:DeprecationWarning"),
]

inf, nan = math.inf, math.nan
REAL_DTYPES = ("float16", "bfloat16", "float32", "float64")


def assert_oracle(got, exact, dtype: str, what: str = "") -> None:
    errors = oracle.ulp_errors(got, exact, dtype)
    worst = float(np.max(errors)) if errors.size else 0.0
    index = np.unravel_index(int(np.argmax(errors)), errors.shape) if errors.size else ()
    hi = exact[0] if isinstance(exact, tuple) else exact
    assert worst <= ULP_BUDGET[dtype], (
        f"{what}: {worst:.3g} ulps (budget {ULP_BUDGET[dtype]}) at {index}: "
        f"got {np.asarray(got, dtype=np.float64)[index]!r}, exact {hi[index]!r}"
    )


def prefix_condition(values, exact) -> np.ndarray:
    """``kappa_i = sum_{j <= i} exp(x_j - lse_i) |x_j| / |lse_i|``, the condition number of each prefix.

    Rows of ``values`` are scanned; ``-inf`` entries add nothing; a
    non-finite prefix (a limit, which must be exact) gets 0.
    """
    exact_f = np.array([[float(v) for v in row] for row in exact])
    prefix = np.arange(values.shape[1])
    finite = np.isfinite(values)
    safe = np.where(finite, values, 0.0)
    earlier = finite[:, None, :] & (prefix[None, :] <= prefix[:, None])[None]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        weights = np.where(earlier, np.exp(safe[:, None, :] - exact_f[:, :, None]), 0.0)
        kappa = np.sum(weights * np.abs(safe[:, None, :]), axis=2) / np.abs(exact_f)
    return np.where(np.isfinite(exact_f), np.nan_to_num(kappa, nan=0.0, posinf=np.inf), 0.0)


def assert_conditioned(got, exact, values, dtype: str, what: str = "") -> None:
    """The contract's budget where a prefix is well conditioned (``kappa <= 1``), ``budget + kappa`` elsewhere."""
    errors = oracle.ulp_errors(got, exact, dtype)
    kappa = prefix_condition(values, exact)
    allowed = ULP_BUDGET[dtype] + np.where(kappa > 1, kappa, 0.0)
    index = np.unravel_index(int(np.argmax(errors - allowed)), errors.shape)
    assert np.all(errors <= allowed), f"{what}: {errors[index]:.3g} ulps at {index}, kappa {kappa[index]:.3g}"


def assert_stated(got, want) -> None:
    """Same non-finite pattern, finite entries equal to 1e-12 relative."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=0)


# --- logcumsumexp: the hard cases -----------------------------------------------------------


def _scan_inputs(name: str) -> tuple[np.ndarray, int]:
    """``(values, axis)``: float64 values, well-conditioned (no prefix cancels to near 0)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == "dominant":
        x = np.array([[0.0, -40.0, -41.0, -45.0, -60.0, -38.0], [10.0, -30.0, -31.0, -20.0, -25.0, -26.0]])
        return x, 1
    if name == "dominant-late":
        return np.array([-40.0, -41.0, -39.0, 0.0, -45.0, -60.0, -38.0, 0.0]), 0
    if name == "ties":
        return np.vstack([np.zeros(70), np.full(70, 3.0), np.full(70, -0.25)]), 1
    if name == "offset":
        return 1e4 + rng.standard_normal((3, 200)), 1
    if name == "offset-axis0":
        return 1e4 + rng.standard_normal((200, 3)), 0
    if name == "uniform":
        return 4 * rng.random((4, 300)), 1
    if name == "increasing":
        return np.linspace(0.5, 40.0, 500), 0
    if name == "decreasing":
        return np.linspace(40.0, 0.5, 500), 0
    if name == "neg-inf":
        x = 4 * rng.random((3, 150))
        x[:, ::7] = -inf
        x[1, :40] = -inf
        x[2, :] = -inf
        return x, 1
    if name == "wide":
        return np.abs(300 * rng.standard_normal((2, 200))) + 1, 1
    if name == "long":
        return 3 + rng.standard_normal(2**16), 0
    if name == "equal-tail":
        # A max of 0 (so log1p(T) passes T's error on whole) and equal terms, whose
        # roundings in a native cumulative sum all go one way (float64 blocked scan:
        # 4.9 and 6.0 ulps before its in-block sums were compensated).
        return np.stack([np.r_[-10.0, 0.0, np.full(300, -20.0)], np.r_[-1.0, 0.0, np.full(300, -37.0)]]), 1
    raise KeyError(name)


SCAN_CASES = ["dominant", "dominant-late", "ties", "offset", "offset-axis0", "uniform", "increasing", "decreasing", "neg-inf",
              "wide", "long", "equal-tail"]


@functools.cache
def _scan_case(name: str, dtype: str):
    values, axis = _scan_inputs(name)
    values = round_to(values, dtype)
    forward = oracle.double_double(oracle.exact_logcumsumexp(values, axis=axis))
    return values, axis, forward, oracle.double_double(oracle.exact_logcumsumexp(values, axis=axis, reverse=True))


@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize("name", SCAN_CASES)
def test_logcumsumexp_matches_the_oracle(backend, name, dtype):
    _need(backend, dtype)
    values, axis, exact, exact_reverse = _scan_case(name, dtype)
    x = backend.asarray(values, dtype)
    out = backend.call(logcumsumexp, x, axis=axis)
    backend.check_array(out, dtype, values.shape)
    assert_oracle(backend.to_numpy(out), exact, dtype, f"{name} forward")
    out = backend.call(logcumsumexp, x, axis=axis, reverse=True)
    assert_oracle(backend.to_numpy(out), exact_reverse, dtype, f"{name} reverse")


@functools.cache
def _creeping(n: int, dtype: str):
    values = round_to(np.arange(n) * 1e-4, dtype)
    return values, oracle.double_double(oracle.exact_logcumsumexp(values))


@pytest.mark.parametrize("dtype, n", [("float32", 1000), ("float64", 3000)])
def test_a_running_max_that_rises_at_every_entry(backend, dtype, n):
    """Each rise rescales the rest by exp(m_old - m_new): a product of those factors kept
    every one's rounding (float64, 3000 entries: 10.2 ulps on array-api-strict; float32,
    1000 entries: 19.3 on JAX; found by benchmarks/fuzz_semiring.py).  Well conditioned."""
    _need(backend, dtype)
    values, exact = _creeping(n, dtype)
    out = backend.call(logcumsumexp, backend.asarray(values, dtype))
    assert_oracle(backend.to_numpy(out), exact, dtype, "creeping max")


@pytest.mark.parametrize("dtype, tail, risen", [("float32", -88.0, -76.0), ("float64", -709.5, -700.0)])
@pytest.mark.parametrize("rise", [False, True])
def test_prefixes_made_of_flushed_terms_still_count(backend, dtype, tail, risen, rise):
    """A max of 0 and 200 entries whose terms are subnormal: XLA flushed them (JAX float32:
    0.0 for 1.2109204e-36, found by benchmarks/fuzz_semiring.py); now summed again with
    references e**offset lower, as the logsumexp state does.  ``rise``: an entry ``risen``
    first, which becomes a term of the rest when the max rises to 0 (the rescue once left
    that term unscaled: JAX float32 0.0 for 8.79e-34).  Float64 with the rise: 7.3 ulps on
    the blocked scan until its in-block sums were compensated (``semiring._prefix_sums``)."""
    _need(backend, dtype)
    values = round_to(np.r_[[risen] if rise else [], 0.0, np.full(200, tail)], dtype)
    exact = oracle.double_double(oracle.exact_logcumsumexp(values))
    got = backend.to_numpy(backend.call(logcumsumexp, backend.asarray(values, dtype)))
    # Without the rise the first prefixes' results are themselves subnormal (flushed
    # there too): from the 5th on.
    start = 0 if rise else 5
    assert_oracle(got[start:], tuple(part[start:] for part in exact), dtype, "flushed tail")


def _forced(backend):
    """The namespaces whose scan method can be forced (eager ones)."""
    if backend.lazy or backend.jit or backend.name == "jax":
        pytest.skip("the methods are forced on eager namespaces; JAX and Dask have their own kernels")


@pytest.mark.parametrize("method", ["blocked", "recurrence", "scan"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", SCAN_CASES)
def test_every_scan_method_matches_the_oracle(backend, name, dtype, method):
    _need(backend, dtype)
    _forced(backend)
    values, axis, exact, _ = _scan_case(name, dtype)
    x = backend.asarray(values, dtype)
    plan = semiring.plan_dtypes(backend.xp, x)
    out = semiring.cumulative(backend.xp, x, axis, plan, method=method)
    backend.check_array(out, dtype, values.shape)
    assert_oracle(backend.to_numpy(out), exact, dtype, f"{name} {method}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_blocked_scan_across_tiles_segments_and_redone_blocks(monkeypatch, dtype):
    """Small tiles: lines cut into segments that carry their state, blocks redone after new maxima."""
    monkeypatch.setattr(semiring, "_SCAN_TILE", 64)
    rng = np.random.default_rng(5)
    xp = pytest.importorskip("array_api_compat.numpy")
    values = round_to(np.concatenate([np.linspace(-20, 30, 300), 30 + rng.standard_normal(200)]), dtype)
    values = np.vstack([values, values[::-1], 2 * rng.random(values.shape)])
    values[2, 100:130] = -inf
    x = np.asarray(values, dtype=dtype)
    out = semiring.cumulative(xp, x, 1, semiring.plan_dtypes(xp, x), method="blocked")
    # The first row's prefixes cross 0 near entry 108 (kappa about 41 there).
    assert_conditioned(out, oracle.exact_logcumsumexp(values, axis=1), values, dtype, "tiled")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_error_grows_no_faster_than_the_condition_number(dtype):
    """Random normal prefixes cross 0, where logsumexp is ill-conditioned.

    There the relative error may exceed 4 ulps; it stays within
    ``4 + kappa`` ulps, ``kappa = sum_j w_j |x_j| / |lse|`` the condition
    number of each prefix, as for a backward-stable method.
    """
    rng = np.random.default_rng(9)
    values = round_to(rng.standard_normal((4, 400)), dtype)
    exact = oracle.exact_logcumsumexp(values, axis=1)
    kappa = prefix_condition(values, exact)
    for method in ("blocked", "recurrence", "scan"):
        xp = pytest.importorskip("array_api_compat.numpy")
        x = np.asarray(values, dtype=dtype)
        got = semiring.cumulative(xp, x, 1, semiring.plan_dtypes(xp, x), method=method)
        errors = oracle.ulp_errors(got, exact, dtype)
        assert np.all(errors <= 4 + kappa), (method, float(np.max(errors - kappa)))


def test_cancellation_free_tail_is_kept():
    """``[0, -40]``: 4.25e-18, not the 0 that ``log(1 + exp(-40))`` rounds to."""
    got = logcumsumexp(np.array([0.0, -40.0, -80.0]))
    exact = oracle.exact_logcumsumexp(np.array([0.0, -40.0, -80.0]))
    assert got[1] == pytest.approx(4.248354255291589e-18, rel=1e-15)
    assert_oracle(got, exact, "float64")


# --- logcumsumexp: limits, include_initial, API ---------------------------------------------


LIMIT_ROWS = {
    "all -inf": ([-inf, -inf, -inf], [-inf, -inf, -inf]),
    "-inf then finite": ([-inf, 0.0, -inf, 0.0], [-inf, 0.0, 0.0, math.log(2)]),
    "+inf from its position on": ([0.0, inf, 1.0, -inf], [0.0, inf, inf, inf]),
    "two +inf": ([inf, inf], [inf, inf]),
    "NaN from its position on": ([0.0, 1.0, nan, 2.0], [0.0, 1.0 + math.log1p(math.exp(-1.0)), nan, nan]),
    "+inf then NaN": ([inf, nan, 1.0], [inf, nan, nan]),
    "NaN then +inf": ([nan, inf], [nan, nan]),
    "-inf then +inf": ([-inf, inf], [-inf, inf]),
}


@pytest.mark.parametrize("row", list(LIMIT_ROWS))
def test_logcumsumexp_limits(backend, row):
    values, want = LIMIT_ROWS[row]
    dtype = "float64" if "float64" in backend.dtypes else "float32"
    x = backend.asarray(np.array(values), dtype)
    assert_stated(backend.to_numpy(backend.call(logcumsumexp, x)), want)
    # The same row inside a 2-D array, next to an ordinary one, along either axis.
    grid = np.vstack([np.array(values), np.linspace(0.0, 1.0, len(values))])
    want_grid = np.vstack([np.array(want), [float(v) for v in oracle.exact_logcumsumexp(np.linspace(0.0, 1.0, len(values)))]])
    x = backend.asarray(grid, dtype)
    assert_stated(backend.to_numpy(backend.call(logcumsumexp, x, axis=1)), want_grid)
    assert_stated(backend.to_numpy(backend.call(logcumsumexp, backend.asarray(grid.T, dtype), axis=0)), want_grid.T)


def test_logcumsumexp_limits_in_every_eager_method():
    xp = pytest.importorskip("array_api_compat.numpy")
    for values, want in LIMIT_ROWS.values():
        x = np.array(values)
        for method in ("blocked", "recurrence", "scan"):
            assert_stated(semiring.cumulative(xp, x, 0, semiring.plan_dtypes(xp, x), method=method), want)


def test_include_initial_and_reverse(backend):
    dtype = "float64" if "float64" in backend.dtypes else "float32"
    values = np.array([[0.0, 1.0, 2.0], [3.0, -inf, 1.0]])
    x = backend.asarray(values, dtype)
    forward = oracle.exact_logcumsumexp(values, axis=1)
    backward = oracle.exact_logcumsumexp(values, axis=1, reverse=True)
    out = backend.call(logcumsumexp, x, axis=1, include_initial=True)
    backend.check_array(out, dtype, (2, 4))
    got = backend.to_numpy(out)
    assert np.all(got[:, 0] == -inf)
    assert_oracle(got[:, 1:], forward, dtype, "include_initial")
    got = backend.to_numpy(backend.call(logcumsumexp, x, axis=1, include_initial=True, reverse=True))
    assert got.shape == (2, 4) and np.all(got[:, -1] == -inf)
    assert_oracle(got[:, :-1], backward, dtype, "include_initial reverse")
    got = backend.to_numpy(backend.call(logcumsumexp, x, axis=-2, include_initial=True))
    assert got.shape == (3, 3) and np.all(got[0] == -inf)
    assert_oracle(got[1:], oracle.exact_logcumsumexp(values, axis=0), dtype, "axis=-2")


def test_empty_axis(backend):
    dtype = "float64" if "float64" in backend.dtypes else "float32"
    x = backend.asarray(np.zeros((2, 0)), dtype)
    out = backend.call(logcumsumexp, x, axis=1)
    backend.check_array(out, dtype, (2, 0))
    out = backend.call(logcumsumexp, x, axis=1, include_initial=True)
    backend.check_array(out, dtype, (2, 1))
    assert np.all(backend.to_numpy(out) == -inf)


def test_logcumsumexp_argument_errors():
    with pytest.raises(ValueError, match="'axis' must be given"):
        logcumsumexp(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="'x' must have at least one dimension"):
        logcumsumexp(np.float64(1.0))
    with pytest.raises(AxisError, match="axis 2 is out of range"):
        logcumsumexp(np.zeros((2, 3)), axis=2)
    with pytest.raises(TypeError, match="'axis' must be None or an int"):
        logcumsumexp(np.zeros(3), axis=(0,))
    with pytest.raises(TypeError, match="'axis' must be None or an int"):
        logcumsumexp(np.zeros(3), axis=True)
    with pytest.raises(TypeError, match="must be real"):
        logcumsumexp(np.zeros(3, dtype=complex))
    with pytest.raises(TypeError, match="'x' must be"):
        logcumsumexp(["a", "b"])


def test_integer_input_gives_the_default_float(backend):
    if backend.readonly or backend.lazy:
        pytest.skip("integer arrays are made once, on the plain variants")
    x = backend.asarray(np.array([0, 1, 2]), "int32") if not backend.jit else backend.xp.asarray([0, 1, 2])
    out = backend.call(logcumsumexp, x)
    backend.check_array(out, backend.default_float(), (3,))
    exact = oracle.exact_logcumsumexp(np.array([0.0, 1.0, 2.0]))
    assert_oracle(backend.to_numpy(out), exact, str(np.dtype(backend.to_numpy(out).dtype)), "int")


def test_python_sequences_are_numpy():
    out = logcumsumexp([0.0, -40.0])
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    assert out[1] == pytest.approx(4.248354255291589e-18, rel=1e-15)


def test_inputs_are_not_written_to():
    x = np.array([[0.0, inf, -inf, nan], [1.0, 2.0, 3.0, 4.0]])
    copy = x.copy()
    x.setflags(write=False)
    logcumsumexp(x, axis=1)
    logmatmulexp(x, x.T)
    np.testing.assert_array_equal(x, copy)


# --- logmatmulexp: the hard cases -----------------------------------------------------------


def _product_inputs(name: str):
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == "issue-example":
        return np.array([[0.0, -2000.0], [-2000.0, 0.0]]), np.array([[-2000.0, 0.0], [0.0, -2000.0]])
    if name == "dominant":
        a = np.full((4, 40), -30.0)
        a[:, 3] = 0.0
        b = np.full((40, 5), -30.0)
        b[3] = 0.0
        return a, b
    if name == "dominant-away":
        # Row maxima at k=0, column maxima at k=1, the dominant pair at k=2.
        a = np.array([[0.0, -60.0, -25.0, -80.0]] * 3) + rng.random((3, 4))
        b = np.array([[-60.0], [0.0], [-25.0], [-80.0]]) + rng.random((4, 4))
        return a, b
    if name == "ties":
        return np.zeros((3, 50)), np.zeros((50, 4))
    if name == "offset":
        return 1e4 + rng.standard_normal((6, 30)), 1e4 + rng.standard_normal((30, 5))
    if name == "offsets-cancel":
        return 1e4 + rng.standard_normal((6, 30)), -1e4 + 3 + rng.standard_normal((30, 5))
    if name == "uniform":
        return 4 * rng.random((7, 60)), 4 * rng.random((60, 6))
    if name == "wide":
        return 300 * rng.standard_normal((6, 40)), 300 * rng.standard_normal((40, 5))
    if name == "neg-inf":
        a = 3 * rng.random((6, 30))
        a[:, ::3] = -inf
        a[2] = -inf
        b = 3 * rng.random((30, 5))
        b[1::3] = -inf
        b[:, 4] = -inf
        # Disjoint supports: no finite pair in entry (0, 0).
        a[0, :] = -inf
        a[0, 0] = 1.0
        b[0, 0] = -inf
        return a, b
    if name == "long-k":
        return 2 + rng.random((3, 2**12)), 2 + rng.random((2**12, 2))
    if name == "batched":
        return 3 * rng.random((2, 1, 5, 20)), 3 * rng.random((3, 20, 4))
    if name == "vector-matrix":
        return 3 * rng.random(20), 3 * rng.random((2, 20, 4))
    if name == "matrix-vector":
        return 3 * rng.random((5, 20)), 3 * rng.random(20)
    if name == "vector-vector":
        return np.array([0.0, -40.0, -41.0]), np.array([0.0, 0.0, 1.0])
    if name == "huge-sums":
        # ma + mb rounds by an ulp or more (|M| >= 2**53 in float64, 2**24 in
        # float32): -inf and NaN before (benchmarks/fuzz_semiring.py).
        return np.array([[-1.0, -5.0], [-700.0, -703.0]]), np.array([[2.0**54, -1e30, 2.0**25], [2.0**54, -1e30, 2.0**25]])
    if name == "huge-single":
        # The same with k = 1: JAX took the pairs' fallback (the rest is 0, as if
        # flushed), whose rest carried 1 + e <= 0: -inf (benchmarks/fuzz_semiring.py).
        return np.array([[-1.0], [3.0]]), np.array([[2.0**54, -(2.0**25), 2.0**25]])
    if name == "flushed-tail":
        # A max of 0 and terms below the smallest normal (float32 and float64), first
        # alone and then after a larger one: XLA flushed them (JAX float32: 0.0 for
        # 1.2109203e-36, benchmarks/fuzz_semiring.py).
        tails = [(-88.0, -80.0), (-709.5, -700.0)]
        a = np.array([np.r_[0.0, f, np.full(200, t)] for t, f in tails] + [np.r_[f, 0.0, np.full(200, t)] for t, f in tails])
        b = np.zeros((202, 2))
        b[5, 1] = 1e-3
        return a, b
    if name == "equal-tail":
        # Equal terms after a larger one, each near an ulp of the running sum: a
        # library's matrix product rounds them all one way (float64 k = 32: torch
        # 5.5 ulps before the products were split exactly; NumPy 5.2 against two
        # columns of zeros, 0.48 against these three).
        a = np.array([np.r_[0.0, -20.0, np.full(30, -25.0)], np.r_[-3.0, -3.5, np.full(30, -12.0)]])
        b = np.zeros((32, 3))
        b[7, 2] = -1.0
        return a, b
    raise KeyError(name)


PRODUCT_CASES = [
    "issue-example",
    "dominant",
    "dominant-away",
    "ties",
    "offset",
    "offsets-cancel",
    "uniform",
    "wide",
    "neg-inf",
    "long-k",
    "batched",
    "vector-matrix",
    "matrix-vector",
    "vector-vector",
    "huge-sums",
    "huge-single",
    "flushed-tail",
    "equal-tail",
]


@functools.cache
def _product_case(name: str, dtype: str):
    a, b = _product_inputs(name)
    a, b = round_to(a, dtype), round_to(b, dtype)
    return a, b, oracle.double_double(oracle.exact_logmatmulexp(a, b))


@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize("name", PRODUCT_CASES)
def test_logmatmulexp_matches_the_oracle(backend, name, dtype):
    _need(backend, dtype)
    a, b, exact = _product_case(name, dtype)
    out = backend.call(logmatmulexp, backend.asarray(a, dtype), backend.asarray(b, dtype))
    backend.check_array(out, dtype, exact[0].shape)
    assert_oracle(backend.to_numpy(out), exact, dtype, name)


def test_issue_example_is_not_minus_inf():
    """The "scaled exp then matmul" idiom returns -inf on the diagonal here."""
    a, b, _ = _product_case("issue-example", "float64")
    with np.errstate(divide="ignore"):
        idiom = np.log(np.exp(a - a.max(1, keepdims=True)) @ np.exp(b - b.max(0, keepdims=True)))
    assert np.all(np.diag(idiom) == -inf)
    got = logmatmulexp(a, b)
    np.testing.assert_allclose(np.diag(got), -2000 + math.log(2), rtol=1e-15)
    np.testing.assert_array_equal(got[[0, 1], [1, 0]], [0.0, 0.0])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eager_product_in_small_tiles(monkeypatch, dtype):
    """Row tiles, sub-tiles, fallback batches and the chunked float64 product, all at small sizes."""
    monkeypatch.setattr(semiring, "_MATMUL_TILE", 8)
    monkeypatch.setattr(semiring, "_FALLBACK_BATCH", 16)
    monkeypatch.setattr(semiring, "_split_chunk", lambda precision: 4)
    rng = np.random.default_rng(3)
    a = round_to(3 * rng.random((2, 9, 23)), dtype)
    b = round_to(3 * rng.random((23, 7)), dtype)
    a[0, 1, :] = -2000.0
    a[0, 1, 5] = 0.0
    b[:, 2] = -2000.0
    b[5, 2] = 0.0
    b[6, 2] = 3.0
    got = logmatmulexp(np.asarray(a, dtype), np.asarray(b, dtype))
    assert_oracle(got, oracle.exact_logmatmulexp(a, b), dtype, "tiles")


PRODUCT_LIMITS = {
    # (a row, b column, expected entry)
    "no finite pair": ([-inf, 0.0], [0.0, -inf], -inf),
    "all -inf": ([-inf, -inf], [-inf, -inf], -inf),
    "a +inf pair": ([inf, 0.0], [1.0, 0.0], inf),
    "NaN": ([nan, 0.0], [0.0, 0.0], nan),
    "-inf + inf": ([-inf, 0.0], [inf, 0.0], nan),
    "-inf + inf next to +inf": ([-inf, inf], [inf, 0.0], nan),
    "+inf meets a finite column": ([inf, -inf], [0.0, 5.0], inf),
    "-inf row meets a finite column": ([-inf, -inf], [0.0, 5.0], -inf),
}


@pytest.mark.parametrize("row", list(PRODUCT_LIMITS))
def test_logmatmulexp_limits(backend, row):
    a_row, b_col, want = PRODUCT_LIMITS[row]
    dtype = "float64" if "float64" in backend.dtypes else "float32"
    # The special entry at (1, 2) of a 3x4 product whose other entries are ordinary.
    rng = np.random.default_rng(0)
    a = round_to(rng.random((3, 2)), dtype)
    b = round_to(rng.random((2, 4)), dtype)
    a[1] = a_row
    b[:, 2] = b_col
    out = backend.call(logmatmulexp, backend.asarray(a, dtype), backend.asarray(b, dtype))
    got = backend.to_numpy(out)
    exact = oracle.exact_logmatmulexp(a, b)
    assert_stated(got[1, 2], want)
    assert_stated(exact[1, 2], want)
    assert_oracle(got, exact, dtype, row)


def test_empty_products(backend):
    dtype = "float64" if "float64" in backend.dtypes else "float32"
    out = backend.call(logmatmulexp, backend.asarray(np.zeros((3, 0)), dtype), backend.asarray(np.zeros((0, 2)), dtype))
    backend.check_array(out, dtype, (3, 2))
    assert np.all(backend.to_numpy(out) == -inf)
    out = backend.call(logmatmulexp, backend.asarray(np.zeros((0, 4)), dtype), backend.asarray(np.zeros((4, 2)), dtype))
    backend.check_array(out, dtype, (0, 2))


def test_logmatmulexp_argument_errors():
    with pytest.raises(ValueError, match="contracted dimension"):
        logmatmulexp(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="'a' must have at least one dimension"):
        logmatmulexp(np.float64(0.0), np.zeros(3))
    with pytest.raises(ValueError, match="'b' must have at least one dimension"):
        logmatmulexp(np.zeros(3), np.float64(0.0))
    with pytest.raises(ValueError, match="does not broadcast"):
        logmatmulexp(np.zeros((2, 3, 4)), np.zeros((5, 4, 2)))
    with pytest.raises(TypeError, match="must be real"):
        logmatmulexp(np.zeros((2, 2), dtype=complex), np.zeros((2, 2)))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries"):
        logmatmulexp(np.zeros((2, 2)), torch.zeros((2, 2)))


def test_mixed_dtypes_promote(backend):
    if "float64" not in backend.dtypes or backend.jit:
        pytest.skip("needs float64")
    a = backend.asarray(np.array([[0.0, 1.0]]), "float32")
    b = backend.asarray(np.array([[1.0], [0.5]]), "float64")
    out = backend.call(logmatmulexp, a, b)
    backend.check_array(out, "float64", (1, 1))


# --- Dask: lazy, one pass ------------------------------------------------------------------


class _Counting:
    """A Dask source whose blocks count how often they are computed."""

    def __init__(self, values, chunks):
        import dask.array as da

        self.calls: dict = {}
        base = da.from_array(values, chunks=chunks)
        self.array = base.map_blocks(self._count, dtype=values.dtype)

    def _count(self, block, block_info=None):
        key = tuple(block_info[0]["chunk-location"]) if block_info else None
        self.calls[key] = self.calls.get(key, 0) + 1
        return block


@pytest.mark.parametrize("reverse", [False, True])
def test_dask_logcumsumexp_is_lazy_and_reads_each_block_once(reverse):
    da = pytest.importorskip("dask.array")
    import dask

    from .conftest import _refuse_to_compute

    values = round_to(np.abs(np.random.default_rng(2).standard_normal((5, 300))) * 3, "float64")
    source = _Counting(values, (2, 70))
    with dask.config.set(scheduler=_refuse_to_compute):
        out = logcumsumexp(source.array, axis=1, reverse=reverse)
    assert isinstance(out, da.Array)
    got = out.compute(scheduler="sync")
    blocks = [key for key in source.calls if key is not None]
    assert len(blocks) == 3 * 5 and all(source.calls[key] == 1 for key in blocks), source.calls
    assert_oracle(got, oracle.exact_logcumsumexp(values, axis=1, reverse=reverse), "float64", "dask")


def test_dask_chain_of_many_chunks_keeps_its_roundings():
    """A running max creeping up by 1e-4 over 10000 entries, in 625 chunks of 16.

    Each chunk rescaled the carry once (``exp`` of the exact rise, a product
    and a sum), and a rescaled carry passes on about 1 / (1 - e**-0.0016)
    chunks: 4.71 ulps off at entry 5019 before the carries were merged with
    their roundings kept (``semiring.carried_state``; 1.13 after).  Found by
    ``benchmarks/fuzz_semiring.py --seed 1130``.
    """
    da = pytest.importorskip("dask.array")
    values = np.arange(10000) * 1e-4
    got = logcumsumexp(da.from_array(values, chunks=16), axis=0).compute(scheduler="sync")
    assert_oracle(got, oracle.exact_logcumsumexp(values), "float64", "dask chain")


def test_dask_logmatmulexp_is_lazy_and_blockwise():
    da = pytest.importorskip("dask.array")
    import dask

    from .conftest import _refuse_to_compute

    rng = np.random.default_rng(4)
    a, b = 3 * rng.random((12, 30)), 3 * rng.random((30, 8))
    a[3, :] = -2000.0
    a[3, 0] = 0.0
    b[:, 1] = -2000.0
    b[1, 1] = 0.0
    with dask.config.set(scheduler=_refuse_to_compute):
        out = logmatmulexp(da.from_array(a, chunks=(5, 7)), da.from_array(b, chunks=(7, 3)))
    assert isinstance(out, da.Array) and out.chunks == ((5, 5, 2), (3, 3, 2))
    assert_oracle(out.compute(scheduler="sync"), oracle.exact_logmatmulexp(a, b), "float64", "dask product")


# --- the public names ------------------------------------------------------------------------


def test_exported():
    assert lse_dispatch.logcumsumexp is logcumsumexp
    assert lse_dispatch.logmatmulexp is logmatmulexp
    assert {"logcumsumexp", "logmatmulexp"} <= set(lse_dispatch.__all__)


# --- derivatives -------------------------------------------------------------------------------


def _cumulative_gradient(x: np.ndarray, cotangent: np.ndarray) -> np.ndarray:
    """``d sum(c * logcumsumexp(x)) / dx`` (1-D), from the weights of each prefix, limits stated:

    finite prefix: ``exp(x_j - y_i)``; ``+inf`` prefix: ``1/k`` to its ``k``
    ``+inf`` entries; empty prefix: 0.
    """
    grad = np.zeros_like(x)
    for i in range(len(x)):
        prefix = x[: i + 1]
        if np.any(prefix == inf):
            at_inf = prefix == inf
            grad[: i + 1] += cotangent[i] * at_inf / at_inf.sum()
        elif np.any(prefix > -inf):
            y = float(oracle.exact_logcumsumexp(prefix)[-1])
            grad[: i + 1] += cotangent[i] * np.exp(prefix - y)
    return grad


CUMULATIVE_GRADIENT_ROWS = {
    "finite": np.array([0.5, -1.0, 2.0, 0.0]),
    "-inf entries": np.array([-inf, 0.0, -inf, 1.0]),
    "empty prefix": np.array([-inf, -inf, 0.0, -2.0]),
    "+inf": np.array([0.0, inf, 1.0, inf]),
    "offset": 1e4 + np.array([0.0, 1.0, -1.0, 0.5]),
}


class _Grad(Adapter):
    """:class:`Adapter`'s gradients with respect to every argument, from float64 NumPy inputs
    (JAX under x64; constants are made with ``array`` inside the traced function)."""

    def __call__(self, fn, *arrays):
        argnums = tuple(range(len(arrays)))
        if self.name == "torch":
            return self.grad(fn, *(self.array(a) for a in arrays), argnums=argnums)
        with self.jax.enable_x64(True):
            return self.grad(fn, *(self.array(a) for a in arrays), argnums=argnums)


@pytest.mark.parametrize("lib", ["torch", "jax"])
@pytest.mark.parametrize("row", list(CUMULATIVE_GRADIENT_ROWS))
def test_logcumsumexp_gradient_values_and_limits(lib, row):
    grad = _Grad(lib)
    x = CUMULATIVE_GRADIENT_ROWS[row]
    cotangent = np.array([1.0, -2.0, 0.5, 3.0])
    want = _cumulative_gradient(x, cotangent)
    (got,) = grad(lambda v: (logcumsumexp(v) * grad.array(cotangent)).sum(), x)
    assert np.all(np.isfinite(got)), got
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(got[x == -inf], 0.0)
    # reverse scans the flipped input
    (got,) = grad(lambda v: (logcumsumexp(v, reverse=True) * grad.array(cotangent)).sum(), x)
    np.testing.assert_allclose(got, _cumulative_gradient(x[::-1], cotangent[::-1])[::-1], rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_nan_prefix_gives_nan_gradients(lib):
    grad = _Grad(lib)
    (got,) = grad(lambda v: logcumsumexp(v).sum(), np.array([0.0, nan, 1.0]))
    assert np.all(np.isnan(got))


def _product_gradient(a, b, cotangent):
    """``d sum(c * logmatmulexp(a, b)) / d(a, b)`` from each entry's pair weights (finite entries)."""
    exact = oracle.exact_logmatmulexp(a, b)
    ga, gb = np.zeros_like(a), np.zeros_like(b)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            y = float(exact[i, j])
            if y == -inf:
                continue
            w = np.exp(a[i] + b[:, j] - y)
            ga[i] += cotangent[i, j] * w
            gb[:, j] += cotangent[i, j] * w
    return ga, gb


PRODUCT_GRADIENT_ROWS = {
    "random": (lambda r: (r.standard_normal((3, 4)), r.standard_normal((4, 2)))),
    "issue-example": (lambda r: (np.array([[0.0, -2000.0], [-2000.0, 0.0]]), np.array([[-2000.0, 0.0], [0.0, -2000.0]]))),
    "-inf entries": (lambda r: (np.array([[0.0, -inf, 1.0], [-inf, -inf, -inf]]),
                                np.array([[0.0, -inf], [1.0, 2.0], [-inf, -inf]]))),
    "wide": (lambda r: (300 * r.standard_normal((3, 5)), 300 * r.standard_normal((5, 3)))),
}


@pytest.mark.parametrize("lib", ["torch", "jax"])
@pytest.mark.parametrize("row", list(PRODUCT_GRADIENT_ROWS))
def test_logmatmulexp_gradient_values_and_limits(lib, row):
    grad = _Grad(lib)
    a, b = PRODUCT_GRADIENT_ROWS[row](np.random.default_rng(1))
    cotangent = np.random.default_rng(2).standard_normal((a.shape[0], b.shape[1]))
    want_a, want_b = _product_gradient(a, b, cotangent)
    got_a, got_b = grad(lambda u, v: (logmatmulexp(u, v) * grad.array(cotangent)).sum(), a, b)
    assert np.all(np.isfinite(got_a)) and np.all(np.isfinite(got_b))
    np.testing.assert_allclose(got_a, want_a, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-10, atol=1e-300)
    np.testing.assert_array_equal(got_a[a == -inf], 0.0)
    np.testing.assert_array_equal(got_b[b == -inf], 0.0)


def test_logmatmulexp_gradient_at_inf_and_nan():
    """An entry at +inf shares its derivative among its +inf pairs; a NaN entry gives NaN."""
    torch = pytest.importorskip("torch")
    a = torch.tensor([[inf, 0.0, inf], [0.0, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.0], [1.0], [5.0]], dtype=torch.float64, requires_grad=True)
    y = logmatmulexp(a, b)
    assert y[0, 0] == inf
    ga, gb = torch.autograd.grad(y[0, 0], (a, b))
    np.testing.assert_array_equal(ga.numpy(), [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(gb.numpy(), [[0.5], [0.0], [0.5]])
    a = torch.tensor([[-inf, 0.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[inf], [0.0]], dtype=torch.float64, requires_grad=True)
    (ga,) = torch.autograd.grad(logmatmulexp(a, b).sum(), (a,))
    assert torch.isnan(ga).all()


def test_torch_gradcheck_and_gradgradcheck():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    for kwargs in (dict(axis=1), dict(axis=0, reverse=True), dict(axis=-1, include_initial=True)):
        fn = lambda v, kw=kwargs: logcumsumexp(v, **kw)[..., 1:] if kw.get("include_initial") else logcumsumexp(v, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True)
        assert torch.autograd.gradgradcheck(fn, (x,))
    shapes = [((4, 5), (5, 3)), ((2, 1, 3, 4), (3, 4, 2)), ((5,), (2, 5, 3)), ((2, 3, 5), (5,)), ((4,), (4,))]
    for sa, sb in shapes:
        a = torch.randn(*sa, dtype=torch.float64, generator=gen, requires_grad=True)
        b = torch.randn(*sb, dtype=torch.float64, generator=gen, requires_grad=True)
        assert torch.autograd.gradcheck(logmatmulexp, (a, b), check_forward_ad=True), (sa, sb)
        assert torch.autograd.gradgradcheck(logmatmulexp, (a, b)), (sa, sb)
    # A fallback entry (dominant pairs far from the maxima) and slow gradients.
    a = torch.tensor([[0.0, -2000.0], [-2000.0, 0.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[-2000.0, 0.0], [0.0, -2000.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(logmatmulexp, (a, b), check_forward_ad=True)


def test_torch_float32_and_integer_inputs():
    torch = pytest.importorskip("torch")
    x = torch.tensor([0.0, -40.0, 1.0], requires_grad=True)
    y = logcumsumexp(x)
    assert y.dtype == torch.float32
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    out = logmatmulexp(torch.tensor([[0, 1]]), torch.tensor([[1.0], [2.0]], requires_grad=True))
    assert out.dtype == torch.float32 and out.requires_grad


def test_torch_func_transforms():
    torch = pytest.importorskip("torch")
    from torch import func

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    batched = func.vmap(lambda v: logcumsumexp(v))(x)
    np.testing.assert_allclose(batched.numpy(), logcumsumexp(x, axis=1).numpy(), rtol=1e-15)
    jac = func.jacrev(lambda v: logcumsumexp(v))(x[0])
    jac_fwd = func.jacfwd(lambda v: logcumsumexp(v))(x[0])
    np.testing.assert_allclose(jac.numpy(), jac_fwd.numpy(), rtol=1e-12)
    y = logcumsumexp(x[0]).numpy()
    want = np.tril(np.exp(x[0].numpy()[None, :] - y[:, None]))
    np.testing.assert_allclose(jac.numpy(), want, rtol=1e-12)
    a, b = torch.randn(3, 4, dtype=torch.float64, generator=gen), torch.randn(4, 2, dtype=torch.float64, generator=gen)
    ga = func.grad(lambda u: logmatmulexp(u, b).sum())(a)
    leaf = a.clone().requires_grad_()
    (want,) = torch.autograd.grad(logmatmulexp(leaf, b).sum(), [leaf])
    np.testing.assert_allclose(ga.numpy(), want.numpy(), rtol=1e-12)


def test_jax_check_grads_jit_and_vmap():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        x = jnp.asarray(rng.standard_normal((3, 6)))
        check_grads(lambda v: logcumsumexp(v, axis=1), (x,), order=2, modes=("fwd", "rev"))
        check_grads(lambda v: logcumsumexp(v, axis=0, reverse=True), (x,), order=2, modes=("fwd", "rev"))
        a, b = jnp.asarray(rng.standard_normal((3, 4))), jnp.asarray(rng.standard_normal((4, 2)))
        check_grads(logmatmulexp, (a, b), order=2, modes=("fwd", "rev"))
        check_grads(logmatmulexp, (a[0], b), order=1, modes=("fwd", "rev"))
        issue_a = jnp.asarray([[0.0, -2000.0], [-2000.0, 0.0]])
        issue_b = jnp.asarray([[-2000.0, 0.0], [0.0, -2000.0]])
        check_grads(logmatmulexp, (issue_a, issue_b), order=1, modes=("fwd", "rev"))
        batched = jax.vmap(jax.grad(lambda v: logcumsumexp(v)[-1]))(x)
        want = np.exp(np.asarray(x) - np.asarray(logcumsumexp(x, axis=1))[:, -1:])
        np.testing.assert_allclose(np.asarray(batched), want, rtol=1e-12)
        per_row = jax.jit(jax.vmap(logmatmulexp, in_axes=(0, None)))(jnp.stack([a, a + 1]), b)
        np.testing.assert_allclose(np.asarray(per_row[1]), np.asarray(logmatmulexp(a, b)) + 1, rtol=1e-13)
        fallback = jax.vmap(logmatmulexp, in_axes=(None, 0))(issue_a, jnp.stack([issue_b, issue_b]))
        np.testing.assert_allclose(np.diag(np.asarray(fallback[0])), -2000 + math.log(2), rtol=1e-15)


# --- the example --------------------------------------------------------------------------------


def test_hmm_example_small_runs():
    """``examples/hmm_forward.py --small``: log space on NumPy, torch and JAX agrees with the
    scaled float64 forward algorithm and with mpmath, where probability space underflows."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "hmm_forward.py"
    done = subprocess.run([sys.executable, str(script), "--small"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(p underflows to 0)" in done.stdout and done.stdout.rstrip().endswith("ok"), done.stdout


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_logmatmulexp_derivatives_of_an_empty_inner_dimension(lib):
    """k = 0: y is -inf, constant; its derivatives are 0 (torch raised IndexError from
    the max of an empty row, found by benchmarks/fuzz_semiring.py)."""
    shapes = ((2, 0), (0, 3))
    if lib == "torch":
        torch = pytest.importorskip("torch")
        a, b = (torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes)
        logmatmulexp(a, b).sum().backward()
        assert a.grad.shape == shapes[0] and b.grad.shape == shapes[1]
        ones = tuple(torch.ones(s, dtype=torch.float64) for s in shapes)
        value, tangent = torch.func.jvp(logmatmulexp, (a.detach(), b.detach()), ones)
        value, tangent = value.numpy(), tangent.numpy()
    else:
        jax = pytest.importorskip("jax")
        jnp = pytest.importorskip("jax.numpy")
        args = tuple(jnp.zeros(s, jnp.float32) for s in shapes)
        grads = jax.grad(lambda a, b: jnp.sum(logmatmulexp(a, b)), argnums=(0, 1))(*args)
        assert grads[0].shape == shapes[0] and grads[1].shape == shapes[1]
        value, tangent = (np.asarray(t) for t in jax.jvp(logmatmulexp, args, tuple(jnp.ones(s, jnp.float32) for s in shapes)))
    assert np.all(value == -inf) and value.shape == (2, 3)
    np.testing.assert_array_equal(tangent, np.zeros((2, 3)))
