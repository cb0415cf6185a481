"""Every path the dispatcher can pick meets the contract: forced with ``use()``.

For each backend (numpy, torch, jax) and each implementation it can run (the
generic one and its native kernels), the rows of the contract are checked
against the mpmath oracle (4 ulps) or against exact expected limits.  For
every call the test works out on its own whether the forced kernel must take
it; the trace must show that it really ran, or that it declined with a stated
reason and the generic implementation ran instead.  What declines what:

* ``numpy.blocked`` / ``torch.blocked``: ``b``, ``where``, a reduced axis
  that is neither leading nor trailing, float64 softmax (the TwoSum-
  compensated exponent of ``softmax_from_state`` is the generic path's) and
  float64 log_softmax (the max's ``-log1p(rest)`` needs terms ``exp(x - m)``
  of the exact difference, which only the shared state forms; see
  ``spread``); ``torch.blocked`` declines calls that autograd records.
* ``numpy.fused`` / ``torch.fused`` (numba): other layouts (weighted
  logsumexp is taken in any layout) and calls autograd records, and every
  call when numba is not installed; the module warms them up first so that
  they take these small inputs.
* ``jax.jit``: traced inputs (inside a JAX transform).
* ``autodiff`` (torch and JAX): every call that is not being differentiated.
  They are also exercised for real: torch with ``requires_grad=True`` inputs
  (and a backward pass), JAX inside ``jax.jvp``, forward values checked
  against the oracle like every other path.
"""

from __future__ import annotations

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import oracle
from lse_dispatch.backends import _fused_cpu

from ._helpers import INF, NAN, fused_kernels_loaded
from ._helpers import LIMIT_ROWS as LIMITS

mpmath = pytest.importorskip("mpmath")

ULPS = 4.0
BACKENDS = ("numpy", "torch", "jax")
OPS = ("logsumexp", "log_softmax", "softmax")
EXACT = {"logsumexp": oracle.exact_logsumexp, "log_softmax": oracle.exact_log_softmax, "softmax": oracle.exact_softmax}


def _paths():
    catalogue = lse_dispatch.available()
    for backend in BACKENDS:
        for implementation in ("generic", *catalogue[backend]):
            if implementation == "torch.triton":
                continue  # CUDA only; tests/test_triton_kernels.py runs these inputs through its interpreter
            yield pytest.param(backend, implementation, id=f"{backend}-{implementation}")


PATHS = list(_paths())


@pytest.fixture(scope="module", autouse=True)
def _fused_compiled():
    """The fused kernels compiled (from numba's cache after the first run), so
    that they take the small inputs here; forgotten afterwards, so that other
    modules see the default of a fresh process."""
    with fused_kernels_loaded():
        yield


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


def _host(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _declines(implementation, op, dtype, *, layout=True, weighted=False, masked=False, differentiated=False):
    """Whether ``implementation`` must decline the call (worked out here, not asked of it).

    ``layout``: the reduced axes are the leading or trailing axes of a
    contiguous array; ``weighted``: ``b`` given; ``masked``: ``where`` given;
    ``differentiated``: a derivative is being taken.
    """
    if implementation == "generic":
        return False
    if implementation == "jax.fused":
        return weighted or masked or np.dtype(dtype) == np.float64  # plain float32 without x64 only
    if implementation.endswith(".fused"):
        # Compiled kernels (numba): other layouts (not for b), autograd-recorded calls.
        if not _fused_cpu.available():
            return True
        if weighted:
            return differentiated  # any layout
        return not layout or differentiated
    if implementation == "autodiff":
        return not differentiated
    if implementation == "jax.jit":
        return differentiated  # inputs are traced there
    if implementation.endswith(".blocked"):
        float64_softmax = op == "softmax" and np.dtype(dtype) == np.float64
        autograd = differentiated and implementation == "torch.blocked"
        # Both form float32 terms of the exact x - m (numpy in float64, torch by TwoSum).
        log_softmax = op == "log_softmax" and np.dtype(dtype) == np.float64
        return weighted or masked or not layout or float64_softmax or log_softmax or autograd
    raise AssertionError(f"no rule for {implementation!r}: add one")


def _check_decision(seen, implementation, declines):
    (decision,) = seen.records
    if declines:
        assert decision.implementation == "generic", str(decision)
        assert dict(decision.declined).get(implementation), str(decision)
    else:
        assert decision.implementation == implementation, str(decision)


def _run(backend, implementation, op, x, declines=False, **kwargs):
    """Call ``op`` with ``implementation`` forced; check what the trace says."""
    with lse_dispatch.use(implementation), lse_dispatch.trace() as seen:
        result = getattr(lse_dispatch, op)(x, **kwargs)
    _check_decision(seen, implementation, declines)
    if isinstance(result, tuple):
        return tuple(map(_host, result))
    return _host(result)


def _run_differentiated(backend, implementation, op, x, declines=False, **kwargs):
    """Like :func:`_run`, but while a derivative with respect to ``x`` is taken.

    torch: ``x`` requires grad and the result is back-propagated; JAX: the
    call runs inside ``jax.jvp`` (its inputs are traced) and the primal
    output is returned.  Derivative values are test_autodiff's business; here
    they only have to be computed.
    """
    function = getattr(lse_dispatch, op)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        x = x.detach().clone().requires_grad_(True)
        with lse_dispatch.use(implementation), lse_dispatch.trace() as seen:
            result = function(x, **kwargs)
        _check_decision(seen, implementation, declines)
        value = result[0] if isinstance(result, tuple) else result
        finite = torch.where(torch.isfinite(value), value, torch.zeros_like(value))
        (grad,) = torch.autograd.grad(finite.sum(), x, allow_unused=True)
        assert grad is None or grad.shape == x.shape
    elif backend == "jax":
        jax = pytest.importorskip("jax")
        with lse_dispatch.use(implementation), lse_dispatch.trace() as seen:
            result, _ = jax.jvp(lambda v: function(v, **kwargs), (x,), (jax.numpy.ones_like(x),))
        _check_decision(seen, implementation, declines)
    else:
        raise AssertionError(f"{backend} has no derivatives")
    if isinstance(result, tuple):
        return tuple(map(_host, result))
    return _host(result)


def _differentiable(backend, implementation):
    """Whether the path is also checked while differentiated (autodiff kernels)."""
    return implementation == "autodiff" and backend in ("torch", "jax")


def _assert_ulps(got, exact, dtype, what):
    """At most ``ULPS`` ulps from the oracle, every element, every path."""
    errors = oracle.ulp_error(got, exact, dtype)
    worst = int(np.argmax(errors)) if errors.size else 0
    assert errors.size == 0 or errors.flat[worst] <= ULPS, (
        f"{what}: {errors.flat[worst]:.2f} ulps > {ULPS} at flat index {worst}"
    )


def _rng():
    return np.random.default_rng(20261122)


# Hard finite inputs: (name, array, axis)
JAX_SUBSET = ("dominant-rows", "ties", "large-negative-offset", "random-3d-middle", "spread")


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
        # A dominant max with inexact differences x - m near -30: the rest's
        # terms must not carry the rounding of x - m (log_softmax at the max
        # is -log1p(rest)).
        ("spread", rng.standard_normal((6, 10)) * 30, 1),
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
        # The middle-axis layout is outside the blocked kernels' reach.
        declines = _declines(implementation, op, dtype, layout=name != "random-3d-middle")
        got = _run(backend, implementation, op, x, declines=declines, axis=axis)
        exact = EXACT[op](values, axis=axis)
        what = f"{op} {name} ({backend}, {implementation})"
        _assert_ulps(got, exact, np.dtype(dtype), what)
        if _differentiable(backend, implementation):
            got = _run_differentiated(backend, implementation, op, x, axis=axis)
            _assert_ulps(got, exact, np.dtype(dtype), what + " differentiated")


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
    with mpmath.workprec(160):
        rows = [0, n // 3, n - 1]
        log_exact = np.array([[mpmath.mpf(float(values[i, 0])) - lse0, mpmath.mpf(1.5) - lse1] for i in rows],
                             dtype=object)
        exact = {
            "logsumexp": np.array([lse0, lse1], dtype=object),
            "log_softmax": log_exact,
            "softmax": np.vectorize(mpmath.exp, otypes=[object])(log_exact),
        }
    runners = [(_run, False)]
    if _differentiable(backend, implementation):
        runners.append((_run_differentiated, True))
    for runner, differentiated in runners:
        for op in OPS:
            declines = _declines(implementation, op, dtype, differentiated=differentiated)
            got = runner(backend, implementation, op, x, declines=declines, axis=0)
            got = got if op == "logsumexp" else got[rows]
            _assert_ulps(got, exact[op], np.dtype(dtype), f"{op} ({backend}, {implementation}, {runner.__name__})")




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
    runners = [(_run, False)]
    if _differentiable(backend, implementation):
        runners.append((_run_differentiated, True))
    for runner, differentiated in runners:
        for op in OPS:
            declines = _declines(implementation, op, dtype, differentiated=differentiated)
            got = runner(backend, implementation, op, x, declines=declines, axis=-1)
            np.testing.assert_array_equal(got, expected[op], err_msg=f"{op} {implementation} {runner.__name__}")


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
    total = np.sum(weights * np.exp(values), axis=1)
    runners = [(_run, False)]
    if _differentiable(backend, implementation):
        runners.append((_run_differentiated, True))
    for runner, differentiated in runners:
        def declines(op, weighted=False, differentiated=differentiated):
            return _declines(implementation, op, values.dtype, weighted=weighted, masked=not weighted,
                             differentiated=differentiated)

        what = f"({backend}, {implementation}, {runner.__name__})"
        value, sign = runner(backend, implementation, "logsumexp", x, declines=declines("logsumexp", weighted=True),
                             axis=1, b=b, return_sign=True)
        exact = oracle.exact_logsumexp(values, axis=1, b=weights)
        _assert_ulps(value, exact, values.dtype, "logsumexp with b " + what)
        np.testing.assert_array_equal(sign, np.sign(total))
        got = runner(backend, implementation, "logsumexp", x, declines=declines("logsumexp"), axis=1, where=where)
        _assert_ulps(got, oracle.exact_logsumexp(values, axis=1, where=mask), values.dtype,
                     "logsumexp with where " + what)
        got = runner(backend, implementation, "softmax", x, declines=declines("softmax"), axis=1, where=where)
        exact = oracle.exact_softmax(values, axis=1, where=mask)
        _assert_ulps(got, exact, values.dtype, "softmax with where " + what)
        assert np.all(got[~mask] == 0)
