"""The fused CuPy kernels against the generic path and the oracle (GPU only)."""

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
except Exception:  # CUDA driver missing
    pytest.skip("no CUDA device", allow_module_level=True)

import lse_dispatch  # noqa: E402
from lse_dispatch import _dispatch, oracle  # noqa: E402
from lse_dispatch._call import prepare  # noqa: E402

FUNCTIONS = {"logsumexp": lse_dispatch.logsumexp, "softmax": lse_dispatch.softmax, "log_softmax": lse_dispatch.log_softmax}


def _kernel_name(op, x, axis):
    call = prepare(op, x, axis=axis)
    spec = _dispatch.backend_for(x)
    for kernel in spec.kernels:
        if kernel.op == op and kernel.declines(call) is None:
            return kernel.name
    return "generic"


@pytest.mark.parametrize("op", sorted(FUNCTIONS))
@pytest.mark.parametrize(
    "values",
    [
        np.array([0.0, -40.0]),
        np.array([3.0, 3.0, 3.0, 1.0, -2.0]),
        1e4 + np.random.default_rng(0).normal(size=5000),
        np.random.default_rng(1).normal(size=(7, 3001)) * 5,
        np.random.default_rng(2).normal(size=2**20),
        # Longer than the one-pass softmax (4096), shorter than a logsumexp warp row (8192).
        np.random.default_rng(3).normal(size=(3, 5000)) * 5,
        np.concatenate([[0.0], -30.0 + np.random.default_rng(4).uniform(-1, 1, 20_000)]),
    ],
    ids=["dominant", "ties", "offset", "rows", "long", "mid-rows", "dominant-long"],
)
def test_fused_matches_oracle(op, values):
    values = values.astype(np.float32).astype(np.float64)
    x = cupy.asarray(values, dtype=cupy.float32)
    assert _kernel_name(op, x, -1) == "cupy-fused"
    got = FUNCTIONS[op](x, axis=-1)
    assert isinstance(got, cupy.ndarray) and got.dtype == cupy.float32
    if op == "logsumexp":
        exact = oracle.exact_logsumexp(values, axis=-1)
    elif values.size > 100_000:
        pytest.skip("the oracle's softmax is per entry; too slow for 2**20")
    else:
        exact = (oracle.exact_softmax if op == "softmax" else oracle.exact_log_softmax)(values, axis=-1)
    assert oracle.ulp_error(cupy.asnumpy(got), exact, np.float32).max() <= 4


@pytest.mark.parametrize("op", sorted(FUNCTIONS))
def test_fused_limits_match_generic(op):
    inf, nan = np.inf, np.nan
    rows = np.array(
        [
            [1.0, inf, 0.0, inf],
            [-inf, -inf, -inf, -inf],
            [1.0, nan, 0.0, 2.0],
            [0.0, -40.0, -1.0, -2.0],
            [-inf, 3.0, -inf, 3.0],  # -inf entries in a finite row get exactly 0 / -inf
        ],
        dtype=np.float32,
    )
    fused = FUNCTIONS[op](cupy.asarray(rows), axis=-1)
    generic = FUNCTIONS[op](rows, axis=-1)
    # Same non-finite pattern; finite entries within the contract's 4 ulps.
    np.testing.assert_allclose(cupy.asnumpy(fused), generic, rtol=4 * np.finfo(np.float32).eps, atol=0)


@pytest.mark.parametrize("shape", [(3, 100), (2, 20_000), (1, 2**20)], ids=["short", "long", "flat"])
def test_partial_states_merge_to_the_generic_state(shape):
    """The kernel's per-block states, merged by _state.merge, give the generic state.

    Holds the CUDA update and merge steps to lse_dispatch._state: max and
    count exactly, rest to float64 rounding (summation order differs).
    (Not merge_along: it forms exp(max - overall) from the rounded float32
    difference.)
    """
    import functools

    import array_api_compat.cupy as xp

    from lse_dispatch import _generic
    from lse_dispatch._state import LSEState, merge
    from lse_dispatch.backends._cupy_fused import lse_state_rows

    values = np.random.default_rng(8).normal(size=shape).astype(np.float32) * 6
    values[0, 5] = values[0].max()  # a tie at the max
    x = cupy.asarray(values)
    parts = lse_state_rows(x)
    columns = [LSEState(*(p[:, j : j + 1] for p in parts)) for j in range(parts[0].shape[1])]
    merged = functools.reduce(lambda s, t: merge(xp, s, t), columns)
    want = _generic.logsumexp_state(prepare("logsumexp", x, axis=-1))
    np.testing.assert_array_equal(cupy.asnumpy(merged.max), cupy.asnumpy(want.max))
    np.testing.assert_array_equal(cupy.asnumpy(merged.count), cupy.asnumpy(want.count))
    np.testing.assert_allclose(cupy.asnumpy(merged.rest), cupy.asnumpy(want.rest), rtol=1e-13)
