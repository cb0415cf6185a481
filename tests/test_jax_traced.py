"""The jax.fused kernel: plain float32 JAX calls without x64 (backends/_jax_traced.py, _jax_fused.py).

Checked here, inside the user's ``jax.jit`` (and eagerly, where the kernel
compiles the same code):

* the summation tree is the fixed one it claims: XLA's result equals, bit for
  bit, the same tree evaluated by NumPy in float32, and meets the
  ``ceil(log2 n) u`` bound on data a sequential sum gets badly wrong;
* the exact shift: ``x - s`` is exact (against float64) for every entry that
  counts, on every regime of the max;
* both forms (exact shift, TwoSum) meet the 4-ulp contract against the
  oracle on the hard rows, along every layout (last axis, first axis, middle
  axis, several axes, 1-D, lengths that are not powers of two);
* limits (+inf, all -inf, NaN) are the shared functions', and a NaN entry wins
  even where XLA's max misses it;
* derivatives: values, the limits of ``lse_dispatch._autodiff``, ``hessian``,
  ``jacfwd``, ``jvp``, ``vmap``; residuals no larger than jax.nn's;
* ``vmap`` keeps one ``lax.cond`` (no select between both forms), donated
  inputs are reused for the output, and ``jax.debug_nans`` does not fire on
  NaN-free input, with jit on and off.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("mpmath")

import lse_dispatch  # noqa: E402
from lse_dispatch import oracle  # noqa: E402
from lse_dispatch.backends import _jax_traced  # noqa: E402

pytestmark = pytest.mark.skipif(jax.config.jax_enable_x64, reason="jax.fused is for JAX without x64")

U = 2.0**-24
ULPS = 4.0
OPS = ("logsumexp", "softmax", "log_softmax")
EXACT = {"logsumexp": oracle.exact_logsumexp, "softmax": oracle.exact_softmax, "log_softmax": oracle.exact_log_softmax}


def _op(op, **kwargs):
    return lambda a: getattr(lse_dispatch, op)(a, **kwargs)


def _tree_sum_numpy(values: np.ndarray) -> np.ndarray:
    """The tree of ``pairwise_sum`` evaluated by NumPy in float32 (last axis)."""
    n = values.shape[-1]
    leaves = 1 << min(_jax_traced.LEAF_LEVELS, max(0, math.floor(math.log2(n))))
    width = 1 << max(0, math.ceil(math.log2(-(-n // leaves))))
    padded = np.zeros(values.shape[:-1] + (leaves * width,), np.float32)
    padded[..., :n] = values
    parts = [padded[..., i * width : (i + 1) * width] for i in range(leaves)]
    while len(parts) > 1:
        parts = [(parts[i] + parts[i + 1]).astype(np.float32) for i in range(0, len(parts), 2)]
    total = parts[0]
    while total.shape[-1] > 1:
        half = total.shape[-1] // 2
        total = (total[..., :half] + total[..., half:]).astype(np.float32)
    return total


def _hard_sum_data(n, seed):
    """Positive terms over 40 binades, a large one first: summed one after another they are far off."""
    rng = np.random.default_rng(seed)
    exponents = np.where(rng.random(n) < 0.05, rng.integers(0, 10, n), rng.integers(24, 40, n))
    values = (1 + rng.random(n)) * 2.0**-exponents
    values[0] = 1.0
    return values.astype(np.float32)


@pytest.mark.parametrize("n", [1, 3, 8, 100, 128, 1000, 4096])
def test_pairwise_sum_is_the_fixed_tree_under_jit(n):
    values = np.stack([_hard_sum_data(n, seed) for seed in range(3)])
    got = np.asarray(jax.jit(lambda v: _jax_traced.pairwise_sum(v, lambda p: (p,)))(jnp.asarray(values)))
    np.testing.assert_array_equal(got, _tree_sum_numpy(values))  # bit for bit: XLA kept the order
    for row, total in zip(values, got[..., 0], strict=True):
        exact = math.fsum(row.astype(np.float64))
        assert abs(float(total) - exact) <= math.ceil(math.log2(max(n, 2))) * U * exact


def test_pairwise_sum_beats_the_sequential_sum():
    values = np.full((1, 4096), 2.0**-25, dtype=np.float32)
    values[0, 0] = 1.0
    exact = math.fsum(values[0].astype(np.float64))
    sequential = float(np.cumsum(values[0], dtype=np.float32)[-1])
    assert abs(sequential - exact) / exact > 100 * U
    got = float(jax.jit(lambda v: _jax_traced.pairwise_sum(v, lambda p: (p,)))(jnp.asarray(values))[0, 0])
    assert abs(got - exact) / exact <= 2 * U


@pytest.mark.parametrize(
    "m",
    [0.0, -0.0, -1e-30, -0.3, -5.7, -40.123, -127.9, -1000.3, -123456.78, -(2.0**20) + 1, 1e-30, 0.7123, 50.5, 77.9],
)
def test_exact_shift_leaves_every_difference_that_counts_exact(m):
    rng = np.random.default_rng(0)
    m32 = np.float32(m)
    n = 4096
    # Entries from m down to m - 127 (the range whose terms count), with
    # every kind of low bits: tiny, integers, random, near binade edges.
    x = m32 - np.float32(127.0) * rng.random(n).astype(np.float32)
    x[:64] = (-(2.0 ** rng.integers(-30, 7, 64)) * (1 + rng.random(64))).astype(np.float32)
    x[64:128] = np.float32(m32) - np.float32(2.0) ** rng.integers(-20, 7, 64).astype(np.float32)
    x = x[(x <= m32) & (x >= m32 - np.float32(127.0))]
    s, ok = jax.jit(lambda v: _jax_traced.exact_shift(v, n))(jnp.asarray([[m32]]))
    assert bool(ok[0, 0])
    s = np.float32(s[0, 0])
    got = np.asarray(jax.jit(lambda a, b: a - b)(jnp.asarray(x), jnp.float32(s)), np.float64)
    np.testing.assert_array_equal(got, x.astype(np.float64) - np.float64(s))
    assert abs(float(m32) - float(s)) <= 2.0**-4 or s == 0


@pytest.mark.parametrize("m", [79.0, 1e4, -(2.0**20) - 64, np.inf, -np.inf, np.nan])
def test_exact_shift_declines_what_it_cannot_take(m):
    _, ok = jax.jit(lambda v: _jax_traced.exact_shift(v, 4096))(jnp.asarray([[m]], jnp.float32))
    assert not bool(ok[0, 0])


@pytest.mark.parametrize("n", [1, 2, 3, 8, 100])
def test_positive_maxima_whose_total_has_a_subnormal_reciprocal(n):
    """Found 2026-11-30 by fuzzing: with ``s = 0`` up to ``ln(FLT_MAX) - ln(n) - 1`` a line
    could sum to above ``2**126``, whose reciprocal (XLA's division by the total) and
    ``exp(-m) / (c + r)`` (the logsumexp weights) XLA flushes: softmax of ``[86.901474,
    86.899925]`` was ``[0, 0]``, and so was the gradient of its logsumexp."""
    rows = []
    old_limit = math.floor(math.log(float(np.finfo(np.float32).max)) - math.log(n) - 1)
    for top in (old_limit - 1e-3, _jax_traced.shift_free_limit(n) - 1e-3, 86.901474, 85.5, 80.0):
        rows.append(np.full(n, top))  # ties: the largest total a max allows
        rows.append(top - np.arange(n) * 1.5e-3)
    x = np.asarray(rows, np.float32)
    for op in ("softmax", "log_softmax"):
        worst = np.max(_errors(op, x, -1))
        assert worst <= ULPS, (op, worst)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(lse_dispatch.logsumexp(a, axis=-1))))(jnp.asarray(x))
    want = np.asarray(oracle.exact_softmax(x.astype(np.float64), axis=-1), np.float64)
    np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=3e-6)


@pytest.mark.parametrize("form", ["exact shift", "twosum"])
def test_rests_made_of_flushed_terms_are_summed_again(form):
    """Found 2026-11-30 by ``benchmarks/fuzz_kernels.py``: XLA flushes the terms below
    ``2**-126`` of the shift's, so ``logsumexp([-85.97, -90.38, 0, -102.63, -93.07])`` gave
    ``4.6219944e-38`` for ``4.6819694e-38`` and ``log_softmax`` at the max of a line whose
    other entries are 75 to 98 below it was off by 1242 ulps; such lines are summed again
    with terms ``e**64`` larger (``_rescued``)."""
    rng = np.random.default_rng(13)
    rows = [np.array([-85.96741, -90.37746, 0.0, -102.634445, -93.07198] + [-120.0] * 123)]
    for top in (0.0, 0.52183914, -3.7, -9910.0):
        for low, high in ((75.0, 98.0), (86.0, 89.0), (60.0, 120.0)):
            rows.append(top - np.concatenate([[0.0], rng.uniform(low, high, 127)]))
    rows.append(np.concatenate([[2.0, 2.0], 2.0 - rng.uniform(80.0, 95.0, 126)]))  # ties at the max
    if form == "twosum":
        rows.append(1e5 + rng.standard_normal(128))  # a line beyond the exact shift's range
    x = np.asarray(rows, np.float32)
    m = np.max(x, axis=1)
    _, ok = jax.jit(lambda v: _jax_traced.exact_shift(v, x.shape[1]))(jnp.asarray(m[:, None]))
    assert bool(np.all(ok)) == (form == "exact shift")
    for op in ("log_softmax", "logsumexp"):
        worst = np.max(_errors(op, x, -1))
        assert worst <= ULPS, (op, worst)
    batched = np.asarray(jax.jit(jax.vmap(lambda v: lse_dispatch.log_softmax(v, axis=-1)))(jnp.asarray(x[None])))
    errors = oracle.ulp_error(batched[0], EXACT["log_softmax"](x.astype(np.float64), axis=-1), np.float32)
    assert np.max(errors) <= ULPS


def _hard_rows(n=1000):
    rng = np.random.default_rng(5)
    rows = {
        "normal": rng.standard_normal(n) * 3,
        "dominant": np.concatenate([[0.0], np.full(n - 1, -40.0)]),
        "dominant, small positive max": np.concatenate([[1e-3], 1e-3 - 30 - rng.random(n - 1)]),
        "dominant spread": np.concatenate([[3.0], 3.0 - 25.0 - 20.0 * rng.random(n - 1)]),
        "second max then tiny": np.concatenate([[2.0, 2.0 - 20.0], np.full(n - 2, 2.0 - 45.0)]),
        "ties": np.concatenate([np.full(3, 2.5), 2.5 - 30.0 - rng.random(n - 3)]),
        "with -inf": np.where(rng.random(n) < 0.3, -np.inf, rng.standard_normal(n)),
        "negative offset": -1e4 + rng.standard_normal(n),
        "max near the exact-shift limit": np.concatenate([[78.5], 78.5 - 20 * rng.random(n - 1)]),
        "max near 0": np.concatenate([[1e-3], -rng.random(n - 1) * 5.0]),
        "max just below 0": np.concatenate([[-1e-3], -1e-3 - rng.random(n - 1) * 5.0]),
    }
    return {name: row.astype(np.float32) for name, row in rows.items()}


FORCE_TWOSUM = {"offset": 1e4}  # a line with a max beyond the exact shift's range


def _errors(op, block, axis, exact=None):
    """Each line's worst error in float32 ulps (``exact``: the oracle's values, if already formed)."""
    got = np.asarray(jax.jit(_op(op, axis=axis))(jnp.asarray(block)))
    exact = EXACT[op](block.astype(np.float64), axis=axis) if exact is None else exact
    errors = oracle.ulp_errors(got, exact, "float32")
    return errors if op == "logsumexp" else np.max(errors, axis=axis)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("form", ["exact shift", "twosum"])
def test_hard_rows_meet_the_contract(op, form):
    rows = _hard_rows()
    names = list(rows)
    block = np.stack([rows[name] for name in names])
    if form == "twosum":
        names.append("offset 1e4")
        block = np.concatenate([block, (1e4 + np.random.default_rng(1).standard_normal((1, 1000))).astype(np.float32)])
    m, _ = np.max(block, axis=1), None
    _, ok = jax.jit(lambda v: _jax_traced.exact_shift(v, 1000))(jnp.asarray(m[:, None]))
    assert bool(np.all(ok)) == (form == "exact shift")
    worst = _errors(op, block, -1)
    assert np.all(worst <= ULPS), dict(zip(names, np.round(worst, 2), strict=True))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("spread", [(-5.0, 75.0), (-5.0, 5.0)])
def test_dominant_rows_with_random_maxima_meet_the_contract(ties, spread):
    # One entry (two with ties) 10 to 50 above all others, the max anywhere in
    # the exact shift's range: the rest is small, so every output depends on
    # its relative accuracy (softmax read 5.0 ulps here when the dominant
    # term went through every level of the summation tree).
    rng = np.random.default_rng(11)
    rows, n = 512, 256
    m = (spread[0] + (spread[1] - spread[0]) * rng.random(rows)).astype(np.float32)
    gap = (10 + 40 * rng.random(rows)).astype(np.float32)
    x = (m[:, None] - gap[:, None] - 10 * rng.random((rows, n))).astype(np.float32)
    x[:, 0] = m
    if ties:
        x[:, 1] = m
    # The oracle once per op: softmax is exp of log_softmax's exact values, and
    # logsumexp's also picks the conditioned rows below.
    wide = x.astype(np.float64)
    exact_log_softmax = oracle.exact_log_softmax(wide, axis=-1)
    exact_softmax = oracle.exact_exp(exact_log_softmax)
    for op, exact in (("softmax", exact_softmax), ("log_softmax", exact_log_softmax)):
        worst = np.max(_errors(op, x, -1, exact))
        assert worst <= ULPS, (op, worst)
    exact_lse = oracle.exact_logsumexp(wide, axis=-1)
    errors = _errors("logsumexp", x, -1, exact_lse)
    lse = np.asarray(exact_lse, np.float64)
    # m + log(c + r) cancels where m < 0 < lse: a condition number |m| / |lse|
    # that float32 alone cannot absorb (the contract's cancels-to-near-zero,
    # exempt without float64); every other row meets the contract.
    conditioned = np.abs(m.astype(np.float64)) <= 1.5 * np.abs(lse)
    assert np.max(errors[conditioned]) <= ULPS


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "shape, axis",
    [((1000,), None), ((300, 7), 0), ((4, 130, 3), 1), ((6, 5, 33), (1, 2)), ((2, 129), -1), ((5, 1), -1), ((3, 2), -1)],
)
def test_layouts_meet_the_contract(op, shape, axis):
    x = (np.random.default_rng(2).standard_normal(shape) * 4).astype(np.float32)
    if x.size > 20:
        x.reshape(-1)[::7] = -40.0
    with lse_dispatch.trace() as seen:
        got = np.asarray(jax.jit(_op(op, axis=axis))(jnp.asarray(x)))
        eager = np.asarray(_op(op, axis=axis)(jnp.asarray(x)))
    assert seen.implementations == ["jax.fused", "jax.fused"]
    np.testing.assert_array_equal(got, eager)  # the same compiled code
    errors = oracle.ulp_error(got, EXACT[op](x.astype(np.float64), axis=axis), np.float32)
    assert np.max(errors) <= ULPS


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_keeps_its_dtype_within_1_ulp(op, dtype):
    x = np.random.default_rng(3).standard_normal((8, 200)).astype(np.float32) * 3
    got = jax.jit(_op(op, axis=-1))(jnp.asarray(x, dtype=dtype))
    assert got.dtype == jnp.dtype(dtype)
    rounded = np.asarray(jnp.asarray(x, dtype=dtype).astype(jnp.float32), np.float64)
    errors = oracle.ulp_error(np.asarray(got.astype(jnp.float32)), EXACT[op](rounded, axis=-1), dtype)
    assert np.max(errors) <= 1.0


LIMIT_ROWS = {
    "one +inf": [np.inf, 1.0, 2.0, -np.inf],
    "two +inf": [np.inf, np.inf, 0.0, 5.0],
    "all -inf": [-np.inf] * 4,
    "nan": [1.0, np.nan, 2.0, 3.0],
    "nan and +inf": [np.inf, np.nan, 2.0, 3.0],
    "nan and -inf": [-np.inf, np.nan, -np.inf, -np.inf],
    "finite": [0.5, -1.0, 3.0, 3.0],
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", list(LIMIT_ROWS))
def test_limits_are_the_shared_functions(op, name):
    block = np.array([LIMIT_ROWS[name], LIMIT_ROWS["finite"]], np.float32)
    got = np.asarray(jax.jit(_op(op, axis=-1))(jnp.asarray(block)))
    want = np.asarray(_op(op, axis=-1, backend="generic")(block))  # NumPy, shared code
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got) & (got > 0), np.isinf(want) & (want > 0))
    np.testing.assert_array_equal(np.isinf(got) & (got < 0), np.isinf(want) & (want < 0))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=8 * 2.0**-23, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_a_nan_entry_wins_where_xla_max_misses_it(op):
    # XLA's CPU max under jit returned -inf for such a (10, 1024) row.
    x = np.random.default_rng(0).standard_normal((10, 1024)).astype(np.float32)
    x[3, 500] = np.nan
    got = np.asarray(jax.jit(_op(op, axis=-1))(jnp.asarray(x)))
    assert np.all(np.isnan(got[3]))
    assert np.all(np.isfinite(np.delete(got, 3, axis=0)))


# ----------------------------------------------------------------------------
# Derivatives


def _softmax64(x, axis=-1):
    return np.asarray(oracle.exact_softmax(np.asarray(x, np.float64), axis=axis), dtype=np.float64)


@pytest.mark.parametrize("form", ["exact shift", "twosum"])
def test_gradients_match_the_analytic_ones(form):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((4, 50)) * 2).astype(np.float32)
    if form == "twosum":
        x[0] += 1e3  # beyond the exact shift: the whole call takes the TwoSum form
    c = rng.standard_normal((4, 50)).astype(np.float32)
    c_rows = rng.standard_normal((4,)).astype(np.float32)
    p = _softmax64(x)
    grads = {
        "logsumexp": jax.jit(jax.grad(lambda a: jnp.sum(lse_dispatch.logsumexp(a, axis=-1) * c_rows)))(jnp.asarray(x)),
        "softmax": jax.jit(jax.grad(lambda a: jnp.sum(lse_dispatch.softmax(a, axis=-1) * c)))(jnp.asarray(x)),
        "log_softmax": jax.jit(jax.grad(lambda a: jnp.sum(lse_dispatch.log_softmax(a, axis=-1) * c)))(jnp.asarray(x)),
    }
    expected = {
        "logsumexp": p * c_rows[:, None],
        "softmax": p * (c - np.sum(p * c, axis=-1, keepdims=True)),
        "log_softmax": c - p * np.sum(c, axis=-1, keepdims=True),
    }
    for op in OPS:
        np.testing.assert_allclose(np.asarray(grads[op], np.float64), expected[op], rtol=3e-6, atol=3e-7, err_msg=op)


@pytest.mark.parametrize(
    "row, expected",
    [([np.inf, np.inf, 0.0], [0.5, 0.5, 0.0]), ([-np.inf, -np.inf], [0.0, 0.0]), ([np.inf, 0.0], [1.0, 0.0])],
)
def test_logsumexp_gradient_limits(row, expected):
    g = jax.jit(jax.grad(lambda a: lse_dispatch.logsumexp(a)))(jnp.asarray(row, jnp.float32))
    np.testing.assert_array_equal(np.asarray(g), np.asarray(expected, np.float32))


def test_softmax_gradient_is_zero_where_the_output_is_zero():
    # where(mask, log(softmax), 0): log's cotangent at the masked entry is inf.
    x = jnp.asarray([0.0, -np.inf, 1.0], jnp.float32)
    mask = jnp.asarray([True, False, True])

    def loss(a):
        y = lse_dispatch.softmax(a)
        return jnp.sum(jnp.where(mask, jnp.log(jnp.where(mask, y, 1.0)), 0.0))

    g = np.asarray(jax.jit(jax.grad(loss))(x))
    assert np.all(np.isfinite(g)) and g[1] == 0.0


def test_hessian_jacfwd_jvp_and_vmap():
    x = jnp.asarray([0.3, -1.2, 2.0, 0.5], jnp.float32)
    p = _softmax64(np.asarray(x))
    hessian = np.diag(p) - np.outer(p, p)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.hessian(lambda a: lse_dispatch.logsumexp(a)))(x)), hessian, atol=2e-7)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.jacfwd(lambda a: lse_dispatch.softmax(a)))(x)), hessian, atol=2e-7)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.jacrev(lambda a: lse_dispatch.softmax(a)))(x)), hessian, atol=2e-7)
    jac_log = np.eye(4) - p[None, :]
    np.testing.assert_allclose(np.asarray(jax.jit(jax.jacfwd(lambda a: lse_dispatch.log_softmax(a)))(x)), jac_log, atol=3e-7)
    dx = jnp.asarray([1.0, 0.0, -1.0, 2.0], jnp.float32)
    _, tangent = jax.jvp(lambda a: lse_dispatch.logsumexp(a), (x,), (dx,))
    np.testing.assert_allclose(float(tangent), float(np.dot(p, np.asarray(dx))), rtol=1e-6)
    # Hessian at two +inf entries: [0.25, 0.25, 0] on the diagonal.
    h_inf = np.asarray(jax.jit(jax.hessian(lambda a: lse_dispatch.logsumexp(a)))(jnp.asarray([np.inf, np.inf, 0.0], jnp.float32)))
    np.testing.assert_allclose(np.diag(h_inf), [0.25, 0.25, 0.0])
    rows = jnp.asarray(np.random.default_rng(1).standard_normal((5, 7)), jnp.float32)
    g = jax.jit(jax.vmap(jax.grad(lambda a: lse_dispatch.logsumexp(a))))(rows)
    np.testing.assert_allclose(np.asarray(g), _softmax64(np.asarray(rows)), rtol=3e-6, atol=1e-7)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(64, 512), (8, 16, 128)])
def test_residuals_are_no_larger_than_jax_nn(op, shape):
    try:
        from jax.ad_checkpoint import saved_residuals
    except ImportError:  # jax 0.10 exports only print_saved_residuals
        from jax._src.ad_checkpoint import saved_residuals

    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    c = jnp.ones(shape[:-1] if op == "logsumexp" else shape, jnp.float32)
    theirs = getattr(jax.nn, op)
    ours = getattr(lse_dispatch, op)

    def residuals(f):
        found = saved_residuals(lambda a, w: jnp.sum(f(a, axis=-1) * w), x, c)
        return [(aval, why) for aval, why in found if why != "from the argument w"]

    def size(found):
        return sum(aval.size * aval.dtype.itemsize for aval, _ in found)

    mine = residuals(ours)
    assert size(mine) <= size(residuals(theirs)), mine
    # Under jax.grad with respect to the input alone, one full-size array: the
    # output (softmax) or the terms of the weights softmax(x) = t f (logsumexp,
    # log_softmax: formed in the forward pass as jax.nn's exp is); nothing else
    # but per-line scalars.  (The loss's gradient with respect to w also keeps
    # log_softmax's output, as jax.nn's does.)
    alone = [(aval, why) for aval, why in saved_residuals(lambda a: jnp.sum(ours(a, axis=-1) * c), x)
             if why != "from a constant"]
    full = [aval for aval, _ in alone if aval.shape == shape]
    assert len(full) == 1, alone
    assert all(aval.size * len(shape) <= x.size * 2 for aval, _ in alone if aval.shape != shape), alone


# ----------------------------------------------------------------------------
# Transforms and compilation


@pytest.mark.parametrize("op", OPS)
def test_vmap_keeps_one_cond(op):
    xs = jnp.asarray(np.random.default_rng(6).standard_normal((3, 4, 50)), jnp.float32)
    f = _op(op, axis=-1)
    batched = jax.jit(jax.vmap(f))(xs)
    looped = np.stack([np.asarray(jax.jit(f)(x)) for x in xs])
    np.testing.assert_array_equal(np.asarray(batched), looped)
    jaxpr = jax.make_jaxpr(jax.vmap(f))(xs)
    # The forward (the custom_vmap_call's body) holds one cond: the choice of form
    # (the rescue's conds, _rescued, are inside its branches).  vmap of a cond with
    # a batched predicate would select between both branches instead.
    body = _first_equation(jaxpr.jaxpr, "custom_vmap_call")
    names = [eqn.primitive.name for eqn in body.eqns]
    assert names.count("cond") == 1, names
    assert "select_n" not in names[: names.index("cond")], names


def _first_equation(jaxpr, primitive):
    """The inner jaxpr of the first equation of ``primitive`` in ``jaxpr`` or the jaxprs it calls."""
    for eqn in jaxpr.eqns:
        inners = [getattr(v, "jaxpr", v) for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr")]
        if eqn.primitive.name == primitive:
            return inners[0]
        for inner in inners:
            found = _first_equation(inner, primitive) if hasattr(inner, "eqns") else None
            if found is not None:
                return found
    return None


_EAGER = {
    **{op: _op(op, axis=-1) for op in OPS},
    "logcumsumexp": lambda a: lse_dispatch.logcumsumexp(a, axis=-1),
    "logmatmulexp": lambda a: lse_dispatch.logmatmulexp(a, a.T),
}


@pytest.mark.parametrize("op", list(_EAGER))
def test_eager_calls_on_a_seen_shape_compile_nothing(op):
    """A concrete JAX array of a shape already seen reuses the compiled program:
    no XLA compilation per call (each would also keep an executable mapped),
    nor a load from JAX's persistent compilation cache (scripts/dev.sh sets one)."""
    compiles = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event or "cache_retrieval_time" in event:
            compiles.append(event)

    rng = np.random.default_rng(12)
    xs = [jnp.asarray(rng.standard_normal((5, 37)), jnp.float32) for _ in range(4)]
    f = _EAGER[op]
    f(xs[0]).block_until_ready()  # the shape's first call may compile
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        f(jnp.asarray(rng.standard_normal((6, 37)), jnp.float32)).block_until_ready()
        assert compiles, "the listener sees a new shape's compilation"
        compiles.clear()
        for x in xs[1:]:
            f(x).block_until_ready()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


@pytest.mark.parametrize("op", OPS)
def test_the_kernel_is_traced_once_per_signature_inside_user_programs(op, monkeypatch):
    """Inside the user's jit the call is a nested jit: a model that calls it on
    the same shape in every layer, or a second program, reuses its trace
    (what that saves: ``python benchmarks/jax_compile_time.py``)."""
    from lse_dispatch.backends import _jax_fused

    traced = []
    original = _jax_fused._run_traced

    def counting(call):
        traced.append(call.op)
        return original(call)

    monkeypatch.setattr(_jax_fused, "_run_traced", counting)
    x = jnp.asarray(np.random.default_rng(13).standard_normal((3, 5, 71)), jnp.float32)
    f = getattr(lse_dispatch, op)

    def layers(v):
        for _ in range(3):
            v = f(v * 1.5, axis=-1) if op != "logsumexp" else v + f(v, axis=-1, keepdims=True)
        return v

    jax.jit(layers)(x)
    jax.jit(lambda v: f(v - 1.0, axis=-1))(x)  # another program, the same signature
    assert traced == [op]


def _instructions(hlo_text: str) -> list[str]:
    """The optimized program's instructions without names, metadata or stack frames."""
    import re

    text = re.sub(r"metadata=\{[^}]*\}", "", hlo_text)
    text = re.sub(r", frontend_attributes=\{[^}]*\}", "", text)
    text = re.sub(r"[%\w.\-]*\.\d+", "N", text)
    lines = (re.sub(r"\s+", " ", line).strip().rstrip(",") for line in text.splitlines())
    return sorted(line for line in lines if line and not re.match(r"^\d+ [{\"]", line))


@pytest.mark.parametrize("op", OPS)
def test_the_nested_jit_compiles_to_the_program_traced_in_place(op, monkeypatch):
    """XLA inlines the nested jit: the optimized program of the forward and of
    the gradient is the one the kernel traced in place gives, instruction for
    instruction."""
    from lse_dispatch.backends import _jax_fused

    nested = _jax_fused._compiled

    def in_place():
        return _jax_fused._in_place

    x = jnp.asarray(np.random.default_rng(14).standard_normal((6, 301)), jnp.float32)
    f = getattr(lse_dispatch, op)

    def programs():  # new functions each time: JAX caches a trace per function
        return {"forward": lambda v: f(v, axis=-1), "gradient": jax.grad(lambda v: jnp.sum(jnp.sin(f(v, axis=-1))))}

    texts: dict = {}
    for compiled in (nested, in_place):
        monkeypatch.setattr(_jax_fused, "_compiled", compiled)
        for name, program in programs().items():
            texts.setdefault(name, []).append(jax.jit(program).lower(x).compile().as_text())
    monkeypatch.setattr(_jax_fused, "_compiled", nested)
    for name, (with_nested, traced_in_place) in texts.items():
        assert _instructions(with_nested) == _instructions(traced_in_place), name


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_donated_input_is_reused_for_the_output(op):
    x = jnp.asarray(np.random.default_rng(7).standard_normal((256, 128)), jnp.float32)
    compiled = jax.jit(_op(op, axis=-1), donate_argnums=0).lower(x).compile()
    # The output takes the donated input's buffer: no second full-size buffer.
    assert compiled.memory_analysis().alias_size_in_bytes == x.size * 4
    got = compiled(jnp.array(x))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(_op(op, axis=-1))(x)))


@pytest.mark.parametrize("jit", [True, False])
def test_debug_nans_does_not_fire_on_nan_free_input(jit):
    block = jnp.asarray(
        [[0.0, -1.0, 3.0, 3.0], [np.inf, 1.0, np.inf, 0.0], [-np.inf] * 4, [100.0, 1.0, -np.inf, 2.0]], jnp.float32
    )
    with jax.debug_nans(True):
        for op in OPS:
            f = _op(op, axis=-1)

            def loss(a, f=f):
                out = f(a)
                return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0))

            for fn in (f, jax.grad(loss)):
                if jit:
                    jax.block_until_ready(jax.jit(fn)(block))
                else:
                    with jax.disable_jit():
                        jax.block_until_ready(fn(block))


def test_one_pass_over_the_input_then_small_kernels():
    # The compiled program reads the (4096, 512) input in the max and in the
    # one fused loop; everything after works on arrays at least 8 times smaller.
    x = jnp.zeros((4096, 512), jnp.float32)
    text = jax.jit(_op("logsumexp", axis=-1)).lower(x).compile().as_text()
    entry = text[text.index("ENTRY") :]
    full = [line for line in entry.splitlines()
            if "fusion(" in line and "f32[4096,512]" in line.split("=")[1].split("fusion(")[0]]
    assert full == [], full  # no fusion writes an array of the input's size
    assert "optimization_barrier" not in jax.jit(_op("logsumexp", axis=-1)).lower(x).as_text()
