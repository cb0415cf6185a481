"""The tiled engine of the eager CPU kernels, written once: ``numpy.blocked`` and ``torch.blocked``.

A kernel here computes the shared state ``(max, count, rest)`` of
:mod:`lse_dispatch._state` tile by tile, over cache-sized pieces of a 2-D
view of the input (the reduced axes as one axis, leading or trailing), with
``out=`` buffers, so that a piece is read from memory once for the sums and
the extra memory is a few tile-sized buffers whatever the input's size.  The
finalisation and every limit rule are the shared functions of
:mod:`lse_dispatch._state`: lines whose max is not finite go to them.

What differs between NumPy and torch is a small table of operations,
:class:`Ops` (each backend module supplies one), and which *terms* each uses,
chosen by the accuracy of its float32 ``exp``:

* ``WIDE`` (NumPy, whose float32 ``exp`` was measured 2.54 ulps and
  ``3.57 * 2**-24`` relative off): float64 ``exp`` of the float64 difference
  ``x - m``, which is exact for float32 ``x``; lines whose max lies in
  ``[-550, 600]`` take unshifted ``exp(x)`` and scale the sums by ``exp(-m)``
  (a third of a tile's time saved; every term that can matter stays a
  normal float64).
* ``COMPENSATED`` (torch, whose Sleef ``expf`` is documented within 1 ulp):
  ``expf(d) * (1 + lo)`` in the input's dtype, ``d = fl(x - m)`` and ``lo``
  its rounding error recovered exactly by TwoSum; the terms are summed in
  float64 and the small corrections in the input's dtype.
* ``PLAIN``: ``exp`` of the rounded difference, for float64 logsumexp on
  NumPy (its lines always take the exact mode below, so every term's
  relative error ``|d| 2**-53`` lands on ``rest`` at most as ``n e**-1 2**-53``).

Modes of a pass over lines:

* *fast*: every term summed, the entries at the max included (each
  contributes 1), ``count = 1`` and ``rest = total - 1``: the same
  ``count - 1 + rest``.  Only for float32 input (a float64 accumulator);
* *exact*: the entries at the max masked out and counted, as in the generic
  path.  float64 input always takes it; float32 lines whose fast ``rest``
  is below ``2**-20`` (where the float64 rounding of ``1 + rest`` could cost
  ``rest`` more than ``2**-29`` of its float32 ulp), whose max is not
  finite, or -- for ``COMPENSATED`` logsumexp -- whose ``m + log1p(rest)``
  may cancel (``|lse| < min(log1p(rest), 1)``: float32 terms put a relative
  error ``2u 2**-24`` on ``rest``), are recomputed in it with ``WIDE`` terms.

Error bounds of each path are in ``docs/dispatch.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Protocol

from lse_dispatch import _generic
from lse_dispatch._kernel import Priority, state_kernels
from lse_dispatch._numerics import extracted_sum
from lse_dispatch._ops import Op
from lse_dispatch._state import LSEState, finite_shift, log_norm, two_sum

from ._spec import FLOAT64_LOG_SOFTMAX, FLOAT64_SOFTMAX

__all__ = ["COMPENSATED", "PLAIN", "WIDE", "Ops", "Pairwise", "TiledKernel", "layout", "reduced_axis"]

Array = Any

WIDE, COMPENSATED, PLAIN = "wide", "compensated", "plain"

# float32 lines whose fast total is below 1 + this are recomputed exactly:
# above it, the float64 rounding of 1 + rest costs rest less than 2**-29 of
# its float32 ulp.
RECHECK_BELOW = 2.0**-20
# Lines whose max lies in this range take unshifted WIDE terms exp(x), their
# sums scaled by exp(-m): exp(x) stays finite (a sum of up to 2**40 terms
# below e**600 too), and every term that can matter, x >= m - 110, stays a
# normal float64.
UNSHIFTED_LOW, UNSHIFTED_HIGH = -550.0, 600.0
# Pieces of fewer rows than this keep no running maxima (softmax of long
# lines): at most 1/64 of the input's memory.
MIN_ROWS_ON_THE_FLY = 64


class Ops(Protocol):
    """The operations of an array library that the engine needs: the table each backend supplies.

    ``x`` are arrays of the library; ``out`` preallocated buffers, possibly
    of a wider dtype than the inputs (the operation then computes in
    ``out``'s dtype).  Reductions run over ``axis`` of a 2-D array and return
    1-D arrays.  ``xp`` is the library's array-API namespace, for the
    arithmetic on per-line vectors.
    """

    name: str
    xp: Any
    float32: Any
    float64: Any
    #: Term rule of float32 input (WIDE or COMPENSATED) and of float64 input.
    float32_terms: str
    float64_terms: str
    #: Input sizes: the tile (elements), the direct path, the Python-float path.
    def tile_elements(self, view: Array) -> int: ...
    def small_elements(self) -> int: ...
    def tiny_elements(self) -> int: ...
    def declines(self, call) -> str | None: ...
    def is_contiguous(self, a: Array) -> bool: ...
    def empty(self, shape, dtype) -> Array: ...
    def maximum(self, x: Array, axis: int, out: Array | None = None) -> Array: ...
    def subtract(self, x: Array, y: Array, out: Array) -> Array: ...
    def add(self, x: Array, y: Array, out: Array) -> Array: ...
    def multiply(self, x: Array, y: Array, out: Array) -> Array: ...
    def exp(self, x: Array, out: Array) -> Array: ...
    def sum(self, x: Array, axis: int, dtype, work: Any) -> Array: ...
    def equal(self, x: Array, y: Array, out: Array) -> Array: ...
    def count(self, mask: Array, axis: int) -> Array: ...
    def zero_where(self, x: Array, mask: Array) -> None: ...
    def zero_nan(self, x: Array) -> None: ...
    def copy(self, dst: Array, src: Array) -> None: ...
    def contiguous(self, x: Array) -> Array: ...
    def from_floats(self, values: list, dtype, shape: tuple) -> Array: ...
    def quiet(self): ...


class Pairwise:
    """Adds equal-shape partial sums as a balanced tree, holding O(log n) of them.

    A binary counter: a new partial merges with the stored one of the same
    size, so the error grows like log(number of partials), not linearly.
    """

    def __init__(self) -> None:
        self.levels: list = []  # (number of partials, their sum), sizes decreasing

    def add(self, part) -> None:
        size = 1
        while self.levels and self.levels[-1][0] == size:
            size += self.levels[-1][0]
            part = self.levels.pop()[1] + part
        self.levels.append((size, part))

    def total(self):
        parts = [part for _, part in self.levels]
        total = parts.pop()
        while parts:
            total = parts.pop() + total
        return total


class Compensated:
    """Adds partial sums with their rounding errors kept (TwoSum): the total is within about one rounding.

    For float64 input, whose pieces' sums have no wider accumulator (the
    pieces' own sums are :func:`~lse_dispatch._numerics.extracted_sum`).
    """

    def __init__(self, xp) -> None:
        self.xp = xp
        self.high = self.low = None

    def add(self, part) -> None:
        if self.high is None:
            self.high, self.low = part, part * 0
        else:
            self.high, error = two_sum(self.xp, self.high, part)
            self.low = self.low + error

    def total(self):
        return self.high + self.low


def _piece_sum(ops: Ops, piece_terms, correction, axis: int, work, narrow: bool):
    """The float64 sum of a piece's terms (overwritten) and corrections; ``narrow``: float64 input."""
    if narrow:
        # Equal terms after a larger one round one way in a plain sum
        # (float64 [0, -1] + [-37] * 5000: 10.7 ulps on torch).
        total = _extracted_piece_sum(ops, piece_terms, axis, work)
    else:
        total = ops.sum(piece_terms, axis, ops.float64, work)
    if correction is not None:
        # Small next to the total: a sum in the input's dtype is accurate enough.
        total = total + ops.sum(correction, axis, correction.dtype, work)
    return total


def _extracted_piece_sum(ops: Ops, terms, axis: int, work):
    """:func:`~lse_dispatch._numerics.extracted_sum` of the non-negative float64 ``terms`` of a piece, in its buffers.

    ``terms`` is overwritten (with the low parts).  The terms are finite or
    NaN (exact mode zeroes the entries at an infinite max), so no
    ``inf - inf`` is formed; a NaN line keeps its plain, NaN, sum.  The
    reductions run in the library's own order: the exact parts need none.
    """
    xp = ops.xp
    total = xp.sum(terms, axis=axis)
    sigma = total * 4.0
    ok = xp.isfinite(sigma)
    sigma_lines = _lines(xp.where(ok, sigma, xp.zeros_like(sigma)), axis)
    high = work("high", terms, ops.float64)
    ops.add(terms, sigma_lines, out=high)
    ops.subtract(high, sigma_lines, out=high)
    ops.subtract(terms, high, out=terms)
    return xp.where(ok, xp.sum(high, axis=axis) + xp.sum(terms, axis=axis), total)


def reduced_axis(call) -> int | None:
    """1 if the reduced axes are the trailing ones, 0 if the leading ones, else ``None``."""
    axes, ndim = call.axes, len(call.shape)
    if axes == tuple(range(ndim - len(axes), ndim)):
        return 1
    if axes == tuple(range(len(axes))):
        return 0
    return None


def layout(call) -> tuple[Array, int]:
    """``(view, axis)``: the contiguous input as 2-D with the reduced axes as one."""
    axis = reduced_axis(call)
    n = math.prod(call.shape[ax] for ax in call.axes)
    return (call.a.reshape(-1, n), 1) if axis == 1 else (call.a.reshape(n, -1), 0)


def tiles(view, axis: int, size: int) -> Iterator[tuple[slice, list[slice]]]:
    """``(kept slice, reduced slices)`` covering ``view`` in tiles of about ``size`` entries.

    Whole lines per tile when they fit (lines contiguous, ``axis == 1``), or
    whole rows of the kept axis (``axis == 0``).
    """
    n, kept = view.shape[axis], view.shape[1 - axis]
    if axis == 1:
        step_n = min(n, size)
        step_k = max(1, size // step_n)
    else:
        step_k = min(kept, size)
        step_n = max(1, size // step_k)
    for k0 in range(0, kept, step_k):
        yield slice(k0, min(k0 + step_k, kept)), [slice(n0, min(n0 + step_n, n)) for n0 in range(0, n, step_n)]


def piece(view, axis: int, k: slice, r: slice):
    """The tile ``(k, r)`` of a 2-D view whose reduced axis is ``axis``."""
    return view[k, r] if axis == 1 else view[r, k]


def _lines(x, axis: int):
    """A per-line vector shaped to broadcast against pieces of a view reduced along ``axis``."""
    return x[:, None] if axis == 1 else x[None, :]


def _numel(x) -> int:
    return math.prod(x.shape)


class Work:
    """Tile-sized scratch buffers of one pass, handed out as views shaped like a piece."""

    def __init__(self, ops: Ops, size: int):
        self.ops, self.size, self.buffers = ops, size, {}

    def __call__(self, name: str, piece, dtype):
        buffer = self.buffers.get((name, dtype))
        if buffer is None:
            buffer = self.buffers[(name, dtype)] = self.ops.empty(self.size, dtype)
        return buffer[: _numel(piece)].reshape(piece.shape)


def terms(ops: Ops, rule: str, x, shift, work: Work, *, unshifted: bool = False):
    """``(terms, correction)`` of one piece: ``exp(x - shift)`` by the term rule.

    ``correction`` is ``None`` but for ``COMPENSATED``, whose terms are
    ``expf(d)`` with ``d = fl(x - shift)`` and whose corrections are
    ``expf(d) * lo``, ``lo`` the rounding error of ``d`` recovered exactly by
    Knuth's TwoSum (``d + lo = x - shift``): ``exp(d + lo) = exp(d) (1 + lo +
    lo**2 / 2 ...)`` and ``|lo| <= 2**-24 |d| < 2**-17`` wherever ``exp(d)``
    is a normal float32.  Non-finite entries (``-inf`` in a finite line)
    make ``lo`` NaN; their correction is set to 0.  ``unshifted`` (``WIDE``
    only): ``exp(x)`` itself.
    """
    if rule == WIDE:
        wide = work("terms", x, ops.float64)
        if unshifted:
            return ops.exp(x, out=wide), None
        ops.subtract(x, shift, out=wide)  # exact in float64 for float32 x
        return ops.exp(wide, out=wide), None
    difference = ops.subtract(x, shift, out=work("terms", x, x.dtype))
    if rule == PLAIN:
        return ops.exp(difference, out=difference), None
    back, low = work("back", x, x.dtype), work("low", x, x.dtype)
    ops.subtract(difference, x, out=back)  # b' = d - a, the -shift that was added
    ops.subtract(difference, back, out=low)  # a' = d - b'
    ops.subtract(x, low, out=low)  # a - a'
    ops.add(back, shift, out=back)  # b' - b
    ops.subtract(low, back, out=low)  # lo = (a - a') + (b - b')
    exp_d = ops.exp(difference, out=difference)
    correction = ops.multiply(low, exp_d, out=low)
    ops.zero_nan(correction)
    return exp_d, correction


def _in_unshifted_range(xp, line_max) -> bool:
    return bool(xp.all((line_max >= UNSHIFTED_LOW) & (line_max <= UNSHIFTED_HIGH)))


def line_pass(ops: Ops, view, axis: int, rule: str, size: int, *, exact_lines=None, maxes=None):
    """``(max, count, rest)`` per line of ``view`` along ``axis`` (1-D arrays), in tiles of ``size``.

    Fast mode (``exact_lines`` is ``None``): every line, ``count = 1`` and
    ``rest = total - 1``.  Exact mode: only the lines in the boolean mask
    ``exact_lines``, the entries at the max masked out and counted (the
    others' ``count``/``rest`` are left unset).  ``maxes``: the lines' maxima
    when the caller has them.  Without them, the fast mode of ``WIDE`` lines
    longer than a tile finds the maxima as the pieces go by and takes
    unshifted terms; it returns ``None`` if a max falls outside
    ``[UNSHIFTED_LOW, UNSHIFTED_HIGH]`` (the caller computes the maxima first).
    """
    xp = ops.xp
    exact = exact_lines is not None
    kept = view.shape[1 - axis]
    whole_lines = axis == 1 and view.shape[1] <= size
    on_the_fly = maxes is None and rule == WIDE and not exact and not whole_lines
    if maxes is None and not on_the_fly and (exact or not whole_lines):
        maxes = ops.maximum(view, axis)
    line_maxes = ops.empty(kept, view.dtype) if maxes is None else maxes
    count = xp.ones(kept, dtype=ops.float64)
    rest = ops.empty(kept, ops.float64)
    work = Work(ops, min(size, _numel(view)))
    for k, reduced in tiles(view, axis, size):
        if exact and not bool(xp.any(exact_lines[k])):
            continue
        if maxes is None and whole_lines:
            ops.maximum(view[k], 1, out=line_maxes[k])
        line_max = None if on_the_fly else line_maxes[k]
        unshifted = on_the_fly or (rule == WIDE and not exact and _in_unshifted_range(xp, line_max))
        # Exact mode takes the generic path's shift: 0 for -inf, the largest float for +inf/NaN.
        shift = None if line_max is None else _lines(finite_shift(xp, line_max) if exact else line_max, axis)
        narrow = exact and view.dtype == ops.float64  # float64 terms summed in float64
        partial_rest, partial_count = (Compensated(xp) if narrow else Pairwise()), Pairwise()
        running = None
        for r in reduced:
            x = piece(view, axis, k, r)
            if on_the_fly:
                piece_max = ops.maximum(x, axis)
                if not bool(xp.all(piece_max <= UNSHIFTED_HIGH)):  # a NaN max fails too
                    return None
                running = piece_max if running is None else xp.maximum(running, piece_max)
            piece_terms, correction = terms(ops, rule, x, shift, work, unshifted=unshifted)
            if exact:
                at_max = ops.equal(x, _lines(line_max, axis), out=work("at_max", x, xp.bool))
                ops.zero_where(piece_terms, at_max)
                partial_count.add(ops.count(at_max, axis))
            partial_rest.add(_piece_sum(ops, piece_terms, correction, axis, work, narrow))
        if on_the_fly:
            if not bool(xp.all(running >= UNSHIFTED_LOW)):
                return None
            ops.copy(line_maxes[k], running)
            line_max = running
        total = partial_rest.total()
        if unshifted:
            total = total * xp.exp(-xp.astype(line_max, ops.float64))
        if exact:
            lines = exact_lines[k]
            ops.copy(rest[k], xp.where(lines, total, rest[k]))
            ops.copy(count[k], xp.where(lines, partial_count.total(), count[k]))
        else:
            ops.copy(rest[k], total - 1.0)
    return line_maxes, count, rest


class TiledKernel:
    """``<library>.blocked``: the tiled kernels of one array library, from its :class:`Ops`.

    :meth:`kernels` declares the four entries (``state_kernels``): the state
    of tiles, logsumexp finalising finite lines with ``m + log_norm`` and the
    others with the shared rules, and softmax / log_softmax that fill the
    output tile by tile (float64 input declined for those two: the TwoSum-
    compensated exponent is the generic path's).
    """

    def __init__(self, name: str, ops: Ops):
        self.name, self.ops = name, ops

    def kernels(self) -> tuple:
        return state_kernels(
            self.name,
            self.state,
            self.declines,
            priority=Priority.NATIVE,
            logsumexp=self.logsumexp,
            normalised=self.normalised,
            declines_normalised=self.declines_normalised,
        )

    # -- what the kernels take ------------------------------------------------

    def declines(self, call) -> str | None:
        ops, a = self.ops, call.a
        if call.b is not None:
            return "b given"
        if call.where is not None:
            return "where given"
        if call.plan.is_complex:
            return "complex input"
        if a.dtype not in (ops.float32, ops.float64):
            return f"dtype {a.dtype} (kernel takes float32, float64)"
        reason = ops.declines(call)
        if reason is not None:
            return reason
        if call.plan.compute != a.dtype or tuple(a.shape) != tuple(call.shape):
            return "input needs a cast or a broadcast"
        if not call.axes:
            return "nothing reduced"
        if _numel(a) == 0:
            return "empty input"
        if reduced_axis(call) is None or not ops.is_contiguous(a):
            return "layout: reduced axes are not the leading or trailing axes of a contiguous array"
        return None

    def declines_normalised(self, call) -> str | None:
        reason = self.declines(call)
        if reason is None and call.plan.compute == self.ops.float64:
            return FLOAT64_LOG_SOFTMAX if call.op == Op.LOG_SOFTMAX else FLOAT64_SOFTMAX
        return reason

    # -- the state ----------------------------------------------------------------

    def _size(self, view) -> int:
        return self.ops.tile_elements(view)

    def line_states(self, view, axis: int, *, cancelling: bool):
        """``(max, count, rest)`` per line: the fast pass, then the exact recheck (module docstring)."""
        ops, xp = self.ops, self.ops.xp
        size = self._size(view)
        if view.dtype == ops.float64:
            every = xp.ones(view.shape[1 - axis], dtype=xp.bool)
            return line_pass(ops, view, axis, ops.float64_terms, size, exact_lines=every)
        rule = ops.float32_terms
        fast = line_pass(ops, view, axis, rule, size)
        if fast is None:
            fast = line_pass(ops, view, axis, rule, size, maxes=ops.maximum(view, axis))
        maxes, count, rest = fast
        recheck = ~xp.isfinite(maxes) | (rest < RECHECK_BELOW)
        if cancelling and rule == COMPENSATED:
            # |lse| below min(log1p(rest), 1): the float32 terms' relative error
            # 2u 2**-24 on rest could be more than 2u ulps of lse.
            normaliser = log_norm(xp, count, rest)
            lse = xp.astype(maxes, ops.float64) + normaliser
            recheck = recheck | (xp.abs(lse) < xp.minimum(normaliser, xp.ones_like(normaliser)))
        if bool(xp.any(recheck)):
            _, exact_count, exact_rest = line_pass(ops, view, axis, WIDE, size, exact_lines=recheck, maxes=maxes)
            count = xp.where(recheck, exact_count, count)
            rest = xp.where(recheck, exact_rest, rest)
        return maxes, count, rest

    def state(self, call) -> LSEState:
        """The ``STATE`` operation: the call's keepdims state, tile by tile."""
        view, axis = layout(call)
        with self.ops.quiet():
            fields = self.line_states(view, axis, cancelling=True)
        keep = _generic.keepdims_shape(call)
        return LSEState(*(field.reshape(keep) for field in fields))

    # -- logsumexp ----------------------------------------------------------------

    def _few_entries(self, call):
        """The result of a call on few entries without tiles, or ``None`` (a max is not finite, or too many)."""
        ops = self.ops
        size = _numel(call.a)
        if size <= ops.tiny_elements() and len(call.axes) == len(call.shape):
            found = tiny(ops, call)
            if found is not None:
                return found
        if size <= ops.small_elements():
            with ops.quiet():
                return small(ops, call)
        return None

    def logsumexp(self, call):
        """``m + log_norm`` for finite lines; any other line takes the shared finalisation."""
        found = self._few_entries(call)
        if found is not None:
            return found
        state = self.state(call)
        found = _generic.logsumexp_of_finite_lines(call, state)
        return _generic.logsumexp_from_state(call, state) if found is None else found

    # -- softmax and log_softmax ------------------------------------------------------

    def normalised(self, call, log: bool):
        """float32 log_softmax (``log``) or softmax, written tile by tile into the output."""
        ops = self.ops
        found = self._few_entries(call)
        if found is not None:
            return found
        view, axis = layout(call)
        out = ops.empty(tuple(call.shape), call.plan.result)
        out_view = out.reshape(view.shape)
        with ops.quiet():
            if axis == 1 and view.shape[1] <= self._size(view):
                done = self._whole_lines(view, out_view, log)
            elif log:
                done = self._log_softmax_long(view, out_view, axis)
            else:
                done = self._softmax_long(view, out_view, axis)
        if done:
            return out
        # A line whose max is not finite: the shared limit rules, on the whole input.
        return _generic.normalised_from_state(call, self.state(call), log)

    def _whole_lines(self, view, out_view, log: bool) -> bool:
        """Lines that fit in a tile: each tile's state, then its output, while it is in cache.

        softmax: ``terms / sum`` (``WIDE``: in float64, rounded once: half an
        ulp plus float64 noise; ``COMPENSATED``: ``fl(e' fl32(1 / sum))``
        with ``e' = fl(expf(d) + expf(d) lo)``, bound in docs/dispatch.md).
        log_softmax: the fast state, lines below ``RECHECK_BELOW`` redone in
        the exact mode, then ``(x - m) - fl(log_norm)`` (1.5 ulps plus
        ``rest``'s error).  Returns False at the first tile with a line whose
        max is not finite.
        """
        ops, xp = self.ops, self.ops.xp
        size = self._size(view)
        n = view.shape[1]
        rows = max(1, size // n)
        work = Work(ops, min(rows, view.shape[0]) * n)
        rule = ops.float32_terms
        for r0 in range(0, view.shape[0], rows):
            x, target = view[r0 : r0 + rows], out_view[r0 : r0 + rows]
            line_max = ops.maximum(x, 1)
            if not bool(xp.all(xp.isfinite(line_max))):
                return False
            unshifted = rule == WIDE and _in_unshifted_range(xp, line_max)
            piece_terms, correction = terms(ops, rule, x, line_max[:, None], work, unshifted=unshifted)
            total = ops.sum(piece_terms, 1, ops.float64, work)
            if correction is not None:
                total = total + ops.sum(correction, 1, correction.dtype, work)
            if not log:
                _write_softmax(ops, piece_terms, correction, total, target)
                continue
            wide_max = xp.astype(line_max, ops.float64)
            rest = (total * xp.exp(-wide_max) if unshifted else total) - 1.0
            count = xp.ones_like(rest)
            exact = rest < RECHECK_BELOW
            if bool(xp.any(exact)):
                _, count, exact_rest = line_pass(ops, x, 1, WIDE, size, exact_lines=exact, maxes=line_max)
                rest = xp.where(exact, exact_rest, rest)
                count = xp.where(exact, count, xp.ones_like(count))
            normaliser = xp.astype(log_norm(xp, count, rest), x.dtype)
            _write_log_softmax(ops, x, line_max[:, None], normaliser[:, None], target)
        return True

    def _log_softmax_long(self, view, out_view, axis: int) -> bool:
        """Lines longer than a tile, or the leading axis: the state, then ``(x - m) - log_norm``."""
        ops, xp = self.ops, self.ops.xp
        maxes, count, rest = self.line_states(view, axis, cancelling=False)
        if not bool(xp.all(xp.isfinite(maxes))):
            return False
        normaliser = xp.astype(log_norm(xp, count, rest), view.dtype)
        for k, reduced in tiles(view, axis, self._size(view)):
            line_max, line_norm = _lines(maxes[k], axis), _lines(normaliser[k], axis)
            for r in reduced:
                _write_log_softmax(ops, piece(view, axis, k, r), line_max, line_norm, piece(out_view, axis, k, r))
        return True

    def _softmax_long(self, view, out_view, axis: int) -> bool:
        """softmax of lines too long for a tile, or the leading axis: two passes, one ``exp`` per entry.

        The first pass shifts each piece by the running max ``s`` of its lines
        (its own entries included), stores the rounding of its terms
        ``exp(x - s)`` in the output, and rescales the float64 sums whenever
        the running max grows.  The second pass multiplies each stored piece
        by the rounding of ``exp(s - m) / sum``: three roundings to float32
        (``WIDE``: at most 3 ulps; ``COMPENSATED``: see docs/dispatch.md).
        The running maxima take ``1 / rows per piece`` of the input's memory,
        so wide leading-axis reductions (fewer than ``MIN_ROWS_ON_THE_FLY``
        rows per piece) find their maxima in a pass of their own first.
        Returns False at the first non-finite max of a piece (a piece all
        ``-inf``, as in a padded line, then costs the shared path).
        """
        ops, xp = self.ops, self.ops.xp
        size = self._size(view)
        kept = view.shape[1 - axis]
        known = None
        if axis == 0 and size // min(kept, size) < MIN_ROWS_ON_THE_FLY:
            known = ops.maximum(view, 0)
            if not bool(xp.all(xp.isfinite(known))):
                return False
        work = Work(ops, min(size, _numel(view)))
        rule = ops.float32_terms
        for k, reduced in tiles(view, axis, size):
            running, total, shifts = None if known is None else known[k], None, []
            for r in reduced:
                x, target = piece(view, axis, k, r), piece(out_view, axis, k, r)
                if known is None:
                    piece_max = ops.maximum(x, axis)
                    if not bool(xp.all(xp.isfinite(piece_max))):
                        return False
                    if running is None:
                        running = piece_max
                    else:
                        grown = xp.maximum(running, piece_max)
                        total = total * xp.exp(xp.astype(running, ops.float64) - xp.astype(grown, ops.float64))
                        running = grown
                    shifts.append(running)
                piece_terms, correction = terms(ops, rule, x, _lines(running, axis), work)
                part = ops.sum(piece_terms, axis, ops.float64, work)
                if correction is not None:
                    part = part + ops.sum(correction, axis, correction.dtype, work)
                    ops.add(piece_terms, correction, out=target)
                else:
                    ops.copy(target, piece_terms)
                total = part if total is None else total + part
            wide_max = xp.astype(running, ops.float64)
            for index, r in enumerate(reduced):
                shift = running if known is not None else shifts[index]
                factor = xp.astype(xp.exp(xp.astype(shift, ops.float64) - wide_max) / total, view.dtype)
                target = piece(out_view, axis, k, r)
                ops.multiply(target, _lines(factor, axis), out=target)
        return True


def _write_softmax(ops: Ops, piece_terms, correction, total, target) -> None:
    """``terms / total`` into ``target``: in float64 for float64 terms, else ``(e + c) * fl(1 / total)``."""
    xp = ops.xp
    if correction is None:
        ops.multiply(piece_terms, (1.0 / total)[:, None], out=piece_terms)
        ops.copy(target, piece_terms)
        return
    ops.add(piece_terms, correction, out=target)
    ops.multiply(target, xp.astype(1.0 / total, target.dtype)[:, None], out=target)


def _write_log_softmax(ops: Ops, x, line_max, normaliser, target) -> None:
    """``(x - m) - log_norm`` in the input's dtype into ``target``.

    Both terms are <= 0, so nothing cancels: the roundings of ``x - m`` and of
    ``log_norm`` cost at most an ulp of the result together, the final
    subtraction half an ulp (1.5 ulps, as on the generic path).
    """
    ops.subtract(x, line_max, out=target)
    ops.subtract(target, normaliser, out=target)


# -- few entries: no tiles ------------------------------------------------------------


def small(ops: Ops, call):
    """Inputs of at most ``small_elements``: whole-array operations; ``None`` if a max is not finite.

    The same state (entries at the max masked out and counted, float64 terms
    of the exact difference, float64 sums), finalised with ``m + log_norm``;
    softmax as ``exp(x - m) / (count + rest)`` from the same float64 terms,
    rounded once.
    """
    xp = ops.xp
    view, axis = layout(call)
    # Lines contiguous and last: NumPy sums them pairwise.
    lines = view if axis == 1 else ops.contiguous(xp.permute_dims(view, (1, 0)))
    line_max = xp.max(lines, axis=1, keepdims=True)
    if not bool(xp.all(xp.isfinite(line_max))):
        return None
    at_max = lines == line_max
    wide = xp.astype(lines, ops.float64)
    exponentials = xp.exp(wide - xp.astype(line_max, ops.float64))
    kept = xp.where(at_max, xp.zeros_like(exponentials), exponentials)
    if lines.dtype == ops.float64:  # no wider accumulator: the order-free sum, as in line_pass
        rest = extracted_sum(xp, kept, (1,), nonnegative=True)
    else:
        rest = xp.sum(kept, axis=1, keepdims=True)
    count = xp.sum(xp.astype(at_max, ops.float64), axis=1, keepdims=True)
    normaliser = log_norm(xp, count, rest)
    dtype = call.plan.result
    if call.op in (Op.LOGSUMEXP, Op.STATE):
        value = xp.reshape(xp.astype(xp.astype(line_max, ops.float64) + normaliser, dtype), _generic.keepdims_shape(call))
        return value, xp.ones(value.shape, dtype=dtype)
    if call.op == Op.LOG_SOFTMAX:
        value = (lines - line_max) - xp.astype(normaliser, lines.dtype)
    else:
        value = xp.where(at_max, xp.ones_like(exponentials), exponentials) / (count + rest)
    value = xp.astype(value, dtype)
    return xp.reshape(value if axis == 1 else xp.permute_dims(value, (1, 0)), tuple(call.shape))


def tiny(ops: Ops, call):
    """One short line in Python floats; ``None`` unless every entry is finite.

    The same state -- max ``m``, ``count`` of entries at it, ``rest`` of the
    others' ``exp(x - m)`` -- with ``math.fsum`` (correctly rounded) for the
    sums, every difference ``x - m`` exact in a Python float for float32
    input, and ``m + log_norm`` for the result; softmax as the terms over
    their correctly rounded sum.  A call on ten entries then costs a few
    microseconds more than the library's own functions, where a dozen array
    calls on tiny arrays cost tens.
    """
    a = call.a
    values = a.reshape(-1).tolist()
    if not all(map(math.isfinite, values)):
        return None
    top = max(values)
    dtype = call.plan.result
    if call.op == Op.SOFTMAX:
        exponentials = [math.exp(v - top) for v in values]
        total = math.fsum(exponentials)
        return ops.from_floats([term / total for term in exponentials], dtype, tuple(a.shape))
    count = values.count(top)
    normaliser = log_norm(math, count, math.fsum([math.exp(v - top) for v in values if v != top]))
    if call.op == Op.LOG_SOFTMAX:
        return ops.from_floats([(v - top) - normaliser for v in values], dtype, tuple(a.shape))
    shape = (1,) * len(a.shape)
    return ops.from_floats([top + normaliser], dtype, shape), ops.from_floats([1.0], dtype, shape)
