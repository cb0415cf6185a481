"""JAX float32 under ``jax.jit`` without optimization barriers: the sums and TwoSum stay exact.

The float32 JAX path (no float64 accumulator) relies on two facts about XLA
that a compiler upgrade could break, so they are checked under ``jax.jit``:

* the limb sums of ``_jax_numerics._limb_sum`` are exact whatever order XLA adds in,
  and ``_fused_sum_last`` meets its documented bound on data whose plain
  float32 (sequential) sum is many ulps off;
* TwoSum with traced operands keeps its rounding error (XLA folds
  ``(x + c) - c`` only for a constant ``c``).

Plus the public functions on plain float32 input under ``jax.jit`` (the
``jax.fused`` kernel, backends/_jax_traced.py, tested on its own in
tests/test_jax_traced.py): they meet the 4-ulp contract on the hard cases,
on rows whose terms sum to 16 or more (ties at the max, sums just above 16,
a max near 0), and every non-finite row gets the shared limits.  The
functions of ``_state`` and ``_jax_numerics`` called directly are the
generic path's JAX float32 form, which ``b`` and ``where`` calls take.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lse_dispatch import oracle

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("mpmath")

import lse_dispatch  # noqa: E402
from lse_dispatch import _state  # noqa: E402
from lse_dispatch.backends import _jax_numerics  # noqa: E402

U = 2.0**-24  # float32 unit roundoff
ULPS = 4.0

pytestmark = pytest.mark.skipif(jax.config.jax_enable_x64, reason="the float32-only path is for JAX without x64")


def _f32_ulps(got: float, exact: float) -> float:
    return abs(float(got) - exact) / float(np.spacing(np.float32(abs(exact))))


def _sequential_f32(values: np.ndarray) -> float:
    """The float32 sum added one term after another (the naive order)."""
    return float(np.cumsum(values.astype(np.float32), dtype=np.float32)[-1])


def _hard_sum_data(n: int, seed: int) -> np.ndarray:
    """Positive float32 terms over 40 binades, a large one first: a sequential sum loses the small ones."""
    rng = np.random.default_rng(seed)
    # Mostly terms below half an ulp of the running sum, some of them large.
    exponents = np.where(rng.random(n) < 0.05, rng.integers(0, 10, n), rng.integers(24, 40, n))
    values = (1 + rng.random(n)) * 2.0**-exponents
    values[0] = 1.0
    return values.astype(np.float32)


@pytest.mark.parametrize("n", [256, 1000, 4096 * 3 + 1])
def test_limb_sum_is_exact_to_a_rounding_under_jit(n):
    values = _hard_sum_data(n, seed=n)
    exact = math.fsum(values.astype(np.float64))
    # The data are hard: summed one after another in float32 they are many ulps off.
    assert _f32_ulps(_sequential_f32(values), exact) > ULPS
    total = jax.jit(lambda v: _jax_numerics._limb_sum(jnp, v, axis=0))(jnp.asarray(values))
    # Bound: u |sum| + (2**-7 + 1.02 n 2**-23) u T, T = sum = exact here.
    bound = U * exact * (1 + 2.0**-7 + 1.02 * n * 2.0**-23)
    assert abs(float(total[0]) - exact) <= bound


@pytest.mark.parametrize("shape", [(4, 4096), (3, 1000), (2, 977)])
def test_fused_sum_meets_its_bound_under_jit(shape):
    values = np.stack([_hard_sum_data(shape[1], seed=row) for row in range(shape[0])])
    signs = np.where(np.random.default_rng(7).random(shape) < 0.1, -1.0, 1.0).astype(np.float32)
    values = values * signs
    totals = np.asarray(jax.jit(lambda v: _jax_numerics._fused_sum_last(jnp, v))(jnp.asarray(values)))
    n = shape[1]
    group = next(k for k in (8, 4, 2, 1) if n % k == 0)
    for row, total in zip(values, totals, strict=True):
        exact = math.fsum(row.astype(np.float64))
        magnitude = math.fsum(np.abs(row).astype(np.float64))
        bound = U * abs(exact) + (group - 1 + 2.0**-7 + 1.02 * (n / group) * 2.0**-23) * U * magnitude
        assert abs(float(total) - exact) <= bound


def test_fused_sum_beats_the_sequential_sum_on_a_dominant_term():
    # 1 then 4095 terms of 2**-25: one after another each rounds away.
    values = np.full((1, 4096), 2.0**-25, dtype=np.float32)
    values[0, 0] = 1.0
    exact = math.fsum(values[0].astype(np.float64))
    assert _f32_ulps(_sequential_f32(values[0]), exact) > 100
    total = float(jax.jit(lambda v: _jax_numerics._fused_sum_last(jnp, v))(jnp.asarray(values))[0])
    assert _f32_ulps(total, exact) <= 1.0


def test_two_sum_keeps_its_error_under_jit():
    rng = np.random.default_rng(3)
    a = rng.standard_normal(4096).astype(np.float32)
    b = (rng.standard_normal(4096) * 1e-3).astype(np.float32)
    total, error = jax.jit(lambda a, b: _state.two_sum(jnp, a, b))(jnp.asarray(a), jnp.asarray(b))
    total, error = np.asarray(total, np.float64), np.asarray(error, np.float64)
    # Exact: s + e == a + b in float64 (both float32 sums fit), and e is nonzero often.
    assert np.array_equal(total + error, a.astype(np.float64) + b.astype(np.float64))
    assert np.count_nonzero(error) > 1000


def test_exp_difference_is_compensated_under_jit():
    rng = np.random.default_rng(4)
    x = (-30 - 10 * rng.random(2048)).astype(np.float32)
    shift = np.float32(0.7123)
    got = np.asarray(jax.jit(lambda x, s: _state.exp_difference(jnp, x, s, jnp.float32))(jnp.asarray(x), shift))
    exact = np.exp(x.astype(np.float64) - np.float64(shift))
    naive = np.exp(x - shift).astype(np.float64)
    spacing = np.spacing(exact.astype(np.float32)).astype(np.float64)
    # Without the compensation the rounded difference costs several ulps ...
    assert np.max(np.abs(naive - exact) / spacing) > 3
    # ... with it, exp's own error is what is left.
    assert np.max(np.abs(got - exact) / spacing) <= 2.0


def _hard_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    n = 1024
    rows = {
        "normal": rng.standard_normal(n),
        "dominant": np.concatenate([[0.0], np.full(n - 1, -40.0)]),
        "dominant spread": np.concatenate([[3.0], 3.0 - 25.0 - 20.0 * rng.random(n - 1)]),
        "ties": np.concatenate([np.full(3, 2.5), 2.5 - 30.0 - rng.random(n - 3)]),
        "with -inf": np.where(rng.random(n) < 0.3, -np.inf, rng.standard_normal(n)),
        "offset": 1e4 + rng.standard_normal(n),
        "one +inf": np.concatenate([[np.inf], rng.standard_normal(n - 1)]),
        "two +inf": np.concatenate([[np.inf, np.inf], rng.standard_normal(n - 2)]),
        "nan": np.concatenate([rng.standard_normal(n - 1), [np.nan]]),
        "all -inf": np.full(n, -np.inf),
    }
    return {name: row.astype(np.float32) for name, row in rows.items()}


EXACT = {"logsumexp": oracle.exact_logsumexp, "softmax": oracle.exact_softmax, "log_softmax": oracle.exact_log_softmax}
FINITE = ("normal", "dominant", "dominant spread", "ties", "with -inf", "offset")


def _block(names, axis):
    rows = _hard_rows()
    block = np.stack([rows[name] for name in names])  # one case per row
    return np.ascontiguousarray(block.T) if axis == 0 else block


@pytest.mark.parametrize("op", sorted(EXACT))
@pytest.mark.parametrize("axis", [-1, 0])
def test_plain_float32_path_meets_the_contract_under_jit(op, axis):
    block = _block(FINITE, axis)
    got = np.asarray(jax.jit(lambda x: getattr(lse_dispatch, op)(x, axis=axis))(jnp.asarray(block)))
    errors = oracle.ulp_error(got, EXACT[op](block.astype(np.float64), axis=axis), np.float32)
    worst = errors if op == "logsumexp" else np.max(errors, axis=axis)
    assert np.all(worst <= ULPS), dict(zip(FINITE, worst, strict=True))


@pytest.mark.parametrize("op", sorted(EXACT))
def test_non_finite_rows_get_the_shared_limits_under_jit(op):
    # A +inf or all -inf row sends the call to the shared implementation: its
    # limits are those of the NumPy path, which the contract tests check.
    names = ("normal", "one +inf", "two +inf", "all -inf", "with -inf")
    block = _block(names, -1)
    got = np.asarray(jax.jit(lambda x: getattr(lse_dispatch, op)(x, axis=-1))(jnp.asarray(block)))
    want = np.asarray(getattr(lse_dispatch, op)(block, axis=-1))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=8 * 2.0**-23, atol=0)


@pytest.mark.parametrize("op", sorted(EXACT))
def test_a_nan_entry_makes_its_row_nan_under_jit(op):
    # XLA's CPU max drops NaN on inputs this large; the state puts it back.
    block = _block(FINITE + ("nan",), -1)
    got = np.asarray(jax.jit(lambda x: getattr(lse_dispatch, op)(x, axis=-1))(jnp.asarray(block)))
    assert np.all(np.isnan(got[-1]))
    assert not np.any(np.isnan(got[:-1]))


def test_compiled_module_has_no_optimization_barrier():
    x = jnp.zeros((8, 1024), jnp.float32)
    for op in ("logsumexp", "softmax", "log_softmax"):
        text = jax.jit(lambda x, op=op: getattr(lse_dispatch, op)(x, axis=-1)).lower(x).as_text()
        assert "optimization_barrier" not in text, op


@pytest.mark.parametrize("case", ["normal", "dominant", "with -inf", "ties", "nan", "one +inf", "all -inf"])
def test_one_dimensional_input_as_rows_under_jit(case):
    # 1-D inputs are reduced as rows of up to 4096 entries with one shared shift.
    rng = np.random.default_rng(6)
    n = 4 * 4096
    x = {
        "normal": rng.standard_normal(n),
        "dominant": np.concatenate([np.full(n - 1, -40.0), [0.0]]),
        "with -inf": np.where(rng.random(n) < 0.5, -np.inf, rng.standard_normal(n)),
        "ties": np.concatenate([[1.5], 1.5 - 20 - rng.random(n - 2), [1.5]]),
        "nan": np.concatenate([rng.standard_normal(n - 1), [np.nan]]),
        "one +inf": np.concatenate([rng.standard_normal(n - 1), [np.inf]]),
        "all -inf": np.full(n, -np.inf),
    }[case].astype(np.float32)
    got = np.asarray(jax.jit(lse_dispatch.logsumexp)(jnp.asarray(x)))
    if case in ("nan", "one +inf", "all -inf"):
        np.testing.assert_array_equal(got, np.asarray(lse_dispatch.logsumexp(x)))
    else:
        assert oracle.ulp_error(got, oracle.exact_logsumexp(x.astype(np.float64)), np.float32) <= ULPS
    log_softmax = np.asarray(jax.jit(lse_dispatch.log_softmax)(jnp.asarray(x)))
    if case == "dominant":
        # The max's -log1p(rest) keeps rest's relative accuracy (rest ~ 4e-14).
        exact_max = oracle.exact_log_softmax(x.astype(np.float64))[-1]
        assert oracle.ulp_error(log_softmax[-1:], np.asarray([exact_max]), np.float32)[0] <= ULPS


def test_a_nan_among_finite_entries_wins_under_jit():
    """XLA's CPU max under jit skipped this NaN (a (10, 1024) row); the
    shared ``reduce_max`` puts it back, so every path gives NaN for the row."""
    import jax
    import jax.numpy as jnp

    from lse_dispatch import _state

    x = np.random.default_rng(0).standard_normal((10, 1024)).astype(np.float32)
    x[3, 500] = np.nan
    assert np.isnan(jax.jit(lambda a: _state.reduce_max(jnp, a, (1,)))(x)[3, 0])
    weights = np.ones_like(x)
    mask = np.ones(x.shape, bool)
    results = {
        "plain": jax.jit(lambda a: lse_dispatch.logsumexp(a, axis=-1))(x),
        "b": jax.jit(lambda a, b: lse_dispatch.logsumexp(a, axis=-1, b=b))(x, weights),
        "where": jax.jit(lambda a, w: lse_dispatch.logsumexp(a, axis=-1, where=w))(x, mask),
        "log_softmax": jax.jit(lambda a, w: lse_dispatch.log_softmax(a, axis=-1, where=w))(x, mask)[:, 0],
        "softmax": jax.jit(lambda a, w: lse_dispatch.softmax(a, axis=-1, where=w))(x, mask)[:, 0],
    }
    for name, value in results.items():
        value = np.asarray(value)
        assert np.isnan(value[3]), name
        assert np.isfinite(np.delete(value, 3)).all(), name


def _fast_rows() -> dict[str, np.ndarray]:
    """Rows whose terms sum to 16 or more: the count-free form takes them."""
    rng = np.random.default_rng(7)
    n = 1024
    rows = {
        "normal": rng.standard_normal(n),
        # One at 0, the rest at -4: t = 1 + 1023 exp(-4) = 19.7, lse near 3.
        "just above 16": np.concatenate([[0.0], np.full(n - 1, -4.0)]),
        # Four ties at the max and a spread of entries within 3 of it.
        "ties": np.concatenate([np.full(4, 2.5), 2.5 - 3.0 * rng.random(n - 4)]),
        # Max near 0, so that lse is not dominated by m.
        "max near 0": np.concatenate([[1e-3], -rng.random(n - 1) * 5.0]),
        "with -inf": np.where(rng.random(n) < 0.3, -np.inf, rng.standard_normal(n)),
        "offset": -1e3 + rng.standard_normal(n),
    }
    return {name: row.astype(np.float32) for name, row in rows.items()}


FAST = tuple(_fast_rows())


def _fast_block(axis, extra=()):
    fast, hard = _fast_rows(), _hard_rows()
    block = np.stack([fast[name] for name in FAST] + [hard[name] for name in extra])
    return np.ascontiguousarray(block.T) if axis == 0 else block


def _fast_form_errors(op, axis):
    block = _fast_block(axis)
    got = np.asarray(jax.jit(lambda x: getattr(lse_dispatch, op)(x, axis=axis))(jnp.asarray(block)))
    errors = oracle.ulp_error(got, EXACT[op](block.astype(np.float64), axis=axis), np.float32)
    worst = errors if op == "logsumexp" else np.max(errors, axis=axis)
    return dict(zip(FAST, worst, strict=True))


@pytest.mark.parametrize("op", sorted(EXACT))
@pytest.mark.parametrize("axis", [-1, 0])
def test_count_free_form_meets_the_contract_under_jit(op, axis):
    worst = _fast_form_errors(op, axis)
    assert all(error <= ULPS for error in worst.values()), worst


def test_float32_softmax_with_a_large_log_sum_meets_the_contract_under_jit():
    # 5.5 ulps on this row with the former log form exp(hi) * (1 + lo), which
    # recovered the roundings of x - m and of the subtraction but not that of
    # log1p(c - 1 + r) ~ 5.3 itself; softmax_from_state now divides by c + r.
    assert _fast_form_errors("softmax", -1)["max near 0"] <= ULPS
