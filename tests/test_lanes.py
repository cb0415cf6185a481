"""Lanes: the calls of a decided signature that skip preparing and dispatching.

Once ``auto`` has decided for good which kernel takes a NumPy array's or a
CPU tensor's call signature, a kernel with a ``Kernel.lane`` (``numpy.fused``,
``torch.fused``) leaves a function of the input alone, which the next calls of
the signature run (``_dispatch.through_lane``).  Every test here first makes
a lane, checks that it is there, then counts its calls, so that a lane that
never ran cannot pass: its results must be the full path's, bit for bit
(``backend="auto"`` takes the full path), and every state in which the full
path would decide otherwise must leave the lane.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import _dispatch, _kernel
from lse_dispatch._ops import Op
from lse_dispatch.backends import _fused_cpu

from ._helpers import fused_kernels_loaded, in_threads

pytestmark = pytest.mark.skipif(not _fused_cpu.available(), reason="numba is not installed")

OPS = (Op.LOGSUMEXP, Op.SOFTMAX, Op.LOG_SOFTMAX)
LAYOUTS = [((10,), -1), ((10,), None), ((7, 5), -1), ((7, 5), 0), ((7, 5), None), ((3, 4, 5), (1, 2)),
           ((3, 4, 5), (0, 1))]


@pytest.fixture(scope="module", autouse=True)
def _fused_compiled():
    with fused_kernels_loaded():
        yield


@pytest.fixture(autouse=True)
def _no_lanes():
    _kernel.catalogue_changed()
    yield
    _kernel.catalogue_changed()


def _call(op, x, axis, keepdims=False, **kw):
    if op == Op.LOGSUMEXP:
        return lse_dispatch.logsumexp(x, axis=axis, keepdims=keepdims, **kw)
    return getattr(lse_dispatch, op.value)(x, axis=axis, **kw)


def _lane_calls(op, x, axis, keepdims=False) -> list:
    """Make the lane of ``x``'s signature and count its calls from now on: a list of
    ``(input, whether the lane finished it)``."""
    _call(op, x, axis, keepdims)
    key = (op, type(x), x.dtype, x.shape, axis, keepdims)
    learned, decision_key, part, lane = _dispatch._LANES[key]
    assert lane is not None, "the fused kernel leaves a lane"
    assert learned.a is None, "the lane keeps no array alive"
    seen = []

    def counted(a):
        result = lane(a)
        seen.append((a, result is not None))  # (the input, whether the lane finished it)
        return result

    _dispatch._LANES[key] = (learned, decision_key, part, counted)
    return seen


def _same(got, want):
    assert type(got) is type(want)
    if hasattr(want, "dtype"):
        assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_numpy_lane_gives_the_full_paths_result(op, shape, axis, dtype):
    rng = np.random.default_rng(7)
    for keepdims in (False, True) if op == Op.LOGSUMEXP else (False,):
        seen = _lane_calls(op, rng.standard_normal(shape).astype(dtype), axis, keepdims)
        y = (rng.standard_normal(shape) * 30).astype(dtype)
        _same(_call(op, y, axis, keepdims), _call(op, y, axis, keepdims, backend="auto"))
        assert seen == [(y, True)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[:5])
@pytest.mark.parametrize("op", OPS)
def test_torch_lane_gives_the_full_paths_result(op, shape, axis, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    for keepdims in (False, True) if op == Op.LOGSUMEXP else (False,):
        seen = _lane_calls(op, torch.from_numpy(rng.standard_normal(shape).astype(dtype)), axis, keepdims)
        y = torch.from_numpy((rng.standard_normal(shape) * 30).astype(dtype))
        got, want = _call(op, y, axis, keepdims), _call(op, y, axis, keepdims, backend="auto")
        assert type(got) is torch.Tensor and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
        assert [taken for _, taken in seen] == [True]


@pytest.mark.parametrize("op", OPS)
def test_lines_to_finish_by_the_limit_rules_leave_the_lane(op):
    """A line with an infinity or a NaN is flagged by the compiled code: the lane hands the
    call to the full path, which finishes it by the shared rules."""
    seen = _lane_calls(op, np.array([[0.5, 1.0, 2.0], [3.0, -1.0, 0.0]]), -1)
    y = np.array([[np.inf, np.inf, 0.0], [-np.inf, -np.inf, -np.inf]])
    got = _call(op, y, -1)
    _same(got, _call(op, y, -1, backend="auto"))
    expected = {Op.LOGSUMEXP: [np.inf, -np.inf], Op.SOFTMAX: [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]],
                Op.LOG_SOFTMAX: [[-np.log(2), -np.log(2), -np.inf], [-np.inf] * 3]}[op]
    np.testing.assert_allclose(got, expected, rtol=1e-15)
    assert [taken for _, taken in seen] == [False]  # it ran, and left the call to the full path
    z = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # and finishes finite lines again
    _same(_call(op, z, -1), _call(op, z, -1, backend="auto"))
    assert [taken for _, taken in seen] == [False, True]


@pytest.mark.parametrize("op", OPS)
def test_numpy_inputs_the_lane_was_not_learned_for(op):
    """Same type, dtype and shape, but another layout, a mask or a subclass: not the lane."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 6))
    seen = _lane_calls(op, x, -1)
    fortran = np.asfortranarray(rng.standard_normal((6, 6)))
    _same(_call(op, fortran, -1), _call(op, np.ascontiguousarray(fortran), -1, backend="generic"))
    masked = np.ma.MaskedArray(x, mask=np.eye(6, dtype=bool))
    got = _call(op, masked, -1)
    want = _call(op, x, -1, where=~np.eye(6, dtype=bool))
    np.testing.assert_array_equal(np.ma.getdata(got) if op != Op.LOGSUMEXP else got, want)
    assert seen == []


# torch's forward-mode AD imports its jvp decompositions, scripted by a deprecated torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_states_leave_the_lane():
    """The states in which the full path decides otherwise (autograd, forward AD, another
    layout, a lazily negated view, torch.compile) leave the lane, and give their own
    results; ``no_grad`` on a tensor that requires grad takes it."""
    torch = pytest.importorskip("torch")
    import torch.autograd.forward_ad as fwad

    x = torch.randn(4, 10, dtype=torch.float64)
    seen = _lane_calls(Op.LOGSUMEXP, x, -1)
    leaf = x.clone().requires_grad_()
    lse_dispatch.logsumexp(leaf, axis=-1).sum().backward()
    torch.testing.assert_close(leaf.grad, torch.softmax(x, -1), rtol=1e-14, atol=0)
    with fwad.dual_level():
        tangent = torch.randn(4, 10, dtype=torch.float64)
        out = lse_dispatch.logsumexp(fwad.make_dual(x, tangent), axis=-1)
        torch.testing.assert_close(fwad.unpack_dual(out).tangent, (torch.softmax(x, -1) * tangent).sum(-1))
    strided = torch.randn(10, 4, dtype=torch.float64).t()
    torch.testing.assert_close(lse_dispatch.logsumexp(strided, axis=-1), torch.logsumexp(strided, -1))
    negated = torch._neg_view(x)
    torch.testing.assert_close(lse_dispatch.logsumexp(negated, axis=-1), torch.logsumexp(-x, -1))
    compiled = torch.compile(lambda t: lse_dispatch.logsumexp(t, axis=-1), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.logsumexp(x, -1))
    assert seen == []
    with torch.no_grad():
        out = lse_dispatch.logsumexp(leaf, axis=-1)
    assert not out.requires_grad and [taken for _, taken in seen] == [True]
    torch.testing.assert_close(out, torch.logsumexp(x, -1))


@pytest.mark.parametrize("op", [Op.SOFTMAX, Op.LOG_SOFTMAX])
def test_a_differentiated_call_takes_the_rule_with_the_fused_lane(op):
    """softmax / log_softmax of a CPU tensor that requires grad leave a lane too: the
    derivative rule (``autodiff``) applied with ``torch.fused``'s lane as its forward.
    Values, gradients and second derivatives are the full path's bit for bit; a
    line the compiled code flags (an infinity) is handed back to the rule's own
    dispatch; ``no_grad`` takes the fused kernel's lane of the same signature."""
    torch = pytest.importorskip("torch")
    x = torch.randn(6, 9).requires_grad_()
    seen = _lane_calls(op, x, -1)
    g = torch.randn(6, 9)
    flagged = x.detach().clone()
    flagged[2, 3] = float("inf")
    flagged.requires_grad_()
    for leaf in (x, flagged):
        y = _call(op, leaf, -1)
        (grad,) = torch.autograd.grad((y * g).sum(), leaf, create_graph=True)
        (second,) = torch.autograd.grad((grad * g).sum(), leaf)
        with lse_dispatch.trace() as full:
            y_full = _call(op, leaf, -1)
            (grad_full,) = torch.autograd.grad((y_full * g).sum(), leaf, create_graph=True)
            (second_full,) = torch.autograd.grad((grad_full * g).sum(), leaf)
        assert full.implementations[0] == "autodiff"
        assert y.grad_fn is not None
        for got, want in ((y, y_full), (grad, grad_full), (second, second_full)):
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), op
    assert [a is leaf for (a, _), leaf in zip(seen, (x, flagged))] == [True, True]
    with torch.no_grad():
        out = _call(op, x, -1)
    assert not out.requires_grad and len(seen) == 2
    assert torch.equal(out, _call(op, x.detach(), -1))


def test_a_choice_in_force_or_a_trace_leaves_the_lane(monkeypatch):
    x = np.linspace(-2.0, 3.0, 12, dtype=np.float32).reshape(3, 4)
    seen = _lane_calls(Op.SOFTMAX, x, -1)
    with lse_dispatch.use("generic"):
        _same(lse_dispatch.softmax(x, axis=-1), lse_dispatch.softmax(x, axis=-1, backend="generic"))
    monkeypatch.setenv(_dispatch.ENV_VAR, "numpy.blocked")
    lse_dispatch.softmax(x, axis=-1)
    with lse_dispatch.trace() as by_env:
        lse_dispatch.softmax(x, axis=-1)
    monkeypatch.delenv(_dispatch.ENV_VAR)
    with lse_dispatch.trace() as traced:
        lse_dispatch.softmax(x, axis=-1)
    lse_dispatch.softmax(x, axis=-1, backend="numpy.blocked")
    assert by_env.implementations == ["numpy.blocked"]
    assert traced.implementations == ["numpy.fused"]
    assert seen == []
    lse_dispatch.softmax(x, axis=-1)
    assert [taken for _, taken in seen] == [True]


def test_a_signature_the_fused_kernel_declines_has_no_lane():
    """A middle axis (a layout the compiled code does not take): the decision is stored
    with no lane, and every call takes the full path."""
    x = np.random.default_rng(2).standard_normal((2, 3, 4))
    lse_dispatch.softmax(x, axis=1)
    assert _dispatch._LANES[(Op.SOFTMAX, np.ndarray, x.dtype, x.shape, 1, False)][3] is None
    _same(lse_dispatch.softmax(x, axis=1), lse_dispatch.softmax(x, axis=1, backend="generic"))


def test_a_catalogue_change_forgets_the_lanes():
    x = np.ones((2, 3))
    _lane_calls(Op.LOG_SOFTMAX, x, -1)
    _kernel.catalogue_changed()
    assert _dispatch._LANES == {}


def test_the_lane_keeps_no_input_alive():
    x = np.random.default_rng(1).standard_normal((5, 5))
    probe = weakref.ref(x)
    lse_dispatch.softmax(x, axis=-1)
    lse_dispatch.softmax(x, axis=-1)
    del x
    assert probe() is None


@pytest.mark.parametrize("op", [Op.LOGSUMEXP, Op.SOFTMAX])
def test_threads_share_a_lane(op):
    """The lane keeps its scratch arrays between calls: threads running it at once (the
    compiled code releases the GIL) each take a set of their own."""
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((40, 33)).astype(np.float32) * 10 for _ in range(8)]
    inputs[3][5, 7] = np.inf  # a flagged line: its scratch goes back with its flags cleared
    expected = [_call(op, x, -1, backend="auto") for x in inputs]
    seen = _lane_calls(op, inputs[0], -1)
    failures = []

    def work(k):
        for i in range(200):
            j = (i + k) % len(inputs)
            got = _call(op, inputs[j], -1)
            if not np.array_equal(got, expected[j]):
                failures.append(j)

    in_threads(work, range(4))
    assert failures == [] and len(seen) == 800
    assert sum(not taken for _, taken in seen) == 100  # the flagged input's calls alone


def test_random_signatures_give_the_full_paths_results():
    """Seeded draws of shape (extents of 1 included), axis (None, one, several, negative,
    middle ones that no lane takes), dtype, op, keepdims and entries (some infinite or
    NaN): the second call of each signature, by its lane where it has one, equals the
    full path's result bit for bit."""
    rng = np.random.default_rng(20261201)
    taken = 0
    for _ in range(150):
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(n) for n in rng.integers(1, 7, ndim))
        choices = [None, -1, 0, ndim - 1, tuple(range(ndim)), tuple(range(1, ndim)) or 0, (0, ndim - 1) if ndim > 1 else -1]
        axis = choices[int(rng.integers(len(choices)))]
        op = OPS[int(rng.integers(3))]
        keepdims = bool(rng.integers(2)) and op == Op.LOGSUMEXP
        dtype = ("float32", "float64")[int(rng.integers(2))]
        for _ in range(2):  # the first call decides, the second may run the lane
            x = (rng.standard_normal(shape) * 20).astype(dtype)
            if rng.random() < 0.2:
                x.reshape(-1)[int(rng.integers(x.size))] = (np.inf, -np.inf, np.nan)[int(rng.integers(3))]
            got = _call(op, x, axis, keepdims)
            _same(got, _call(op, x, axis, keepdims, backend="auto"))
        found = _dispatch._LANES.get((op, np.ndarray, x.dtype, x.shape, axis, keepdims))
        taken += found is not None and found[3] is not None
    assert 100 < taken < 150  # most draws have a lane, some (middle axes) none
