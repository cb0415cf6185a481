"""Every path the dispatcher can pick meets the contract: forced with ``use()``.

For each backend (numpy, torch, jax) and each implementation it can run (the
generic one and its native kernels), the rows of the contract are checked
against the mpmath oracle (4 ulps) or against exact expected limits.  The
trace must show that the forced implementation really ran, or that it
declined for the stated reason (``b``/``where`` on the blocked kernels).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import oracle

mpmath = pytest.importorskip("mpmath")

ULPS = 4.0
BACKENDS = ("numpy", "torch", "jax")
OPS = ("logsumexp", "log_softmax", "softmax")
EXACT = {"logsumexp": oracle.exact_logsumexp, "log_softmax": oracle.exact_log_softmax, "softmax": oracle.exact_softmax}


def _paths():
    catalogue = lse_dispatch.available()
    for backend in BACKENDS:
        for implementation in ("generic", *catalogue[backend]):
            yield pytest.param(backend, implementation, id=f"{backend}-{implementation}")


PATHS = list(_paths())


def _convert(backend, array):
    array = np.ascontiguousarray(array)
    if backend == "numpy":
        return array
    if backend == "torch":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(array.copy())
    jnp = pytest.importorskip("jax.numpy")
    if array.dtype == np.float64 and not pytest.importorskip("jax").config.jax_enable_x64:
        pytest.skip("jax without x64 has no float64")
    return jnp.asarray(array)


def _wide(backend):
    """Whether the backend has float64 to accumulate float32 in."""
    return backend != "jax" or pytest.importorskip("jax").config.jax_enable_x64


def _host(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _run(backend, implementation, op, x, expect_ran=True, **kwargs):
    """Call ``op`` with ``implementation`` forced; check what the trace says."""
    with lse_dispatch.use(implementation), lse_dispatch.trace() as seen:
        result = getattr(lse_dispatch, op)(x, **kwargs)
    (decision,) = seen.records
    if expect_ran:
        assert decision.implementation == implementation, str(decision)
    else:
        assert decision.implementation == "generic", str(decision)
        assert dict(decision.declined).get(implementation), str(decision)
    if isinstance(result, tuple):
        return tuple(map(_host, result))
    return _host(result)


def _assert_ulps(got, exact, dtype, what, softmax=False, wide=True):
    """At most ``ULPS`` ulps; for float64 softmax plus the conditioning of exp.

    softmax = exp(y) with y = x - lse formed in float64 when the result is
    float64: y's own rounding (|y| * eps) comes out of exp as a relative
    error, 2|y| ulps at most, for every implementation alike.  float32
    results form y in float64 and get no allowance, except where no float64
    exists (``wide=False``: JAX without x64).
    """
    errors = oracle.ulp_error(got, exact, dtype)
    allowed = np.full(errors.shape, ULPS)
    if softmax and (np.dtype(dtype) == np.float64 or not wide):
        with mpmath.workprec(64):
            log_exact = np.vectorize(lambda e: float(mpmath.log(e)) if e > 0 else 0.0, otypes=[float])(exact)
        allowed = allowed + 2 * np.abs(log_exact)
    excess = errors - allowed
    worst = int(np.argmax(excess)) if errors.size else 0
    assert errors.size == 0 or excess.flat[worst] <= 0, (
        f"{what}: {errors.flat[worst]:.2f} ulps > {allowed.flat[worst]:.2f}"
    )


def _rng():
    return np.random.default_rng(20261122)


# Hard finite inputs: (name, array, axis)
JAX_SUBSET = ("dominant-rows", "ties", "large-negative-offset", "random-3d-middle")


def _hard_inputs(dtype):
    rng = _rng()
    return [
        ("dominant", np.array([0.0, -40.0, -50.0, -17.5]), None),
        ("dominant-rows", np.array([[0.0, -20.0, -30.0], [5.0, -60.0, 4.0], [1.0, 1.0 - 2.0**-20, -3.0]]), 1),
        ("ties", np.array([[3.0, 3.0, 3.0, -1.0], [-2.0, 7.0, 7.0, 0.0]]), 1),
        # Longer than the kernels' small-input path: tiles, and the exact
        # recheck of a line whose rest is far below one ulp of 1.
        ("dominant-long", np.concatenate([[0.0], -40.0 - rng.uniform(0, 1, 5000)]), None),
        ("dominant-long-axis0", np.stack([np.r_[0.0, np.full(2500, -45.0)], np.linspace(-3, 3, 2501)], axis=1), 0),
        ("large-positive-offset", rng.standard_normal((4, 33)) * 3 + 1.0e4, 1),
        ("large-negative-offset", rng.standard_normal((33, 4)) * 3 - 1.0e4, 0),
        ("random-axis0", rng.standard_normal((40, 6)) * 5, 0),
        ("random-3d-leading", rng.standard_normal((5, 4, 3)), (0, 1)),
        ("random-3d-trailing", rng.standard_normal((3, 4, 5)), (1, 2)),
        ("random-3d-middle", rng.standard_normal((3, 5, 4)), 1),
    ]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("backend", "implementation"), PATHS)
def test_hard_inputs_within_4_ulps(backend, implementation, op, dtype):
    for name, values, axis in _hard_inputs(dtype):
        if backend == "jax" and name not in JAX_SUBSET:
            continue  # eager JAX compiles every new shape: keep its share short
        values = values.astype(dtype)
        x = _convert(backend, values)
        # Only the middle-axis layout is outside the blocked kernels' reach.
        ran = not (name == "random-3d-middle" and implementation.endswith(".blocked"))
        got = _run(backend, implementation, op, x, expect_ran=ran, axis=axis)
        exact = EXACT[op](values, axis=axis)
        _assert_ulps(got, exact, np.dtype(dtype), f"{op} {name}", softmax=op == "softmax", wide=_wide(backend))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("backend", "implementation"), PATHS)
def test_long_strided_axis(backend, implementation, dtype):
    """n = 2**20 + 3 along axis 0 of a (n, 2) array: the reduced axis is strided.

    Column 0 holds one 0 among -20s, column 1 holds 1.5 everywhere; the exact
    values follow in closed form (mpmath, 160 bits).
    """
    n = 2**20 + 3
    values = np.empty((n, 2), dtype=dtype)
    values[:, 0] = -20.0
    values[n // 3, 0] = 0.0
    values[:, 1] = 1.5
    x = _convert(backend, values)
    with mpmath.workprec(160):
        lse0 = mpmath.log1p((n - 1) * mpmath.exp(-20))
        lse1 = mpmath.mpf(1.5) + mpmath.log(n)
    got = _run(backend, implementation, "logsumexp", x, axis=0)
    _assert_ulps(got, np.array([lse0, lse1], dtype=object), np.dtype(dtype), "logsumexp")
    got = _run(backend, implementation, "log_softmax", x, axis=0)
    with mpmath.workprec(160):
        rows = [0, n // 3, n - 1]
        exact = np.array([[mpmath.mpf(float(values[i, 0])) - lse0, mpmath.mpf(1.5) - lse1] for i in rows], dtype=object)
    _assert_ulps(got[rows], exact, np.dtype(dtype), "log_softmax")
    got = _run(backend, implementation, "softmax", x, axis=0)
    with mpmath.workprec(160):
        exact = np.vectorize(mpmath.exp, otypes=[object])(exact)
    _assert_ulps(got[rows], exact, np.dtype(dtype), "softmax", softmax=True, wide=_wide(backend))


INF, NAN = math.inf, math.nan
# (input, logsumexp, softmax, log_softmax) along the last axis, exact.
LIMITS = [
    ([INF, 1.0, INF], INF, [0.5, 0.0, 0.5], [-math.log(2), -INF, -math.log(2)]),
    ([-INF, -INF, -INF], -INF, [0.0, 0.0, 0.0], [-INF, -INF, -INF]),
    ([-INF, 0.0, -INF], 0.0, [0.0, 1.0, 0.0], [-INF, 0.0, -INF]),
    ([NAN, 0.0, 1.0], NAN, [NAN, NAN, NAN], [NAN, NAN, NAN]),
    ([INF, NAN, 0.0], NAN, [NAN, NAN, NAN], [NAN, NAN, NAN]),
    ([1.0e30, 1.0e30, -1.0e30], 1.0e30 + math.log(2), [0.5, 0.5, 0.0], [-math.log(2), -math.log(2), -2.0e30]),
]


@pytest.mark.parametrize("pad", [0, 2000], ids=["short", "padded"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("backend", "implementation"), PATHS)
def test_limit_semantics(backend, implementation, dtype, pad):
    """The rows above; ``padded`` appends -inf entries (which change no limit)
    so that the kernels leave their small-input path for the tiled one."""
    if backend == "jax" and pad:
        pytest.skip("one length is enough for the generic code")
    fill = {"softmax": 0.0, "log_softmax": -INF}
    values = np.array([row[0] + [-INF] * pad for row in LIMITS], dtype=dtype)
    x = _convert(backend, values)
    expected = {
        "logsumexp": np.array([row[1] for row in LIMITS], dtype=dtype),
        "softmax": np.array([row[2] + [fill["softmax"] if row[1] == row[1] else NAN] * pad for row in LIMITS], dtype=dtype),
        "log_softmax": np.array([row[3] + [fill["log_softmax"] if row[1] == row[1] else NAN] * pad for row in LIMITS],
                                dtype=dtype),
    }
    for op in OPS:
        got = _run(backend, implementation, op, x, axis=-1)
        np.testing.assert_array_equal(got, expected[op], err_msg=f"{op} {implementation}")


@pytest.mark.parametrize(("backend", "implementation"), PATHS)
def test_where_and_b(backend, implementation):
    """Weights and masks: the blocked kernels decline them, the rest compute them."""
    rng = _rng()
    values = rng.standard_normal((3, 8))
    weights = rng.uniform(-1.0, 2.0, (3, 8))
    weights[0, :3] = 0.0
    mask = rng.uniform(size=(3, 8)) < 0.7
    mask[:, 0] = True
    x, b, where = (_convert(backend, v) for v in (values, weights, mask))
    takes = not implementation.endswith(".blocked")
    value, sign = _run(backend, implementation, "logsumexp", x, expect_ran=takes, axis=1, b=b, return_sign=True)
    exact = oracle.exact_logsumexp(values, axis=1, b=weights)
    _assert_ulps(value, exact, values.dtype, "logsumexp with b")
    total = np.sum(weights * np.exp(values), axis=1)
    np.testing.assert_array_equal(sign, np.sign(total))
    got = _run(backend, implementation, "logsumexp", x, expect_ran=takes, axis=1, where=where)
    _assert_ulps(got, oracle.exact_logsumexp(values, axis=1, where=mask), values.dtype, "logsumexp with where")
    got = _run(backend, implementation, "softmax", x, expect_ran=takes, axis=1, where=where)
    exact = oracle.exact_softmax(values, axis=1, where=mask)
    _assert_ulps(got, exact, values.dtype, "softmax with where", softmax=True, wide=_wide(backend))
    assert np.all(got[~mask] == 0)
