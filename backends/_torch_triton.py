"""``torch.triton``: Triton kernels for torch tensors on CUDA devices.

The kernels are in :mod:`._triton_kernels` (their numerics are described
there); this module decides which calls they take, launches them, hands
the rows they flag (a max that is not finite, an included NaN) to the
generic path -- so every limit comes from :mod:`lse_dispatch._state` -- and
wraps them in a ``torch.autograd.Function`` whose backward is a fused kernel
too.

Importing this module imports neither torch nor triton.

Which calls: torch CUDA tensors of float16, bfloat16, float32 or float64,
without ``b``, reduced over trailing axes of a C-contiguous tensor, with or
without ``where``.  Declined (with the reason, see ``lse-dispatch`` trace):
triton missing, other devices, ``b``, complex input, other layouts,
``torch.compile`` tracing, ``torch.func`` transforms and forward-mode AD
(the ``autodiff`` kernel has those rules), and a differentiated logsumexp
under CUDA graph capture (its backward finds the limit rows by reading one
value back to the host).  Forward calls read nothing back: the kernels
write the limits themselves, so they are captured and never wait.

Under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter) the kernel also
takes CPU tensors, but only when chosen by name (``lse_dispatch.use("torch.triton")``
or ``LSE_DISPATCH_BACKEND``): that is how the tests run it without a GPU,
and it keeps the slow interpreter away from every other CPU call.

Gradients: while autograd records, the forward runs inside
:class:`_Fused`; its backward is ``lse_backward`` (one pass over the input)
or ``normalized_backward`` (one pass over output and cotangent for rows
that fit on chip).  When a graph of the backward itself is asked for
(``create_graph=True``), the backward uses the differentiable formulas of
:mod:`lse_dispatch._autodiff` instead, so that higher derivatives follow the
same rules as on the ``autodiff`` kernel.
"""

from __future__ import annotations

import functools
import math

from lse_dispatch._call import Call
from lse_dispatch._env import getenv
from lse_dispatch._kernel import Kernel, Priority, user_choice
from lse_dispatch._ops import Op

__all__ = ["KERNELS", "NAME"]

NAME = "torch.triton"

_OPS = {"logsumexp": 0, "softmax": 1, "log_softmax": 2}


@functools.cache
def _triton_missing() -> str | None:
    """Why triton cannot be used here, or None."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install is as good as none
        return f"triton is not installed ({type(exc).__name__}: {exc})"
    return None


def _interpreting() -> bool:
    return getenv("TRITON_INTERPRET") == "1"


def _chosen_by_name() -> bool:
    return user_choice() == NAME


_CPU_REASON = "device cpu (CUDA tensors only; CPU tensors under TRITON_INTERPRET=1 when chosen by name)"


def _declines(call: Call) -> str | None:
    import torch

    if torch.compiler.is_compiling():  # first: Dynamo traces no further than this
        return "inside torch.compile tracing"
    a = call.a
    # The device first: it is what declines every CPU call, cheaply (one look at
    # the environment, a constant reason).
    if a.is_cpu:
        if not (_interpreting() and _chosen_by_name()):
            return _CPU_REASON
    elif (device := a.device.type) != "cuda":
        return f"device {device} (CUDA tensors only; CPU tensors under TRITON_INTERPRET=1 when chosen by name)"
    if call.b is not None:
        return "b given"
    if call.plan.is_complex:
        return "complex input"
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {a.dtype} (kernels take float16, bfloat16, float32, float64)"
    missing = _triton_missing()
    if missing is not None:
        return missing
    if torch._C._functorch.is_functorch_wrapped_tensor(a) or torch._C._are_functorch_transforms_active():
        return "inside a torch.func transform"
    from torch.autograd import forward_ad

    if forward_ad._current_level >= 0:
        return "forward-mode AD active (the autodiff kernel has the jvp rules)"
    if (call.op == Op.LOGSUMEXP and a.requires_grad and torch.is_grad_enabled() and a.device.type == "cuda"
            and torch.cuda.is_current_stream_capturing()):
        return "CUDA graph capture of a differentiated logsumexp (its backward reads limit rows back)"
    if not call.axes:
        return "nothing reduced"
    if a.numel() == 0:
        return "empty input"
    if call.axes != tuple(range(a.ndim - len(call.axes), a.ndim)) or not a.is_contiguous():
        return "layout: reduced axes are not the trailing axes of a contiguous tensor"
    return None


# --------------------------------------------------------------------------
# Forward.


def _rows(call: Call):
    """``(x2d, where2d)``: the input as (rows, n) and ``where`` as a uint8 tensor of that shape."""
    import torch

    a = call.a
    n = math.prod(a.shape[ax] for ax in call.axes)
    x2d = a.reshape(-1, n)
    where2d = None
    if call.where is not None:
        where = call.where
        if tuple(where.shape) != tuple(a.shape) or not where.is_contiguous():
            where = torch.broadcast_to(where, a.shape).contiguous()
        where2d = where.reshape(-1, n).view(torch.uint8)
    return x2d, where2d


def _sub_call(call: Call, x2d, where2d, index):
    """The generic path's Call for the rows ``index`` of the (rows, n) view."""
    import torch

    rows = x2d.index_select(0, index)
    where = None if where2d is None else where2d.index_select(0, index).view(torch.bool)
    return Call(call.op, call.xp, rows, None, where, (1,), tuple(rows.shape), call.plan, call.return_sign)


def _flagged(special):
    """Indices of flagged rows, or None (one read-back of a single value)."""
    import torch

    if not bool(special.any()):
        return None
    return torch.nonzero(special).flatten()


def _forward(call: Call):
    """``(result, state)``; result as the generic path returns it, limits included.

    Nothing is read back: the kernels write the limit rows themselves, so the
    call returns while the GPU works.
    """
    import torch

    from . import _triton_kernels as kernels

    x2d, where2d = _rows(call)
    op = _OPS[call.op]
    dtype = call.plan.result
    if op == 0:
        value = torch.empty((2, x2d.shape[0]), dtype=dtype, device=x2d.device)
        state = kernels.rows_forward(x2d, where2d, op, value=value)
        keep_shape = tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape))
        return (value[0].view(keep_shape), value[1].view(keep_shape)), state
    out = torch.empty(call.a.shape, dtype=dtype, device=x2d.device)
    state = kernels.rows_forward(x2d, where2d, op, out=out.view(x2d.shape))
    return out, state


# --------------------------------------------------------------------------
# Gradients.


def _function():
    """The autograd Function (built on first use: it needs torch)."""
    global _FUSED
    if _FUSED is None:
        _FUSED = _make_function()
    return _FUSED


_FUSED = None


def _make_function():
    import torch

    class _Fused(torch.autograd.Function):
        """Forward by the Triton kernels; backward by the fused backward kernels."""

        @staticmethod
        def forward(ctx, x, where, call):
            result, state = _forward(call)
            ctx.call = call
            if call.op == "logsumexp":
                value, sign = result
                ctx.mark_non_differentiable(sign)
                ctx.save_for_backward(x, where, *state, value, sign)
                return value, sign
            ctx.save_for_backward(result, where)
            return result

        @staticmethod
        def backward(ctx, g, *_ignored):
            call = ctx.call
            with _on_device(g.device):
                if call.op == "logsumexp":
                    x, where, m, count, rest, special, value, sign = ctx.saved_tensors
                    grad = _lse_backward(call, x, where, (m, count, rest), value, sign, g, special)
                else:
                    out, where = ctx.saved_tensors
                    grad = _normalized_backward(call, out, where, g)
            return grad, None, None

    return _Fused


def _lse_backward(call, x, where, state, value, sign, g, special):
    import torch

    from lse_dispatch import _autodiff

    from . import _triton_kernels as kernels

    if torch.is_grad_enabled():
        # A graph of the backward is wanted: the autodiff kernel's rules.
        from . import _torch_autograd

        with torch.enable_grad():
            again = _torch_autograd.logsumexp(_with_input(call, x, where))[0]
            (grad,) = torch.autograd.grad(again, x, g, create_graph=True)
        return grad
    sub_call = _with_input(call, x, where)
    x2d, where2d = _rows(sub_call)
    g_rows = g.reshape(-1).contiguous()
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad2d = grad.view(x2d.shape)
    m, count, rest = state
    kernels.lse_backward(x2d, where2d, m, count, rest, g_rows, grad2d)
    flagged = _flagged(special)  # the backward's one read-back
    if flagged is not None:
        # The limits (+inf shares, -inf rows, NaN): the shared formulas.
        sub = _sub_call(sub_call, x2d, where2d, flagged)
        xp = call.xp
        from lse_dispatch import _generic

        sub_state = _generic.logsumexp_state(sub)
        sub_value, sub_sign = _generic.logsumexp_from_state(sub, sub_state)
        a = sub.a.to(call.plan.compute)
        w, _ = _autodiff.lse_weights(xp, a, None, sub.where, (1,), sub_value, sub_sign, sub_state)
        g_sub = g_rows.index_select(0, flagged).reshape(-1, 1).to(w.dtype)
        grad_sub, _ = _autodiff.lse_vjp(xp, w, None, g_sub)
        grad2d.index_copy_(0, flagged, grad_sub.to(x.dtype))
    return grad


def _normalized_backward(call, out, where, g):
    import torch

    from lse_dispatch import _autodiff

    from . import _triton_kernels as kernels

    if torch.is_grad_enabled():
        # Differentiable formulas on the saved output (as the autodiff kernel).
        xp = call.xp
        compute = call.plan.compute
        out_c, g_c = out.to(compute), g.to(compute)
        full_where = None if where is None else torch.broadcast_to(where, out.shape)
        if call.op == "softmax":
            result = _autodiff.softmax_vjp(xp, out_c, g_c, call.axes)
        else:
            result = _autodiff.log_softmax_vjp(xp, out_c, full_where, g_c, call.axes)
        return result.to(out.dtype)
    sub_call = _with_input(call, out, where)
    y2d, where2d = _rows(sub_call)
    g2d = g.contiguous().view(y2d.shape)
    grad = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    kernels.normalized_backward(y2d, g2d, where2d, call.op == "log_softmax", grad.view(y2d.shape))
    return grad


def _with_input(call: Call, a, where) -> Call:
    return Call(call.op, call.xp, a, None, where, call.axes, call.shape, call.plan, call.return_sign)


# --------------------------------------------------------------------------
# Kernel entries.


def _on_device(device):
    """A context that makes ``device`` current: Triton launches on the current CUDA device."""
    import contextlib

    import torch

    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _run(call: Call):
    import torch

    with _on_device(call.a.device):
        if torch.is_grad_enabled() and call.a.requires_grad:
            return _function().apply(call.a, call.where, call)
        return _forward(call)[0]


#: Kernels for backends/torch.py, listed before the autodiff ones: they
#: take differentiated CUDA calls too (with their own backward).
KERNELS = tuple(
    Kernel(op, NAME, _run, _declines, Priority.COMPILED_WITH_DERIVATIVES)
    for op in (Op.LOGSUMEXP, Op.SOFTMAX, Op.LOG_SOFTMAX)
)
