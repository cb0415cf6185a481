"""laziness and differentiation: what happens under the libraries' transforms.

* laziness: the api family's oracle comparisons again, under ``jax.jit`` (JAX
  targets) and with a Dask scheduler that counts every compute (Dask targets):
  building the result must compute nothing.
* differentiation: torch autograd and JAX gradients against analytic values,
  including the +-inf, masked and ``b == 0`` cases.  Entries whose analytic
  gradient is exactly 0 must be exactly 0; the others are compared normwise:
  ``max|got - want| <= B * eps * scale`` (``B`` the float64 budget, ``scale``
  the largest term of the analytic formula: ``max|p|`` for logsumexp,
  ``max_j |v_j| + p_j |sum v|`` for the log_softmax vector-Jacobian product),
  times ``max(1, kappa)`` of softmax for non-strict implementations.
"""

from __future__ import annotations

import math

import numpy as np

from ._checks import Check, Context, Outcome, condition, register, summarize
from ._family_api import _against_oracle, _where_mask

__all__: list[str] = []

OPS = ("logsumexp", "softmax", "log_softmax")


# -- laziness ---------------------------------------------------------------------


class _JitContext(Context):
    """Calls the implementation through ``jax.jit``; arrays are traced arguments."""

    def call(self, op, x, **kwargs):
        import jax

        arrays = {k: v for k, v in kwargs.items() if k in ("b", "where") and v is not None}
        static = {k: v for k, v in kwargs.items() if k not in arrays}
        compiled = jax.jit(lambda x_, arrays_: self.impl(op, x_, **static, **arrays_))
        return compiled(x, arrays)


class _CountingDaskContext(Context):
    """Calls the implementation with a Dask scheduler that records each compute."""

    def call(self, op, x, **kwargs):
        import dask

        computes = self.notes.setdefault("computes", [])

        def counting_get(graph, keys, **options):
            computes.append(op)
            return dask.get(graph, keys, **options)

        with dask.config.set(scheduler=counting_get):
            return self.impl(op, x, **kwargs)


def _subcontext(cls, ctx: Context) -> Context:
    return cls(ctx.impl, ctx.target, ctx.dtype, ctx.reference, ctx.max_examples, {})


def _jit(ctx: Context, op: str, variant: str) -> Outcome:
    inner = _subcontext(_JitContext, ctx)
    if variant == "plain":
        return _against_oracle(inner, op, axis=-1, oracle_axis=2)
    if variant == "where":
        return _against_oracle(inner, op, axis=-1, oracle_axis=2, where=_where_mask())
    weights = np.random.default_rng(14).uniform(-2, 2, (3, 4, 5))
    weights[..., 0] = 8.0
    return _against_oracle(inner, op, axis=-1, oracle_axis=2, b=weights, return_sign=True)


def _dask(ctx: Context, op: str, variant: str) -> Outcome:
    inner = _subcontext(_CountingDaskContext, ctx)
    if variant == "plain":
        outcome = _against_oracle(inner, op, axis=-1, oracle_axis=2)
    else:
        outcome = _against_oracle(inner, op, axis=-1, oracle_axis=2, where=_where_mask())
    computes = inner.notes.get("computes", [])
    if computes:
        return Outcome(False, f"the call computed the Dask graph {len(computes)} time(s) before returning",
                       {"got": f"{len(computes)} compute(s)", "expected": "0 computes"})
    return outcome


def _register_laziness() -> None:
    for op in OPS:
        register(Check(f"laziness/jax-jit/{op}", "laziness", lambda ctx, op=op: _jit(ctx, op, "plain"),
                       backends=("jax",), what="correct under jax.jit"))
        register(Check(f"laziness/jax-jit-where/{op}", "laziness", lambda ctx, op=op: _jit(ctx, op, "where"),
                       backends=("jax",), what="correct under jax.jit with a traced where"))
        register(Check(f"laziness/dask-not-computed/{op}", "laziness", lambda ctx, op=op: _dask(ctx, op, "plain"),
                       backends=("dask",), what="Dask result built without computing"))
        register(Check(f"laziness/dask-not-computed-where/{op}", "laziness",
                       lambda ctx, op=op: _dask(ctx, op, "where"),
                       backends=("dask",), what="Dask result with where built without computing"))
    register(Check("laziness/jax-jit-b-sign/logsumexp", "laziness", lambda ctx: _jit(ctx, "logsumexp", "b-sign"),
                   backends=("jax",), what="b and return_sign under jax.jit"))


# -- differentiation -----------------------------------------------------------------


def _mp_weights(a, b=None, where=None):
    """Analytic ``d lse / d a_i`` (with mpmath), following the limit semantics:
    k included entries at +inf share 1/k, and nothing included gives 0."""
    import mpmath as mp

    n = len(a)
    b = [1.0] * n if b is None else list(b)
    where = [True] * n if where is None else list(where)
    included = [bool(where[i]) and b[i] != 0 for i in range(n)]
    infinite = [i for i in range(n) if included[i] and a[i] == math.inf]
    if infinite:
        return [mp.mpf(1) / len(infinite) if i in infinite else mp.mpf(0) for i in range(n)]
    with mp.workprec(200):
        terms = [mp.mpf(b[i]) * mp.exp(mp.mpf(a[i])) if included[i] and a[i] != -math.inf else mp.mpf(0)
                 for i in range(n)]
        total = mp.fsum(terms)
        if total == 0:
            return [mp.mpf(0)] * n
        return [t / total for t in terms]


def _expected(case: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """(analytic gradient, mask of entries that must be exactly 0, scale).

    ``scale`` is the largest magnitude of the terms the analytic formula adds
    (``|v_j| + p_j |sum v|`` for log_softmax): the normwise tolerance is
    relative to it, since the formula itself cancels."""
    import mpmath as mp

    a, b, where, v = case["a"], case.get("b"), case.get("where"), case.get("v")
    n = len(a)
    keep = [True] * n if where is None else list(where)
    p = _mp_weights(a, b, where)
    if case["op"] == "logsumexp" and case.get("wrt", "a") == "b":
        with mp.workprec(200):
            total = mp.fsum(mp.mpf(b[i]) * mp.exp(mp.mpf(a[i])) for i in range(n) if keep[i])
            grad = [mp.exp(mp.mpf(a[i])) / total if keep[i] else mp.mpf(0) for i in range(n)]
        zero = [not keep[i] for i in range(n)]
        scale = grad
    elif case["op"] == "logsumexp":
        grad = p
        zero = [p_i == 0 for p_i in p]
        scale = grad
    elif case["op"] == "softmax":
        dot = mp.fsum(p[i] * v[i] for i in range(n))
        grad = [p[i] * (v[i] - dot) for i in range(n)]
        zero = [p_i == 0 for p_i in p]
        scale = [p[i] * (abs(v[i]) + mp.fsum(p[k] * abs(v[k]) for k in range(n))) for i in range(n)]
    else:
        total_v = mp.fsum(v[i] for i in range(n) if keep[i])
        grad = [v[i] - p[i] * total_v if keep[i] else mp.mpf(0) for i in range(n)]
        zero = [not keep[i] for i in range(n)]
        scale = [abs(v[i]) + p[i] * abs(total_v) if keep[i] else mp.mpf(0) for i in range(n)]
    return (np.array([float(g) for g in grad]), np.array(zero),
            float(max((abs(s) for s in scale), default=0.0)))


_INF, _NAN = math.inf, math.nan

#: name -> case; ``a`` the input, ``v`` the cotangent for softmax/log_softmax.
_GRADIENT_CASES = {
    "finite/logsumexp": {"op": "logsumexp", "a": [0.5, -1.25, 3.0, 2.0, -7.5]},
    "large-equal/logsumexp": {"op": "logsumexp", "a": [1e4, 1e4 - 1]},
    "dominant/logsumexp": {"op": "logsumexp", "a": [0.0, -40.0]},
    "neg-inf-entry/logsumexp": {"op": "logsumexp", "a": [0.0, -_INF, 1.0]},
    "all-neg-inf/logsumexp": {"op": "logsumexp", "a": [-_INF, -_INF]},
    "pos-inf-one/logsumexp": {"op": "logsumexp", "a": [_INF, 0.0]},
    "pos-inf-two/logsumexp": {"op": "logsumexp", "a": [1.0, _INF, 0.0, _INF]},
    "where-masked/logsumexp": {"op": "logsumexp", "a": [0.0, _NAN, 1.0, _INF], "where": [True, False, True, False]},
    "all-masked/logsumexp": {"op": "logsumexp", "a": [0.0, 1.0], "where": [False, False]},
    "b-zero/logsumexp": {"op": "logsumexp", "a": [0.0, _INF, 1.0], "b": [1.0, 0.0, 2.0]},
    "all-b-zero/logsumexp": {"op": "logsumexp", "a": [0.0, 1.0], "b": [0.0, 0.0]},
    "wrt-b/logsumexp": {"op": "logsumexp", "a": [0.0, 1.0, 2.0], "b": [1.0, 0.0, 2.0], "wrt": "b"},
    "finite/softmax": {"op": "softmax", "a": [0.5, -1.25, 3.0, 2.0], "v": [1.0, -2.0, 0.5, 3.0]},
    "neg-inf-entry/softmax": {"op": "softmax", "a": [0.0, -_INF, 1.0], "v": [1.0, 2.0, 3.0]},
    "where-masked/softmax": {"op": "softmax", "a": [0.0, _NAN, 1.0], "where": [True, False, True], "v": [1.0, 2.0, 3.0]},
    "finite/log_softmax": {"op": "log_softmax", "a": [0.5, -1.25, 3.0, 2.0], "v": [1.0, -2.0, 0.5, 3.0]},
    "neg-inf-entry/log_softmax": {"op": "log_softmax", "a": [0.0, -_INF, 1.0], "v": [1.0, 2.0, 3.0]},
    "where-masked/log_softmax": {"op": "log_softmax", "a": [0.0, _NAN, 1.0], "where": [True, False, True],
                                 "v": [1.0, 2.0, 3.0]},
}


def _gradient(ctx: Context, case: dict) -> np.ndarray:
    """The implementation's gradient on this target (torch autograd or jax.grad/vjp)."""
    op, wrt = case["op"], case.get("wrt", "a")
    x = ctx.array(case["a"])
    b = ctx.array(case["b"]) if "b" in case else None
    where = ctx.mask(case["where"]) if "where" in case else None
    kwargs = {"axis": -1}
    if where is not None:
        kwargs["where"] = where
    if ctx.target.spec.name == "torch":
        import torch

        leaf = x if wrt == "a" else b
        leaf.requires_grad_(True)
        if b is not None:
            kwargs["b"] = b
        y = ctx.call(op, x, **kwargs)
        if not getattr(y, "requires_grad", False):
            raise AssertionError("the result does not require grad: the implementation is not differentiable")
        cotangent = None if op == "logsumexp" else torch.tensor(case["v"], dtype=y.dtype, device=y.device)
        (g,) = torch.autograd.grad(y, leaf, grad_outputs=cotangent)
        return ctx.numpy(g)
    import jax

    def f(x_, b_):
        extra = dict(kwargs)
        if b_ is not None:
            extra["b"] = b_
        return ctx.call(op, x_, **extra)

    if op == "logsumexp":
        g = jax.grad(f, argnums=0 if wrt == "a" else 1)(x, b)
    else:
        _, pullback = jax.vjp(lambda t: f(t, b), x)
        (g,) = pullback(ctx.array(case["v"]))
    return ctx.numpy(g)


def _gradient_condition(ctx: Context, case: dict) -> float:
    """1 for strict implementations, else ``max(1, kappa)`` of softmax (the
    gradient of logsumexp) at the included finite entries."""
    if ctx.strict:
        return 1.0
    a = np.asarray(case["a"], dtype=np.float64)
    keep = np.isfinite(a) & (np.ones(a.shape, bool) if "where" not in case else np.asarray(case["where"]))
    if "b" in case:
        keep &= np.asarray(case["b"]) != 0
    if not keep.any():
        return 1.0
    return float(max(1.0, np.max(condition("softmax", a[keep]))))


def _differentiation(ctx: Context, name: str) -> Outcome:
    case = _GRADIENT_CASES[name]
    want, zero, scale = _expected(case)
    got = _gradient(ctx, case)  # Unsupported (torch's b, where) propagates to the runner
    example = {"inputs": {k: summarize(np.asarray(v, dtype=float)) for k, v in case.items() if k in ("a", "b", "where", "v")},
               "kwargs": {"wrt": case.get("wrt", "a")}, "got": summarize(got), "expected": summarize(want)}
    if got.shape != want.shape:
        return Outcome(False, f"gradient of shape {got.shape}, expected {want.shape}", example)
    if not np.isfinite(got).all():
        return Outcome(False, f"non-finite gradient {got.tolist()}, expected {want.tolist()}", example)
    if (got[zero] != 0).any():
        return Outcome(False, f"entries that must be exactly 0 are {got[zero].tolist()} (gradient {got.tolist()}, "
                              f"expected {want.tolist()})", example)
    tol = ctx.budget * float(np.finfo(np.float64).eps) * scale * _gradient_condition(ctx, case)
    error = float(np.max(np.abs(got - want))) if want.size else 0.0
    if error > tol:
        return Outcome(False, f"gradient {got.tolist()} differs from {want.tolist()} by {error:.3g} (allowed {tol:.3g})",
                       example)
    return Outcome(True)


def _register_differentiation() -> None:
    for name in _GRADIENT_CASES:
        register(Check(f"differentiation/{name}", "differentiation",
                       lambda ctx, name=name: _differentiation(ctx, name),
                       dtypes=("float64",), backends=("torch", "jax"), what=name))


_register_laziness()
_register_differentiation()
