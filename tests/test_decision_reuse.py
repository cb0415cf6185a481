"""The dispatcher's reuse of ``auto``'s choice per call signature.

For NumPy arrays and torch CPU tensors the dispatcher decides once per
signature (op, type, dtype, shape, axes and the backend's
``decision_key``) and reuses the kernel it chose.  A reused choice must be
the one a fresh decision makes: here every scenario runs on the same shape
after the others, so that a key that missed something a ``declines`` reads
would hand the scenario a stale kernel, and the fresh decision (``trace()``
decides afresh on every call) is compared with the one reused.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import _api, _dispatch, _kernel
from lse_dispatch._call import prepare
from lse_dispatch._ops import Op
from lse_dispatch.backends import _fused_cpu

from ._helpers import fused_kernels_loaded

OPS = (Op.LOGSUMEXP, Op.SOFTMAX, Op.LOG_SOFTMAX)


@pytest.fixture(scope="module", autouse=True)
def _fused_compiled():
    """The fused kernels loaded where numba is (they then take small calls), as in
    tests/test_dispatch_paths.py; forgotten afterwards."""
    with fused_kernels_loaded():
        yield


def _public(op):
    return getattr(lse_dispatch, op.value)


def _fresh(op, x, axis):
    """The implementation a fresh decision picks (a traced call decides every time)."""
    with lse_dispatch.trace() as seen:
        _public(op)(x, axis=axis)
    return seen.records[-1].implementation


def _reused(op, x, axis):
    """The implementation the dispatcher stored for ``x``'s signature after a plain call, or
    ``None`` where it stores none."""
    _public(op)(x, axis=axis)
    call, _ = _api._prepare(op, x, axis, None, None)
    key = _dispatch._decision_key(call)
    if key is None:
        return None
    chosen = _dispatch._DECIDED[key]
    return "generic" if chosen is None else chosen.name


def _check(op, x, axis=-1):
    reused = _reused(op, x, axis)
    assert reused is not None, "a plain call of this signature stores its decision"
    assert reused == _fresh(op, x, axis)
    return reused


@pytest.mark.parametrize("op", OPS)
def test_numpy_layouts_do_not_share_a_decision(op):
    x = np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32)
    fortran = np.asfortranarray(x)
    raw = np.empty(x.nbytes + 1, np.uint8)[1:]
    unaligned = raw[: x.nbytes].view(np.float32).reshape(x.shape)
    unaligned[...] = x
    assert not unaligned.flags.aligned
    ran = [_check(op, array) for array in (x, fortran, unaligned, x)]
    assert ran[0] != ran[1] and ran[0] == ran[3]


def _torch_scenarios(torch):
    """(name, context, input maker) on a (4, 10) float32 tensor; each context holds
    the state a ``declines`` reads."""
    import torch.autograd.forward_ad as fwad

    base = torch.randn(10, 4).t().contiguous()

    @contextlib.contextmanager
    def dual():
        with fwad.dual_level():
            yield

    return [
        ("plain", contextlib.nullcontext, lambda: base),
        ("requires grad", contextlib.nullcontext, lambda: base.clone().requires_grad_()),
        ("requires grad, no_grad", torch.no_grad, lambda: base.clone().requires_grad_()),
        ("inference mode", torch.inference_mode, lambda: base.clone()),
        ("forward AD", dual, lambda: fwad.make_dual(base, torch.ones_like(base))),
        ("not contiguous", contextlib.nullcontext, lambda: torch.randn(10, 4).t()),
        ("negated view", contextlib.nullcontext, lambda: torch._neg_view(base)),
        ("float64", contextlib.nullcontext, lambda: base.double()),
        ("plain again", contextlib.nullcontext, lambda: base),
    ]


# torch's forward-mode AD imports its jvp decompositions, scripted by a deprecated torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("op", OPS)
def test_torch_states_do_not_share_a_decision(op):
    torch = pytest.importorskip("torch")
    ran = {}
    for name, context, make in _torch_scenarios(torch):
        with context():
            ran[name] = _check(op, make())
    assert ran["plain"] == ran["plain again"]
    assert ran["requires grad"] == "autodiff" and ran["forward AD"] == "autodiff"
    assert ran["requires grad, no_grad"] == ran["plain"]
    assert ran["not contiguous"] != ran["plain"]


def test_a_reused_decision_still_differentiates():
    """Behaviour, not bookkeeping: after plain calls of a shape, the same shape with
    ``requires_grad`` is differentiated, and torch.func's transforms decide afresh."""
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 10, dtype=torch.float64)
    for _ in range(3):
        lse_dispatch.logsumexp(x, axis=-1)
    leaf = x.clone().requires_grad_()
    lse_dispatch.logsumexp(leaf, axis=-1).sum().backward()
    torch.testing.assert_close(leaf.grad, torch.softmax(x, -1))

    keys = []

    def traced(t):
        call, _ = _api._prepare(Op.LOGSUMEXP, t, -1, None, None)
        keys.append(_dispatch._decision_key(call))
        return lse_dispatch.logsumexp(t, axis=-1).sum()

    grad = torch.func.grad(traced)(x)
    torch.testing.assert_close(grad, torch.softmax(x, -1))
    assert keys == [None]


def test_torch_compile_decides_without_reuse():
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 10)
    keys = []

    def f(t):
        call, _ = _api._prepare(Op.SOFTMAX, t, -1, None, None)
        keys.append(_dispatch._decision_key(call))
        return lse_dispatch.softmax(t, axis=-1)

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.softmax(x.double(), -1).float())
    assert keys == [None]


@pytest.mark.skipif(not _fused_cpu.available(), reason="numba is not installed")
def test_loading_a_dtype_redecides(monkeypatch):
    """``numpy.fused`` takes small calls once their dtype is loaded: loading says that the
    catalogue changed, and the next call of a signature decided before decides again.
    Until then its decline is provisional (the calls count towards loading it), so the
    choice made past it is not stored: every call asks again."""
    x = np.linspace(-3.0, 2.0, 64)
    monkeypatch.setattr(_fused_cpu, "_SIGNATURES_SEEN", set())
    _kernel.catalogue_changed()
    try:
        lse_dispatch.logsumexp(x, axis=-1)
        call, _ = _api._prepare(Op.LOGSUMEXP, x, -1, None, None)
        assert _dispatch._decision_key(call) not in _dispatch._DECIDED
        assert _fresh(Op.LOGSUMEXP, x, -1) == "numpy.blocked"
        _fused_cpu.warm_up(("float64",))
        assert _check(Op.LOGSUMEXP, x) == "numpy.fused"
    finally:
        monkeypatch.undo()
        _kernel.catalogue_changed()


def test_calls_with_weights_or_a_mask_are_decided_every_time():
    x = np.linspace(-3.0, 2.0, 64)
    for kwargs in ({"b": np.ones(64)}, {"where": x > 0}):
        assert _dispatch._decision_key(prepare(Op.LOGSUMEXP, x, axis=-1, **kwargs)) is None
