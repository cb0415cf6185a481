"""accuracy, overflow and special-values: every row of ``lse_dispatch.cases``.

The catalogue is not repeated here: each :class:`~lse_dispatch.cases.Case`
becomes one check with the case's own id, run by ``cases.run_case`` (the
runner ``lse-dispatch report`` and the test suite use).  Stated rows are
judged as there; oracle rows with the conditioning-aware tolerance
(``_checks.tolerance``) for implementations other than ours.  Namespace,
device and dtype are the metadata family's, not judged again here.
"""

from __future__ import annotations

from lse_dispatch import cases as _cases

from ._checks import Check, Context, Outcome, condition, register, summarize, tolerance

__all__: list[str] = []


def _run(case: _cases.Case, ctx: Context) -> Outcome:
    inputs = _cases.inputs(case, ctx.dtype)

    def allowed(exact):
        kappa = condition(case.op, inputs["a"], case.kwargs.get("axis"), inputs.get("b"), inputs.get("where"),
                          exact=exact)
        return tolerance(ctx, kappa)

    verdict = _cases.run_case(case, ctx.dtype, ctx.target, ctx.call, tolerance=allowed, check_metadata=False)
    if verdict.passed:
        return Outcome(True, verdict.detail)
    example = {
        "inputs": {k: summarize(v) for k, v in inputs.items()},
        "kwargs": {k: repr(v) for k, v in case.kwargs.items()},
        "got": summarize(verdict.got),
        "expected": summarize(verdict.expected),
    }
    return Outcome(False, f"{case.row}: {verdict.detail}", example)


def _register() -> None:
    for case in _cases.CASES:
        register(
            Check(
                case.id,
                case.family,
                lambda ctx, case=case: _run(case, ctx),
                dtypes=case.dtypes,
                slow=case.id.startswith("accuracy/long-"),
                what=case.row,
                ops=(case.op,),
            )
        )


_register()
