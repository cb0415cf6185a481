"""NumPy: the reference CPU backend.

Native kernel ``numpy.blocked``: the same (max, count, rest) state as the
generic path, computed tile by tile over cache-sized pieces with ``out=``
buffers, so that each piece is read from memory once for the sums and the
extra memory is a few MiB whatever the input's size.  Finalisation and the
limit rules (``+inf``, ``-inf``, NaN) are the shared functions of
:mod:`lse_dispatch._state`.

Terms, for float32 input: ``exp`` in float64, of ``x`` itself or of the
float64 difference ``x - m`` (exact there), summed in float64.  Not float32
``exp``: NumPy's float32 ``exp`` was measured (every float32 in
``[-87.34, 0]``, AVX-512 build) at most 2.54 ulps and ``3.57 * 2**-24``
relative off, and a float32 difference ``x - m`` adds ``|x - m| * 2**-24``.
The state carries such a relative error of its terms into the absolute
error of ``log1p(rest)``, and every result inherits that: ``logsumexp``
where ``m + log1p(rest)`` cancels to near 0 (``[-1, c, c]`` with
``1 + 2 exp(c + 1) = e``: float32 terms gave 1.4e8 ulps, float64 terms 0.4),
``log_softmax`` where ``x - m`` and ``log1p(rest)`` nearly cancel, and each
softmax entry (up to 3.57 ulps on top of its own rounding).  A float32
``exp(t_hi) * (1 + t_lo)`` of a compensated exponent would fit the output
pass of softmax alone (2.54 + 0.5 ulps), but on these 2^17-element tiles the
TwoSum passes it needs cost as much as the float64 ``exp`` they replace
(measured 171 us against 128 us per tile), so every path uses float64 terms,
and NumPy's float64 ``exp`` (under an ulp of float64, 2**-29 of a float32
ulp) needs no accuracy check at import on any CPU.

* Unshifted terms: lines whose max lies in ``[-550, 600]`` take ``exp(x)``
  and scale the sums by ``exp(-m)``, which saves the float64 subtraction;
  the relative error of the state stays a few float64 ulps.
* The fast pass sums all terms, the entries at the max included (each
  contributes 1), and takes ``count = 1``, ``rest = total - 1``, which gives
  the same ``count - 1 + rest``.  That loses ``rest`` to rounding only when
  it is tiny next to 1, so every line whose total is below ``1 + 2**-20``,
  and every line whose max is not finite, is recomputed exactly, with the
  entries at the max masked out and counted, as in the generic path
  (``rest`` then keeps a relative error of about ``2**-32``, 2**-8 of a
  float32 ulp).  float64 input has no wider accumulator, so it always takes
  the exact mode (and float64 softmax/log_softmax are declined).

Results, float32 (against the exact value; the contract allows 4 ulps):

* ``logsumexp``: ``m + log1p(count - 1 + rest)`` in float64, rounded once:
  half an ulp plus the float64 state's error, as on the generic path.
* ``log_softmax``: ``(x - m) - log_norm`` in float32, both terms <= 0:
  at most 1.5 ulps.
* ``softmax`` of lines that fit in a tile (the last axis, up to 2^17
  entries): ``terms / sum`` in float64 rounded once, from the same float64
  terms that made the sum: half an ulp plus float64 noise, one ``exp`` per
  entry.  Longer lines (or the leading axes): the float32 rounding of each
  float64 term ``exp(x - m)`` is stored in the output during the state pass
  and multiplied by the float32 rounding of ``1 / sum`` afterwards: three
  roundings of ``2**-24`` relative each, at most 3 ulps.
"""

from __future__ import annotations

import math

from array_api_compat import is_numpy_array

from . import _fused_cpu
from ._blocked import Pairwise as _Pairwise
from ._blocked import kernels as _blocked_kernels
from ._blocked import piece as _piece
from ._spec import BackendSpec, Device


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






def _line_state(view, axis, exact_lines=None, maxes=None):
    """``(max, count, rest)`` per line of ``view`` along ``axis`` (1-D arrays).

    With ``exact_lines`` (a boolean mask of lines), only those lines are
    computed, in the exact mode; otherwise all lines in the fast mode.
    ``maxes``: the lines' maxima when the caller has them already.  Without
    them, the fast mode of float32 lines longer than a tile finds the maxima
    as the pieces go by and takes unshifted terms (see ``_UNSHIFTED_LOW``);
    it returns ``None`` if a max falls outside that range (the caller then
    computes the maxima first).
    """
    import numpy as np

    dtype = view.dtype
    kept = view.shape[1 - axis]
    whole_lines = axis == 1 and view.shape[1] <= TILE_ELEMENTS
    m = maxes
    if m is None and exact_lines is not None:
        m = view.max(axis=axis)
    on_the_fly = m is None and not whole_lines
    if on_the_fly and dtype != np.float32:
        m = view.max(axis=axis)
        on_the_fly = False
    maxes = np.empty(kept, dtype) if m is None else m
    count = np.ones(kept, np.float64)
    rest = np.empty(kept, np.float64)
    spare = np.empty(TILE_ELEMENTS, dtype) if (axis == 0 and dtype == np.float64) else None
    wide_buffer = np.empty(TILE_ELEMENTS, np.float64)
    mask = np.empty(TILE_ELEMENTS, bool) if exact_lines is not None else None
    huge = np.finfo(dtype).max
    for k, reduced in _tiles(view, axis):
        if exact_lines is not None and not exact_lines[k].any():
            continue
        if m is None and whole_lines:
            np.maximum.reduce(view[k], axis=1, out=maxes[k])
        line_max = None if on_the_fly else maxes[k]
        if exact_lines is not None:
            # The generic path's shift: 0 for -inf, the largest float for +inf/NaN.
            shift = np.where(line_max == -np.inf, 0, np.where(np.isfinite(line_max), line_max, huge)).astype(dtype)
            unshifted = False
        elif on_the_fly:
            shift, unshifted = None, True
        else:
            shift = line_max
            unshifted = dtype == np.float32 and _unshifted(line_max)
        if shift is not None:
            shift = shift[:, None] if axis == 1 else shift[None, :]
            at_max_value = line_max[:, None] if axis == 1 else line_max[None, :]
        partial_rest, partial_count = _Pairwise(), _Pairwise()
        running_max = None
        for r in reduced:
            piece = _piece(view, axis, k, r)
            if on_the_fly:
                piece_max = np.maximum.reduce(piece, axis=axis)
                # "not <=": a NaN max fails too.
                if not piece_max.max() <= _UNSHIFTED_HIGH:
                    return None
                running_max = piece_max if running_max is None else np.maximum(running_max, piece_max)
            terms = wide_buffer[: piece.size].reshape(piece.shape)
            _exp_terms(piece, shift, terms, unshifted)
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
                partial_rest.add(np.add.reduce(terms, axis=axis))
        if on_the_fly:
            if not running_max.min() >= _UNSHIFTED_LOW:
                return None
            maxes[k] = line_max = running_max
        total = partial_rest.total()
        if unshifted:
            total = total * np.exp(-line_max.astype(np.float64))
        if exact_lines is None:
            rest[k] = total - 1.0
        else:
            lines = exact_lines[k]
            rest[k][lines] = total[lines]
            count[k][lines] = partial_count.total()[lines]
    return maxes, count, rest


# Lines whose max lies in this range take terms exp(x) and scale their sums by
# exp(-m) afterwards, which saves the float64 subtraction x - m (a third of a
# tile's time).  exp(x) stays finite (a sum of up to 2**40 terms below e**600
# too), and every term that can matter, x >= m - 110, stays a normal float64.
_UNSHIFTED_LOW, _UNSHIFTED_HIGH = -550.0, 600.0


def _unshifted(line_max):
    return bool(line_max.size) and _UNSHIFTED_LOW <= line_max.min() and line_max.max() <= _UNSHIFTED_HIGH


def _exp_terms(piece, shift, terms, unshifted):
    """Terms into the float64 buffer ``terms``: ``exp(x)`` or ``exp(x - shift)``.

    Both in float64: ``x - m`` of float32 entries is exact there, and float64
    ``exp`` is within an ulp of float64 (a float32 ``exp`` of the rounded
    float32 difference is ``|x - m| / 2`` ulps off, and NumPy's float32
    ``exp`` itself up to 3.6 * 2**-24 relative: either breaks a
    ``logsumexp`` that cancels to near 0).
    """
    import numpy as np

    if unshifted:
        np.exp(piece, out=terms, dtype=np.float64)
    else:
        np.subtract(piece, shift, out=terms, dtype=np.float64)
        np.exp(terms, out=terms)


def _state(call, maxes=None):
    """The call's :class:`LSEState` (keepdims shape), computed tile by tile."""
    import numpy as np

    from lse_dispatch._state import LSEState

    view, axis = _layout(call)
    with np.errstate(over="ignore", invalid="ignore"):
        if view.dtype == np.float64:
            # No wider accumulator: always mask the max out, as the generic path.
            recheck = np.ones(view.shape[1 - axis], bool)
            maxes, count, rest = _line_state(view, axis, exact_lines=recheck, maxes=maxes)
        else:
            fast = _line_state(view, axis, maxes=maxes)
            if fast is None:
                maxes = view.max(axis=axis)
                fast = _line_state(view, axis, maxes=maxes)
            maxes, count, rest = fast
            recheck = ~np.isfinite(maxes) | (rest < _RECHECK_BELOW)
        if recheck.any() and view.dtype != np.float64:
            _, exact_count, exact_rest = _line_state(view, axis, exact_lines=recheck, maxes=maxes)
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
    # x - m in float64, where it is exact, and float64 exp (see _exp_terms).
    terms = np.exp(lines.astype(np.float64) - line_max)
    at_max = lines == line_max
    terms[at_max] = 0.0
    rest = np.add.reduce(terms, axis=1, keepdims=True)
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
        # exp(x - m) / (count + rest): one rounding to float32 at the end.
        terms[at_max] = 1.0
        value = terms / (count + rest)
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
    view, axis = _layout(call)
    out = np.empty(call.shape, call.plan.result)
    out_view = out.reshape(view.shape)
    with _quiet():
        if axis == 1 and view.shape[1] <= TILE_ELEMENTS:
            if _whole_lines(view, out_view, log):
                return out
        elif not log and _softmax_stored(view, out_view, axis):
            return out
    # log_softmax of long lines, and what the paths above gave back (a
    # non-finite max): the state, with maxima found on the fly (_line_state).
    state, view, axis = _state(call)
    m, count, rest = state
    if not np.all(np.isfinite(m)):
        # Infinite or NaN maxima: the shared limit rules, on the whole array.
        value = log_softmax_from_state(call.xp, call.a, state, None)
        return (value if log else np.exp(value)).astype(call.plan.result)
    shape = (-1, 1) if axis == 1 else (1, -1)
    log_norm = np.log1p((count - 1.0) + rest).reshape(shape)
    line_max = m.reshape(shape)
    # softmax gets here when a piece of a long line is all -inf (see
    # _softmax_stored): exp((x - m) - log_norm) in float64, rounded once.
    norm = log_norm.astype(view.dtype) if log else log_norm
    wide = None if log else np.empty(TILE_ELEMENTS, np.float64)
    with np.errstate(over="ignore", under="ignore"):
        for k, reduced in _tiles(view, axis):
            tile_max = line_max[k] if axis == 1 else line_max[:, k]
            tile_norm = norm[k] if axis == 1 else norm[:, k]
            for r in reduced:
                piece, target = _piece(view, axis, k, r), _piece(out_view, axis, k, r)
                if log:
                    _log_softmax_piece(piece, tile_max, tile_norm, target)
                    continue
                exponent = wide[: piece.size].reshape(piece.shape)
                np.subtract(piece, tile_max, out=exponent, dtype=np.float64)
                np.subtract(exponent, tile_norm, out=exponent)
                np.exp(exponent, out=exponent)
                np.copyto(target, exponent, casting="same_kind")
    return out


def _log_softmax_piece(piece, line_max, log_norm, target):
    """``(x - m) - log_norm`` in the input's dtype into ``target``.

    Both terms are <= 0, so nothing cancels: the roundings of ``x - m`` and
    of ``log_norm`` cost at most an ulp of the result together, the final
    subtraction half an ulp (1.5 ulps, as on the generic path).
    """
    import numpy as np

    np.subtract(piece, line_max, out=target)
    np.subtract(target, log_norm, out=target)


def _whole_lines(view, out_view, log: bool) -> bool:
    """softmax / log_softmax of lines that fit in a tile, one visit per tile.

    Each tile of whole lines is read once: its maxima, its float64 terms
    (:func:`_exp_terms`), their sums, and then the output.  softmax is
    ``terms / sum`` in float64, rounded once to float32 (half an ulp, plus
    a few float64 ulps): no second ``exp``.  log_softmax takes the fast
    state (``count = 1``, ``rest = sum - 1``) and recomputes, in the same
    tile, lines whose ``rest`` is below ``_RECHECK_BELOW`` with the entries
    at the max masked out and counted.  Returns False at the first line
    with a non-finite max (the caller then takes the shared limit rules).
    """
    import numpy as np

    n = view.shape[1]
    rows = max(1, TILE_ELEMENTS // n)
    buffer = np.empty(min(rows, view.shape[0]) * n, np.float64)
    for r0 in range(0, view.shape[0], rows):
        piece = view[r0 : r0 + rows]
        target = out_view[r0 : r0 + rows]
        terms = buffer[: piece.size].reshape(piece.shape)
        line_max = np.maximum.reduce(piece, axis=1)
        if not np.isfinite(line_max).all():
            return False
        unshifted = _unshifted(line_max)
        _exp_terms(piece, line_max[:, None], terms, unshifted)
        total = np.add.reduce(terms, axis=1)
        if not log:
            np.multiply(terms, (1.0 / total)[:, None], out=terms)
            np.copyto(target, terms, casting="same_kind")
            continue
        scale = np.exp(-line_max.astype(np.float64)) if unshifted else np.ones(len(line_max))
        count = np.ones(len(line_max))
        rest = total * scale - 1.0
        exact = rest < _RECHECK_BELOW
        if exact.any():
            at_max = piece[exact] == line_max[exact][:, None]
            masked = np.where(at_max, 0.0, terms[exact])
            rest[exact] = np.add.reduce(masked, axis=1) * scale[exact]
            count[exact] = np.count_nonzero(at_max, axis=1)
        log_norm = np.log1p((count - 1.0) + rest).astype(view.dtype)
        _log_softmax_piece(piece, line_max[:, None], log_norm[:, None], target)
    return True


def _softmax_stored(view, out_view, axis) -> bool:
    """softmax of lines too long for a tile: two passes, one ``exp`` per entry.

    The first pass shifts each piece by the running max ``s`` of its lines
    (its own entries included), stores the float32 rounding of its float64
    terms ``exp(x - s)`` (:func:`_exp_terms`) in the output, and rescales the
    float64 sums whenever the running max grows.  The second pass multiplies
    each stored piece by the float32 rounding of ``exp(s - m) / sum``.
    Three roundings to float32, each within ``2**-24`` relative: at most
    3 ulps (the float64 terms and sums add about ``2**-29`` of an ulp).
    Entries below the smallest normal float32 stay there, in the range the
    contract flushes.  The running maxima of a piece take ``1 / rows per
    piece`` of the input's memory, so wide leading-axis reductions (fewer
    than ``_MIN_ROWS_ON_THE_FLY`` rows per piece) find their maxima in a
    pass of their own first.  Returns False at the first non-finite max of a
    piece (the caller then takes the state: a piece all -inf, as in a padded
    line, costs the old second ``exp`` pass).
    """
    import numpy as np

    kept = view.shape[1 - axis]
    known = None
    if axis == 0 and TILE_ELEMENTS // min(kept, TILE_ELEMENTS) < _MIN_ROWS_ON_THE_FLY:
        known = view.max(axis=0)
        if not np.isfinite(known).all():
            return False
    buffer = np.empty(TILE_ELEMENTS, np.float64)
    for k, reduced in _tiles(view, axis):
        running, total, shifts = None if known is None else known[k], None, []
        for r in reduced:
            piece = _piece(view, axis, k, r)
            if known is None:
                piece_max = np.maximum.reduce(piece, axis=axis)
                if not np.isfinite(piece_max).all():
                    return False
                if running is None:
                    running = piece_max
                else:
                    grown = np.maximum(running, piece_max)
                    total *= np.exp(running.astype(np.float64) - grown)
                    running = grown
                shifts.append(running)
            terms = buffer[: piece.size].reshape(piece.shape)
            _exp_terms(piece, running[:, None] if axis == 1 else running[None, :], terms, False)
            part = np.add.reduce(terms, axis=axis)
            total = part if total is None else total + part
            np.copyto(_piece(out_view, axis, k, r), terms, casting="same_kind")
        wide_max = running.astype(np.float64)
        for i, r in enumerate(reduced):
            shift = running if known is not None else shifts[i]
            factor = (np.exp(shift - wide_max) / total).astype(view.dtype)
            target = _piece(out_view, axis, k, r)
            np.multiply(target, factor[:, None] if axis == 1 else factor[None, :], out=target)
    return True


# Pieces of fewer rows than this keep no running maxima (see _softmax_stored):
# at most 1/64 of the input's memory.
_MIN_ROWS_ON_THE_FLY = 64


def _kernels():
    return _blocked_kernels("numpy.blocked", _logsumexp, _normalised, _declines)


SPEC = BackendSpec(
    name="numpy",
    module="numpy",
    is_array=is_numpy_array,
    namespace=_namespace,
    devices=lambda: [Device("cpu", "cpu")],
    dtypes=("float16", "float32", "float64"),
    to_numpy=_to_numpy,
    kernels=(*_fused_cpu.numpy_kernels(), *_kernels()),
)

__all__ = ["SPEC", "TILE_ELEMENTS"]
