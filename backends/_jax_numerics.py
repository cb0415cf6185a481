"""JAX's numerics: what XLA needs of the shared math, behind the declared hook.

:class:`JaxNumerics` is the ``numerics`` of the JAX backend's spec
(:mod:`lse_dispatch._numerics` says what the hook is).  Each method works
around one measured behaviour of XLA (jax 0.10, CPU):

* ``max``: XLA's CPU ``max`` under ``jax.jit`` was seen to skip a NaN among
  finite entries (a (10, 1024) row), so the NaN is put back, taken from the
  input itself (a NaN constant would trip ``jax.debug_nans``);
* ``log1p``: XLA's float64 ``log1p`` is up to 128 ulps off on (-0.5, 0);
* ``sum_last``: float32 sums without a wider accumulator are grouped sums
  plus exact limb sums, fused by XLA (no optimization barriers);
* ``weight_parts``: XLA flushes subnormal operands (``1e-310 != 0`` is False),
  so weights are read from their bits;
* ``undefined_where``: NaN made as ``inf - inf``, never selected from a
  constant (``jax.debug_nans``);
* ``plain_state``: plain float32 input (no ``b``, no ``where``, one reduced
  axis) takes a state of one max and one fused sum.

Importing this module imports no array library; JAX is imported by the
methods, which run only on JAX arrays.
"""

from __future__ import annotations

import math
from typing import Any

from lse_dispatch._numerics import PAIRWISE_THRESHOLD, Numerics
from lse_dispatch._namespace import scalar
from lse_dispatch._state import LSEState, finite_shift, state_from_exponents, two_sum

__all__ = ["JaxNumerics"]

Array = Any

# Row lengths of 1-D input reduced as rows (_row_count): XLA's CPU runtime
# runs a reduction with a scalar broadcast into it 4x slower than one with a
# per-row operand (measured), so a 1-D input is cut into rows of 512 to 4096
# entries (multiples of 8, longest first), else of 4104 to 8192.
_ROW_LENGTHS = range(4096, 511, -8)
_LONG_ROW_LENGTHS = range(4104, 8193, 8)
# TwoSum's error of x - m is taken from x clamped to m - 128: a -inf entry
# then gives a finite error, and its term exp(-inf) is 0 anyway (any
# difference below -103.3 gives a float32 term of 0).
_TWO_SUM_FLOOR = 128.0
# The count-free state (m, 1, t - 1) is taken when every row sums to at
# least this much: then 1 + y <= (16/15) y and log1p(y) >= log 16 (see
# _jax_float32_state's bound).
_COUNT_FREE_MIN_TOTAL = 16


class JaxNumerics(Numerics):
    """The shared math's hook for JAX arrays (see the module docstring)."""

    def max(self, xp, x: Array, axes: tuple[int, ...]) -> Array:
        m = xp.max(x, axis=axes, keepdims=True)
        # The NaN is taken from x itself (a sum of its NaN entries, 0 when there
        # are none): a NaN constant would trip jax.debug_nans on NaN-free input.
        return m + xp.sum(xp.where(xp.isnan(x), x, xp.zeros_like(x)), axis=axes, keepdims=True)

    def log1p(self, xp, x: Array) -> Array:
        return _log1p(xp, x)

    def sum_last(self, xp, x: Array, dtype) -> Array:
        return _fused_sum_last(xp, x)

    def weight_parts(self, xp, b: Array, dtype) -> tuple[Array, Array, Array]:
        return _weight_parts(xp, b, dtype)

    def undefined_where(self, xp, mask: Array, like: Array) -> Array:
        z = xp.where(mask, scalar(xp, math.inf, like), scalar(xp, 0.0, like))
        return z - z

    def plain_state(self, xp, x: Array, axes: tuple[int, ...], accumulator):
        if (
            len(axes) == 1
            and x.dtype == xp.float32
            and accumulator == xp.float32
            and x.shape[axes[0]] >= PAIRWISE_THRESHOLD
        ):
            return _jax_float32_state(xp, x, axes[0], accumulator)
        return None


def _log1p(xp, x: Array) -> Array:
    """``log(1 + x)`` to about two ulps on every backend.

    XLA's float64 ``log1p`` was measured up to 128 ulps off on (-0.5, 0) and
    under 2 ulps elsewhere (jax 0.10, CPU).  Negative arguments therefore go
    through ``log1p(x) = -log1p(-x / (1 + x))``, whose argument is positive.
    (Goldberg's ``log(u) * x / (u - 1)`` is no cure: under ``jax.jit`` XLA
    rewrites ``(1 + x) - 1`` to ``x``.)
    """
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



# Cody and Waite's split of log 2: _LN2_HIGH has 32 significant bits, so
# k * _LN2_HIGH is exact for |k| < 2**20 and k log 2 is formed to an ulp.
_LN2_HIGH = 6.93147180369123816490e-01
_LN2_LOW = 1.90821492927058770002e-10


def _weight_parts(xp, b: Array, dtype) -> tuple[Array, Array, Array]:
    """``(b != 0, sign(b), log|b|)`` from the bits of ``b`` (float16/32/64), immune to flushing.

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



def _jax_float32_state(xp, x: Array, axis: int, accumulator) -> LSEState:
    """The state of plain float32 JAX input (no ``b``, no ``where``): max and one fused sum.

    The common case needs no separate ``count``: the fused sum runs over
    every entry, those at the max included (their terms are exactly
    ``exp(0) * (1 + 0) = 1``), giving ``t = c + r``, and the state is
    ``(m, 1, t - 1)``, which has the same ``c + r`` and ``c - 1 + r``.  That
    saves the count pass and the per-entry max mask.  Splitting ``c`` off
    matters only when ``r`` is small next to ``c``, so this form is taken
    only when every row has ``t >= 16`` (``_COUNT_FREE_MIN_TOTAL``) (and a finite max or a NaN entry);
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
    usable = xp.all((xp.isfinite(m) & (total >= _COUNT_FREE_MIN_TOTAL)) | has_nan)
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
        return x, axis, m, finite_shift(xp, m), None
    # A 1-D input as rows: XLA's CPU runtime runs a reduction with a
    # scalar broadcast into it 4x slower than one with a per-row operand
    # (measured), so each row gets its own copy of the shift.
    work = xp.reshape(x, (rows, x.shape[0] // rows))
    row_max = xp.max(work, axis=1, keepdims=True)
    m = xp.max(row_max, axis=0)
    shift = finite_shift(xp, m)
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
    _, error = two_sum(xp, xp.maximum(grouped, grouped_shift - _TWO_SUM_FLOOR), -grouped_shift)
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
        lambda: state_from_exponents(xp, x, (axis,), accumulator),
    )


def _row_count(n: int) -> int | None:
    """Rows of 512 to 8192 entries (a multiple of 8) that ``n`` splits into, if any."""
    for length in _ROW_LENGTHS:
        if n % length == 0 and n // length >= 2:
            return n // length
    for length in _LONG_ROW_LENGTHS:
        if n % length == 0:
            return n // length
    return None


