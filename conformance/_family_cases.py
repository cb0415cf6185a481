"""accuracy, overflow and special-values: every row of ``lse_dispatch.cases``.

The catalogue is not repeated here: each :class:`~lse_dispatch.cases.Case`
becomes one check with the case's own id.  Stated rows are judged by
``cases.evaluate``; oracle rows by the conditioning-aware tolerance.
"""

from __future__ import annotations

from functools import lru_cache

from lse_dispatch import cases as _cases
from lse_dispatch import oracle as _oracle

from ._checks import Check, Context, Outcome, compare_exact, condition, register, summarize

__all__: list[str] = []

_BY_ID = {case.id: case for case in _cases.CASES}


@lru_cache(maxsize=None)
def _exact(case_id: str, dtype: str):
    """The oracle's values for a case in a dtype (cached: costly, and shared by
    every implementation and target)."""
    case = _BY_ID[case_id]
    inputs = _cases.inputs(case, dtype)
    axis = case.kwargs.get("axis")
    if case.op == "logsumexp":
        return _oracle.exact_logsumexp(inputs["a"], axis=axis, b=inputs.get("b"), where=inputs.get("where"))
    if case.op == "log_softmax":
        return _oracle.exact_log_softmax(inputs["a"], axis=axis, where=inputs.get("where"))
    return _oracle.exact_softmax(inputs["a"], axis=axis, where=inputs.get("where"))


def _run(case: _cases.Case, ctx: Context) -> Outcome:
    inputs = _cases.inputs(case, ctx.dtype)
    x = ctx.array(inputs["a"])
    b = ctx.array(inputs["b"]) if "b" in inputs else None
    where = ctx.mask(inputs["where"]) if "where" in inputs else None
    kwargs = dict(case.kwargs)
    if case.op == "logsumexp":
        kwargs.update(b=b, where=where)
    elif where is not None:
        kwargs.update(where=where)
    got = ctx.numpy(ctx.call(case.op, x, **kwargs))
    if case.expected is not None:
        verdict = _cases.evaluate(case, ctx.dtype, inputs, got)
        if verdict.passed:
            return Outcome(True, f"worst {verdict.worst_ulps:.3g} ulps")
        want = case.expected(inputs)
        example = {
            "inputs": {k: summarize(v) for k, v in inputs.items()},
            "kwargs": {k: repr(v) for k, v in case.kwargs.items()},
            "got": summarize(got),
            "expected": summarize(want),
        }
        return Outcome(False, f"{case.row}: {verdict.detail}", example)
    exact = _exact(case.id, ctx.dtype)
    kappa = condition(case.op, inputs["a"], case.kwargs.get("axis"), inputs.get("b"), inputs.get("where"), exact=exact)
    outcome = compare_exact(ctx, got, exact, kappa, inputs, case.kwargs)
    if not outcome.passed:
        outcome.detail = f"{case.row}: {outcome.detail}"
    return outcome


def _register() -> None:
    for case in _cases.CASES:
        slow = case.id.startswith("accuracy/long-")
        register(
            Check(
                case.id,
                case.family,
                lambda ctx, case=case: _run(case, ctx),
                dtypes=case.dtypes,
                slow=slow,
                what=case.row,
            )
        )


_register()
