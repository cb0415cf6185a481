"""User control of the dispatcher: backend= > use() > environment > auto.

Also what the trace and the debug log say, and that the choice is local to a
thread and to an asyncio task.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import _dispatch

from ._helpers import in_threads

X = np.linspace(-3.0, 2.0, 64)


def _ran(**kwargs):
    with lse_dispatch.trace() as seen:
        lse_dispatch.logsumexp(X, **kwargs)
    (decision,) = seen.records
    return decision


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)


@pytest.fixture(autouse=True)
def _fused_not_compiled(monkeypatch):
    """The default of a fresh process: the fused kernels leave small calls
    (X has 64 entries) to the blocked ones until a large call or warm_up()
    has compiled them (tests/test_fused_cpu.py covers that)."""
    from lse_dispatch import _kernel
    from lse_dispatch.backends import _fused_cpu

    monkeypatch.setattr(_fused_cpu, "_SIGNATURES_SEEN", set())
    _kernel.catalogue_changed()  # the dispatcher's reused decisions saw the loaded dtypes
    yield
    monkeypatch.undo()
    _kernel.catalogue_changed()


def test_auto_picks_the_native_kernel():
    decision = _ran()
    assert (decision.implementation, decision.choice, decision.source) == ("numpy.blocked", "auto", "default")


def test_resolution_order(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "generic")
    assert _ran().implementation == "generic"
    assert _ran().source == _dispatch.ENV_VAR
    with lse_dispatch.use("numpy.blocked"):
        assert _ran().implementation == "numpy.blocked"  # use() beats the environment
        assert _ran(backend="generic").implementation == "generic"  # backend= beats use()
        assert _ran(backend="generic").source == "backend="
        with lse_dispatch.use("auto"):
            assert _ran().implementation == "numpy.blocked"
        with lse_dispatch.use("generic"):
            assert _ran().implementation == "generic"
        assert _ran().source == "use()"
    assert _ran().implementation == "generic"


@pytest.mark.parametrize("name", ["numpy", "numpy.blocked"])
def test_backend_and_kernel_names(name):
    assert _ran(backend=name).implementation == "numpy.blocked"


def test_other_backends_kernel_on_numpy_falls_back_to_generic():
    decision = _ran(backend="torch.blocked")
    assert decision.implementation == "generic"
    assert ("torch.blocked", "does not apply to this input's backend") in decision.declined


def test_declined_kernel_says_why():
    with lse_dispatch.trace() as seen:
        lse_dispatch.logsumexp(X, b=np.ones_like(X))
        lse_dispatch.softmax(X.astype(np.float16))
        lse_dispatch.log_softmax(np.ones((3, 4, 5)), axis=1)
        lse_dispatch.logsumexp(np.ma.array([1.0, 2.0, 3.0], mask=[0, 0, 1]))
    reasons = [dict(record.declined)["numpy.blocked"] for record in seen.records]
    assert seen.implementations == ["generic"] * 4
    # A masked array's mask becomes a where (masked entries are excluded).
    assert reasons[3] == "where given"
    assert reasons[0] == "b given"
    assert reasons[1].startswith("dtype float16")
    assert reasons[2].startswith("layout")


@pytest.mark.parametrize("bad", ["fastest", "numpy.nope", ""])
def test_unknown_names_are_rejected(bad, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        lse_dispatch.logsumexp(X, backend=bad)
    with pytest.raises(ValueError, match="unknown backend"):
        with lse_dispatch.use(bad):
            pass
    if bad:
        monkeypatch.setenv(_dispatch.ENV_VAR, bad)
        with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
            lse_dispatch.logsumexp(X)


def test_backend_must_be_a_string():
    with pytest.raises(TypeError, match="'backend'"):
        lse_dispatch.softmax(X, backend=3)


def test_use_restores_after_an_error():
    with pytest.raises(RuntimeError):
        with lse_dispatch.use("generic"):
            raise RuntimeError
    assert _ran().implementation == "numpy.blocked"


def test_nested_traces_each_see_their_calls():
    with lse_dispatch.trace() as outer:
        lse_dispatch.softmax(X)
        with lse_dispatch.trace() as inner:
            lse_dispatch.log_softmax(X.astype(np.float32))  # float64 log_softmax is the generic path's
    assert [r.op for r in outer.records] == ["softmax", "log_softmax"]
    assert [r.op for r in inner.records] == ["log_softmax"]
    assert "log_softmax on numpy ran numpy.blocked" in str(inner)


def test_debug_log_says_what_ran(caplog):
    with caplog.at_level(logging.DEBUG, logger="lse_dispatch.dispatch"):
        lse_dispatch.logsumexp(X, where=X > 0)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "lse_dispatch.dispatch"]
    assert "ran generic" in message and "numpy.blocked: where given" in message


def test_choice_is_thread_local():
    barrier = threading.Barrier(2)
    seen = {}

    def worker(name):
        with lse_dispatch.use(name):
            barrier.wait()  # both blocks are open at once
            seen[name] = _ran().implementation
            barrier.wait()

    in_threads(worker, ("generic", "numpy.blocked"))
    assert seen == {"generic": "generic", "numpy.blocked": "numpy.blocked"}
    assert _ran().implementation == "numpy.blocked"


def test_choice_is_task_local():
    async def task(name, started, release):
        with lse_dispatch.use(name):
            started.set()
            await release.wait()
            return _ran().implementation

    async def main():
        events = [asyncio.Event() for _ in range(3)]
        first = asyncio.create_task(task("generic", events[0], events[2]))
        second = asyncio.create_task(task("numpy", events[1], events[2]))
        await events[0].wait()
        await events[1].wait()
        events[2].set()
        return await first, await second

    assert asyncio.run(main()) == ("generic", "numpy.blocked")


def test_available_lists_builtin_kernels():
    catalogue = lse_dispatch.available()
    assert catalogue["numpy"] == ("numpy.fused", "numpy.blocked")
    # In priority order: torch.triton (CUDA, with its own fused backward), the
    # derivative kernels (they take only differentiated calls), the CPU kernels.
    assert catalogue["torch"] == ("torch.triton", "autodiff", "torch.fused", "torch.blocked")
    # jax.fused first: plain float32 calls without x64, with its own rules.
    assert catalogue["jax"] == ("jax.fused", "autodiff", "jax.jit")
    assert set(catalogue) >= {"numpy", "array_api_strict", "torch", "jax", "cupy", "dask"}


def test_kernels_give_the_generic_results_on_numpy():
    """Same state, same accumulator: the results agree to the rounding of y = x - lse.

    The oracle checks of both paths are in test_dispatch_paths; here larger
    arrays of both layouts, in every tiling regime, against the generic path:
    logsumexp within 2 ulps, log_softmax within the roundings of (x - m) and
    lse - m, softmax within exp's magnification of those.
    """
    rng = np.random.default_rng(5)
    for shape, axis in [((50, 70), 1), ((70, 50), 0), ((3, 100_000), 1), ((100_000, 3), 0), ((200_003,), None)]:
        for dtype in (np.float32, np.float64):
            eps = np.finfo(dtype).eps
            x = (rng.standard_normal(shape) * 10).astype(dtype)
            lse = [lse_dispatch.logsumexp(x, axis=axis, keepdims=True, backend=b) for b in ("numpy.blocked", "generic")]
            np.testing.assert_array_max_ulp(lse[0], lse[1], maxulp=2)
            spread = np.abs(lse[1] - np.max(x, axis=axis, keepdims=True)) + 1
            fast = lse_dispatch.log_softmax(x, axis=axis, backend="numpy.blocked")
            slow = lse_dispatch.log_softmax(x, axis=axis, backend="generic")
            assert np.all(np.abs(fast - slow) <= 2 * eps * (np.abs(slow) + spread))
            fast = lse_dispatch.softmax(x, axis=axis, backend="numpy.blocked")
            slow = lse_dispatch.softmax(x, axis=axis, backend="generic")
            wide = 2.0**-52 if dtype == np.float32 else eps
            bound = 2 * eps + 4 * wide * (np.abs(np.log(np.maximum(slow, 1e-300))) + spread)
            assert np.all(np.abs(fast - slow) <= bound * slow + np.finfo(dtype).smallest_subnormal)


def test_tiles_bound_the_extra_memory():
    """64 MiB of float32 along either axis: peak extra memory <= 10 % (softmax: beyond the output)."""
    import tracemalloc

    x = np.random.default_rng(6).standard_normal((4096, 4096)).astype(np.float32)
    for op, axis in [("logsumexp", -1), ("logsumexp", 0), ("softmax", -1), ("log_softmax", 0)]:
        # Once untraced: the first call may import and load a compiled kernel
        # (numpy.fused), a one-off cost that is not the call's memory.
        getattr(lse_dispatch, op)(x, axis=axis)
        tracemalloc.start()
        result = getattr(lse_dispatch, op)(x, axis=axis)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        extra = peak - (result.nbytes if op != "logsumexp" else 0)
        assert extra <= 0.10 * x.nbytes, f"{op} axis {axis}: {extra / x.nbytes:.1%} of the input"


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("axis", [None, 0, -1, (0, 1)])
def test_short_lane_builds_the_call_prepare_builds(library, dtype, axis):
    """The public functions' short lane for NumPy/torch floats equals prepare()."""
    from lse_dispatch._api import _prepare
    from lse_dispatch._call import prepare

    x = np.ones((3, 4), dtype=dtype)
    if library == "torch":
        x = pytest.importorskip("torch").from_numpy(x)
    _prepare("softmax", x, axis, None, None)  # fills the per-dtype cache
    for op, sign in [("logsumexp", True), ("logsumexp", False), ("softmax", False), ("log_softmax", False)]:
        assert _prepare(op, x, axis, None, None, sign)[0] == prepare(op, x, axis=axis, return_sign=sign)


def test_small_inputs_take_the_direct_path_with_the_same_results():
    from lse_dispatch.backends import numpy as numpy_backend

    rng = np.random.default_rng(7)
    for shape, axis in [((10,), -1), ((4, 6), 0), ((4, 6), 1), ((2, 3, 5), (1, 2))]:
        for dtype in (np.float32, np.float64):
            x = (rng.standard_normal(shape) * 30).astype(dtype)
            x.flat[0] = x.flat[1]  # a tie somewhere
            assert x.size <= numpy_backend.SMALL_ELEMENTS
            for op in ("logsumexp", "log_softmax"):
                small = getattr(lse_dispatch, op)(x, axis=axis)
                generic = getattr(lse_dispatch, op)(x, axis=axis, backend="generic")
                np.testing.assert_array_max_ulp(small, generic, maxulp=2 if op == "logsumexp" else 3)


def test_torch_kernel_leaves_autograd_to_others():
    torch = pytest.importorskip("torch")
    x = torch.linspace(-3.0, 2.0, 64, requires_grad=True)
    with lse_dispatch.trace() as seen:
        value = lse_dispatch.logsumexp(x)
        with torch.no_grad():
            lse_dispatch.logsumexp(x)
        lse_dispatch.softmax(x.detach())
        torch.func.grad(lambda t: lse_dispatch.logsumexp(t))(x.detach())
    value.backward()
    assert torch.allclose(x.grad, torch.softmax(x.detach(), 0))
    first, no_grad, detached, transformed = seen.records
    assert (first.implementation, transformed.implementation) == ("autodiff", "autodiff")
    assert (no_grad.implementation, detached.implementation) == ("torch.blocked", "torch.blocked")
    # Forced, the blocked kernel says why it leaves differentiated calls alone.
    with lse_dispatch.use("torch.blocked"), lse_dispatch.trace() as forced:
        lse_dispatch.logsumexp(x)
        torch.func.grad(lambda t: lse_dispatch.logsumexp(t))(x.detach())
    recorded, transformed = forced.records
    assert (recorded.implementation, transformed.implementation) == ("generic", "generic")
    assert dict(recorded.declined)["torch.blocked"] == "autograd active (input requires grad)"
    reason = dict(transformed.declined)["torch.blocked"]
    assert "torch.func" in reason or "autograd" in reason  # grad's wrapped input requires grad


def test_jax_kernel_declines_tracers():
    jax = pytest.importorskip("jax")
    x = jax.numpy.linspace(-3.0, 2.0, 64)
    with lse_dispatch.trace() as seen:
        eager = lse_dispatch.logsumexp(x)
        jitted = jax.jit(lambda t: lse_dispatch.logsumexp(t))(x)
    assert float(eager) == pytest.approx(float(jitted), rel=1e-6)
    # Plain float32 without x64 goes to jax.fused, traced or not; below it
    # the compiled generic code takes concrete calls and the rules traced ones.
    assert [r.implementation for r in seen.records] == ["jax.fused", "jax.fused"]
    with lse_dispatch.use("autodiff"), lse_dispatch.trace() as ruled:
        jax.jit(lambda t: lse_dispatch.logsumexp(t))(x)
        lse_dispatch.logsumexp(x)
    assert [r.implementation for r in ruled.records] == ["autodiff", "generic"]
    with lse_dispatch.use("jax.jit"), lse_dispatch.trace() as forced:
        jax.jit(lambda t: lse_dispatch.logsumexp(t))(x)
    assert forced.records[0].implementation == "generic"
    assert dict(forced.records[0].declined)["jax.jit"].startswith("traced input 'a'")
