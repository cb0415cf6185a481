"""invariants: properties that hold for every input, searched with hypothesis.

Inputs are multiples of 1/8 in [-16, 16] and shifts are integers, so ``x + c``
is exact in float32 and float64 and every property below holds exactly in
real arithmetic; the tolerances only allow each result its own budget
(``_checks.tolerance``), twice where two results are compared.
"""

from __future__ import annotations

import math

import numpy as np

from ._checks import Check, Context, Outcome, condition, finfo, register, spacing, summarize
from ._impls import NotApplicable

__all__: list[str] = []

OPS = ("logsumexp", "softmax", "log_softmax")
_DTYPES = ("float64", "float32")


class _Violation(AssertionError):
    pass


def _strategy():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    # A few fixed shapes: JAX compiles every operation once per shape, and a
    # new shape per example would spend the run compiling.
    shapes = st.sampled_from([(1,), (2,), (7,), (12,), (1, 5), (3, 4), (4, 1)])
    eighths = st.integers(-128, 128).map(lambda k: k / 8)

    @st.composite
    def draw(draw_):
        shape = draw_(shapes)
        values = draw_(hnp.arrays(np.float64, shape, elements=eighths))
        axis = draw_(st.sampled_from([None, 0, -1]))
        shift = float(draw_(st.integers(-1000, 1000)))
        return values, axis, shift

    return draw()


_FIXED = (np.array([[0.0, -3.5, 2.25], [1.0, 1.0, -16.0]]), -1, 731.0)


def _factor(ctx: Context, op, values, axis, result=None):
    """Per-element ``max(1, kappa)`` (1 for strict implementations).

    The denominators of kappa come from the oracle, never from the result
    under test (a result of 0 where the exact value is 1e-13 would make
    kappa infinite)."""
    if ctx.strict:
        return 1.0
    from lse_dispatch import oracle

    exact = None
    if op == "logsumexp":
        exact = oracle.exact_logsumexp(values, axis=axis)
    elif op == "log_softmax":
        exact = oracle.exact_log_softmax(values, axis=axis)
    kappa = condition(op, values, axis, exact=exact)
    return np.maximum(1.0, kappa)


def _property(ctx: Context, name: str, op: str):
    """``check(values, axis, shift)`` raising :class:`_Violation` with a message."""
    budget = ctx.budget
    eps = float(finfo(ctx.dtype).eps)

    def run(op_, values, axis):
        return ctx.numpy(ctx.call(op_, ctx.array(values), axis=axis))

    def shift(values, axis, c):
        r1, r2 = run(op, values, axis), run(op, values + c, axis)
        f1 = _factor(ctx, op, values, axis, r1)
        f2 = _factor(ctx, op, values + c, axis, r2)
        if op == "logsumexp":
            diff, want = r2 - r1, c
            tol = budget * (f1 * spacing(r1, ctx.dtype) + f2 * spacing(r2, ctx.dtype))
        elif op == "log_softmax":
            diff, want = r2, r1
            tol = budget * (f1 + f2) * spacing(np.maximum(np.abs(r1), np.abs(r2)), ctx.dtype)
        else:
            diff, want = r2, r1
            tol = budget * (f1 + f2) * spacing(np.maximum(np.abs(r1), np.abs(r2)), ctx.dtype)
        error = np.abs(diff - want)
        if not (error <= tol).all():
            raise _Violation(f"{op}(x + {c:g}) vs {op}(x){' + c' if op == 'logsumexp' else ''}: "
                             f"differ by {float(np.max(error)):.3g} (allowed {float(np.min(tol)):.3g}); "
                             f"f(x)={summarize(r1)}, f(x+c)={summarize(r2)}")

    def bounds(values, axis, c):
        r = run(op, values, axis)
        if op == "logsumexp":
            axes = tuple(range(values.ndim)) if axis is None else (axis % values.ndim,)
            top = np.max(values, axis=axes)
            n = math.prod(values.shape[ax] for ax in axes)
            f = _factor(ctx, op, values, axis, r)
            slack = budget * f * spacing(np.abs(top) + math.log(n), ctx.dtype)
            if not ((r >= top - slack).all() and (r <= top + math.log(n) + slack).all()):
                raise _Violation(f"logsumexp {summarize(r)} outside [max, max + log n] = "
                                 f"[{summarize(top)}, + log {n}]")
        elif op == "softmax":
            f = np.max(_factor(ctx, op, values, axis, r))
            if not ((r >= 0).all() and (r <= 1 + budget * f * eps).all()):
                raise _Violation(f"softmax {summarize(r)} outside [0, 1]")
        elif not (r <= 0).all():
            raise _Violation(f"log_softmax {summarize(r)} has positive entries")

    def normalisation(values, axis, c):
        r = run("softmax", values, axis)
        axes = tuple(range(values.ndim)) if axis is None else (axis % values.ndim,)
        moved = np.moveaxis(r, axes, tuple(range(-len(axes), 0)))
        flat = moved.reshape(moved.shape[: values.ndim - len(axes)] + (-1,))
        f = np.max(_factor(ctx, "softmax", values, axis, r))
        # |sum s_j - 1| <= sum |err_j| <= B f eps sum s_j (+ subnormal spacing per entry)
        tol = budget * f * eps + flat.shape[-1] * float(finfo(ctx.dtype).smallest_normal)
        for index in np.ndindex(flat.shape[:-1]):
            total = math.fsum(flat[index].tolist())
            if abs(total - 1.0) > tol:
                raise _Violation(f"softmax sums to {total!r} (|error| {abs(total - 1):.3g} > {tol:.3g}): {summarize(flat[index])}")

    def exp_log(values, axis, c):
        ls = run("log_softmax", values, axis)
        s = run("softmax", values, axis)
        f_ls = _factor(ctx, "log_softmax", values, axis, ls)
        f_s = _factor(ctx, "softmax", values, axis, s)
        from lse_dispatch.cases import round_to

        e = round_to(np.exp(ls), ctx.dtype)
        # ls within B f ulps -> exp(ls) within B f eps |ls| relatively; s within B f eps;
        # plus one rounding of exp(ls) to the dtype.
        with np.errstate(all="ignore"):
            tol = budget * eps * (f_ls * np.abs(ls) + f_s) * s + spacing(s, ctx.dtype)
        tol = np.where(np.isnan(tol), 0.0, tol)  # ls = -inf with s = 0: only e == s passes
        if not (np.abs(e - s) <= tol).all():
            excess = np.where(np.isnan(e - s), np.inf, np.abs(e - s) - tol).reshape(-1)
            worst = int(np.argmax(excess))
            raise _Violation(f"exp(log_softmax) = {float(e.reshape(-1)[worst])!r} (log_softmax "
                             f"{float(ls.reshape(-1)[worst])!r}) but softmax = {float(s.reshape(-1)[worst])!r}, "
                             f"allowed difference {float(tol.reshape(-1)[worst]):.3g}")

    def agreement(values, axis, c):
        if ctx.reference is None:
            raise NotApplicable("no second target of this implementation to agree with")
        here = run(op, values, axis)
        there_raw = ctx.impl(op, ctx.reference.array(values, ctx.dtype), axis=axis)
        there = ctx.reference.to_numpy(there_raw)
        f = _factor(ctx, op, values, axis, here)
        tol = 2 * budget * f * spacing(np.maximum(np.abs(here), np.abs(there)), ctx.dtype)
        if here.shape != there.shape or not (np.abs(here - there) <= tol).all():
            raise _Violation(f"{ctx.target.label} gave {summarize(here)}, {ctx.reference.label} gave {summarize(there)}")

    return {"shift": shift, "bounds": bounds, "normalisation": normalisation,
            "exp-log-softmax": exp_log, "agreement": agreement}[name]


def _run(ctx: Context, name: str, op: str) -> Outcome:
    from hypothesis import HealthCheck, given, settings

    prop = _property(ctx, name, op)
    failing: list = []

    def attempt(example):
        values, axis, c = example
        try:
            prop(values, axis, c)
        except _Violation as exc:
            failing.append((example, str(exc)))
            raise

    # One fixed example first: it surfaces Unsupported before hypothesis starts.
    try:
        attempt(_FIXED)
    except _Violation:
        pass
    else:
        @settings(max_examples=ctx.max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @given(_strategy())
        def search(example):
            attempt(example)

        try:
            search()
        except _Violation:
            pass
    if not failing:
        return Outcome(True, f"{ctx.max_examples} examples")
    (values, axis, c), message = failing[-1]  # hypothesis replays the shrunk example last
    return Outcome(False, message, {"inputs": {"x": summarize(values)}, "kwargs": {"axis": repr(axis), "shift": c},
                                    "got": message, "expected": name})


def _register() -> None:
    for op in OPS:
        register(Check(f"invariants/shift/{op}", "invariants", lambda ctx, op=op: _run(ctx, "shift", op),
                       dtypes=_DTYPES, what="f(x + c) = f(x) (+ c for logsumexp)"))
        register(Check(f"invariants/bounds/{op}", "invariants", lambda ctx, op=op: _run(ctx, "bounds", op),
                       dtypes=_DTYPES, what="max <= lse <= max + log n; 0 <= softmax <= 1; log_softmax <= 0"))
        register(Check(f"invariants/agreement/{op}", "invariants", lambda ctx, op=op: _run(ctx, "agreement", op),
                       dtypes=_DTYPES, what="agrees with the reference target within twice the budget"))
    register(Check("invariants/normalisation/softmax", "invariants", lambda ctx: _run(ctx, "normalisation", "softmax"),
                   dtypes=_DTYPES, what="softmax sums to 1"))
    register(Check("invariants/exp-log-softmax/log_softmax", "invariants",
                   lambda ctx: _run(ctx, "exp-log-softmax", "log_softmax"),
                   dtypes=_DTYPES, what="exp(log_softmax) = softmax"))


_register()
