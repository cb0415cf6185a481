"""NumPy: the reference CPU backend.

Native kernel ``numpy.blocked``: the same (max, count, rest) state as the
generic path, computed tile by tile over cache-sized pieces with ``out=``
buffers, so that each piece is read from memory once for the sums and the
extra memory is a few hundred KiB whatever the input's size.  Finalisation and
the limit rules (``+inf``, ``-inf``, NaN) are the shared functions of
:mod:`lse_dispatch._state`.

Why it is as accurate as the generic path: terms ``exp(x - m)`` are formed in
the input's dtype exactly as the generic path forms them, and summed in the
same accumulator (float64).  The fast pass sums all terms, the entries at the
max included (each contributes exactly 1), and takes ``count = 1``,
``rest = total - 1``, which gives the same ``count - 1 + rest``.  That loses
``rest`` to rounding only when it is tiny next to 1, so every line whose total
is below ``1 + 2**-20``, and every line whose max is not finite, is recomputed
exactly, with the entries at the max masked out and counted, as in the generic
path.  float64 input has no wider accumulator, so it always takes the exact
mode.
"""

from __future__ import annotations

import math

from array_api_compat import is_numpy_array

from ._blocked import Pairwise as _Pairwise
from ._blocked import piece as _piece
from ._spec import FLOAT64_LOG_SOFTMAX, FLOAT64_SOFTMAX, BackendSpec, Device, declines_also


def _namespace():
    import array_api_compat.numpy as xp

    return xp


def _to_numpy(x):
    import numpy as np

    return np.asarray(x)


# Elements per tile: a float32 tile (512 KiB) stays inside a 1 MiB L2; larger
# tiles make the per-call overhead of NumPy negligible (measured: 2**15 -> 2**17
# took logsumexp of (4096, 4096) from 1.3x to 1.2x a bare np.exp).
TILE_ELEMENTS = 1 << 17
# float32 lines whose fast total is below 1 + this are recomputed with the max
# masked out: above it, the float64 rounding of 1 + rest costs rest less than
# 2**-29 of its float32 ulp.
_RECHECK_BELOW = 2.0**-20


def _layout(call):
    """``(view, reduced_axis)``: the input as 2-D with the reduced axes as one.

    Works without a copy when the reduced axes are the trailing or the
    leading axes of a C-contiguous array; otherwise ``None``.
    """
    a, axes, ndim = call.a, call.axes, call.a.ndim
    if not a.flags.c_contiguous:
        return None
    n = math.prod(a.shape[ax] for ax in axes)
    if axes == tuple(range(ndim - len(axes), ndim)):
        return a.reshape(-1, n), 1
    if axes == tuple(range(len(axes))):
        return a.reshape(n, -1), 0
    return None


def _declines(call) -> str | None:
    import numpy as np

    if call.b is not None:
        return "b given"
    if call.where is not None:
        return "where given"
    if call.plan.is_complex:
        return "complex input"
    a = call.a
    if isinstance(a, (np.ma.MaskedArray, np.matrix)):
        return f"{type(a).__name__} (masks and matrix semantics are not the kernel's)"
    if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64):
        return f"dtype {a.dtype} (kernel takes float32, float64)"
    if call.plan.compute != a.dtype or a.shape != call.shape:
        return "input needs a cast or a broadcast"
    if not call.axes:
        return "nothing reduced"
    if a.size == 0:
        return "empty input"
    if _layout(call) is None:
        return "layout: reduced axes are not the leading or trailing axes of a C-contiguous array"
    return None


def _tiles(view, axis):
    """Yield ``(kept_slice, reduced_slice)`` pairs covering ``view`` in tiles."""
    n, kept = view.shape[axis], view.shape[1 - axis]
    if axis == 1:  # lines are contiguous: whole lines per tile when they fit
        step_n = min(n, TILE_ELEMENTS)
        step_k = max(1, TILE_ELEMENTS // step_n)
    else:  # rows of the kept axis are contiguous: whole rows per tile when they fit
        step_k = min(kept, TILE_ELEMENTS)
        step_n = max(1, TILE_ELEMENTS // step_k)
    for k0 in range(0, kept, step_k):
        yield slice(k0, min(k0 + step_k, kept)), [
            slice(n0, min(n0 + step_n, n)) for n0 in range(0, n, step_n)
        ]






def _line_state(view, axis, exact_lines=None, wide_terms=False):
    """``(max, count, rest)`` per line of ``view`` along ``axis`` (1-D arrays).

    With ``exact_lines`` (a boolean mask of lines), only those lines are
    computed, in the exact mode; otherwise all lines in the fast mode.
    ``wide_terms``: float32 terms ``exp(x - m)`` from the float64 difference
    (for log_softmax and softmax; logsumexp = m + log1p(rest) does not need it).
    """
    import numpy as np

    dtype = view.dtype
    kept = view.shape[1 - axis]
    whole_lines = axis == 1 and view.shape[1] <= TILE_ELEMENTS
    m = None if whole_lines else view.max(axis=axis)
    if m is None and exact_lines is not None:
        m = view.max(axis=axis)
    maxes = np.empty(kept, dtype) if m is None else m
    count = np.ones(kept, np.float64)
    rest = np.empty(kept, np.float64)
    buffer = np.empty(TILE_ELEMENTS, dtype)
    spare = np.empty(TILE_ELEMENTS, dtype) if (axis == 0 and dtype == np.float64) else None
    wide_buffer = buffer if dtype == np.float64 else np.empty(TILE_ELEMENTS, np.float64)
    mask = np.empty(TILE_ELEMENTS, bool) if exact_lines is not None else None
    huge = np.finfo(dtype).max
    for k, reduced in _tiles(view, axis):
        if exact_lines is not None and not exact_lines[k].any():
            continue
        if m is None:
            np.maximum.reduce(view[k], axis=1, out=maxes[k])
        line_max = maxes[k]
        if exact_lines is not None:
            # The generic path's shift: 0 for -inf, the largest float for +inf/NaN.
            shift = np.where(line_max == -np.inf, 0, np.where(np.isfinite(line_max), line_max, huge)).astype(dtype)
        else:
            shift = line_max
        shift = shift[:, None] if axis == 1 else shift[None, :]
        at_max_value = line_max[:, None] if axis == 1 else line_max[None, :]
        partial_rest, partial_count = _Pairwise(), _Pairwise()
        for r in reduced:
            piece = _piece(view, axis, k, r)
            if dtype == np.float64 or not wide_terms:
                terms = buffer[: piece.size].reshape(piece.shape)
                np.subtract(piece, shift, out=terms)
            else:
                # float32: x - m in float64, where it is exact; exp of the
                # float32 difference would be |x - m| / 2 ulps off, and the
                # max's log_softmax, -log1p(rest), with it.
                terms = wide_buffer[: piece.size].reshape(piece.shape)
                np.subtract(piece, shift, out=terms, dtype=np.float64)
            np.exp(terms, out=terms)
            if exact_lines is not None:
                at_max = mask[: piece.size].reshape(piece.shape)
                np.equal(piece, at_max_value, out=at_max)
                np.copyto(terms, 0, where=at_max)
                partial_count.add(np.count_nonzero(at_max, axis=axis).astype(np.float64))
            if axis == 0 and dtype == np.float64:
                # NumPy adds the rows of a reduction over axis 0 one after
                # another; without a wider accumulator, sum the transposed
                # tile along its contiguous last axis, which NumPy does pairwise.
                transposed = spare[: piece.size].reshape(piece.shape[::-1])
                np.copyto(transposed, terms.T)
                partial_rest.add(np.add.reduce(transposed, axis=1))
            else:
                # Cast, then reduce: NumPy's casting reductions crawl over
                # many short lines (measured 250 us for a (128, 128) tile).
                wide = terms
                if terms.dtype != np.float64:
                    wide = wide_buffer[: piece.size].reshape(piece.shape)
                    np.copyto(wide, terms)
                partial_rest.add(np.add.reduce(wide, axis=axis))
        total = partial_rest.total()
        if exact_lines is None:
            rest[k] = total - 1.0
        else:
            lines = exact_lines[k]
            rest[k][lines] = total[lines]
            count[k][lines] = partial_count.total()[lines]
    return maxes, count, rest


def _state(call, wide_terms=False):
    """The call's :class:`LSEState` (keepdims shape), computed tile by tile."""
    import numpy as np

    from lse_dispatch._state import LSEState

    view, axis = _layout(call)
    with np.errstate(over="ignore", invalid="ignore"):
        if view.dtype == np.float64:
            # No wider accumulator: always mask the max out, as the generic path.
            recheck = np.ones(view.shape[1 - axis], bool)
            maxes, count, rest = _line_state(view, axis, exact_lines=recheck)
        else:
            maxes, count, rest = _line_state(view, axis, wide_terms=wide_terms)
            recheck = ~np.isfinite(maxes) | (rest < _RECHECK_BELOW)
        if recheck.any() and view.dtype != np.float64:
            _, exact_count, exact_rest = _line_state(view, axis, exact_lines=recheck, wide_terms=wide_terms)
            count = np.where(recheck, exact_count, count)
            rest = np.where(recheck, exact_rest, rest)
    keep_shape = tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape))
    return LSEState(*(part.reshape(keep_shape) for part in (maxes, count, rest))), view, axis


# Inputs up to this many elements take the direct path: a handful of whole-array
# NumPy calls, no tiles, so that a call on 10 entries costs microseconds.
SMALL_ELEMENTS = 4096


def _small(call, op):
    """Small inputs in one go; ``None`` if a max is not finite (then tiles + shared limits).

    The same state as everywhere (entries at the max masked out and counted,
    float64 sums), and for finite maxima the finite branch of
    :func:`~lse_dispatch._state.finalize` written out: ``m + log1p(count - 1
    + rest)`` with sign 1 (no weights, so the sum is positive).
    """
    import numpy as np

    view, axis = _layout(call)
    # Lines contiguous and last: NumPy sums them pairwise.
    lines = view if axis == 1 else np.ascontiguousarray(view.T)
    line_max = np.maximum.reduce(lines, axis=1, keepdims=True)
    if not np.isfinite(line_max).all():
        return None
    # log_softmax and softmax: float32 x - m in float64, where it is exact
    # (see _line_state's wide_terms).
    terms = np.exp((lines if op == "logsumexp" else lines.astype(np.float64)) - line_max)
    at_max = lines == line_max
    terms[at_max] = 0.0
    rest = np.add.reduce(terms.astype(np.float64), axis=1, keepdims=True)
    count = np.count_nonzero(at_max, axis=1, keepdims=True)
    log_norm = np.log1p((count - 1.0) + rest)
    keep_shape = tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape))
    dtype = call.plan.result
    if op == "logsumexp":
        value = (line_max + log_norm).astype(dtype).reshape(keep_shape)
        return value, np.ones(keep_shape, dtype)
    if op == "log_softmax":
        value = (lines - line_max) - log_norm.astype(lines.dtype)
    else:
        value = np.exp((lines - line_max.astype(np.float64)) - log_norm)
    value = value.astype(dtype, copy=False)
    return (value if axis == 1 else value.T).reshape(call.shape)


# A reduction over all of at most this many elements runs in Python floats.
TINY_ELEMENTS = 16


def _tiny(call, op):
    """One short line in Python floats; ``None`` unless every entry is finite.

    The same state -- max ``m``, ``count`` of entries at it, ``rest`` of the
    others' ``exp(x - m)`` -- with ``math.fsum`` (correctly rounded) for the
    sums, and ``m + log1p(count - 1 + rest)`` for finite entries.  A call on
    ten entries then costs a few microseconds more than NumPy's own
    functions, where a dozen NumPy calls on tiny arrays cost tens.
    """
    import numpy as np

    a = call.a
    values = a.ravel().tolist()
    if not all(map(math.isfinite, values)):
        return None
    top = max(values)
    count = values.count(top)
    log_norm = math.log1p((count - 1) + math.fsum([math.exp(v - top) for v in values if v != top]))
    dtype = call.plan.result
    if op == "logsumexp":
        shape = (1,) * a.ndim
        return np.full(shape, top + log_norm, dtype), np.ones(shape, dtype)
    shifted = [(v - top) - log_norm for v in values]
    if op == "softmax":
        shifted = list(map(math.exp, shifted))
    return np.array(shifted, dtype).reshape(a.shape)


def _logsumexp(call):
    import numpy as np

    from lse_dispatch._state import finalize

    if call.a.size <= TINY_ELEMENTS and len(call.axes) == call.a.ndim:
        result = _tiny(call, "logsumexp")
        if result is not None:
            return result

    if call.a.size <= SMALL_ELEMENTS:
        with _quiet():
            result = _small(call, "logsumexp")
        if result is not None:
            return result
    state, _, _ = _state(call)
    m, count, rest = state
    if np.isfinite(m).all():
        # The finite branch of finalize, written out (see _small): the shared
        # function costs tens of microseconds in small NumPy calls.
        dtype = call.plan.result
        return (m + np.log1p((count - 1.0) + rest)).astype(dtype), np.ones(m.shape, dtype)
    return finalize(call.xp, state, call.plan.result)


def _quiet():
    import numpy as np

    return np.errstate(over="ignore", under="ignore", invalid="ignore")


def _normalised(call, log: bool):
    """log_softmax or softmax from the state, tile by tile into the output."""
    import numpy as np

    from lse_dispatch._state import log_softmax_from_state

    if call.a.size <= TINY_ELEMENTS and len(call.axes) == call.a.ndim:
        result = _tiny(call, "log_softmax" if log else "softmax")
        if result is not None:
            return result
    if call.a.size <= SMALL_ELEMENTS:
        with _quiet():
            result = _small(call, "log_softmax" if log else "softmax")
        if result is not None:
            return result
    state, view, axis = _state(call, wide_terms=True)
    m, count, rest = state
    if not np.all(np.isfinite(m)):
        # Infinite or NaN maxima: the shared limit rules, on the whole array.
        value = log_softmax_from_state(call.xp, call.a, state, None)
        return (value if log else np.exp(value)).astype(call.plan.result)
    shape = (-1, 1) if axis == 1 else (1, -1)
    log_norm = np.log1p((count - 1.0) + rest).reshape(shape)
    line_max = m.reshape(shape)
    out = np.empty(call.shape, call.plan.result)
    out_view = out.reshape(view.shape)
    dtype = view.dtype
    wide = np.empty(TILE_ELEMENTS, np.float64) if (not log and dtype == np.float32) else None
    # log_softmax: (x - m) - log_norm, both terms <= 0, so no cancellation: at
    # most 1.5 ulps in the input's dtype, as in the generic path.  softmax of
    # float32: the exponent in float64, as the generic path forms it (exp of a
    # float32 exponent would be off by |x - m| ulps), with two subtractions,
    # since m + log_norm could round log_norm away next to a huge m.
    norm = log_norm.astype(dtype) if log else log_norm
    wide_max = line_max.astype(np.float64)
    with np.errstate(over="ignore", under="ignore"):
        for k, reduced in _tiles(view, axis):
            tile_max = line_max[k] if axis == 1 else line_max[:, k]
            tile_norm = norm[k] if axis == 1 else norm[:, k]
            for r in reduced:
                piece = _piece(view, axis, k, r)
                target = _piece(out_view, axis, k, r)
                if wide is None:
                    np.subtract(piece, tile_max, out=target)
                    np.subtract(target, tile_norm, out=target)
                    if not log:
                        np.exp(target, out=target)
                else:
                    exponent = wide[: piece.size].reshape(piece.shape)
                    np.subtract(piece, wide_max[k] if axis == 1 else wide_max[:, k], out=exponent)
                    np.subtract(exponent, tile_norm, out=exponent)
                    np.exp(exponent, out=exponent)
                    np.copyto(target, exponent, casting="same_kind")
    return out


def _log_softmax(call):
    return _normalised(call, log=True)


def _softmax(call):
    return _normalised(call, log=False)


def _kernels():
    from lse_dispatch._dispatch import Kernel

    return (
        Kernel("logsumexp", "numpy.blocked", _logsumexp, _declines),
        Kernel("softmax", "numpy.blocked", _softmax, declines_also(_declines, FLOAT64_SOFTMAX, dtype="float64")),
        Kernel("log_softmax", "numpy.blocked", _log_softmax, declines_also(_declines, FLOAT64_LOG_SOFTMAX, dtype="float64")),
    )


SPEC = BackendSpec(
    name="numpy",
    module="numpy",
    is_array=is_numpy_array,
    namespace=_namespace,
    devices=lambda: [Device("cpu", "cpu")],
    dtypes=("float16", "float32", "float64"),
    to_numpy=_to_numpy,
    kernels=_kernels(),
)

__all__ = ["SPEC", "TILE_ELEMENTS"]
