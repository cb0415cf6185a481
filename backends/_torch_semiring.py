"""PyTorch derivative rules of ``logcumsumexp`` and ``logmatmulexp``.

The formulas are those of :mod:`lse_dispatch.semiring` (``cumulative_vjp``,
``cumulative_jvp``, ``product_vjp``, ``product_jvp``); this module only
plumbs them into ``torch.autograd.Function`` s, with ``setup_context``,
``backward``, ``jvp`` and a generated vmap rule, so that they work under
plain autograd, forward AD and ``torch.func`` (``grad``, ``vmap``,
``jacrev``, ``jacfwd``).  Backward passes are written with differentiable
torch operations on the saved input and the Function's own output, so double
backward reuses the same rules.

The Functions run only while a derivative can be taken; plain calls go to
the eager implementation unchanged (``lse_dispatch.semiring``).
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat.torch as xp
import torch

from lse_dispatch import semiring
from lse_dispatch._autodiff import unbroadcast
from lse_dispatch._namespace import DtypePlan

__all__ = ["differentiating", "logcumsumexp", "logmatmulexp", "takes"]


def differentiating(*tensors) -> bool:
    """Whether autograd, forward AD or a ``torch.func`` transform could differentiate the call."""
    from torch.autograd import forward_ad

    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    if forward_ad._current_level >= 0:
        return True
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _transformed(*tensors) -> bool:
    """Inside ``torch.func``: data-dependent branches are not allowed, so the lazy-safe method runs."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


@dataclass(frozen=True)
class _Static:
    """The non-tensor arguments, as one pytree leaf for the generated vmap rules."""

    plan: DtypePlan
    axis: int = 0
    reverse: bool = False


def _last(x: torch.Tensor, axis: int, reverse: bool) -> torch.Tensor:
    """``x`` with the scan axis last, in scan order."""
    x = torch.movedim(x, axis, -1)
    return torch.flip(x, (-1,)) if reverse else x


def _back(x: torch.Tensor, axis: int, reverse: bool) -> torch.Tensor:
    x = torch.flip(x, (-1,)) if reverse else x
    return torch.movedim(x, -1, axis)


class LogCumSumExp(torch.autograd.Function):
    """``logcumsumexp`` along ``static.axis``; derivatives by the recurrence of its weights."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, static):
        method = "recurrence" if _transformed(x) else None
        return semiring.cumulative(xp, x, static.axis, static.plan, reverse=static.reverse, method=method)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, static = inputs
        ctx.static = static
        ctx.save_for_backward(x, output)
        ctx.save_for_forward(x, output)

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        s = ctx.static
        compute = s.plan.compute
        grad = semiring.cumulative_vjp(
            xp, *(_last(t.to(compute), s.axis, s.reverse) for t in (x, y, g))
        )
        return _back(grad, s.axis, s.reverse).to(x.dtype), None

    @staticmethod
    def jvp(ctx, dx, _static):
        x, y = ctx.saved_tensors
        s = ctx.static
        compute = s.plan.compute
        tangent = semiring.cumulative_jvp(
            xp, *(_last(t.to(compute), s.axis, s.reverse) for t in (x, y, dx))
        )
        return _back(tangent, s.axis, s.reverse).to(y.dtype)


takes = differentiating  # eager tensors without autograd take the shared eager code


def logcumsumexp(x, axis: int, include_initial: bool, reverse: bool, plan: DtypePlan):
    """The public function's torch path while a derivative is being taken."""
    if not torch.is_floating_point(x):
        x = x.to(plan.result)
    out = LogCumSumExp.apply(x, _Static(plan, axis, reverse))
    if include_initial:
        shape = list(out.shape)
        shape[axis] = 1
        initial = torch.full(shape, -torch.inf, dtype=out.dtype, device=out.device)
        out = torch.cat([out, initial] if reverse else [initial, out], dim=axis)
    return out


def _matrices(a, b):
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    return a2.expand(*batch, *a2.shape[-2:]), b2.expand(*batch, *b2.shape[-2:])


def _as_output_matrix(t, a, b):
    """A tensor of the output's shape as the ``(..., n, m)`` grid."""
    if b.ndim == 1:
        t = t[..., None]
    if a.ndim == 1:
        t = t[..., None, :]
    return t


def _from_output_matrix(t, a, b):
    if a.ndim == 1:
        t = t.squeeze(-2)
    if b.ndim == 1:
        t = t.squeeze(-1)
    return t


class LogMatMulExp(torch.autograd.Function):
    """``logmatmulexp(a, b)``; derivatives by softmax-weighted matrix products."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b, static):
        return semiring.product(xp, a, b, static.plan)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, static = inputs
        ctx.static = static
        ctx.save_for_backward(a, b, output)
        ctx.save_for_forward(a, b, output)

    @staticmethod
    def backward(ctx, g):
        a, b, y = ctx.saved_tensors
        compute = ctx.static.plan.compute
        a2, b2 = _matrices(a.to(compute), b.to(compute))
        y2 = _as_output_matrix(y.to(compute), a, b)
        g2 = _as_output_matrix(g.to(compute), a, b)
        ga, gb = semiring.product_vjp(xp, a2, b2, y2, g2, ctx.static.plan)
        needs_a, needs_b = ctx.needs_input_grad[:2]
        ga = _reduce_to(ga, a) if needs_a else None
        gb = _reduce_to(gb, b) if needs_b else None
        return ga, gb, None

    @staticmethod
    def jvp(ctx, da, db, _static):
        a, b, y = ctx.saved_tensors
        compute = ctx.static.plan.compute
        a2, b2 = _matrices(a.to(compute), b.to(compute))
        y2 = _as_output_matrix(y.to(compute), a, b)
        da2 = None if da is None else (da[None, :] if a.ndim == 1 else da).to(compute).expand(a2.shape)
        db2 = None if db is None else (db[:, None] if b.ndim == 1 else db).to(compute).expand(b2.shape)
        tangent = semiring.product_jvp(xp, a2, b2, y2, da2, db2, ctx.static.plan)
        return _from_output_matrix(tangent, a, b).to(y.dtype)


def _reduce_to(grad, original):
    """Sum a gradient on the broadcast matrix shape back to ``original`` 's shape (1-D rules undone)."""
    if original.ndim == 1:
        # A 1-D a was (1, k): sum over the batch and the added row axis; b (k, 1) likewise.
        grad = grad.sum(dim=tuple(range(grad.ndim - 2))) if grad.ndim > 2 else grad
        grad = grad.reshape(-1)
        return grad.to(original.dtype)
    return unbroadcast(xp, grad, tuple(original.shape)).to(original.dtype)


def logmatmulexp(a, b, plan: DtypePlan):
    """The public function's torch path while a derivative is being taken."""
    if not torch.is_floating_point(a):
        a = a.to(plan.result)
    if not torch.is_floating_point(b):
        b = b.to(plan.result)
    return LogMatMulExp.apply(a, b, _Static(plan))
