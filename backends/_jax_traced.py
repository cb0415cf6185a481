"""The (max, count, rest) state of plain float32 JAX input, in kernels XLA fuses.

For the calls that JAX computes in float32 without a float64 accumulator
(x64 off: float32, float16 and bfloat16 input; no ``b``, no ``where``), every
line (the reduced axes, moved last and flattened) is reduced in three steps,
whatever the number of lines:

1. ``m = max(x)``: one reduction (YNNPACK on XLA's CPU backend);
2. one loop over the input, every elementwise step fused in it: the terms,
   the split into the rest (entries below the max) and the count at the max,
   and the first ``LEAF_LEVELS`` levels of a fixed pairwise summation tree
   over ``2**LEAF_LEVELS`` slices of the line; it writes ``n / 2**L`` partial
   sums per line and nothing of the input's size;
3. the remaining levels of the tree, on those partial sums.

The shared functions of :mod:`lse_dispatch._state` then finalise the state
(``finalize``, ``log_softmax_from_state``, ``softmax_from_state``), except
that the exact-shift form writes out the finite-line formulas of
``log_softmax`` and ``softmax`` itself (every line is finite there).

**Terms.**  Where every line allows it (:func:`exact_shift`, one ``lax.cond``
per call), the terms are ``exp(x - s)`` with ``x - s`` exact by
construction: ``s`` is the max rounded to the grid of ``ulp(|m| + 128)``
(``m <= 0``) or 0 (``0 < m < 126 ln 2 - ln(n) - 1``), so the only cost
over jax.nn is the split and the tree; the rest is rescaled by
``exp(s - m)`` (to half an ulp by Taylor when ``|m - s| <= 2**-4``, else
XLA's ``exp``).  Otherwise (a max that is not finite, or beyond those
bounds) the terms are ``exp(d) (1 + e)`` with ``d + e = x - m`` exactly
(TwoSum, five more operations per entry), and lines whose max is not finite
get the count of entries equal to the max and a rest of 0, which is what the
shared functions expect (a NaN entry makes the max NaN through ``m + rest``,
without a NaN constant).

**Sums.**  XLA does not specify the order of its reductions (YNNPACK adds
each vector lane sequentially, over hundreds of terms for a line of 4096),
but it does not reassociate additions written out element by element.  Each
level of the tree adds two halves of an array, so every partial sum is a sum
of ``2**k`` terms in a tree of depth ``k``: for nonnegative terms the result
is off by at most ``ceil(log2 n) u`` of the sum, ``u = 2**-24`` (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., section 4.2).
The entries at the max are counted apart and enter after the tree (the rest
plus the count times the max's term), so a dominant term is not rounded at
every level; the rest and the count are stacked into one array, so that the
loop over the input has one output (XLA's CPU backend computes a loop
fusion once per output: a second output evaluated ``exp`` twice).

docs/jax.md has the error bounds of each output, the measurements behind
these choices and what XLA did with the alternatives.
"""

from __future__ import annotations

import math
from typing import Any

from lse_dispatch._state import LSEState

__all__ = ["LEAF_LEVELS", "MATERIALIZE", "declines", "pairwise_sum", "softmax", "state", "to_lines"]

Array = Any

#: Plain (uncompensated) levels of the summation tree, fused with the terms.
LEAF_LEVELS = 3

_F32_MAX = float.fromhex("0x1.fffffep+127")

#: Inputs of at most this many entries keep softmax's terms in memory
#: between the sum and the output (as jax.nn does) instead of forming them
#: twice: below the caches' size writing them is cheaper than a second exp
#: and TwoSum; above it the memory traffic costs more (measured, see
#: docs/jax.md).
MATERIALIZE = 1 << 20


def declines(call) -> str | None:
    """``None`` if the traced float32 form takes ``call``, else why not."""
    import jax.numpy as jnp

    plan = call.plan
    if plan.is_complex:
        return "complex input: the generic path"
    if call.b is not None or call.where is not None:
        return "b or where: the generic path"
    if plan.compute != jnp.float32 or plan.accumulator != jnp.float32:
        return "float64 accumulator (x64): the generic path"
    if not call.axes:
        return "no reduced axis"
    if any(n == 0 for n in call.shape):
        return "empty input"
    return None


def to_lines(x: Array, axes: tuple[int, ...]) -> tuple[Array, Any]:
    """``x`` with the reduced ``axes`` moved last and flattened into one, and the way back.

    The way back takes an array of the flattened shape (``(..., n)``, or
    ``(..., 1)`` for a reduction) and returns it in ``x``'s layout with the
    reduced axes kept.
    """
    import jax.numpy as jnp

    ndim = x.ndim
    kept = tuple(ax for ax in range(ndim) if ax not in axes)
    order = kept + tuple(axes)
    moved = x if order == tuple(range(ndim)) else jnp.transpose(x, order)
    kept_shape = tuple(x.shape[ax] for ax in kept)
    n = math.prod(x.shape[ax] for ax in axes)
    lines = jnp.reshape(moved, kept_shape + (n,))
    moved_shape = moved.shape
    inverse = tuple(order.index(ax) for ax in range(ndim))

    def back(y: Array) -> Array:
        if y.shape[-1] == 1 and n != 1:  # a reduction: keep the reduced axes
            keep = tuple(1 if ax in axes else x.shape[ax] for ax in range(ndim))
            return jnp.reshape(y, keep)
        y = jnp.reshape(y, moved_shape)
        return y if order == tuple(range(ndim)) else jnp.transpose(y, inverse)

    return lines, back


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """``(fl(a + b), a + b - fl(a + b))`` exactly (Knuth)."""
    total = a + b
    b_virtual = total - a
    return total, (a - (total - b_virtual)) + (b - b_virtual)


def pairwise_sum(lines: Array, term, leaf_levels: int | None = None) -> Array:
    """``sum(term(lines))`` over the last axis in a fixed, balanced pairwise tree.

    ``term`` maps a slice of ``lines`` (reduced axis last) to a tuple of ``k``
    arrays of values to add, elementwise; the result has shape
    ``lines.shape[:-1] + (k,)``.  The line is cut into ``2**L`` slices
    (``L = LEAF_LEVELS``); ``term`` is applied to each slice and the slices
    are added in a balanced tree, all of it one loop that XLA fuses (it reads
    each entry once and writes ``n / 2**L`` partial sums per line: slicing
    the *input* keeps the expensive terms single-use, which XLA needs to fuse
    them; computed on the whole line and then sliced, XLA wrote the terms out
    slice by slice); then each level adds the first half of the partial sums
    to the second half, element by element.  The tail of the last slice, and
    slices past the end, are zeros.

    XLA neither reorders these additions nor merges them into a reduction
    (written as reductions, consecutive levels were merged into one
    reduce-window, whose order is unspecified).  Every partial sum is a sum
    of ``2**k`` entries in a tree of depth ``k``, so for nonnegative terms the
    result is off by at most ``ceil(log2 n) u`` of the sum (Higham, *Accuracy
    and Stability of Numerical Algorithms*, 2nd ed., section 4.2), with
    ``u = 2**-24``, whatever XLA's reduction order would have been.
    """
    import jax.numpy as jnp

    n = lines.shape[-1]
    levels = LEAF_LEVELS if leaf_levels is None else leaf_levels
    leaves = 1 << min(levels, max(0, math.floor(math.log2(n))))
    width = 1 << max(0, math.ceil(math.log2(-(-n // leaves))))
    parts = []
    for i in range(leaves):
        start, stop = i * width, min((i + 1) * width, n)
        if start >= n:
            parts.append(tuple(jnp.zeros_like(p) for p in parts[0]))
            continue
        part = term(lines[..., start:stop])
        if stop - start < width:
            part = tuple(jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, width - (stop - start))]) for p in part)
        parts.append(part)
    while len(parts) > 1:
        parts = [tuple(a + b for a, b in zip(parts[i], parts[i + 1])) for i in range(0, len(parts), 2)]
    # The sums of all quantities side by side, one array: the loop over the
    # input then has a single output (XLA's CPU backend runs a loop fusion
    # once per output, so a second output would compute the terms twice).
    total = jnp.stack(parts[0], axis=-2)
    while total.shape[-1] > 1:
        half = total.shape[-1] // 2
        total = total[..., :half] + total[..., half:]
    return total[..., 0]


def _max(lines: Array) -> Array:
    import jax
    import jax.numpy as jnp

    return jax.lax.stop_gradient(jnp.max(lines, axis=-1, keepdims=True))


def _terms(lines: Array, shift: Array) -> Array:
    """``exp(x - shift)`` of the exact difference, for a finite ``shift`` (TwoSum)."""
    import jax.numpy as jnp

    # TwoSum of x clamped into [shift - 128, shift + 128]: finite for infinite
    # entries, whose terms are exactly 0 (or, at the max, replaced by the caller);
    # entries up to 64 above the shift (the rescue's, _rescued) keep their own.
    clamped = jnp.minimum(jnp.maximum(lines, shift - 128), shift + 128)
    _, error = _two_sum(clamped, -shift)
    # exp of the unclamped difference: a NaN entry stays NaN.
    return jnp.exp(lines - shift) * (1 + error)


def state(lines: Array, *, count_free: bool = False, m: Array | None = None) -> LSEState:
    """The state of each line of ``lines`` (float32, reduced axis last), keepdims: any input.

    The terms are ``exp(d) (1 + e)`` with ``d + e = x - m`` exactly (TwoSum,
    five more operations per entry).  With ``count_free`` the lines with a
    finite max get ``(m, t, 0)``, ``t = c + r``: all that
    ``softmax_from_state`` uses of a finite line is ``max(count, 1) + rest``,
    which is then ``t`` itself.  Otherwise ``count`` and ``rest`` are summed
    apart, as ``log1p(c - 1 + r)`` needs when ``r`` is small.

    Lines whose max is not finite are shifted by ``FLT_MAX``, so that every
    finite entry's term is 0: they get the number of entries equal to the max
    as their count (the ``+inf`` entries, or all of them) and a rest of 0,
    except that a NaN entry's term is NaN, and ``m + rest`` then makes the
    max NaN without a NaN constant (XLA's CPU max was seen to return ``-inf``
    for a line of finite entries and one NaN).
    """
    import jax.numpy as jnp

    m = _max(lines) if m is None else m
    finite = jnp.isfinite(m)
    shift = jnp.where(finite, m, jnp.asarray(_F32_MAX, lines.dtype))
    zero = jnp.zeros((), lines.dtype)
    one = jnp.ones((), lines.dtype)

    def packed_from(offset):
        def packed(part):
            at_max = part == m
            return jnp.where(at_max, zero, _terms(part, offset)), jnp.where(at_max, one, zero)

        return packed

    total = pairwise_sum(lines, packed_from(shift))
    rest, count = total[..., :1], total[..., 1:]

    def rescaled(need):
        # The terms' TwoSum takes the inexact x - (m - 64); m - 64 itself rounds
        # by -e: m - 64 = moved + e, so the terms are exp(64 - e) times theirs.
        moved, error = _two_sum(shift, -RESCUE * need)
        return pairwise_sum(lines, packed_from(moved))[..., :1] * _RESCUE_SCALE * (1 - error)

    rest = _rescued(rest, lines.shape[-1], rescaled)
    m = jnp.where(finite, m, m + rest)
    if count_free:
        return LSEState(m, jnp.where(finite, count + rest, count), jnp.zeros_like(m))
    return LSEState(m, count, rest)


# --------------------------------------------------------------------------
# The exact shift: no TwoSum per entry where every line allows it.


#: ``log(2**126)``: the log of the reciprocal of the smallest normal float32.
_LOG_RECIPROCAL_TINY = 126 * math.log(2.0)


def shift_free_limit(n: int) -> float:
    """Bound on the max of a line of ``n`` entries below which its terms need no shift.

    The unshifted terms ``exp(x)`` then sum to at most ``n e**m < 2**126 / e``,
    so the total's reciprocal (XLA divides by a broadcast total by multiplying
    with its reciprocal) and ``exp(-m) / (c + r)`` (the logsumexp weights'
    factor) stay normal: XLA's CPU backend flushes subnormal results to 0,
    and an earlier bound, ``n e**m`` below ``FLT_MAX / e``, let softmax of the
    float32 line ``[86.901474, 86.899925]`` come out ``[0, 0]`` (the total
    ``1.1e38`` has a subnormal reciprocal), and the gradient of its logsumexp too.
    """
    return math.floor(_LOG_RECIPROCAL_TINY - math.log(n) - 1)


def exact_shift(m: Array, n: int) -> tuple[Array, Array]:
    """``(s, ok)`` per line: a shift ``s`` with ``x - s`` exact for every entry that counts.

    * ``-2**20 < m <= 0``: ``s`` is ``m`` rounded to a multiple of
      ``G = ulp(|m| + 128)``.  Every entry ``x <= m`` with ``x - m >= -127``
      has ``|x| < |m| + 128``, so ``G`` is a multiple of ``ulp(x)`` and
      ``x - s`` (a multiple of ``ulp(x)``, no larger in magnitude than ``x``)
      is exact; entries further below have terms under ``e**-126`` of the
      max's, and ``|m - s| <= G / 2 <= 2**-4``.
    * ``0 < m < shift_free_limit(n)``: ``s = 0``, ``x - s = x``.
    * anything else (a max that is not finite, or beyond these bounds):
      ``ok`` is False and the line needs the TwoSum form.
    """
    import jax.numpy as jnp

    finite = jnp.isfinite(m)
    safe = jnp.where(finite, m, jnp.zeros_like(m))
    _, exponent = jnp.frexp(jnp.abs(safe) + 128)
    grid = jnp.ldexp(jnp.ones_like(safe), exponent - 24)
    rounded = jnp.round(safe / grid) * grid
    s = jnp.where(safe > 0, jnp.zeros_like(safe), rounded)
    ok = finite & (m > -(2.0**20)) & (m < shift_free_limit(n))
    return s, ok


#: Lines whose rest is below ``n`` times this are summed again with terms
#: ``e**RESCUE`` times larger: XLA's CPU backend flushes subnormal results, so
#: every term below ``2**-126`` of the shift's (an entry more than 87.3 below
#: the max) is lost, at most ``n 2**-126`` in all, and ``-log1p(r)`` (log_softmax
#: at the max; logsumexp where the max is 0) must keep ``r`` to ``2**-26``.
RESCUED_REST = 2.0**-100
#: The rescue's offset: on those lines every other entry is at least ``ln(2**100 /
#: 2**16) = 58`` below the max, so ``(x - s) + 64`` (an entry's difference with
#: the shift ``s - 64``) is exact where ``x - s`` is, and its term at most ``e**6``.
RESCUE = 64.0
_RESCUE_SCALE = math.exp(-RESCUE)


def _rescued(rest: Array, n: int, rescaled) -> Array:
    """``rest`` of lines of ``n`` entries, the lines below ``n RESCUED_REST`` replaced by ``rescaled(need)``.

    ``rescaled`` takes the per-line mask (1.0 where the line needs it) and
    returns every line's rest from terms ``e**RESCUE`` larger, brought back; it
    runs under the shared state's ``lax.cond`` (``JaxNumerics.replaced``), so
    calls without such a line pay one predicate (found by
    ``benchmarks/fuzz_kernels.py``: ``logsumexp([-85.97, -90.38, 0, -102.63,
    -93.07])`` gave ``4.6219944e-38`` for ``4.6819694e-38``).
    """
    import jax.numpy as jnp

    from lse_dispatch._numerics import numerics_for

    need = rest < n * RESCUED_REST
    return numerics_for(jnp).replaced(jnp, rest, need, lambda: rescaled(need.astype(rest.dtype)))


def _exp_of_shift(m: Array, s: Array) -> Array:
    """``exp(s - m)``: to half an ulp by Taylor where ``|m - s| <= 2**-4``, else (``s = 0``) XLA's ``exp(-m)``."""
    import jax.numpy as jnp

    low = m - s  # exact: m and s are close, or s = 0
    # exp(-low) = 1 + p, p = -low (1 - low/2 (1 - low/3 (1 - low/4 (1 - low/5)))),
    # the remainder below low**6 / 720 <= 2**-24 / 720 for |low| <= 2**-4.
    p = -low * (1 - low / 2 * (1 - low / 3 * (1 - low / 4 * (1 - low / 5))))
    return jnp.where(jnp.abs(low) <= 2.0**-4, 1 + p, jnp.exp(-low))


def _masked_sums(lines: Array, m: Array, s: Array, terms: Array | None) -> Array:
    """``(rest, count)`` along the last axis: ``sum exp(x - s)`` over ``x < m`` and the entries ``x == m``.

    ``terms``, if given, are ``exp(lines - s)`` already formed (and kept in
    memory by the caller); else they are formed in the summation loop.
    """
    import jax.numpy as jnp

    zero = jnp.zeros((), lines.dtype)
    one = jnp.ones((), lines.dtype)
    if terms is None:

        def packed(part):
            at_max = part == m
            return jnp.where(at_max, zero, jnp.exp(part - s)), jnp.where(at_max, one, zero)

        return pairwise_sum(lines, packed)
    # The entries and their terms side by side, sliced together, so that the
    # test at the max is made in the summation loop (computed on the whole
    # line first, XLA wrote the mask out as an array of its own).
    both = jnp.stack([lines, terms], axis=-2)

    def packed_terms(part):
        at_max = part[..., 0, :] == m
        return jnp.where(at_max, zero, part[..., 1, :]), jnp.where(at_max, one, zero)

    return pairwise_sum(both, packed_terms)


def exact_state(lines: Array, m: Array, s: Array, *, terms: Array | None = None) -> tuple[LSEState, Array]:
    """``(state, line total c + r)`` of lines that all have ``ok`` (see :func:`exact_shift`).

    Terms ``exp(x - s)`` of the exact difference (or ``terms``, if given,
    already formed); the count at the max and the rest are summed apart, the
    rest is rescaled by ``exp(s - m)`` (:func:`_exp_of_shift`).
    """
    sums = _masked_sums(lines, m, s, terms)
    rest = sums[..., :1] * _exp_of_shift(m, s)
    rest = _rescued(rest, lines.shape[-1], lambda need: (_masked_sums(lines, m, s - RESCUE * need, None)[..., :1]
                                                         * _exp_of_shift(m, s)) * _RESCUE_SCALE)
    count = sums[..., 1:]
    return LSEState(m, count, rest), count + rest


# --------------------------------------------------------------------------
# The operations on lines: the exact-shift form where every line allows it,
# else the TwoSum form, chosen by one lax.cond (its predicate reads one
# number per line; the branch not taken costs nothing).


def _choose(lines: Array, fast, slow):
    import jax
    import jax.numpy as jnp

    m = _max(lines)
    s, ok = exact_shift(m, lines.shape[-1])
    return jax.lax.cond(jnp.all(ok), fast, slow, lines, m, s)


def _line_total(st: LSEState) -> Array:
    import jax.numpy as jnp

    # c + r on lines with a finite max; the count at a non-finite max (the
    # +inf entries, or all -inf entries): softmax_from_state with this count
    # and rest 0 gives the same weights as with the state itself.
    return jnp.where(jnp.isfinite(st.max), st.count + st.rest, st.count)


def _exact_with_terms(lines: Array, m: Array, s: Array) -> tuple[LSEState, Array, Array]:
    """``(state, line total, terms)`` of the exact-shift form, the terms ``exp(x - s)`` kept.

    Small inputs form the terms once, kept in memory for the sum and the
    caller; larger ones form them again (see :func:`softmax`).
    """
    import jax.numpy as jnp

    terms = jnp.exp(lines - s) if lines.size <= MATERIALIZE else None
    st, total = exact_state(lines, m, s, terms=terms)
    return st, total, jnp.exp(lines - s) if terms is None else terms


def _weights_of_state(lines: Array, st: LSEState) -> tuple[Array, Array]:
    """``(t, f)`` with ``t f = softmax(lines)``, for the TwoSum form: the weights and 1.

    The shared ``softmax_from_state``, from the state's line total (see
    :func:`_line_total`), gives every limit.
    """
    import jax.numpy as jnp

    from lse_dispatch._state import softmax_from_state

    total = _line_total(st)
    weights = softmax_from_state(jnp, lines, LSEState(st.max, total, jnp.zeros_like(total)), None)
    return weights, jnp.ones_like(total)


def logsumexp(lines: Array, *, weights: bool = False) -> tuple[Array, ...]:
    """``(value, sign)`` of each line, keepdims; with ``weights`` also ``(t, f)``, ``t f = softmax(lines)``.

    The weights ``t f`` are the derivative's (``d lse / dx``), formed in the
    same pass as the value, and kept as a factor per line: the terms
    ``t = exp(x - s)`` and ``f = exp(s - m) / (c + r)`` where every line
    allows the exact shift, so that a backward pass reads the terms once and
    forms ``t (f g)`` in one loop (as ``jax.nn``'s reads its ``exp``); else
    the weights of the shared ``softmax_from_state`` and ``f = 1``
    (:func:`_weights_of_state`).  Either way ``f = 1 / sum t``.
    """
    import jax.numpy as jnp

    from lse_dispatch._state import finalize

    def fast(lines, m, s):
        if not weights:
            return finalize(jnp, exact_state(lines, m, s)[0], lines.dtype)
        st, total, terms = _exact_with_terms(lines, m, s)
        return (*finalize(jnp, st, lines.dtype), terms, _exp_of_shift(m, s) / total)

    def slow(lines, m, s):
        st = state(lines, m=m)
        out = finalize(jnp, st, lines.dtype)
        return (*out, *_weights_of_state(lines, st)) if weights else out

    return _choose(lines, fast, slow)


def log_softmax(lines: Array, *, weights: bool = False) -> Array | tuple[Array, ...]:
    """``log_softmax`` of each line; with ``weights`` the tuple ``(z, t, f)``, ``t f = softmax(lines)``.

    Where every line allows the exact shift: ``(x - m) - log1p(c - 1 + r)``,
    the formula of the shared ``log_softmax_from_state`` for lines with a
    finite max (two roundings); otherwise that function itself, which also
    gives the limits.  The weights (the derivative's ``exp(z)``) are formed as
    :func:`logsumexp`'s are, so that a backward pass needs no ``exp``.
    """
    import jax.numpy as jnp

    from lse_dispatch._state import log_softmax_from_state

    def fast(lines, m, s):
        if not weights:
            st, _ = exact_state(lines, m, s)
            return (lines - m) - jnp.log1p((st.count - 1) + st.rest)
        st, total, terms = _exact_with_terms(lines, m, s)
        return (lines - m) - jnp.log1p((st.count - 1) + st.rest), terms, _exp_of_shift(m, s) / total

    def slow(lines, m, s):
        st = state(lines, m=m)
        z = log_softmax_from_state(jnp, lines, st, None)
        return (z, *_weights_of_state(lines, st)) if weights else z

    return _choose(lines, fast, slow)


def softmax(lines: Array) -> Array:
    """``softmax`` of each line.

    Where every line allows the exact shift: ``exp(x - s) / (c exp(m - s) + r_s)``
    with ``r_s`` the rest relative to ``s``: the entries at the max enter
    after the summation tree, each as the same ``exp(m - s)`` as in their own
    numerator, so that a dominant term is neither rounded at every level of
    the tree nor off by its own ``exp`` error relative to itself.  Inputs of at most
    :data:`MATERIALIZE` entries keep the terms in memory between the sum and
    the division (as jax.nn does); larger ones form them twice, which costs
    less than writing and reading them back.  Otherwise the TwoSum state and
    the shared ``softmax_from_state``, which also gives the limits.
    """
    import jax.numpy as jnp

    from lse_dispatch._state import softmax_from_state

    def fast(lines, m, s):
        terms = jnp.exp(lines - s) if lines.size <= MATERIALIZE else None
        sums = _masked_sums(lines, m, s, terms)
        terms = jnp.exp(lines - s) if terms is None else terms
        # The entries at the max enter after the tree, each as exp(m - s) (the
        # same exp as their own terms): a dominant entry's rounding in every
        # level of the tree would otherwise be the error of every output.
        total = sums[..., 1:] * jnp.exp(m - s) + sums[..., :1]
        return terms / total

    def slow(lines, m, s):
        return softmax_from_state(jnp, lines, state(lines, count_free=True, m=m), None)

    return _choose(lines, fast, slow)
