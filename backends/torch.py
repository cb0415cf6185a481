"""PyTorch: CPU, and CUDA when a GPU is present.

Native kernel ``torch.blocked`` (CPU, float32/float64, no ``b``/``where``, no
autograd): the shared (max, count, rest) state, computed over pieces of about
a million elements with torch's own multi-threaded ops and ``out=`` buffers,
then finalised by :mod:`lse_dispatch._state`.  It keeps the generic path's
precision choices exactly as ``numpy.blocked`` does (see
:mod:`lse_dispatch.backends.numpy` for why the fast total plus an exact
recheck of dominated lines equals the generic state): terms in the input's
dtype, sums in float64, the softmax exponent in float64.

Kernel order in ``SPEC.kernels``: kernels for calls that need gradients
(``torch.autograd.Function`` based, from the gradients work) go *first* and
decline calls without gradients; ``torch.blocked`` declines every call where
autograd is active or a ``torch.func`` transform wraps the input, so the two
never compete.
"""

from __future__ import annotations

import math

from array_api_compat import is_torch_array

from . import _torch_grad
from ._blocked import Pairwise as _Pairwise
from ._blocked import piece as _piece
from ._spec import FLOAT64_SOFTMAX, LOG_SOFTMAX, BackendSpec, Device, declines_also


def _namespace():
    import array_api_compat.torch as xp

    return xp


def _devices():
    import torch

    found = [Device("cpu", torch.device("cpu"))]
    if torch.cuda.is_available():
        found.append(Device("cuda", torch.device("cuda", 0)))
    return found


def _to_numpy(x):
    import torch

    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.detach().cpu().numpy()


# Elements per piece.  Every torch op on a piece ends in a barrier of its
# thread pool; on a busy machine each barrier costs milliseconds, so pieces are
# large (measured on the 2-core machine under load: 2**18 -> 2**22 took
# logsumexp of (4096, 4096) from 551 ms to 509 ms, against 202 ms for torch's).
TILE_ELEMENTS = 1 << 22
# float32 lines whose fast total is below 1 + this are recomputed exactly.
_RECHECK_BELOW = 2.0**-20


def _layout(call):
    a, axes, ndim = call.a, call.axes, call.a.ndim
    if not a.is_contiguous():
        return None
    n = math.prod(a.shape[ax] for ax in axes)
    if axes == tuple(range(ndim - len(axes), ndim)):
        return a.reshape(-1, n), 1
    if axes == tuple(range(len(axes))):
        return a.reshape(n, -1), 0
    return None


def _declines(call) -> str | None:
    import torch

    a = call.a
    if call.b is not None:
        return "b given"
    if call.where is not None:
        return "where given"
    if call.plan.is_complex:
        return "complex input"
    if a.dtype not in (torch.float32, torch.float64):
        return f"dtype {a.dtype} (kernel takes float32, float64)"
    if a.device.type != "cpu":
        return f"device {a.device.type} (kernel is CPU-only: its exact recheck reads back to the host)"
    if torch.is_grad_enabled() and a.requires_grad:
        return "autograd active (input requires grad)"
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace the functorch checks
        return "inside torch.compile tracing"
    if torch._C._functorch.is_functorch_wrapped_tensor(a) or torch._C._are_functorch_transforms_active():
        return "inside a torch.func transform"
    if tuple(a.shape) != call.shape:
        return "input needs a broadcast"
    if not call.axes:
        return "nothing reduced"
    if a.numel() == 0:
        return "empty input"
    if _layout(call) is None:
        return "layout: reduced axes are not the leading or trailing axes of a contiguous tensor"
    return None


def _tiles(view, axis):
    n, kept = view.shape[axis], view.shape[1 - axis]
    if axis == 1:
        step_n = min(n, TILE_ELEMENTS)
        step_k = max(1, TILE_ELEMENTS // step_n)
    else:
        step_k = min(kept, TILE_ELEMENTS)
        step_n = max(1, TILE_ELEMENTS // step_k)
    for k0 in range(0, kept, step_k):
        yield slice(k0, min(k0 + step_k, kept)), [
            slice(n0, min(n0 + step_n, n)) for n0 in range(0, n, step_n)
        ]






def _line_state(view, axis, exact_lines=None):
    """``(max, count, rest)`` per line; see ``numpy.blocked`` for the two modes."""
    import torch

    dtype = view.dtype
    kept = view.shape[1 - axis]
    whole_lines = axis == 1 and view.shape[1] <= TILE_ELEMENTS and exact_lines is None
    maxes = torch.empty(kept, dtype=dtype) if whole_lines else torch.amax(view, dim=axis)
    count = torch.ones(kept, dtype=torch.float64)
    rest = torch.empty(kept, dtype=torch.float64)
    buffer = torch.empty(min(TILE_ELEMENTS, view.numel()), dtype=dtype)
    huge = torch.finfo(dtype).max
    for k, reduced in _tiles(view, axis):
        if exact_lines is not None and not bool(exact_lines[k].any()):
            continue
        if whole_lines:
            torch.amax(view[k], dim=1, out=maxes[k])
        line_max = maxes[k].unsqueeze(axis)
        if exact_lines is not None:
            # The generic path's shift: 0 for -inf, the largest float for +inf/NaN.
            finite = torch.where(torch.isfinite(line_max), line_max, torch.full_like(line_max, huge))
            shift = torch.where(line_max == -math.inf, torch.zeros_like(line_max), finite)
        else:
            shift = line_max
        partial_rest, partial_count = _Pairwise(), _Pairwise()
        for r in reduced:
            piece = _piece(view, axis, k, r)
            terms = buffer[: piece.numel()].view(piece.shape)
            torch.sub(piece, shift, out=terms)
            terms.exp_()
            if exact_lines is not None:
                at_max = piece == line_max
                terms.masked_fill_(at_max, 0.0)
                partial_count.add(at_max.sum(dim=axis, dtype=torch.float64))
            partial_rest.add(torch.sum(terms, dim=axis, dtype=torch.float64))
        total = partial_rest.total()
        if exact_lines is None:
            rest[k] = total - 1.0
        else:
            lines = exact_lines[k]
            rest[k] = torch.where(lines, total, rest[k])
            count[k] = torch.where(lines, partial_count.total(), count[k])
    return maxes, count, rest


def _state(call):
    import torch

    from lse_dispatch._state import LSEState

    view, axis = _layout(call)
    if view.dtype == torch.float64:
        recheck = torch.ones(view.shape[1 - axis], dtype=torch.bool)
        maxes, count, rest = _line_state(view, axis, exact_lines=recheck)
    else:
        maxes, count, rest = _line_state(view, axis)
        recheck = ~torch.isfinite(maxes) | (rest < _RECHECK_BELOW)
        if bool(recheck.any()):
            _, exact_count, exact_rest = _line_state(view, axis, exact_lines=recheck)
            count = torch.where(recheck, exact_count, count)
            rest = torch.where(recheck, exact_rest, rest)
    keep_shape = tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape))
    return LSEState(*(part.reshape(keep_shape) for part in (maxes, count, rest))), view, axis


# Inputs up to this many elements take the direct path (see numpy.blocked).
SMALL_ELEMENTS = 4096


def _small(call, op):
    """Small inputs in a few whole-tensor ops; ``None`` if a max is not finite.

    As in ``numpy.blocked``: the same state, and for finite maxima the finite
    branch of :func:`~lse_dispatch._state.finalize` written out.
    """
    import torch

    view, axis = _layout(call)
    lines = view if axis == 1 else view.t().contiguous()
    line_max = torch.amax(lines, dim=1, keepdim=True)
    if not bool(torch.isfinite(line_max).all()):
        return None
    at_max = lines == line_max
    terms = torch.exp(lines - line_max).masked_fill_(at_max, 0.0)
    rest = torch.sum(terms, dim=1, keepdim=True, dtype=torch.float64)
    count = at_max.sum(dim=1, keepdim=True, dtype=torch.float64)
    log_norm = torch.log1p((count - 1.0) + rest)
    dtype = call.plan.result
    if op == "logsumexp":
        keep_shape = tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape))
        value = (line_max + log_norm).to(dtype).reshape(keep_shape)
        return value, torch.ones(keep_shape, dtype=dtype)
    if op == "log_softmax":
        value = (lines - line_max).sub_(log_norm.to(lines.dtype))
    else:
        value = torch.exp((lines.to(torch.float64) - line_max).sub_(log_norm))
    value = value.to(dtype)
    return (value if axis == 1 else value.t()).reshape(call.shape)


def _logsumexp(call):
    from lse_dispatch._state import finalize

    if call.a.numel() <= SMALL_ELEMENTS:
        result = _small(call, "logsumexp")
        if result is not None:
            return result
    state, _, _ = _state(call)
    return finalize(call.xp, state, call.plan.result)


def _normalised(call, log: bool):
    import torch

    from lse_dispatch._state import log_softmax_from_state

    if call.a.numel() <= SMALL_ELEMENTS:
        result = _small(call, "log_softmax" if log else "softmax")
        if result is not None:
            return result
    state, view, axis = _state(call)
    m, count, rest = state
    if not bool(torch.isfinite(m).all()):
        value = log_softmax_from_state(call.xp, call.a, state, None)
        return (value if log else torch.exp(value)).to(call.plan.result)
    shape = (-1, 1) if axis == 1 else (1, -1)
    log_norm = torch.log1p((count - 1.0) + rest).reshape(shape)
    line_max = m.reshape(shape)
    out = torch.empty(call.shape, dtype=call.plan.result)
    out_view = out.view(view.shape)
    dtype = view.dtype
    # Same precision choices as the generic path; see numpy.blocked.
    wide = None
    if not log and dtype == torch.float32:
        wide = torch.empty(min(TILE_ELEMENTS, view.numel()), dtype=torch.float64)
    norm = log_norm.to(dtype) if log else log_norm
    wide_max = line_max.to(torch.float64)
    for k, reduced in _tiles(view, axis):
        tile_max = line_max[k] if axis == 1 else line_max[:, k]
        tile_norm = norm[k] if axis == 1 else norm[:, k]
        for r in reduced:
            piece = _piece(view, axis, k, r)
            target = _piece(out_view, axis, k, r)
            if wide is None:
                torch.sub(piece, tile_max, out=target)
                target.sub_(tile_norm)
                if not log:
                    target.exp_()
            else:
                exponent = wide[: piece.numel()].view(piece.shape)
                exponent.copy_(piece)
                exponent.sub_(wide_max[k] if axis == 1 else wide_max[:, k])
                exponent.sub_(tile_norm)
                exponent.exp_()
                target.copy_(exponent)
    return out


def _log_softmax(call):
    return _normalised(call, log=True)


def _softmax(call):
    return _normalised(call, log=False)


def _kernels():
    from lse_dispatch._dispatch import Kernel

    # Gradient kernels (autograd.Function) are to be listed before these.
    return (
        Kernel("logsumexp", "torch.blocked", _logsumexp, _declines),
        Kernel("softmax", "torch.blocked", _softmax, declines_also(_declines, FLOAT64_SOFTMAX, dtype="float64")),
        Kernel("log_softmax", "torch.blocked", _log_softmax, declines_also(_declines, LOG_SOFTMAX)),
    )


SPEC = BackendSpec(
    name="torch",
    module="torch",
    is_array=is_torch_array,
    namespace=_namespace,
    devices=_devices,
    dtypes=("float16", "bfloat16", "float32", "float64"),
    to_numpy=_to_numpy,
    # Derivative rules first: they take a call only while it is differentiated.
    kernels=(*_torch_grad.KERNELS, *_kernels()),
)

__all__ = ["SPEC", "TILE_ELEMENTS"]
