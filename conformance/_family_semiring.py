"""semiring: logcumsumexp and logmatmulexp against the oracle and the contract's limits.

Implementations bring these as their functions ``logcumsumexp(x, axis,
reverse=False)`` and ``logmatmulexp(a, b)`` (``conformance/_impls.py``); the
built-in ones are:

* ``ours``: ``lse_dispatch.logcumsumexp`` / ``logmatmulexp``;
* ``torch``: ``torch.logcumsumexp`` and the "scaled exp then matmul" idiom
  (subtract the row max of ``a`` and the column max of ``b``, multiply the
  exponentials, take the log, add the maxima back; the form Pyro and others
  keep privately);
* ``jax``: ``jax.lax.cumlogsumexp``; JAX has no log-space matrix product;
* ``scipy``: NumPy's ``np.logaddexp.accumulate`` (NumPy arrays only) and the
  broadcast-sum idiom ``logsumexp(a[..., :, :, None] + b[..., None, :, :],
  axis=-2)`` with ``scipy.special.logsumexp``.

A custom implementation may bring its own (``--impl
logcumsumexp=mymod:f,logmatmulexp=mymod:g``, or a module that has them);
the checks of a function it does not have do not run.
Accuracy uses the suite's tolerance: the ulp budget, times ``max(1, kappa)``
for implementations other than ours, ``kappa`` the condition number of each
result entry (``kappa_i = sum_j w_ij |x_j| / |y_i|`` over the terms of that
entry).
"""

from __future__ import annotations

import math

import numpy as np

from lse_dispatch import oracle as _oracle

from ._checks import Check, Context, Outcome, compare_exact, register, summarize

__all__: list[str] = []

FAMILY = "semiring"
inf, nan = math.inf, math.nan


def _function(ctx: Context, op: str):
    # The runner runs a check only where the implementation has its ops.
    return ctx.impl.functions[op]


# -- inputs -------------------------------------------------------------------------


def _scan_inputs(name: str) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(sum(map(ord, name)))
    return {
        "dominant": (np.array([[0.0, -40.0, -41.0, -45.0, -38.0], [10.0, -30.0, -31.0, -20.0, -26.0]]), 1),
        "ties": (np.vstack([np.zeros(40), np.full(40, 3.0)]), 1),
        "offset": (1e4 + rng.standard_normal((2, 100)), 1),
        "neg-inf": (np.where(np.arange(60) % 5 == 0, -inf, 3 * rng.random((2, 60))), 1),
        "increasing": (np.linspace(0.5, 30.0, 200), 0),
        "long": (3 + rng.standard_normal(2**16), 0),
        # Equal terms after a larger one: a native cumulative sum rounds them all
        # one way (float64 [-1, 0] + [-37] * 300: 6.0 ulps in lse-dispatch's own
        # blocked scan before session 10).
        "equal-tail": (np.stack([np.r_[-10.0, 0.0, np.full(300, -20.0)], np.r_[-1.0, 0.0, np.full(300, -37.0)]]), 1),
        # A running max that rises at every entry: one rescaling per rise.
        "creep": (np.arange(3000) * 1e-4, 0),
    }[name]


def _product_inputs(name: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == "issue-example":
        return np.array([[0.0, -2000.0], [-2000.0, 0.0]]), np.array([[-2000.0, 0.0], [0.0, -2000.0]])
    if name == "dominant":
        a = np.full((3, 20), -30.0)
        a[:, 3] = 0.0
        b = np.full((20, 4), -30.0)
        b[3] = 0.0
        return a, b
    if name == "dominant-away":
        return np.array([[0.0, -60.0, -25.0]] * 2), np.array([[-60.0, -60.0], [0.0, 0.0], [-25.0, -24.0]])
    if name == "offset":
        return 1e4 + rng.standard_normal((4, 20)), 1e4 + rng.standard_normal((20, 3))
    if name == "wide":
        return 300 * rng.standard_normal((4, 20)), 300 * rng.standard_normal((20, 3))
    if name == "neg-inf":
        a = 3 * rng.random((4, 12))
        a[:, ::3] = -inf
        b = 3 * rng.random((12, 3))
        b[1::3] = -inf
        return a, b
    if name == "equal-tail":
        # Equal terms after a larger one, inside one matrix product of k = 32: a
        # library's product rounds them all one way (torch float64: 5.5 ulps).
        a = np.array([np.r_[0.0, -20.0, np.full(30, -25.0)], np.r_[-3.0, -3.5, np.full(30, -12.0)]])
        b = np.zeros((32, 3))
        b[7, 2] = -1.0
        return a, b
    raise KeyError(name)


def _condition(pairs: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """``sum_j w_j |s_j| / |y|`` per entry, ``pairs`` the terms along the last axis (finite or -inf)."""
    y = np.asarray(exact, dtype=object).astype(np.float64)
    with np.errstate(all="ignore"):
        finite = np.isfinite(pairs) & np.isfinite(y)[..., None]
        w = np.where(finite, np.exp(np.where(finite, pairs, 0.0) - np.where(np.isfinite(y), y, 0.0)[..., None]), 0.0)
        numerator = np.sum(w * np.abs(np.where(finite, pairs, 0.0)), axis=-1)
        kappa = np.where(numerator == 0, 0.0, numerator / np.abs(y))
    return np.where(np.isfinite(kappa), kappa, 1.0)


def _scan_condition(values: np.ndarray, axis: int, exact) -> np.ndarray:
    moved = np.moveaxis(values, axis, -1)
    n = moved.shape[-1]
    if n > 4096:  # every prefix of a long axis would cost n**2; its (positive) input is well-conditioned
        return np.ones(np.shape(exact))
    prefix = np.where(np.tril(np.ones((n, n), bool)), moved[..., None, :], -inf)
    kappa = _condition(prefix, np.moveaxis(np.asarray(exact, dtype=object), axis, -1))
    return np.moveaxis(kappa, -1, axis)


# -- checks -------------------------------------------------------------------------


def _scan_accuracy(name: str, reverse: bool, ctx: Context) -> Outcome:
    values, axis = _scan_inputs(name)
    values = np.asarray(values, dtype=np.float64)
    from lse_dispatch.cases import round_to

    values = round_to(values, ctx.dtype)
    fn = _function(ctx, "logcumsumexp")
    got = ctx.numpy(fn(ctx.array(values), axis=axis, reverse=reverse) if reverse else fn(ctx.array(values), axis=axis))
    exact = _oracle.exact_logcumsumexp(values, axis=axis, reverse=reverse)
    if reverse:
        kappa = np.flip(_scan_condition(np.flip(values, axis), axis, np.flip(exact, axis)), axis)
    else:
        kappa = _scan_condition(values, axis, exact)
    return compare_exact(ctx, got, exact, kappa, {"x": values}, {"axis": axis, "reverse": reverse})


SCAN_LIMITS = {
    "all-neg-inf": ([-inf, -inf, -inf], [-inf, -inf, -inf]),
    "neg-inf-then-finite": ([-inf, 0.0, -inf, 0.0], [-inf, 0.0, 0.0, math.log(2)]),
    "pos-inf-from-its-position": ([0.0, inf, 1.0, -inf], [0.0, inf, inf, inf]),
    "nan-from-its-position": ([0.0, nan, 2.0], [0.0, nan, nan]),
}


def _stated(got, want) -> bool:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape or not np.array_equal(np.isnan(got), np.isnan(want)):
        return False
    finite = np.isfinite(want)
    if not np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)]):
        return False
    return bool(np.allclose(got[finite], want[finite], rtol=1e-6, atol=0))


def _scan_limit(row: str, ctx: Context) -> Outcome:
    values, want = SCAN_LIMITS[row]
    got = ctx.numpy(_function(ctx, "logcumsumexp")(ctx.array(np.array(values)), axis=0))
    if _stated(got, want):
        return Outcome(True, "as stated")
    return Outcome(False, f"expected {want}, got {got.tolist()}", {"x": summarize(np.array(values)), "got": summarize(got)})


def _product_accuracy(name: str, ctx: Context) -> Outcome:
    from lse_dispatch.cases import round_to

    a, b = (round_to(v, ctx.dtype) for v in _product_inputs(name))
    got = ctx.numpy(_function(ctx, "logmatmulexp")(ctx.array(a), ctx.array(b)))
    exact = _oracle.exact_logmatmulexp(a, b)
    with np.errstate(invalid="ignore"):
        pairs = a[:, None, :] + np.swapaxes(b, 0, 1)[None, :, :]
    kappa = _condition(np.where(np.isnan(pairs), -inf, pairs), exact)
    return compare_exact(ctx, got, exact, kappa, {"a": a, "b": b}, {})


PRODUCT_LIMITS = {
    "no-finite-pair": ([[-inf, 0.0]], [[0.0], [-inf]], [[-inf]]),
    "pos-inf-pair": ([[inf, 0.0]], [[1.0], [0.0]], [[inf]]),
    "nan": ([[nan, 0.0]], [[0.0], [0.0]], [[nan]]),
    "neg-inf-plus-inf": ([[-inf, 0.0]], [[inf], [0.0]], [[nan]]),
}


def _product_limit(row: str, ctx: Context) -> Outcome:
    a, b, want = PRODUCT_LIMITS[row]
    got = ctx.numpy(_function(ctx, "logmatmulexp")(ctx.array(np.array(a)), ctx.array(np.array(b))))
    if _stated(got, want):
        return Outcome(True, "as stated")
    inputs = {"a": summarize(np.array(a)), "b": summarize(np.array(b))}
    return Outcome(False, f"expected {want}, got {np.asarray(got).tolist()}", inputs)


def _register() -> None:
    float_dtypes = ("float64", "float32", "float16", "bfloat16")
    for name in ("dominant", "ties", "offset", "neg-inf", "increasing", "long", "equal-tail", "creep"):
        for reverse in (False, True):
            suffix = "-reverse" if reverse else ""
            register(
                Check(
                    f"semiring/logcumsumexp/{name}{suffix}",
                    FAMILY,
                    lambda ctx, name=name, reverse=reverse: _scan_accuracy(name, reverse, ctx),
                    dtypes=float_dtypes,
                    slow=name == "long",
                    ops=("logcumsumexp",),
                    what=f"logcumsumexp, {name} input{', reversed' if reverse else ''}, against the oracle",
                )
            )
    for row in SCAN_LIMITS:
        register(Check(f"semiring/logcumsumexp/limit-{row}", FAMILY, lambda ctx, row=row: _scan_limit(row, ctx),
                       what=f"logcumsumexp limit: {row}", ops=("logcumsumexp",)))
    for name in ("issue-example", "dominant", "dominant-away", "offset", "wide", "neg-inf", "equal-tail"):
        register(
            Check(
                f"semiring/logmatmulexp/{name}",
                FAMILY,
                lambda ctx, name=name: _product_accuracy(name, ctx),
                dtypes=float_dtypes,
                what=f"logmatmulexp, {name} input, against the oracle",
                ops=("logmatmulexp",),
            )
        )
    for row in PRODUCT_LIMITS:
        register(Check(f"semiring/logmatmulexp/limit-{row}", FAMILY, lambda ctx, row=row: _product_limit(row, ctx),
                       what=f"logmatmulexp limit: {row}", ops=("logmatmulexp",)))


_register()
