"""The built-in catalogue (``lse_dispatch.cases``) on every backend.

Accuracy and overflow rows are checked against the mpmath oracle within the
ulp budget (4 ulps in float32/float64, 1 in float16/bfloat16); stated rows
of the contract table against their stated values.  The same catalogue is
what ``lse-dispatch report`` runs.
"""

from __future__ import annotations

import pytest

from lse_dispatch import cases

# The 2**20-entry cases cost most in the oracle and in Dask's graph; they run
# on one variant per library (both JAX precisions) rather than on all of them.
LONG_BACKENDS = {"numpy", "array_api_strict", "torch", "torch:cuda", "jax", "jax:x64", "jax:gpu", "dask", "cupy"}


def _params():
    for case in cases.CASES:
        for dtype in case.dtypes:
            marks = [pytest.mark.long] if case.id.startswith("accuracy/long-") else []
            yield pytest.param(case, dtype, id=f"{case.id}[{dtype}]", marks=marks)


@pytest.mark.parametrize(("case", "dtype"), list(_params()))
def test_catalogue_case(backend, case, dtype):
    reason = cases.applies(case, dtype, backend)
    if reason is not None:
        pytest.skip(reason)
    if backend.id in ("jax", "jax:x64") and dtype in ("float16", "bfloat16"):
        # Eager JAX compiles each primitive per shape; jax:x64:jit runs these.
        pytest.skip("float16/bfloat16 catalogue on JAX runs under jit (jax:x64:jit)")
    if case.id.startswith("accuracy/long-") and backend.id not in LONG_BACKENDS:
        pytest.skip("2**20-entry cases run on one variant per library")
    verdict = cases.run_case(case, dtype, backend)
    assert verdict.passed, f"{case.id} on {backend.id} in {dtype}: {verdict.detail} ({case.row})"


def test_catalogue_covers_the_contract():
    """The catalogue holds every family the contract and report rely on."""
    ids = {case.id for case in cases.CASES}
    for name in ("dominant-element", "ties-at-max", "large-offset", "long-contiguous", "long-strided-axis-0"):
        assert any(f"accuracy/{name}/" in i for i in ids), name
    for name in ("empty", "nan", "pos-inf", "all-neg-inf", "all-masked", "b-zero-excludes", "negative-sum-sign"):
        assert any(f"special-values/{name}/" in i for i in ids), name
