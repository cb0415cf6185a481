"""PyTorch: CPU, and CUDA when a GPU is present.

Native kernel ``torch.blocked`` (CPU, float32/float64, no ``b``/``where``, no
autograd): the shared (max, count, rest) state, computed tile by tile with
torch's own ops and ``out=`` buffers over cache-sized tiles, then finalised by
:mod:`lse_dispatch._state`.  As ``numpy.blocked`` (see
:mod:`lse_dispatch.backends.numpy` for why the fast total plus an exact
recheck of dominated lines equals the generic state): sums in float64, and
for logsumexp terms ``exp(x - m)`` in the input's dtype.

softmax and log_softmax (float32; float64 is left to the generic path's
compensated exponent) need terms of the *exact* difference ``x - m``: the
entry at a dominant max gets ``-log1p(rest)``, and ``exp`` of a rounded
difference ``d`` is ``|d| / 2`` ulps off.  The generic path forms them in
float64, whose ``exp`` costs four times torch's float32 one.  This kernel
recovers the rounding ``lo`` of ``d = fl(x - m)`` with TwoSum in float32 and
uses ``expf(d) * (1 + lo)`` (see :func:`_terms`), and the state pass also
fills the output (``d`` for log_softmax, the corrected ``exp(d)`` for
softmax), which a last pass then normalises.  Error bounds are in
:func:`_normalised`.

Inputs of at most 16 entries reduced whole run in Python floats
(:func:`_tiny`), those of at most 4096 in a few whole-tensor ops
(:func:`_small`), for the per-call overhead.

Kernel order in ``SPEC.kernels``: kernels for calls that need gradients
(``torch.autograd.Function`` based, from the gradients work) go *first* and
decline calls without gradients; ``torch.blocked`` declines every call where
autograd is active or a ``torch.func`` transform wraps the input, so the two
never compete, and no differentiated call reaches the Python-float path.
"""

from __future__ import annotations

import math

from array_api_compat import is_torch_array

from . import _torch_grad, _torch_triton
from ._blocked import Pairwise as _Pairwise
from ._blocked import kernels as _blocked_kernels
from ._blocked import piece as _piece
from ._spec import BackendSpec, Device


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


# Elements per tile.  A tile and its buffers stay in the caches between the ops
# that make its terms, so that only the first read of a tile goes to memory;
# and torch's reductions with ``dtype=float64`` copy their input to float64
# internally, into fresh (page-faulting) memory when the piece is large.
# Measured on the 2-core machine, quiet, the logsumexp state of (4096, 4096)
# along axis -1: tiles of 2**24 elements 52 ms, 2**22 84 ms, 2**20 19 ms,
# 2**18 28 ms, 2**16 42 ms (torch.logsumexp 34 ms); softmax, whose tiles have
# three buffers: 2**22 108 ms, 2**20 55 ms, 2**18 49 ms (torch.softmax 22 ms).
# Every op on a tile ends in a barrier of torch's thread pool, which costs
# milliseconds when other processes hold the cores (softmax with 2**20 took
# 285 ms, with 2**18 361 ms, under a load average of 6), so 2**20 for both.
TILE_ELEMENTS = 1 << 20
# Inputs up to SERIAL_INPUT_ELEMENTS go in tiles of SERIAL_TILE_ELEMENTS: torch
# runs an op on at most 32768 elements (its grain size) on the calling thread,
# without a parallel region, which costs milliseconds whenever a thread of the
# pool has to wait for a core on a busy machine.
SERIAL_INPUT_ELEMENTS = 1 << 17
SERIAL_TILE_ELEMENTS = 1 << 15
# float32 lines whose fast total is below 1 + this are recomputed exactly.
_RECHECK_BELOW = 2.0**-20


def _reduced_axis(call) -> int | None:
    """1 if the reduced axes are the trailing ones, 0 if the leading ones, else ``None``.

    From the shapes alone (no tensor op): the declines run on every call.
    """
    axes, ndim = call.axes, call.a.ndim
    if axes == tuple(range(ndim - len(axes), ndim)):
        return 1
    if axes == tuple(range(len(axes))):
        return 0
    return None


def _layout(call):
    """``(view, axis)``: the contiguous input as 2-D with the reduced axes as one."""
    a, axis = call.a, _reduced_axis(call)
    n = math.prod(a.shape[ax] for ax in call.axes)
    return (a.reshape(-1, n), 1) if axis == 1 else (a.reshape(n, -1), 0)


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
    if _reduced_axis(call) is None or not a.is_contiguous():
        return "layout: reduced axes are not the leading or trailing axes of a contiguous tensor"
    return None


def _tile_elements(view, accurate) -> int:
    """Elements per tile of ``view`` (``accurate``: the terms of :func:`_terms`, three buffers)."""
    return SERIAL_TILE_ELEMENTS if view.numel() <= SERIAL_INPUT_ELEMENTS else TILE_ELEMENTS


def _tiles(view, axis, accurate):
    n, kept = view.shape[axis], view.shape[1 - axis]
    size = _tile_elements(view, accurate)
    if axis == 1:
        step_n = min(n, size)
        step_k = max(1, size // step_n)
    else:
        step_k = min(kept, size)
        step_n = max(1, size // step_k)
    for k0 in range(0, kept, step_k):
        yield slice(k0, min(k0 + step_k, kept)), [
            slice(n0, min(n0 + step_n, n)) for n0 in range(0, n, step_n)
        ]


class _Work:
    """Tile-sized scratch buffers, handed out as views shaped like a piece."""

    def __init__(self, view, count, accurate, wide=False):
        import torch

        size = min(_tile_elements(view, accurate), view.numel())
        self._buffers = [torch.empty(size, dtype=view.dtype) for _ in range(count)]
        #: A float64 buffer for float64 terms of float32 input, or ``None``.
        self.wide = torch.empty(size, dtype=torch.float64) if wide else None

    def __call__(self, index, piece):
        return self._buffers[index][: piece.numel()].view(piece.shape)


def _terms(piece, shift, work, accurate, keep=None, keep_difference=False):
    """``(exp(piece - shift), correction)`` for one piece.

    Without ``accurate`` the correction is ``None`` and the terms are ``exp``
    of the rounded difference, as on the generic path for logsumexp.  With
    it, ``lo``, the rounding error of ``d = fl(piece - shift)``, is recovered
    exactly by Knuth's TwoSum (five float32 ops: ``d + lo = piece - shift``)
    and the correction is ``exp(d) * lo``, so that ``exp(d) + correction`` is
    ``exp(piece - shift)`` to within expf's own error: ``exp(d + lo) =
    exp(d) (1 + lo + lo**2 / 2 ...)`` and ``|lo| <= 2**-24 |d| < 2**-17``
    wherever ``exp(d)`` is a normal float32.  Non-finite entries (``-inf``
    in a finite line) make ``lo`` NaN; their correction is set to 0.

    ``keep``: the output piece.  With ``keep_difference`` ``d`` is written
    there (log_softmax: the output is ``d - log_norm``), otherwise the
    corrected term ``exp(d) + correction`` (softmax: the output is that
    times ``1 / (count + rest)``).
    """
    import torch

    if work.wide is not None:
        # float64 terms: the difference is exact and float64 exp within an
        # ulp of float64 (the exact recheck of lines near a cancellation).
        difference = work.wide[: piece.numel()].view(piece.shape)
        # Widen first: torch.sub(..., out=) would subtract in float32.
        difference.copy_(piece).sub_(shift)
        return difference.exp_(), None
    difference = keep if keep_difference else work(0, piece)
    torch.sub(piece, shift, out=difference)
    if not accurate:
        return difference.exp_(), None
    back, low = work(1, piece), work(2, piece)
    torch.sub(difference, piece, out=back)  # b' = d - a, the -shift that was added
    torch.sub(difference, back, out=low)  # a' = d - b'
    torch.sub(piece, low, out=low)  # a - a'
    back.add_(shift)  # b' - b
    low.sub_(back)  # lo = (a - a') + (b - b')
    terms = torch.exp(difference, out=work(0, piece)) if keep_difference else difference.exp_()
    correction = low.mul_(terms).nan_to_num_(nan=0.0)
    if keep is not None and not keep_difference:
        torch.add(terms, correction, out=keep)
    return terms, correction


def _line_state(view, axis, exact_lines=None, accurate=False, keep=None, keep_difference=False, wide=False):
    """``(max, count, rest)`` per line; see ``numpy.blocked`` for the two modes.

    ``accurate``: terms of the exact difference (see :func:`_terms`).
    ``keep``: the output as a view like ``view``, filled in the fast mode
    (see :func:`_terms`).  ``wide``: float64 terms of float32 input.
    """
    import torch

    dtype = view.dtype
    kept = view.shape[1 - axis]
    whole_lines = axis == 1 and view.shape[1] <= _tile_elements(view, accurate) and exact_lines is None
    maxes = torch.empty(kept, dtype=dtype) if whole_lines else torch.amax(view, dim=axis)
    count = torch.ones(kept, dtype=torch.float64)
    rest = torch.empty(kept, dtype=torch.float64)
    wide = wide and dtype != torch.float64
    # float64 terms need only the wide buffer (see _terms).
    work = _Work(view, 0 if wide else 3 if accurate else 1, accurate, wide=wide)
    huge = torch.finfo(dtype).max
    for k, reduced in _tiles(view, axis, accurate):
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
            target = None if keep is None or exact_lines is not None else _piece(keep, axis, k, r)
            terms, correction = _terms(piece, shift, work, accurate, target, keep_difference)
            if exact_lines is not None:
                at_max = piece == line_max
                terms.masked_fill_(at_max, 0.0)
                partial_count.add(at_max.sum(dim=axis, dtype=torch.float64))
            total = torch.sum(terms, dim=axis, dtype=torch.float64)
            if correction is not None:
                # Small next to the total: a float32 sum is accurate enough.
                total += torch.sum(correction, dim=axis)
            partial_rest.add(total)
        total = partial_rest.total()
        if exact_lines is None:
            rest[k] = total - 1.0
        else:
            lines = exact_lines[k]
            rest[k] = torch.where(lines, total, rest[k])
            count[k] = torch.where(lines, partial_count.total(), count[k])
    return maxes, count, rest


def _state(call, accurate=False, keep=None, keep_difference=False, cancelling=False):
    """The call's state (keepdims shape), ``view`` and ``axis``.

    float32 lines are computed in the fast mode, then rechecked exactly (max
    masked out, float64 terms) where the max is not finite, where ``rest`` is
    tiny next to 1 (see ``numpy.blocked``) and, with ``cancelling``, where
    ``lse = m + log1p(rest)`` may cancel: float32 terms put a relative error
    ``delta <= 2 u 2**-24`` on ``rest`` (see :func:`_normalised`), so an
    absolute error ``delta * min(log1p(rest), 1)`` on ``lse``, which is at
    most ``2u`` ulps of ``lse`` where ``|lse| >= min(log1p(rest), 1)``.
    The other lines (``|lse|`` below that, as for normalised log-probabilities)
    are rechecked.
    """
    import torch

    from lse_dispatch._state import LSEState

    view, axis = _layout(call)
    if view.dtype == torch.float64:
        recheck = torch.ones(view.shape[1 - axis], dtype=torch.bool)
        maxes, count, rest = _line_state(view, axis, exact_lines=recheck, accurate=accurate)
    else:
        maxes, count, rest = _line_state(view, axis, accurate=accurate, keep=keep, keep_difference=keep_difference)
        recheck = ~torch.isfinite(maxes) | (rest < _RECHECK_BELOW)
        if cancelling:
            log_norm = torch.log1p(rest)
            recheck |= (maxes + log_norm).abs() < torch.clamp(log_norm, max=1.0)
        if bool(recheck.any()):
            _, exact_count, exact_rest = _line_state(view, axis, exact_lines=recheck, accurate=accurate, wide=True)
            count = torch.where(recheck, exact_count, count)
            rest = torch.where(recheck, exact_rest, rest)
    keep_shape = tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape))
    return LSEState(*(part.reshape(keep_shape) for part in (maxes, count, rest))), view, axis


# Inputs up to this many elements take the direct path (see numpy.blocked).
SMALL_ELEMENTS = 4096


def _small(call, op):
    """Small inputs in a few whole-tensor ops; ``None`` if a max is not finite.

    As in ``numpy.blocked``: the same state, and for finite maxima the finite
    branch of :func:`~lse_dispatch._state.finalize` written out.  softmax and
    log_softmax (float32 only: the kernel declines them for float64), and
    logsumexp of float32, form the terms from the float64 difference, which
    is exact.
    """
    import torch

    view, axis = _layout(call)
    lines = view if axis == 1 else view.t().contiguous()
    line_max = torch.amax(lines, dim=1, keepdim=True)
    if not bool(torch.isfinite(line_max).all()):
        return None
    at_max = lines == line_max
    # float64 terms of the exact difference (a logsumexp near a cancellation
    # needs them as much as softmax does; see _state).
    wide = lines.to(torch.float64)
    terms = torch.exp(wide - line_max).masked_fill_(at_max, 0.0)
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
        value = torch.exp((wide - line_max).sub_(log_norm))
    value = value.to(dtype)
    return (value if axis == 1 else value.t()).reshape(call.shape)


# A reduction over all of at most this many elements runs in Python floats.
TINY_ELEMENTS = 16


def _tiny(call, op):
    """One short line in Python floats; ``None`` unless every entry is finite.

    As ``numpy.blocked``'s: the same state with ``math.fsum`` (correctly
    rounded) for the sums, every difference ``x - m`` exact in a Python float
    (float32 inputs) and ``exp`` in float64.  Only plain CPU tensors reach
    it: the kernel declines autograd, ``torch.func`` and other devices.
    """
    import numpy as np
    import torch

    a = call.a
    values = (a if a.ndim == 1 else a.reshape(-1)).tolist()
    if not all(map(math.isfinite, values)):
        return None
    top = max(values)
    dtype = call.plan.result
    # Through NumPy: a third of torch.tensor's cost on ten floats.
    numpy_dtype = np.float32 if dtype == torch.float32 else np.float64
    if op == "softmax":
        # float32 only (the kernel declines float64 softmax): float64 terms
        # over their correctly rounded sum are far inside a float32 ulp.
        terms = [math.exp(v - top) for v in values]
        total = math.fsum(terms)
        out = torch.from_numpy(np.array([term / total for term in terms], numpy_dtype))
        return out if a.ndim == 1 else out.reshape(a.shape)
    count = values.count(top)
    log_norm = math.log1p((count - 1) + math.fsum([math.exp(v - top) for v in values if v != top]))
    if op == "logsumexp":
        shape = (1,) * a.ndim
        return torch.from_numpy(np.full(shape, top + log_norm, numpy_dtype)), torch.ones(shape, dtype=dtype)
    out = torch.from_numpy(np.array([(v - top) - log_norm for v in values], numpy_dtype))
    return out if a.ndim == 1 else out.reshape(a.shape)


def _logsumexp(call):
    import torch

    from lse_dispatch._state import finalize

    size = call.a.numel()
    if size <= TINY_ELEMENTS and len(call.axes) == call.a.ndim:
        result = _tiny(call, "logsumexp")
        if result is not None:
            return result
    if size <= SMALL_ELEMENTS:
        result = _small(call, "logsumexp")
        if result is not None:
            return result
    state, _, _ = _state(call, accurate=True, cancelling=True)
    m, count, rest = state
    if bool(torch.isfinite(m).all()):
        # The finite branch of finalize, written out (as in _small): the
        # shared function is some twenty ops, a cost on inputs like (64, 1000).
        dtype = call.plan.result
        return (m + torch.log1p((count - 1.0) + rest)).to(dtype), torch.ones(m.shape, dtype=dtype)
    return finalize(call.xp, state, call.plan.result)


def _normalised(call, log: bool):
    """float32 log_softmax or softmax; the state pass fills the output.

    Error bounds, with ``u`` the error of torch's float32 ``exp`` in ulps
    (Sleef's ``expf``: documented at most 1.0; measured at most 0.57 over
    8.4e7 points of [-104, 0]) and each float32 rounding at most ``2**-24``
    relative.  A relative error ``k 2**-24`` of a result is at most ``k``
    ulps of it (a float32 ulp is at least ``2**-24`` of the value).  The
    terms of ``rest`` are ``expf(d) + expf(d) lo`` summed in float64 (the
    ``lo**2`` term and the float32 sum of the corrections are below
    ``2**-30`` relative): ``rest`` is within ``2u 2**-24`` relative.

    log_softmax: the state pass writes ``d = fl(x - m)`` into the output,
    then ``fl(d - fl32(log_norm))``, ``log_norm = log1p(count - 1 + rest)``
    in float64.  Both terms are <= 0, so their roundings (half an ulp of
    each) and the last one cost at most 1.5 ulps of the result, and
    ``log_norm`` carries ``rest``'s relative error at most (``r / ((1 + r)
    log1p(r)) <= 1``): at most ``1.5 + 2u`` ulps, 2.6 with the measured ``u``
    and 3.5 with the documented one.  The entry at a dominant max gets
    ``-fl32(log_norm)``: at most ``0.5 + 2u``.

    softmax: the state pass writes ``e' = fl(expf(d) + expf(d) lo)``
    (``2u + 1``), the last pass ``fl(e' fl32(1 / (count + rest)))``:
    ``count + rest`` off by at most ``2u`` (its max entries are exact), the
    rounded reciprocal by 1, the product by half an ulp.  At most ``2.5 + 4u``
    ulps: 4.8 with the measured ``u`` (6.5 with the documented one), so
    above the contract's 4 in the worst case, where every one of these
    independent roundings would have to reach its bound with the same sign.
    Largest error measured against the mpmath oracle: 2.7 ulps (six sets
    of 150,000-200,000 entries: normal, uniform and offset rows, axis -1 and 0;
    tests/test_torch_blocked.py holds every kernel path to 4).  The generic
    path's float64 exponent is within about 0.5 ulp, at four times the
    cost of float32 ``exp``.
    """
    import torch

    from lse_dispatch._state import log_softmax_from_state

    size = call.a.numel()
    op = "log_softmax" if log else "softmax"
    if size <= TINY_ELEMENTS and len(call.axes) == call.a.ndim:
        result = _tiny(call, op)
        if result is not None:
            return result
    if size <= SMALL_ELEMENTS:
        result = _small(call, op)
        if result is not None:
            return result
    out = torch.empty(call.shape, dtype=call.plan.result)
    view, axis = _layout(call)
    out_view = out.view(view.shape)
    state, view, axis = _state(call, accurate=True, keep=out_view, keep_difference=log)
    m, count, rest = state
    if not bool(torch.isfinite(m).all()):
        value = log_softmax_from_state(call.xp, call.a, state, None)
        return (value if log else torch.exp(value)).to(call.plan.result)
    shape = (-1, 1) if axis == 1 else (1, -1)
    if log:
        norm = torch.log1p((count - 1.0) + rest).reshape(shape).to(out.dtype)
    else:
        norm = (1.0 / (count + rest)).reshape(shape).to(out.dtype)
    normalise = torch.Tensor.sub_ if log else torch.Tensor.mul_
    if view.numel() > SERIAL_INPUT_ELEMENTS:
        normalise(out_view, norm)  # one pass, one parallel region
        return out
    for k, reduced in _tiles(view, axis, True):  # serial pieces, no parallel region
        tile_norm = norm[k] if axis == 1 else norm[:, k]
        for r in reduced:
            normalise(_piece(out_view, axis, k, r), tile_norm)
    return out


def _kernels():
    # Gradient kernels (autograd.Function) are to be listed before these.
    return _blocked_kernels("torch.blocked", _logsumexp, _normalised, _declines)


SPEC = BackendSpec(
    name="torch",
    module="torch",
    is_array=is_torch_array,
    namespace=_namespace,
    devices=_devices,
    dtypes=("float16", "bfloat16", "float32", "float64"),
    to_numpy=_to_numpy,
    # Derivative rules first: they take a call only while it is differentiated.
    kernels=(*_torch_triton.KERNELS, *_torch_grad.KERNELS, *_kernels()),
)

__all__ = ["SPEC", "TILE_ELEMENTS"]
