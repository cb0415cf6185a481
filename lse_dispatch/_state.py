"""The one place for the log-sum-exp math: a mergeable (max, count, rest) state.

Every path of the library -- eager, streaming, Dask tree reductions -- reduces
its input to the same three arrays and finalises them with the same rule.

For included entries with exponents ``e_i`` (``a_i + log|b_i|``) and signs
``s_i`` (``sign(b_i)``, or 1 without weights), the state is

* ``max``   -- ``m = max_i e_i`` (``-inf`` when nothing is included);
* ``count`` -- ``c = sum of s_i over the entries with e_i == m`` (an integer);
* ``rest``  -- ``r = sum of s_i * exp(e_i - m) over all other entries``.

so that ``sum_i s_i exp(e_i) = exp(m) * (c + r)``.  Keeping the entries at the
max out of ``r`` is what makes ``m + log1p(c - 1 + r)`` accurate when ``r`` is
tiny (Blanchard, Higham & Higham, "Accurately computing the log-sum-exp and
softmax functions", IMA J. Numer. Anal. 41, 2021): ``lse([0, -40])`` keeps its
``4.25e-18`` instead of rounding ``1 + r`` to 1.  Counting ties exactly keeps
that accuracy when several entries share the max.

All functions here take the namespace ``xp`` explicitly and are lazy-safe: no
Python ``bool``/``float`` of array values, no in-place writes, no
data-dependent shapes, so they run under ``jax.jit`` and keep Dask lazy.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._namespace import is_dask_namespace, is_jax_namespace, real_sign, scalar

__all__ = [
    "LSEState",
    "finalize",
    "log_softmax_from_state",
    "merge",
    "merge_along",
    "narrow_max",
    "reduce_max",
    "softmax_from_state",
    "state_from_exponents",
    "undefined_where",
    "weight_parts",
]

Array = Any

# Reductions over more than this many elements are summed along a contiguous
# trailing axis, so that NumPy-like backends use pairwise summation instead of
# adding one strided element after another.
_PAIRWISE_THRESHOLD = 32


class LSEState(NamedTuple):
    """Partial log-sum-exp of a set of entries; all fields broadcast together.

    ``max`` has the compute dtype; ``count`` and ``rest`` have the accumulator
    dtype (float64 for float32 input when the namespace has float64).
    """

    max: Array
    count: Array
    rest: Array


def reduce_max(xp, x: Array, axes: tuple[int, ...]) -> Array:
    """``max`` over ``axes`` with ``keepdims=True``; ``axes=()`` reduces nothing.

    NaN wins, as in the standard.  XLA's CPU ``max`` under ``jax.jit`` was
    seen to skip a NaN among finite entries (jax 0.10, a (10, 1024) row), so
    on JAX the NaN is put back from an ``isnan`` reduction.
    """
    if not axes:
        return x
    m = xp.max(x, axis=axes, keepdims=True)
    if is_jax_namespace(xp):
        # The NaN is taken from x itself (a sum of its NaN entries, 0 when there
        # are none): a NaN constant would trip jax.debug_nans on NaN-free input.
        m = m + xp.sum(xp.where(xp.isnan(x), x, xp.zeros_like(x)), axis=axes, keepdims=True)
    return m


def _accurate_sum(xp, x: Array, axes: tuple[int, ...], dtype) -> Array:
    """Sum over ``axes`` (keepdims) accumulating in ``dtype``, never sequentially.

    NumPy adds strided elements one after another (error growing like
    ``sqrt(n) * eps``) when the reduced axis is not the innermost in memory.
    When no wider accumulator exists, move the reduced axes to the end and
    flatten them, so that the sum runs over one contiguous trailing axis,
    which NumPy sums pairwise, torch by cascade and XLA by a tree.
    """
    if not axes:
        return xp.astype(x, dtype)
    widening = x.dtype != dtype
    reduced = math.prod([x.shape[ax] for ax in axes])  # a list: torch.compile traces no generator here
    if widening or reduced < _PAIRWISE_THRESHOLD or is_dask_namespace(xp):
        # Dask sums per chunk and combines in a tree; a reshape would rechunk.
        return xp.sum(x, axis=axes, dtype=dtype, keepdims=True)
    kept = tuple(ax for ax in range(x.ndim) if ax not in axes)
    order = kept + tuple(axes)
    moved = x if order == tuple(range(x.ndim)) else xp.permute_dims(x, order)
    kept_shape = tuple(x.shape[ax] for ax in kept)
    # Through 1-D: a reshape to (kept, n) may return the strided view itself,
    # while flattening lays the reduced entries out contiguously, last.
    flat = xp.reshape(xp.reshape(moved, (-1,)), kept_shape + (reduced,))
    if is_jax_namespace(xp):
        total = _fused_sum_last(xp, flat)
    else:
        total = xp.sum(flat, axis=-1, dtype=dtype)
    keep_shape = tuple(1 if ax in axes else x.shape[ax] for ax in range(x.ndim))
    return xp.reshape(total, keep_shape)


def _log1p(xp, x: Array) -> Array:
    """``log(1 + x)`` to about two ulps on every backend.

    XLA's float64 ``log1p`` was measured up to 128 ulps off on (-0.5, 0) and
    under 2 ulps elsewhere (jax 0.10, CPU).  Negative arguments therefore go
    through ``log1p(x) = -log1p(-x / (1 + x))``, whose argument is positive.
    (Goldberg's ``log(u) * x / (u - 1)`` is no cure: under ``jax.jit`` XLA
    rewrites ``(1 + x) - 1`` to ``x``.)
    """
    if not is_jax_namespace(xp):
        return xp.log1p(x)
    one = scalar(xp, 1.0, x)
    negative = x < 0
    # x <= -1 gives -inf or NaN through the division, as log1p itself would.
    flipped = -xp.log1p(-x / (one + x))
    return xp.where(negative, flipped, xp.log1p(xp.where(negative, -x, x)))


# Level-one groups of the fused sum hold at most this many terms: a group's
# float32 sum, in whatever order XLA adds it, is off by at most 7 roundings.
_GROUP = 8
# Limb grids of the exact chunk sums (see _limb_sum): for values scaled into
# (-1, 1) the high limb holds multiples of 2**-15, the middle one multiples of
# 2**-31, and the limbs of _LIMB_CHUNK values sum exactly in float32.
_HIGH_GRID = 2.0**15
_MID_GRID = 2.0**31
_LIMB_CHUNK = 256


def _group_layout(shape: tuple[int, ...], axis: int) -> tuple[tuple[int, ...], int]:
    """``(grouped shape, axis to sum)`` that sums groups of ``k <= 8`` entries along ``axis``.

    Each group is ``k`` entries of ``axis``; the layout keeps a long
    contiguous trailing extent in the output, the one shape of a reduction
    with many outputs that XLA's CPU runtime vectorises well (measured: a
    group axis innermost, or a 1-D output, runs 3-15x slower).
    """
    n = shape[axis]
    group = next(k for k in (_GROUP, 4, 2, 1) if n % k == 0)
    before, after = shape[:axis], shape[axis + 1 :]
    if math.prod(after) >= 64 or group == 1:
        return before + (n // group, group) + after, axis + 1
    block = next((b for b in range(256, 63, -1) if (n // group) % b == 0), n // group)
    return before + (n // (group * block), group, block) + after, axis + 1


def _fused_sum_last(xp, x: Array) -> Array:
    """Sum over the last axis of a JAX array, in passes XLA can fuse.

    Level one sums groups of ``k <= 8`` terms (``k`` the largest of 8, 4, 2, 1
    dividing ``n``), one fused reduction over a view of ``x`` (see
    :func:`_group_layout`); the
    ``n / k`` partial sums then go through :func:`_limb_sum`, which is exact up
    to a tail far below the last bit.  With ``u = 2**-24`` and ``T = sum |x_i|``
    the error is at most (first order in ``u``)

        ``|computed - sum| <= u |sum| + (k - 1 + 2**-7 + 1.02 (n / k) 2**-23) u T``

    whatever order XLA adds each group in: ``(k - 1) u T`` from the groups
    (any order of ``k`` terms), ``u |sum|`` from the final rounding, and the
    rest from the limb tails (see :func:`_limb_sum`); for ``n <= 2**23`` that is
    at most ``u |sum| + 7.2 u T``.  (float64 under x64 takes this path too:
    the limbs are exact there a fortiori, and the bound holds with
    ``u = 2**-53``.)  Explicit
    pairwise halving bounds the same error by ``ceil(log2 n) u T`` but needs an
    optimization barrier per level, each an unfused pass over memory.  No
    barrier is needed here: rounding, which XLA does not rewrite, makes the
    limbs, and the exact sums do not depend on the order of addition.
    """
    axis = x.ndim - 1
    shape, summed = _group_layout(x.shape, axis)
    partial = xp.sum(xp.reshape(x, shape), axis=summed)
    partial = xp.reshape(partial, x.shape[:-1] + (-1,))
    return _limb_sum(xp, partial, axis=axis)[..., 0]


def _limb_sum(xp, values: Array, axis: int) -> Array:
    """Sum of finite float32 ``values`` over ``axis`` (keepdims), exact up to small tails.

    Each level scales the values by a power of two (exactly) into ``(-1, 1)``
    and splits each scaled ``v`` into limbs on fixed grids by rounding, which
    XLA does not rewrite away:

        ``hi = round(v * 2**15) / 2**15``,  ``mid = round((v - hi) * 2**31) / 2**31``,
        ``lo = (v - hi) - mid``  (``|lo| <= 2**-32``).

    ``v - hi`` and ``lo`` are exact: each is a multiple of ``ulp(v)`` smaller
    than ``2**24`` of them.  Over chunks of 256 values the sums of ``hi``
    (below ``2**23`` multiples of ``2**-15``) and of ``mid`` (below ``2**23``
    multiples of ``2**-31``) are exact in any order of addition; only the sum of
    ``lo`` rounds, by at most ``255 u * 256 * 2**-32`` (``u = 2**-24``).  The
    ``3 n / 256`` chunk sums are the next level's values, until one chunk is
    left, whose sum is ``hi + (mid + lo)``: two roundings, of the result and of
    ``|mid + lo| <= 2**-8``.  The scale is below ``2 max|v|``, so with
    ``T = sum |v|`` the result is within ``u |sum| + (2**-7 + 1.02 n 2**-23) u T``
    of the exact sum for ``n`` values: nearly one rounding.  (Scales are kept
    within ``2**+-125``, so values at or beyond those magnitudes, near float32's
    range limits, lose this bound.)  Each level's arrays are ``3/256`` the size
    of the previous ones.
    """
    total_exponent = None
    while True:
        n = values.shape[axis]
        largest = xp.max(xp.abs(values), axis=axis, keepdims=True)
        _, exponent = xp.frexp(largest)  # largest < 2**exponent; 0 gives 0
        exponent = xp.clip(exponent, -125, 125)
        # ldexp, not exp2: XLA may evaluate exp2 through exp, inexactly.
        values = values * xp.ldexp(xp.ones_like(largest), -exponent)
        total_exponent = exponent if total_exponent is None else total_exponent + exponent
        chunk = min(n, _LIMB_CHUNK)
        padding = (-n) % chunk
        if padding:
            pad_shape = values.shape[:axis] + (padding,) + values.shape[axis + 1 :]
            values = xp.concat([values, xp.zeros(pad_shape, dtype=values.dtype)], axis=axis)
            n += padding
        values = xp.reshape(values, values.shape[:axis] + (n // chunk, chunk) + values.shape[axis + 1 :])
        high = xp.round(values * _HIGH_GRID) / _HIGH_GRID
        remainder = values - high
        mid = xp.round(remainder * _MID_GRID) / _MID_GRID
        low = remainder - mid
        high, mid, low = (xp.sum(limb, axis=axis + 1) for limb in (high, mid, low))
        if n == chunk:
            return xp.ldexp(high + (mid + low), total_exponent)
        values = xp.concat([high, mid, low], axis=axis)


def undefined_where(xp, mask: Array, like: Array) -> Array:
    """NaN where ``mask`` is True and 0 elsewhere, in the dtype of ``like``.

    Added to a result whose value has no limit there (``inf - inf``).  On
    JAX it is made as ``z - z`` with ``z`` infinite under ``mask``, never by
    selecting a NaN constant: a NaN made where the result is not NaN trips
    ``jax.debug_nans`` on NaN-free input.  Elsewhere ``inf - inf`` would
    raise NumPy's "invalid value" warning, so the constant is selected.
    """
    if is_jax_namespace(xp):
        z = xp.where(mask, scalar(xp, math.inf, like), scalar(xp, 0.0, like))
        return z - z
    return xp.where(mask, scalar(xp, math.nan, like), scalar(xp, 0.0, like))


def weight_parts(xp, b: Array, dtype=None) -> tuple[Array, Array, Array]:
    """``(b != 0, sign(b), log|b|)`` of real weights; ``log|b|`` is 0 where ``b == 0``.

    ``log|b|`` is taken in ``dtype`` (``b``'s own by default), from ``b``
    itself: float32 weights of float32 input get a float64 log.

    XLA treats subnormal operands as zero (flush-to-zero and
    denormals-are-zero, jax 0.10 CPU, under ``jit`` and eagerly): ``1e-310 != 0``
    is False there and ``log(1e-310)`` is ``-inf``, so a subnormal weight was
    dropped.  On JAX the three parts come from the bits of ``b`` instead
    (:func:`_jax_weight_parts`); integer operations are not flushed.
    """
    dtype = b.dtype if dtype is None else dtype
    if is_jax_namespace(xp):
        return _jax_weight_parts(xp, b, dtype)
    nonzero = b != 0
    log_abs = xp.log(xp.astype(xp.where(nonzero, xp.abs(b), scalar(xp, 1.0, b)), dtype))
    return nonzero, real_sign(xp, b), log_abs


# Cody and Waite's split of log 2: _LN2_HIGH has 32 significant bits, so
# k * _LN2_HIGH is exact for |k| < 2**20 and k log 2 is formed to an ulp.
_LN2_HIGH = 6.93147180369123816490e-01
_LN2_LOW = 1.90821492927058770002e-10


def _jax_weight_parts(xp, b: Array, dtype) -> tuple[Array, Array, Array]:
    """:func:`weight_parts` from the bits of ``b`` (float16/32/64), immune to flushing.

    A subnormal ``b`` is ``n * 2**-k`` with ``n`` its integer significand
    (``k`` = 1074 for float64, 149 for float32, 24 for float16); ``n`` is
    exact as a float of ``b``'s dtype and ``log|b| = log n - k log 2``.
    (The float32 to float64 conversion of a subnormal is flushed too, so the
    log is taken from the significand, never from a converted ``b``.)
    """
    import jax

    info = xp.finfo(b.dtype)
    bits_dtype = {8: xp.int64, 4: xp.int32, 2: xp.int16}[info.bits // 8]
    bits = jax.lax.bitcast_convert_type(b, bits_dtype)
    magnitude = bits & ((1 << (info.bits - 1)) - 1)
    nonzero = magnitude != 0
    one = scalar(xp, 1.0, b)
    sign = xp.where(bits < 0, -one, one)
    sign = xp.where(nonzero, sign, xp.zeros_like(sign))
    subnormal = nonzero & (magnitude < (1 << info.nmant))
    k = -math.frexp(float(info.smallest_subnormal))[1] + 1  # smallest subnormal = 2**-k
    significand = xp.astype(xp.where(subnormal, magnitude, xp.ones_like(magnitude)), dtype)
    log_subnormal = (xp.log(significand) - k * _LN2_LOW) - k * _LN2_HIGH
    log_normal = xp.log(xp.astype(xp.where(nonzero & ~subnormal, xp.abs(b), one), dtype))
    return nonzero, sign, xp.where(subnormal, log_subnormal, log_normal)


def narrow_max(xp, state: LSEState, dtype) -> LSEState:
    """``state`` with its ``max`` in ``dtype`` (narrower than the state's), same sum.

    Weighted float32 input forms its exponents ``a + log|b|`` and its state in
    float64 (see ``_generic``); the state's ``max`` is then narrowed back to
    float32, as every state of float32 input has it.  ``m`` becomes
    ``m' = fl(m)``, and ``exp(m) (c + r) = exp(m') (c + r) exp(m - m')``:

    * ``|m| < 2 / eps`` (``2**24`` for float32): ``|m - m'|`` is at most half
      an ulp of ``m'``, at most 1/2, so ``(m', 0, (c + r) exp(m - m'))``,
      whose rest carries the float64 precision of the terms (``c`` no longer
      splits off, which only mattered for float64 results);
    * larger, infinite or NaN ``m``: ``(m', c, r)``.  The rounding of ``m``
      is then at most half an ulp of the result, whose magnitude is that of
      ``m``, and the limits keep their count.
    """
    m, count, rest = state
    narrow = xp.astype(m, dtype)
    small = xp.abs(m) < 2.0 / float(xp.finfo(dtype).eps)
    # m - m' only where it is small: infinite m would give inf - inf.
    zero = xp.zeros_like(count)
    difference = xp.where(small, m - xp.astype(xp.where(small, narrow, xp.zeros_like(narrow)), m.dtype), zero)
    moved = (count + rest) * xp.exp(difference)
    return LSEState(narrow, xp.where(small, zero, count), xp.where(small, moved, rest))


def _finite_shift(xp, m: Array) -> Array:
    """The value subtracted before ``exp``: ``m`` itself where it is finite.

    Where ``m == -inf`` nothing is included and 0 avoids ``-inf - -inf``;
    where ``m`` is ``+inf`` or NaN the largest finite value sends every finite
    entry to ``exp(-huge) = 0`` without overflow (the state's ``max`` carries
    the non-finite value to :func:`finalize`).
    """
    huge = scalar(xp, xp.finfo(m.dtype).max, m)
    zero = scalar(xp, 0.0, m)
    return xp.where(m == -math.inf, zero, xp.where(xp.isfinite(m), m, huge))


def _exp_difference(xp, x: Array, shift: Array, accumulator, *, upper: Array | None = None) -> Array:
    """``exp(min(x - shift, upper))`` in ``accumulator``, without the rounding of ``x - shift``.

    A rounded difference ``d`` is off by up to half an ulp of ``|d|``, which
    ``exp`` turns into a relative error of ``|d| / 2`` ulps: the rest of a
    dominant entry's state, and so its ``log_softmax = -log1p(rest)``, would
    be some 30 ulps off for differences near -30.  A wider accumulator holds
    the difference exactly; otherwise TwoSum recovers its error ``e`` and
    ``exp(d + e) = exp(d) * (1 + e)``.  ``shift`` is finite.
    """
    if x.dtype != accumulator:
        diff = xp.astype(x, accumulator) - xp.astype(shift, accumulator)
        return xp.exp(diff if upper is None else xp.minimum(diff, xp.astype(upper, accumulator)))
    # Non-finite x get a finite stand-in for TwoSum; their exp comes from
    # x - shift itself below.
    zero = scalar(xp, 0.0, x)
    _, error = _two_sum(xp, xp.where(xp.isfinite(x), x, zero), -shift)
    # An overflowing difference (x - huge) leaves a NaN error: exp is 0 there.
    error = xp.where(xp.isfinite(error), error, zero)
    diff = x - shift
    if upper is not None:
        diff = xp.minimum(diff, upper)
    return xp.exp(diff) * (1 + error)


def state_from_exponents(
    xp,
    exponent: Array,
    axes: tuple[int, ...],
    accumulator,
    *,
    included: Array | None = None,
    sign: Array | None = None,
    scale: Array | None = None,
    log_scale: Array | None = None,
) -> LSEState:
    """Reduce ``exponent`` over ``axes`` (keepdims) to an :class:`LSEState`.

    Parameters
    ----------
    exponent
        Real floating array of ``e_i = a_i + log|b_i|`` (or ``a_i``).
    axes
        Non-negative axes to reduce; ``()`` makes one state per entry.
    accumulator
        Dtype in which ``count`` and ``rest`` are summed.
    included
        Boolean mask (broadcast to ``exponent``); False entries are ignored,
        whatever their value.  ``None`` includes everything.
    sign
        ``sign(b_i)`` in the compute dtype, or ``None`` for all ones.
    scale, log_scale
        ``|b_i|`` and ``exponent - log|b_i|`` (i.e. ``a_i``).  When given, the
        terms are formed as ``|b_i| * exp(a_i - m)``, which keeps the full
        precision of ``b`` instead of rounding ``log|b_i|`` (whose absolute
        error grows with ``|log b_i|``).  Subnormal ``|b_i|`` fall back to
        ``exp(e_i - m)``, where ``exp(a_i - m)`` alone could overflow.
    """
    if (
        is_jax_namespace(xp)
        and included is None
        and sign is None
        and scale is None
        and len(axes) == 1
        and exponent.dtype == xp.float32
        and accumulator == xp.float32
        and exponent.shape[axes[0]] >= _PAIRWISE_THRESHOLD
    ):
        return _jax_float32_state(xp, exponent, axes[0], accumulator)
    return _state_from_exponents(
        xp, exponent, axes, accumulator, included=included, sign=sign, scale=scale, log_scale=log_scale
    )


def _jax_float32_state(xp, x: Array, axis: int, accumulator) -> LSEState:
    """The state of plain float32 JAX input (no ``b``, no ``where``): max and one fused sum.

    The common case needs no separate ``count``: the fused sum runs over
    every entry, those at the max included (their terms are exactly
    ``exp(0) * (1 + 0) = 1``), giving ``t = c + r``, and the state is
    ``(m, 1, t - 1)``, which has the same ``c + r`` and ``c - 1 + r``.  That
    saves the count pass and the per-entry max mask.  Splitting ``c`` off
    matters only when ``r`` is small next to ``c``, so this form is taken
    only when every row has ``t >= 16`` (and a finite max or a NaN entry);
    otherwise :func:`_jax_float32_state_exact` runs instead, through
    ``lax.cond``.

    Error: with ``y = c - 1 + r`` (what :func:`finalize` takes ``log1p``
    of), the sum's bound of :func:`_fused_sum_last` applies to
    ``T = c + r = 1 + y`` instead of ``r``, and ``fl(t - 1)`` rounds once, as
    :func:`finalize`'s ``(c - 1) + r`` would have:

        ``|computed - y| <= u y + (k - 1 + 2**-7 + 1.02 (n / k) 2**-23) u (1 + y)``

    on top of the terms' own errors; ``t >= 16`` gives ``1 + y <= (16/15) y``,
    so the summation part is at most 16/15 of the exact path's
    ``(...) u r <= (...) u y``, and ``log1p(y) >= log 16`` keeps the
    absolute error of the log below its value's.
    """
    import jax

    work, work_axis, m, work_shift, rows = _jax_work_layout(xp, x, axis)
    partial = _jax_grouped_terms(xp, x, axis, work, work_axis, work_shift, rows, below_max=False)
    total = _limb_sum(xp, partial, axis)
    has_nan = xp.isnan(total) & (m != math.inf)
    usable = xp.all((xp.isfinite(m) & (total >= 16)) | has_nan)
    m = xp.where(has_nan, total, m)
    one = xp.ones_like(total)
    return jax.lax.cond(
        usable,
        lambda: LSEState(m, one, total - one),
        lambda: _jax_float32_state_exact(xp, x, axis, accumulator),
    )


def _jax_work_layout(xp, x: Array, axis: int):
    """``(work, work_axis, m, work_shift, rows)``: ``x`` as rows (1-D input) and its max and shift."""
    rows = _row_count(x.shape[0]) if x.ndim == 1 else None
    if rows is None:
        m = xp.max(x, axis=axis, keepdims=True)
        return x, axis, m, _finite_shift(xp, m), None
    # A 1-D input as rows: XLA's CPU runtime runs a reduction with a
    # scalar broadcast into it 4x slower than one with a per-row operand
    # (measured), so each row gets its own copy of the shift.
    work = xp.reshape(x, (rows, x.shape[0] // rows))
    row_max = xp.max(work, axis=1, keepdims=True)
    m = xp.max(row_max, axis=0)
    shift = _finite_shift(xp, m)
    # shift itself (for +inf and NaN too), but an array XLA cannot fold.
    work_shift = xp.minimum(xp.maximum(row_max, shift), shift)
    return work, 1, m, work_shift, rows


def _jax_grouped_terms(xp, x, axis, work, work_axis, work_shift, rows, *, below_max: bool) -> Array:
    """Group sums (``n / k`` along ``axis``) of ``exp(d) * (1 + e)``, masked to ``x < m`` if ``below_max``."""
    one = scalar(xp, 1.0, x)
    shape, summed = _group_layout(work.shape, work_axis)
    grouped = xp.reshape(work, shape)
    # Broadcast m in the grouped shape: a reshape after the exp would make XLA
    # write the terms out instead of fusing them into the sum.
    extra = len(shape) - work.ndim + 1
    grouped_shift = xp.reshape(work_shift, shape[:work_axis] + (1,) * extra + work_shift.shape[work_axis + 1 :])
    diff = grouped - grouped_shift
    # TwoSum's error of diff, from x clamped to m - 128 so that -inf gives a
    # finite error (its term exp(-inf) is 0 anyway).  exp takes the unclamped
    # diff: XLA's fused max and min can drop a NaN, exp and * cannot.
    _, error = _two_sum(xp, xp.maximum(grouped, grouped_shift - 128), -grouped_shift)
    terms = xp.exp(diff) * (1 + error)
    if below_max:
        terms = terms * xp.minimum(xp.ceil(-diff), one)
    partial = xp.sum(terms, axis=summed)
    if rows is None:
        return xp.reshape(partial, x.shape[:axis] + (-1,) + x.shape[axis + 1 :])
    return xp.reshape(partial, (-1,))


def _jax_float32_state_exact(xp, x: Array, axis: int, accumulator) -> LSEState:
    """The state of plain float32 JAX input (no ``b``, no ``where``), in two fused passes.

    XLA's CPU reductions fuse arithmetic producers (subtract, multiply, exp,
    round, ceil, min, max) but not ``where`` or comparisons, which it writes
    out to memory first, and reductions that share an ``exp`` make it write
    the ``exp`` out too.  So this form has no select on the big arrays:

    * ``count`` sums ``1 - min(ceil(m - x), 1)``, which is 1 exactly where
      ``x == m`` and 0 below (``-inf`` included);
    * ``rest`` sums ``exp(d) * (1 + e) * min(ceil(-d), 1)`` over groups of
      ``k <= 8`` entries, with ``d + e = x - m`` from TwoSum (as
      :func:`_exp_difference`; ``e`` from ``x`` clamped to ``m - 128``, so
      that ``-inf`` gives a term of 0 rather than NaN), and the factor 0 on the entries at
      the max (``ceil(-d)`` is 0 just where ``count``'s is 1); the ``n / k``
      group sums then go through :func:`_limb_sum`.  The error bound is that
      of :func:`_fused_sum_last`: ``u rest + (k - 1 + 2**-7 + 1.02 (n / k)
      2**-23) u rest`` on top of the terms' own.

    A row with a NaN entry gets a NaN rest and a NaN max.  Inputs with any
    other row whose max is not finite (``+inf``, all ``-inf``) take the
    shared implementation through ``lax.cond``, so that every limit is the
    generic path's; it reads only ``x``, so the common case pays nothing
    for it.
    """
    import jax

    work, work_axis, m, work_shift, rows = _jax_work_layout(xp, x, axis)
    one = scalar(xp, 1.0, x)
    # 1 exactly at the max: m - x is 0 only there (and inf for x = -inf).
    count = xp.sum(one - xp.minimum(xp.ceil(work_shift - work), one), axis=work_axis, keepdims=True)
    partial = _jax_grouped_terms(xp, x, axis, work, work_axis, work_shift, rows, below_max=True)
    if rows is not None:
        count = xp.sum(count, axis=0)
    rest = _limb_sum(xp, partial, axis)
    # Only a NaN entry makes rest NaN.  XLA's CPU max can miss that NaN (on
    # large inputs it returned -inf for a row of finite numbers and one NaN),
    # so the state carries the NaN in ``max``; every consumer then returns
    # NaN, as the contract says.
    # (With m = +inf, rest is NaN from inf - inf instead: the shared path.)
    has_nan = xp.isnan(rest) & (m != math.inf)
    usable = xp.all(xp.isfinite(m) | has_nan)
    m = xp.where(has_nan, rest, m)
    return jax.lax.cond(
        usable,
        lambda: LSEState(m, count, rest),
        lambda: _state_from_exponents(xp, x, (axis,), accumulator),
    )


def _row_count(n: int) -> int | None:
    """Rows of 512 to 8192 entries (a multiple of 8) that ``n`` splits into, if any."""
    for length in range(4096, 511, -8):
        if n % length == 0 and n // length >= 2:
            return n // length
    for length in range(4104, 8193, 8):
        if n % length == 0:
            return n // length
    return None


def _state_from_exponents(
    xp,
    exponent: Array,
    axes: tuple[int, ...],
    accumulator,
    *,
    included: Array | None = None,
    sign: Array | None = None,
    scale: Array | None = None,
    log_scale: Array | None = None,
) -> LSEState:
    """:func:`state_from_exponents` for every backend and every argument."""
    neg_inf = scalar(xp, -math.inf, exponent)
    masked = exponent if included is None else xp.where(included, exponent, neg_inf)
    m = reduce_max(xp, masked, axes)
    shift = _finite_shift(xp, m)
    at_max = masked == m
    counted = at_max if included is None else (at_max & included)

    if scale is None:
        terms = _exp_difference(xp, masked, shift, accumulator)
    else:
        tiny = scalar(xp, xp.finfo(exponent.dtype).smallest_normal, exponent)
        one = scalar(xp, 1.0, exponent)
        # One below log(max): exp of log(max) itself rounds up to inf.
        max_log = scalar(xp, math.log(xp.finfo(exponent.dtype).max) - 1.0, exponent)
        normal = scale >= tiny
        # |b| * exp(a - m): a - m <= -log|b| <= max_log for normal |b|, so the
        # clamp below only ever bites on entries that the where discards.
        direct = _exp_difference(xp, log_scale, shift, accumulator, upper=max_log)
        direct = direct * xp.astype(xp.where(normal, scale, one), accumulator)
        terms = xp.where(normal, direct, xp.astype(xp.exp(exponent - shift), accumulator))
    zero = scalar(xp, 0.0, terms)
    if sign is not None:
        # A where, not a product: 0 * inf at excluded b == 0 entries would warn.
        terms = xp.where(sign < 0, -terms, terms)
    keep = ~at_max if included is None else (included & ~at_max)
    rest = _accurate_sum(xp, xp.where(keep, terms, zero), axes, accumulator)

    if sign is None:
        at_max_value = xp.astype(counted, accumulator)
    else:
        at_max_value = xp.where(counted, xp.astype(sign, accumulator), scalar(xp, 0.0, rest))
    count = _accurate_sum(xp, at_max_value, axes, accumulator)
    return LSEState(m, count, rest)


def merge(xp, first: LSEState, second: LSEState) -> LSEState:
    """Combine two states of disjoint entry sets (associative, commutative).

    The state whose max is the overall max keeps its count and rest; the other
    contributes ``(count + rest) * exp(its max - overall max)`` to the rest.
    Differences of equal infinities are never formed, so ``-inf`` merged with
    ``-inf`` stays ``-inf`` and NaN propagates through ``maximum``.
    """
    m = xp.maximum(first.max, second.max)
    acc = first.rest.dtype
    count = xp.zeros_like(first.rest) + xp.zeros_like(second.rest)
    rest = count
    zero = scalar(xp, 0.0, count)
    shift = _finite_shift(xp, m)
    for part in (first, second):
        on_top = part.max == m
        # exp(part.max - shift) is 0 for parts below a finite max, and the
        # where keeps its NaN-free branch for parts that sit on the max.
        below = xp.where(on_top, xp.full_like(part.max, -math.inf), part.max)
        weight = _exp_difference(xp, below, shift, acc)  # without the rounding of below - shift
        count = count + xp.where(on_top, part.count, zero)
        rest = rest + xp.where(on_top, part.rest, (part.count + part.rest) * weight)
    return LSEState(m, count, rest)


def merge_along(xp, state: LSEState, axis: int) -> LSEState:
    """Merge the partial states laid out along ``axis`` into one (keepdims).

    The n-ary form of :func:`merge`: parts on the overall max keep their count
    and rest, the others contribute ``(count + rest) * exp(max - overall)``.
    Used where partial states come back as arrays: blocks of a fused GPU
    kernel, chunks of a Dask reduction.
    """
    m = xp.max(state.max, axis=axis, keepdims=True)
    on_top = state.max == m
    shift = _finite_shift(xp, m)
    below = xp.where(on_top, xp.full_like(state.max, -math.inf), state.max)
    weight = xp.astype(xp.exp(below - shift), state.rest.dtype)
    zero = scalar(xp, 0.0, state.rest)
    count = xp.sum(xp.where(on_top, state.count, zero), axis=axis, keepdims=True)
    rest = xp.sum(xp.where(on_top, state.rest, (state.count + state.rest) * weight), axis=axis, keepdims=True)
    return LSEState(m, count, rest)


def finalize(xp, state: LSEState, dtype) -> tuple[Array, Array]:
    """Return ``(log|sum|, sign(sum))`` of a state, in ``dtype``.

    ``log|c + r| = log1p((s*c - 1) + s*r)`` with ``s = sign(c + r)``: ``s*c - 1``
    is an exact small integer, so a tiny ``r`` survives.
    """
    m, count, rest = state
    acc = rest.dtype
    total = count + rest
    sign = real_sign(xp, total)
    zero_sum = sign == 0
    # log1p(-1) is the right -inf for a zero sum, but NumPy would warn.
    shifted = xp.where(zero_sum, scalar(xp, 0.0, total), (sign * count - 1) + sign * rest)
    log_abs = xp.where(zero_sum, scalar(xp, -math.inf, total), _log1p(xp, shifted))
    # At an infinite max the max alone decides; adding log_abs could form inf - inf.
    m = xp.astype(m, acc)
    out = m + xp.where(xp.isfinite(m), log_abs, scalar(xp, 0.0, log_abs))
    # +inf entries whose signed weights cancel: inf - inf has no limit.
    out = out + undefined_where(xp, (m == math.inf) & (count == 0), out)
    # Nothing included, or a sum of exactly zero: log 0 = -inf with sign 0.
    sign = xp.where(m == -math.inf, scalar(xp, 0.0, sign), sign)
    return xp.astype(out, dtype), xp.astype(sign, dtype)


def log_softmax_from_state(xp, x: Array, state: LSEState, included: Array | None) -> Array:
    """``x - lse`` for entries of ``x`` reduced into ``state`` (no weights).

    Computed as ``(x - m) - log1p(c - 1 + r)`` in the accumulator dtype, so the
    entry at the max gets ``-log1p(r)`` exactly rather than ``m - lse``
    (``log_softmax([0, -40])[0] = -4.25e-18``, not 0).  Limits follow the
    contract: ``k`` entries at ``+inf`` get ``-log k`` and the rest ``-inf``;
    excluded entries get ``-inf``; a NaN in the slice makes it all NaN.
    """
    return _log_softmax_limits(xp, x, state, included, _log_softmax_value(xp, x, state))


def _log_softmax_value(xp, x: Array, state: LSEState) -> Array:
    """``(x - m) - log1p(c - 1 + r)`` in the accumulator dtype, before the limits.

    Two roundings, of ``x - m`` and of the subtraction; exact enough where the
    accumulator is wider than ``x``, and for log_softmax itself (both terms
    are <= 0, so nothing cancels).
    """
    m, count, rest = state
    acc = rest.dtype
    # count is 0 only when nothing is included; those entries end up -inf.
    log_norm = _log1p(xp, xp.maximum(count, scalar(xp, 1.0, count)) - 1 + rest)
    shift = xp.astype(_finite_shift(xp, m), acc)
    return (xp.astype(x, acc) - shift) - log_norm


def _two_sum(xp, a: Array, b: Array) -> tuple[Array, Array]:
    """``s = fl(a + b)`` and the exact rounding error ``a + b - s`` (Knuth).

    No optimization barrier under ``jax.jit``: XLA's algebraic simplifier
    folds ``(x + c) - c`` to ``x`` only for a compile-time constant ``c`` (as in
    :func:`_log1p`'s note), never for two traced operands, and a barrier
    would stop the fusion of every pass around it (jax 0.10, CPU;
    ``tests/test_jax_fused.py`` fails if that ever changes).
    """
    # Written so that few temporaries of a's size live at once
    # (logsumexp_blocked bounds its memory by the block).
    total = a + b
    b_virtual = total - a
    error = a - (total - b_virtual)
    return total, error + (b - b_virtual)


def _log_softmax_limits(xp, x: Array, state: LSEState, included: Array | None, value: Array) -> Array:
    """Impose the contract's limits on a log-softmax ``value``."""
    m, count, _ = state
    neg_inf = scalar(xp, -math.inf, value)
    at_inf = x == math.inf
    at_inf_share = -xp.log(xp.maximum(count, scalar(xp, 1.0, count)))
    value = xp.where(m == math.inf, xp.where(at_inf, at_inf_share, neg_inf), value)
    if included is not None:
        value = xp.where(included, value, neg_inf)
    return xp.where(xp.isnan(m), xp.astype(m, value.dtype), value)


def softmax_from_state(xp, x: Array, state: LSEState, included: Array | None) -> Array:
    """``exp(log_softmax)`` (accumulator dtype), compensated when not widened.

    When the accumulator is wider than ``x`` (float32 in float64) the plain
    exponent ``exp((x - m) - log_norm)`` is exact enough.  Otherwise (float64,
    float32 on JAX without x64) the result is ``exp(x - m) / (c + r)``, with
    the difference's rounding recovered by TwoSum (:func:`_exp_difference`):
    ``exp`` (about an ulp), the correction and the division (half an ulp
    each) and the sum's own error, whatever the length.  The log form
    ``exp(hi) * (1 + lo)`` could not recover the rounding of ``log_norm``
    itself, half an ulp of a number near ``log n``: 7.8 ulps for a float64
    row of 2**20 entries (``tests/test_known_gaps.py`` held that miss).
    """
    if x.dtype != state.rest.dtype:
        out = xp.exp(_log_softmax_limits(xp, x, state, included, _log_softmax_value(xp, x, state)))
        # XLA's fused exp does not carry NaN through (seen under jax.jit).
        return xp.where(xp.isnan(state.max), xp.astype(state.max, out.dtype), out)
    m, count, rest = state
    one = scalar(xp, 1.0, count)
    # count is 0 only when nothing is included; those entries end up 0.
    total = xp.maximum(count, one) + rest
    out = _exp_difference(xp, x, _finite_shift(xp, m), x.dtype) / total
    # The limits of _log_softmax_limits, in linear space.
    zero = scalar(xp, 0.0, out)
    out = xp.where(m == math.inf, xp.where(x == math.inf, one / xp.maximum(count, one), zero), out)
    if included is not None:
        out = xp.where(included, out, zero)
    return xp.where(xp.isnan(m), xp.astype(m, out.dtype), out)
