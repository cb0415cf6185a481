"""invariants: properties that hold for every input, searched with hypothesis.

Inputs are multiples of 1/8 in [-16, 16] and shifts are integers, so ``x + c``
is exact in float32 and float64 and every property below holds exactly in
real arithmetic; the tolerances only allow each result its own budget
(``_checks.tolerance``), twice where two results are compared.
"""

from __future__ import annotations

import math

import numpy as np

from lse_dispatch._validate import normalize_axis
from lse_dispatch.oracle import FORMATS, move_to_end, round_to, ulp

from ._checks import Check, Context, Outcome, condition, register, summarize
from ._impls import OPS, NotApplicable

__all__: list[str] = []

_DTYPES = ("float64", "float32")


class _Violation(AssertionError):
    pass


def _strategy():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    # A few fixed shapes: JAX compiles every operation once per shape, and a
    # new shape per example would spend the run compiling.
    shapes = st.sampled_from(_SHAPES)
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
_SHAPES = [(1,), (2,), (7,), (12,), (1, 5), (3, 4), (4, 1)]


def _draw(rng: np.random.Generator):
    """One example of the strategy's distribution, without hypothesis."""
    shape = _SHAPES[rng.integers(len(_SHAPES))]
    values = rng.integers(-128, 129, size=shape) / 8
    axis = [None, 0, -1][rng.integers(3)]
    return values, axis, float(rng.integers(-1000, 1001))


def _factor(ctx: Context, op, values, axis):
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


def _unit(values, dtype: str) -> np.ndarray:
    """The ulp at ``values`` rounded to ``dtype`` (NaN at non-finite values,
    so that no tolerance is granted around a limit)."""
    return ulp(round_to(values, dtype), dtype)


def _eps(dtype: str) -> float:
    return 2.0 ** (1 - FORMATS[dtype][0])


def _smallest_normal(dtype: str) -> float:
    return 2.0 ** FORMATS[dtype][1]


def _results(ctx: Context, op: str, values, axis) -> np.ndarray:
    """``op`` of finite ``values``: every exact result is finite, so any
    other result is a violation by itself."""
    result = ctx.numpy(ctx.call(op, ctx.array(values), axis=axis))
    if not np.isfinite(result).all():
        raise _Violation(f"{op} of finite input returned {summarize(result)} (input {summarize(values)}, axis {axis})")
    return result


def _reduced(values, axis) -> tuple[tuple[int, ...], int]:
    """The reduced axes and the number of entries per reduced slice."""
    axes = normalize_axis(axis, values.ndim)
    return axes, math.prod(values.shape[ax] for ax in axes)


def _shift(ctx: Context, op: str, values, axis, c) -> None:
    """f(x + c) = f(x) (+ c for logsumexp), each result within its budget."""
    r1, r2 = _results(ctx, op, values, axis), _results(ctx, op, values + c, axis)
    f1, f2 = _factor(ctx, op, values, axis), _factor(ctx, op, values + c, axis)
    if op == "logsumexp":
        diff, want = r2 - r1, c
        tol = ctx.budget * (f1 * _unit(r1, ctx.dtype) + f2 * _unit(r2, ctx.dtype))
    else:
        diff, want = r2, r1
        tol = ctx.budget * (f1 + f2) * _unit(np.maximum(np.abs(r1), np.abs(r2)), ctx.dtype)
    error = np.abs(diff - want)
    if not (error <= tol).all():
        raise _Violation(f"{op}(x + {c:g}) vs {op}(x){' + c' if op == 'logsumexp' else ''}: "
                         f"differ by {float(np.max(error)):.3g} (allowed {float(np.min(tol)):.3g}); "
                         f"f(x)={summarize(r1)}, f(x+c)={summarize(r2)}")


def _bounds(ctx: Context, op: str, values, axis, c) -> None:
    """max <= lse <= max + log n; 0 <= softmax <= 1; log_softmax <= 0."""
    r = _results(ctx, op, values, axis)
    if op == "logsumexp":
        axes, n = _reduced(values, axis)
        top = np.max(values, axis=axes)
        f = _factor(ctx, op, values, axis)
        slack = ctx.budget * f * _unit(np.abs(top) + math.log(n), ctx.dtype)
        if not ((r >= top - slack).all() and (r <= top + math.log(n) + slack).all()):
            raise _Violation(f"logsumexp {summarize(r)} outside [max, max + log n] = [{summarize(top)}, + log {n}]")
    elif op == "softmax":
        f = np.max(_factor(ctx, op, values, axis))
        if not ((r >= 0).all() and (r <= 1 + ctx.budget * f * _eps(ctx.dtype)).all()):
            raise _Violation(f"softmax {summarize(r)} outside [0, 1]")
    elif not (r <= 0).all():
        raise _Violation(f"log_softmax {summarize(r)} has positive entries")


def _normalisation(ctx: Context, op: str, values, axis, c) -> None:
    """softmax sums to 1: |sum s_j - 1| <= sum |err_j| <= B f eps sum s_j
    (+ one smallest normal per entry, the unit below the normal range)."""
    r = _results(ctx, "softmax", values, axis)
    axes, n = _reduced(values, axis)
    flat = move_to_end(r, axes)
    f = np.max(_factor(ctx, "softmax", values, axis))
    tol = ctx.budget * f * _eps(ctx.dtype) + n * _smallest_normal(ctx.dtype)
    for index in np.ndindex(flat.shape[:-1]):
        total = math.fsum(flat[index].tolist())
        if not abs(total - 1.0) <= tol:
            raise _Violation(f"softmax sums to {total!r} (|error| {abs(total - 1):.3g} > {tol:.3g}): "
                             f"{summarize(flat[index])}")


def _exp_log(ctx: Context, op: str, values, axis, c) -> None:
    """exp(log_softmax) = softmax: ls within B f ulps moves exp(ls) by B f eps
    |ls| relatively; s is within B f eps; plus one rounding of exp(ls)."""
    ls = _results(ctx, "log_softmax", values, axis)
    s = _results(ctx, "softmax", values, axis)
    f_ls, f_s = _factor(ctx, "log_softmax", values, axis), _factor(ctx, "softmax", values, axis)
    e = round_to(np.exp(ls), ctx.dtype)
    with np.errstate(all="ignore"):
        tol = ctx.budget * _eps(ctx.dtype) * (f_ls * np.abs(ls) + f_s) * s + _unit(s, ctx.dtype)
    tol = np.where(np.isnan(tol), 0.0, tol)  # ls = -inf with s = 0: only e == s passes
    if not (np.abs(e - s) <= tol).all():
        excess = np.where(np.isnan(e - s), np.inf, np.abs(e - s) - tol).reshape(-1)
        worst = int(np.argmax(excess))
        raise _Violation(f"exp(log_softmax) = {float(e.reshape(-1)[worst])!r} (log_softmax "
                         f"{float(ls.reshape(-1)[worst])!r}) but softmax = {float(s.reshape(-1)[worst])!r}, "
                         f"allowed difference {float(tol.reshape(-1)[worst]):.3g}")


def _agreement(ctx: Context, op: str, values, axis, c) -> None:
    """The same implementation on the reference target agrees within twice the budget."""
    if ctx.reference is None:
        raise NotApplicable("no second target of this implementation to agree with")
    here = _results(ctx, op, values, axis)
    there_raw = ctx.impl(op, ctx.reference.asarray(round_to(values, ctx.dtype), ctx.dtype), axis=axis)
    there = np.asarray(ctx.reference.to_numpy(there_raw)).astype(np.float64)
    f = _factor(ctx, op, values, axis)
    tol = 2 * ctx.budget * f * _unit(np.maximum(np.abs(here), np.abs(there)), ctx.dtype)
    if here.shape != there.shape or not (np.abs(here - there) <= tol).all():
        raise _Violation(f"{ctx.target.label} gave {summarize(here)}, {ctx.reference.label} gave {summarize(there)}")


PROPERTIES = {"shift": _shift, "bounds": _bounds, "normalisation": _normalisation,
              "exp-log-softmax": _exp_log, "agreement": _agreement}


def _search(attempt, max_examples: int) -> str:
    """Feed ``attempt`` examples until one raises :class:`_Violation`: with
    hypothesis (derandomized, shrinking) where it is installed, else with
    ``max_examples`` seeded random draws of the same distribution."""
    try:
        from hypothesis import HealthCheck, given, settings
    except ImportError:
        rng = np.random.default_rng(20240901)
        for _ in range(max_examples):
            attempt(_draw(rng))
        return f"{max_examples} seeded random examples (hypothesis is not installed: no shrinking)"

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(_strategy())
    def search(example):
        attempt(example)

    search()
    return f"{max_examples} examples"


def _run(ctx: Context, name: str, op: str) -> Outcome:
    prop = PROPERTIES[name]
    failing: list = []

    def attempt(example):
        values, axis, c = example
        try:
            prop(ctx, op, values, axis, c)
        except _Violation as exc:
            failing.append((example, str(exc)))
            raise

    # One fixed example first: it surfaces Unsupported before the search starts.
    searched = "1 example"
    try:
        attempt(_FIXED)
        searched = _search(attempt, ctx.max_examples)
    except _Violation:
        pass
    if not failing:
        return Outcome(True, searched)
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
                   dtypes=_DTYPES, what="exp(log_softmax) = softmax", ops=("softmax", "log_softmax")))


_register()
