"""Lazy-safety: jax.jit, Dask graphs that stay unevaluated, non-default devices."""

from __future__ import annotations

import numpy as np
import pytest

from lse_dispatch import log_softmax, logsumexp, oracle, softmax
from lse_dispatch.cases import ULP_BUDGET, round_to

from ._helpers import FUNCTIONS

INPUTS = {
    "dominant": np.array([[0.0, -40.0, -41.0], [3.0, 3.0, 3.0]]),
    "offset": 1e4 + np.random.default_rng(11).normal(size=(2, 64)),
    "special": np.array([[np.inf, 1.0, np.inf], [-np.inf, -np.inf, -np.inf]]),
}


# Stated values for INPUTS["special"] with where = [True, False, True]
# (the oracle takes finite-or-masked inputs only).
_LOG2 = float(np.log(2.0))
SPECIAL = {
    "logsumexp": np.array([np.inf, -np.inf]),
    "softmax": np.array([[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]),
    "log_softmax": np.array([[-_LOG2, -np.inf, -_LOG2], [-np.inf] * 3]),
}


def _exact(op, a, where=None):
    return {
        "logsumexp": lambda: oracle.exact_logsumexp(a, axis=1, where=where),
        "softmax": lambda: oracle.exact_softmax(a, axis=1, where=where),
        "log_softmax": lambda: oracle.exact_log_softmax(a, axis=1, where=where),
    }[op]()


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "x64"])
@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("op", list(FUNCTIONS))
def test_jit_matches_eager_and_the_oracle(op, name, x64):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    with jax.enable_x64(x64):
        dtype = "float64" if x64 else "float32"
        a = round_to(INPUTS[name], dtype)
        where = np.array([True, False, True])[None, :] if name != "offset" else None
        x = jnp.asarray(a, dtype=dtype)
        kw = {} if where is None else {"where": jnp.asarray(where)}
        eager = np.asarray(FUNCTIONS[op](x, axis=1, **kw))
        jitted = np.asarray(jax.jit(lambda v, kw: FUNCTIONS[op](v, axis=1, **kw))(x, kw))
        if name == "special":
            for label, got in (("eager", eager), ("jit", jitted)):
                np.testing.assert_allclose(got, SPECIAL[op], rtol=np.finfo(dtype).eps, err_msg=label)
            return
        exact = _exact(op, a, where)
        for label, got in (("eager", eager), ("jit", jitted)):
            worst = float(np.max(oracle.ulp_error(got, exact, np.dtype(dtype))))
            assert worst <= ULP_BUDGET[dtype], f"{label}: {worst:.3g} ulps"
        np.testing.assert_array_equal(np.isnan(eager), np.isnan(jitted))


def test_jit_with_traced_weights_and_return_sign():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    a = np.array([[0.0, 1.0, -2.0], [5.0, 5.0, 0.0]], dtype=np.float32)
    b = np.array([[1.0, -1.0, 0.5], [1.0, -1.0, 0.0]], dtype=np.float32)
    run = jax.jit(lambda a, b: logsumexp(a, axis=1, b=b, return_sign=True))
    value, sign = (np.asarray(v) for v in run(jnp.asarray(a), jnp.asarray(b)))
    worst = float(np.max(oracle.ulp_error(value, oracle.exact_logsumexp(a, axis=1, b=b), np.float32)))
    assert worst <= ULP_BUDGET["float32"]
    np.testing.assert_array_equal(sign, [-1.0, 0.0])
    assert value[1] == -np.inf


class _CountingScheduler:
    def __init__(self):
        self.calls = 0

    def __call__(self, dsk, keys, **kwargs):
        import dask

        self.calls += 1
        return dask.get(dsk, keys, **kwargs)


@pytest.mark.parametrize("op", list(FUNCTIONS))
@pytest.mark.parametrize("chunks", [(2, 7), (1, 64), (2, 64)], ids=["many-chunks", "one-row-chunks", "one-chunk"])
def test_dask_stays_lazy_until_computed(op, chunks):
    da = pytest.importorskip("dask.array")
    import dask

    from .conftest import _refuse_to_compute

    a = round_to(INPUTS["offset"], "float64")
    a[0, 3] = -np.inf
    where = np.ones(a.shape, bool)
    where[1, ::3] = False
    x = da.from_array(a, chunks=chunks)
    w = da.from_array(where, chunks=chunks)
    with dask.config.set(scheduler=_refuse_to_compute):
        out = FUNCTIONS[op](x, axis=1, where=w)
    assert isinstance(out, da.Array)
    counting = _CountingScheduler()
    with dask.config.set(scheduler=counting):
        got = np.asarray(out.compute())
    assert counting.calls == 1
    worst = float(np.max(oracle.ulp_error(got, _exact(op, a, where), np.float64)))
    assert worst <= ULP_BUDGET["float64"], worst


def test_dask_return_sign_is_lazy():
    da = pytest.importorskip("dask.array")
    import dask

    from .conftest import _refuse_to_compute

    a = da.from_array(np.array([[0.0, 1.0, 2.0, 3.0]] * 3), chunks=(1, 2))
    b = da.from_array(np.array([1.0, -1.0, 1.0, -1.0]), chunks=2)
    with dask.config.set(scheduler=_refuse_to_compute):
        value, sign = logsumexp(a, axis=1, b=b, return_sign=True)
    value, sign = dask.compute(value, sign, scheduler="sync")
    np.testing.assert_array_equal(sign, [-1.0] * 3)
    exact = oracle.exact_logsumexp(np.array([[0.0, 1.0, 2.0, 3.0]] * 3), axis=1, b=np.array([1.0, -1.0, 1.0, -1.0]))
    assert float(np.max(oracle.ulp_error(value, exact, np.float64))) <= 4


@pytest.mark.parametrize("op", list(FUNCTIONS))
def test_array_api_strict_keeps_a_non_default_device(op):
    xp = pytest.importorskip("array_api_strict")
    device = xp.Device("device1")
    assert device != xp.__array_namespace_info__().default_device()
    x = xp.asarray([[0.0, -40.0, 2.0], [1.0, 1.0, 1.0]], device=device)
    where = xp.asarray([True, True, False], device=device)
    out = FUNCTIONS[op](x, axis=1, where=where)
    assert out.device == device
    if op == "logsumexp":
        value, sign = logsumexp(x, axis=-1, b=xp.asarray([1.0, -1.0, 2.0], device=device), return_sign=True)
        assert value.device == device and sign.device == device
    assert softmax(x).device == log_softmax(x, axis=0).device == device
