"""PyTorch derivative rules: ``torch.autograd.Function`` s over the shared math.

The formulas are those of :mod:`lse_dispatch._autodiff`; this module only
plumbs them into autograd.  Each Function has a forward without ``ctx``, a
``setup_context``, ``backward`` and ``jvp``, and ``generate_vmap_rule``, so it
works under ``torch.func`` (``grad``, ``vmap``, ``jacrev``, ``jacfwd``,
``hessian``) and ``torch.compile(fullgraph=True)``.  Backward passes are
written with differentiable torch operations on the Functions' own outputs,
so double backward (``gradgradcheck``, Hessians) reuses the same rules.

This module imports torch; :mod:`._torch_grad` (the kernels) imports it only
when a kernel runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import array_api_compat.torch as xp
import torch

from lse_dispatch import _autodiff, _generic, _kernel
from lse_dispatch._call import Call
from lse_dispatch._namespace import DtypePlan
from lse_dispatch._ops import Op
from lse_dispatch._state import LSEState

from . import _fused_cpu
from ._spec import AUTODIFF

__all__ = ["LogSumExp", "Normalised", "logsumexp", "normalised"]


def _undifferentiated(call: Call):
    """The forward that would run without derivatives: native kernel or generic."""
    return _kernel.dispatch(call, without=AUTODIFF)


def _traced() -> bool:
    """Inside torch.compile's tracing or a torch.func transform: no host reads of
    tensor values, no compiled kernels outside the traced graph."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _plain_backward() -> bool:
    """A backward nobody differentiates: no graph recorded (no double backward),
    no torch.func transform around it, not traced by torch.compile."""
    return not (torch.is_grad_enabled() or _traced())


def _with_op(call: Call, op: Op) -> Call:
    """``call`` as a call of operation ``op`` (same arrays, axes and plan)."""
    return Call(op, call.xp, call.a, call.b, call.where, call.axes, call.shape, call.plan, False)


def _rebuild(a, b, where, static) -> Call:
    """The Call of a Function's forward, from its (possibly unbatched) tensors."""
    shape = tuple(a.shape) if b is None else tuple(torch.broadcast_shapes(a.shape, b.shape))
    return Call(static.op, xp, a, b, where, static.axes, shape, static.plan, static.return_sign)


@dataclass(frozen=True)
class _Static:
    """Non-tensor arguments of a Function, as one pytree leaf.

    A bare tuple of axes would be flattened by the generated vmap rules and
    then no longer match its ``None`` tangent.
    """

    axes: tuple[int, ...]
    op: str
    plan: DtypePlan
    return_sign: bool = False
    #: The forward kernel's lane (``normalised_lane``), tried before the dispatch.
    forward: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)


def _save(ctx, *tensors) -> None:
    """Save tensors for backward and forward mode; ``None`` s are kept aside.

    The generated vmap rules match saved tensors to batch dims by position,
    which a ``None`` among them would break.
    """
    ctx.saved_slots = tuple(t is not None for t in tensors)
    present = [t for t in tensors if t is not None]
    ctx.save_for_backward(*present)
    ctx.save_for_forward(*present)


def _saved(ctx) -> tuple:
    present = iter(ctx.saved_tensors)
    return tuple(next(present) if slot else None for slot in ctx.saved_slots)


class _LSEWeightsReverse(torch.autograd.Function):
    """``(w, u) = (d lse/d a, d lse/d b)`` given the (detached) forward result."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b, where, value, sign, state_max, state_count, state_rest, static):
        state = LSEState(state_max, state_count, state_rest)
        w, u = _autodiff.lse_weights(xp, a, b, where, static.axes, value, sign, state)
        return w if u is None else (w, u)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.axes = inputs[-1].axes
        ctx.weighted = inputs[1] is not None
        outputs = output if ctx.weighted else (output,)
        ctx.save_for_backward(*outputs)
        ctx.save_for_forward(*outputs)
        # An unused u gets no gradient (None), not zeros: u is infinite or NaN
        # at b == 0 entries on +inf or NaN, and u * 0 would be NaN (Hessians in a).
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gw, gu=None):
        w, u = (*ctx.saved_tensors, None)[:2]
        if gw is None:
            gw = torch.zeros_like(w)
        grad_a, grad_b = _autodiff.weights_vjp(xp, w, u, gw, gu, ctx.axes)
        return grad_a, grad_b, None, None, None, None, None, None, None


class LSEWeights(_LSEWeightsReverse):
    """With the forward-mode rule (``jvp``): outside ``torch.compile``."""

    @staticmethod
    def jvp(ctx, da, db, *_constants):
        w, u = (*ctx.saved_tensors, None)[:2]
        if da is None:
            da = torch.zeros_like(w)
        dw, du = _autodiff.weights_jvp(xp, w, u, da, db, ctx.axes)
        return dw if u is None else (dw, du)


def _classic(cls):
    """The same Function in the classic style, ``forward(ctx, ...)``.

    For a Function with ``setup_context`` (which ``torch.func`` needs) torch
    binds the arguments with ``inspect.signature`` on every call, a fixed
    cost that is a sizeable part of a small call; plain autograd and forward
    AD do not need that style, so outside ``torch.func`` this variant runs.
    """

    def forward(ctx, *args):
        output = cls.forward(*args)
        cls.setup_context(ctx, args, output)
        return output

    body = {"forward": staticmethod(forward), "backward": staticmethod(cls.backward), "jvp": staticmethod(cls.jvp)}
    return type(f"{cls.__name__}Classic", (torch.autograd.Function,), body)


def _pick(full, reverse_only, classic):
    """The variant of a Function for the current context.

    Dynamo cannot trace a Function with a custom ``jvp``: compiled graphs use
    the reverse-mode-only class (same forward and backward).  ``torch.func``
    transforms need ``setup_context``; everything else takes the classic one.
    """
    if torch.compiler.is_compiling():
        return reverse_only
    if torch._C._are_functorch_transforms_active():
        return full
    return classic


def weights(a, b, where, value, sign, state, static, plan):
    """``(w, u)`` on the broadcast shape, in the compute dtype."""
    a = a.to(plan.compute)
    if b is not None:
        a, b = torch.broadcast_tensors(a, b.to(plan.compute))
    if where is not None:
        where = torch.broadcast_to(where, a.shape)
    function = _pick(LSEWeights, _LSEWeightsReverse, _LSEWeightsClassic)
    constants = [t.detach() for t in (value, sign, *state)]
    out = function.apply(a, b, where, *constants, static)
    return (out, None) if b is None else out


def _state_of(a, b, where, state, static):
    """The forward's saved state, or, where the forward formed the value alone
    (empty state tensors), the state formed now by the STATE kernel."""
    if state[0].numel():
        return state
    with torch.no_grad():
        return tuple(_undifferentiated(_with_op(_rebuild(a.detach(), b, where, static), Op.STATE)))


class _LogSumExpReverse(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(a, b, where, static):
        # The state goes out too (not differentiable), so that the backward
        # forms the weights from it instead of recomputing it.
        call = _rebuild(a, b, where, static)
        if b is None and not static.plan.is_complex and not _traced():
            # The value alone, by the kernel that would run without derivatives
            # (torch.fused: one fast pass and its keep rule, where the STATE
            # kernel sums exactly: 301 against 149 us on (8, 128, 128) float32).
            # The plain backward needs no state (it runs softmax's kernel); the
            # other rules form it when they run (_state_of).
            value, sign = _undifferentiated(call)
            empty = value.new_empty(0)
            return value, sign, empty, empty, empty
        if static.plan.is_complex:
            state = _generic.logsumexp_state(call)
        else:  # the STATE kernel that would run without derivatives (torch.fused when loaded)
            state = _undifferentiated(_with_op(call, Op.STATE))
        # Finite unweighted lines by the one rule for them, eagerly: it reads
        # the maxima on the host, which neither torch.compile's tracing nor
        # torch.func's batched tensors allow.  The shared finalisation's small
        # operations otherwise.
        found = None if _traced() else _generic.logsumexp_of_finite_lines(call, state)
        return (*(_generic.logsumexp_from_state(call, state) if found is None else found), *state)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, where, static = inputs
        value, sign, *state = output
        ctx.mark_non_differentiable(sign, *state)
        ctx.static = static
        ctx.plan = static.plan
        _save(ctx, a, b, where, value, sign, *state)

    @staticmethod
    def backward(ctx, g_value, *_g_constants):
        a, b, where, value, sign, *state = _saved(ctx)
        if b is None and not ctx.plan.is_complex and _plain_backward():
            # No graph of the backward is wanted (no double backward): the
            # weights are softmax(a), limits included, by the kernel that
            # softmax would run (one fused call when numba is loaded).
            call = _rebuild(a, None, where, ctx.static)
            w = _undifferentiated(_with_op(call, Op.SOFTMAX))
            return (w * g_value.to(w.dtype)).to(a.dtype), None, None, None
        state = _state_of(a, b, where, state, ctx.static)
        w, u = weights(a, b, where, value, sign, state, ctx.static, ctx.plan)
        # Only inputs that need a gradient get one (an integer `a` with a float `b`);
        # without b's, u stays out of the graph (see _LSEWeightsReverse).
        needs_a, needs_b = ctx.needs_input_grad[:2]
        grad_a, grad_b = _autodiff.lse_vjp(xp, w, u if needs_b else None, g_value.to(w.dtype))
        grad_a = _autodiff.unbroadcast(xp, grad_a, a.shape).to(a.dtype) if needs_a else None
        if grad_b is not None:
            grad_b = _autodiff.unbroadcast(xp, grad_b, b.shape).to(b.dtype) if needs_b else None
        return grad_a, grad_b, None, None


class LogSumExp(_LogSumExpReverse):
    """With the forward-mode rule (``jvp``): outside ``torch.compile``."""

    @staticmethod
    def jvp(ctx, da, db, _where, _static):
        a, b, where, value, sign, *state = _saved(ctx)
        state = _state_of(a, b, where, state, ctx.static)
        w, u = weights(a, b, where, value, sign, state, ctx.static, ctx.plan)
        da = torch.zeros_like(w) if da is None else da.to(w.dtype)
        db = None if db is None else db.to(w.dtype)
        tangent = _autodiff.lse_jvp(xp, w, u, da, db, ctx.static.axes)
        return tangent.to(value.dtype), None, None, None, None


class _NormalisedReverse(torch.autograd.Function):
    """softmax or log_softmax; the backward uses the output only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, where, static):
        if static.forward is not None:  # a lane's call: the forward kernel's lane, unless it hands it back
            out = static.forward(x)
            if out is not None:
                return out
        return _undifferentiated(_rebuild(x, None, where, static))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, where, static = inputs
        ctx.axes, ctx.op = static.axes, static.op
        # The forward ran torch.fused (numba loaded): the backward may too.
        # Not while torch.compile traces: the compiled kernel is not traceable.
        ctx.fused = "numba" in sys.modules and not torch.compiler.is_compiling() and _fused_cpu.available()
        ctx.compute = static.plan.compute
        _save(ctx, output, where)

    @staticmethod
    def backward(ctx, g):
        out, where = _saved(ctx)
        # Double backward and torch.compile's traced backward keep the op form.
        if ctx.fused and _plain_backward():
            fused = _fused_cpu.softmax_backward(ctx.op, out, where, g, ctx.axes)
            if fused is not None:
                return fused, None, None
        out_c, g_c = out.to(ctx.compute), g.to(ctx.compute)
        if ctx.op == Op.SOFTMAX:
            result = _autodiff.softmax_vjp(xp, out_c, g_c, ctx.axes)
        else:
            result = _autodiff.log_softmax_vjp(xp, out_c, where, g_c, ctx.axes)
        return result.to(out.dtype), None, None


class Normalised(_NormalisedReverse):
    """With the forward-mode rule (``jvp``): outside ``torch.compile``."""

    @staticmethod
    def jvp(ctx, dx, _where, _static):
        out, where = _saved(ctx)
        out_c, dx_c = out.to(ctx.compute), dx.to(ctx.compute)
        if ctx.op == Op.SOFTMAX:
            result = _autodiff.softmax_jvp(xp, out_c, dx_c, ctx.axes)
        else:
            result = _autodiff.log_softmax_jvp(xp, out_c, where, dx_c, ctx.axes)
        return result.to(out.dtype)


_LSEWeightsClassic = _classic(LSEWeights)
_LogSumExpClassic = _classic(LogSumExp)
_NormalisedClassic = _classic(Normalised)


def logsumexp(call: Call):
    """``(value, sign)`` of a logsumexp call, through :class:`LogSumExp`."""
    static = _Static(call.axes, call.op, call.plan, call.return_sign)
    function = _pick(LogSumExp, _LogSumExpReverse, _LogSumExpClassic)
    value, sign, *_state = function.apply(call.a, call.b, call.where, static)
    return value, sign


def normalised_lane(call: Call, shape: tuple):
    """The lane (``Kernel.lane``) of a differentiated softmax / log_softmax without
    ``where``: :class:`Normalised` (classic: lanes run only where the decision key
    says no torch.func transform or torch.compile tracing is active) applied with
    its forward bound to the lane of the kernel that runs without the rule (the
    fused kernel's), or ``None`` where that kernel has none.  It skips preparing
    the call and both dispatches (the rule's and its forward's).
    """
    if call.where is not None:
        return None
    with torch.no_grad():  # what the forward sees: the rule's kernels decline, the forward's take
        forward = _kernel.lane_without(call, AUTODIFF, shape)
    if forward is None:
        return None
    static = _Static(call.axes, call.op, call.plan, forward=forward)
    apply = _NormalisedClassic.apply
    return lambda a: apply(a, None, static)


def normalised(call: Call):
    """softmax or log_softmax of a call, through :class:`Normalized`."""
    static = _Static(call.axes, call.op, call.plan)
    return _pick(Normalised, _NormalisedReverse, _NormalisedClassic).apply(call.a, call.where, static)
