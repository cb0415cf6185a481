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

from ._namespace import real_sign, scalar
from ._numerics import numerics_for

__all__ = [
    "LSEState",
    "accurate_sum",
    "exp_difference",
    "finalize",
    "finite_shift",
    "log_norm",
    "log_softmax_from_state",
    "merge",
    "merge_compensated",
    "narrow_max",
    "precision_bits",
    "reduce_max",
    "softmax_from_state",
    "state_from_exponents",
    "two_sum",
    "undefined_where",
    "underflow_shift",
    "weight_parts",
]

Array = Any


class LSEState(NamedTuple):
    """Partial log-sum-exp of a set of entries; all fields broadcast together.

    ``max`` has the compute dtype; ``count`` and ``rest`` have the accumulator
    dtype (float64 for float32 input when the namespace has float64).
    """

    max: Array
    count: Array
    rest: Array


def log_norm(xp, count: Array, rest: Array) -> Array:
    """``log(count + rest) = log1p((count - 1) + rest)``, the normaliser of a state.

    The one place of the rule: ``count - 1`` is an exact small integer, so a
    rest far below 1 survives (``lse([0, -40])`` keeps its ``4.25e-18``).
    For a positive sum (``count >= 1``); :func:`finalize` gives every other
    case its limit.  ``xp`` may be ``math`` for Python floats (the kernels'
    paths for a few entries).
    """
    return numerics_for(xp).log1p(xp, (count - 1) + rest)


def reduce_max(xp, x: Array, axes: tuple[int, ...]) -> Array:
    """``max`` over ``axes`` with ``keepdims=True``; ``axes=()`` reduces nothing; NaN wins."""
    if not axes:
        return x
    return numerics_for(xp).max(xp, x, axes)


def accurate_sum(xp, x: Array, axes: tuple[int, ...], dtype, *, nonnegative: bool = False, integral: bool = False) -> Array:
    """Sum over ``axes`` (keepdims) accumulating in ``dtype``, within about a rounding in any order (``Numerics.sum``)."""
    if not axes:
        return xp.astype(x, dtype)
    return numerics_for(xp).sum(xp, x, axes, dtype, nonnegative=nonnegative, integral=integral)


def undefined_where(xp, mask: Array, like: Array) -> Array:
    """NaN where ``mask`` is True and 0 elsewhere (dtype of ``like``), added to results without a limit.

    No NaN is made where the result is not NaN (``jax.debug_nans``): see
    ``Numerics.undefined_where``.
    """
    return numerics_for(xp).undefined_where(xp, mask, like)


def weight_parts(xp, b: Array, dtype=None) -> tuple[Array, Array, Array]:
    """``(b != 0, sign(b), log|b|)`` of real weights; ``log|b|`` is 0 where ``b == 0``.

    ``log|b|`` is taken in ``dtype`` (``b``'s own by default), from ``b``
    itself: float32 weights of float32 input get a float64 log.  Subnormal
    weights count on every backend (XLA flushes them; its numerics read the
    bits of ``b``).
    """
    return numerics_for(xp).weight_parts(xp, b, b.dtype if dtype is None else dtype)


def narrow_max(xp, state: LSEState, dtype) -> LSEState:
    """``state`` with its ``max`` in ``dtype`` (narrower than the state's), same sum.

    Weighted float32 input forms its exponents ``a + log|b|`` and its state in
    float64 (see ``_generic``); the state's ``max`` is then narrowed back to
    float32, as every state of float32 input has it.  ``m`` becomes
    ``m' = fl(m)``, and ``exp(m) (c + r) = exp(m') (c + r) exp(m - m')``:

    * ``|m| < 2 / eps`` (``2**24`` for float32): ``|m - m'| = |delta|`` is at
      most half an ulp of ``m'``, at most 1/2, so ``(m', c, c expm1(delta) +
      r exp(delta))``.  The count stays apart: folding it into the rest as
      ``(c + r) exp(delta)`` rounded ``1 + r`` in float64, 0.4 % of a result
      near 0 (``logsumexp([0, -120], b=[1, 3e38])`` in float32: 2.3093e-14
      for 2.3003e-14, until 2026-11-30);
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
    moved = count * xp.expm1(difference) + rest * xp.exp(difference)
    return LSEState(narrow, count, xp.where(small, moved, rest))


def finite_shift(xp, m: Array) -> Array:
    """The value subtracted before ``exp``: ``m`` itself where it is finite.

    Where ``m == -inf`` nothing is included and 0 avoids ``-inf - -inf``;
    where ``m`` is ``+inf`` or NaN the largest finite value sends every finite
    entry to ``exp(-huge) = 0`` without overflow (the state's ``max`` carries
    the non-finite value to :func:`finalize`).
    """
    huge = scalar(xp, xp.finfo(m.dtype).max, m)
    zero = scalar(xp, 0.0, m)
    return xp.where(m == -math.inf, zero, xp.where(xp.isfinite(m), m, huge))


def exp_difference(xp, x: Array, shift: Array, accumulator, *, upper: Array | None = None, offsets=()) -> Array:
    """``exp(min(x - shift, upper))`` in ``accumulator``, without the rounding of ``x - shift``.

    A rounded difference ``d`` is off by up to half an ulp of ``|d|``, which
    ``exp`` turns into a relative error of ``|d| / 2`` ulps: the rest of a
    dominant entry's state, and so its ``log_softmax = -log1p(rest)``, would
    be some 30 ulps off for differences near -30.  A wider accumulator holds
    the difference exactly; otherwise TwoSum recovers its error ``e`` and
    ``exp(d + e) = exp(d) * (1 + e)``.  ``shift`` is finite.  ``offsets`` are
    added to the difference one after another, before ``upper`` (the scaled
    weighted terms of :func:`_weighted_terms`).
    """
    if x.dtype != accumulator:
        diff = xp.astype(x, accumulator) - xp.astype(shift, accumulator)
        for offset in offsets:
            diff = diff + offset
        return xp.exp(diff if upper is None else xp.minimum(diff, xp.astype(upper, accumulator)))
    # Non-finite x get a finite stand-in for TwoSum; their exp comes from
    # x - shift itself below.
    zero = scalar(xp, 0.0, x)
    _, error = two_sum(xp, xp.where(xp.isfinite(x), x, zero), -shift)
    # An overflowing difference (x - huge) leaves a NaN error: exp is 0 there.
    error = xp.where(xp.isfinite(error), error, zero)
    diff = x - shift
    for offset in offsets:
        diff = diff + offset
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
    weight: Array | None = None,
    unweighted: Array | None = None,
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
        Boolean mask (broadcasting to ``exponent``); False entries are
        ignored, whatever their value.  ``None`` includes everything.
    sign
        ``sign(b_i)``, or ``None`` for all ones.
    weight, unweighted
        ``|b_i|`` and ``a_i`` (the exponent without ``log|b_i|``).  When
        given, the terms are formed as ``|b_i| * exp(a_i - m)``, which keeps
        the full precision of ``b`` instead of rounding ``log|b_i|`` (whose
        absolute error grows with ``|log b_i|``); see :func:`_weighted_terms`.
    """
    neg_inf = scalar(xp, -math.inf, exponent)
    masked = exponent if included is None else xp.where(included, exponent, neg_inf)
    m = reduce_max(xp, masked, axes)
    shift = finite_shift(xp, m)
    at_max = masked == m
    counted = at_max if included is None else (at_max & included)

    keep = ~at_max if included is None else (included & ~at_max)

    def rest_from(shift):
        if weight is None:
            terms = exp_difference(xp, masked, shift, accumulator)
        else:
            terms = _weighted_terms(xp, exponent, unweighted, weight, shift, accumulator)
        if sign is not None:
            # A where, not a product: 0 * inf at excluded b == 0 entries would warn.
            terms = xp.where(sign < 0, -terms, terms)
        kept = xp.where(keep, terms, scalar(xp, 0.0, terms))
        return accurate_sum(xp, kept, axes, accumulator, nonnegative=sign is None)

    rest = rest_from(shift)
    if numerics_for(xp).bitcast is not None:
        n = math.prod([masked.shape[ax] for ax in axes])
        rest = flushed_terms_rescued(xp, m, shift, rest, n, rest_from)

    if sign is None:
        at_max_value = xp.astype(counted, accumulator)
    else:
        at_max_value = xp.where(counted, xp.astype(sign, accumulator), scalar(xp, 0.0, rest))
    count = accurate_sum(xp, at_max_value, axes, accumulator, integral=True)
    return LSEState(m, count, rest)


def flush_ratio(xp, dtype) -> float:
    """``4 tiny / eps`` of ``dtype``: a rest of ``n`` terms below ``n`` times this may have lost
    more than ``eps / 4`` of itself to flushed subnormal terms (:func:`flushed_terms_rescued`)."""
    info = xp.finfo(dtype)
    return 4 * float(info.smallest_normal) / float(info.eps)


def flushed_terms_rescued(xp, m, shift, rest, n: int, rest_from) -> Array:
    """``rest`` of a library that flushes subnormal results (XLA, CuPy's float32), with the
    lines whose rest is tiny summed again from terms ``e**offset`` larger.

    Every term below the smallest normal number ``tiny`` is lost there, at
    most ``n tiny`` of the rest, which ``log1p(r)`` shows where ``r`` is tiny
    (``log_softmax`` at the max, ``logsumexp`` of a max near 0): found on
    2026-11-30 with a ``where`` mask on JAX (float32: ``4.6219944e-38`` for
    ``4.6819694e-38``).  Lines whose rest is below ``4 n tiny / eps`` (so
    that what is lost stays under ``eps / 4`` of it) are summed again with
    the shift ``m - offset``, ``offset = -log(4 tiny / eps) - 6`` (64 for
    float32, 665 for float64): their other terms are then at most
    ``n e**-6``; the TwoSum of :func:`exp_difference` takes the differences,
    and the rounding ``e`` of ``m - offset`` enters as ``1 - e``.  ``rest_from(shift)``
    is the rest of the ``n`` entries of each line relative to ``shift``;
    signed rests (weights of both signs) are tested by magnitude.
    """
    ratio = flush_ratio(xp, rest.dtype)
    offset = math.floor(-math.log(ratio)) - 6
    need = (xp.abs(rest) < n * ratio) & xp.isfinite(m)

    def recompute():
        moved, error = two_sum(xp, shift, -offset * xp.astype(need, shift.dtype))
        return rest_from(moved) * math.exp(-offset) * (1 - xp.astype(error, rest.dtype))

    return numerics_for(xp).replaced(xp, rest, need, recompute)


# ln 2 = _LN2 + _LN2_TAIL, _LN2 its float64 rounding.
_LN2 = 0.6931471805599453
_LN2_TAIL = 2.3190468138462996e-17


def precision_bits(eps: float) -> int:
    """Significand bits, the leading one included, of a dtype whose machine epsilon is
    ``eps`` (24 for float32, 53 for float64)."""
    return round(1 - math.log2(eps))


def ln2_parts(bits: int, eps: float) -> tuple[float, float]:
    """``(C1, C2)``, ``C1 + C2 = ln 2`` with ``C1`` rounded to ``bits`` digits fewer than a
    dtype with ``eps``: ``k C1`` is exact in it for integers ``|k| < 2**bits``."""
    digits = precision_bits(eps) - bits
    high = round(_LN2 * 2.0**digits) / 2.0**digits
    return high, (_LN2 - high) + _LN2_TAIL


def underflow_shift(tiny: float, eps: float) -> tuple[float, float]:
    """``(s C1, s C2)`` of a dtype with smallest normal ``tiny = 2**-s`` and ``eps``:
    ``s ln 2 = s C1 + s C2`` with ``s C1`` exact (``C1`` has ``s.bit_length()``
    digits fewer than the dtype) and ``s C2`` rounded; see :func:`_weighted_terms`."""
    s = 1 - math.frexp(tiny)[1]
    high, low = ln2_parts(s.bit_length(), eps)
    return s * high, s * low


def _weighted_terms(xp, exponent: Array, a: Array, weight: Array, shift: Array, accumulator) -> Array:
    """The terms ``|b_i| exp(a_i - m)`` of weighted entries, in ``accumulator``.

    ``exponent`` (``e_i = a_i + log|b_i|``), ``a`` and ``weight`` (``|b_i|``)
    are in the accumulator dtype; ``shift`` is ``m`` made finite.  Which form
    keeps the precision depends on the entry:

    * normal ``|b|`` and ``d = a - m`` at least ``log`` of the smallest normal
      number: the product ``|b| exp(d)``, ``d`` without its rounding
      (:func:`exp_difference`);
    * normal ``|b|`` and a smaller ``d``, where ``exp(d)`` is subnormal,
      flushed or 0 while a huge ``|b|`` still makes the term count
      (``a = [0, -745.5]``, ``b = [1, 1e308]``: ``lse = 1.7e-16``, which the
      product gives as 0): ``(|b| 2**-s) exp((d + s C1) + s C2)``, with
      ``2**-s`` the smallest normal number (a normal constant, which XLA does
      not flush; ``|b| 2**-s`` is exact for ``|b| >= 1``, and smaller weights
      give terms below ``2**-s`` relatively) and ``C1 + C2 = ln 2``, ``C1``
      rounded to the dtype.  ``s C1`` is exact, and so is ``d + s C1`` for
      ``d`` within a factor two of it (beyond, the term is again below
      ``2**-s`` relatively), and ``exp(y + s C2) = exp(y) (1 + s C2)`` to
      ``(s C2)**2``, under ``2**-45`` relatively in float32 and ``2**-90`` in
      float64: the term is within a few ulps, where forming ``e_i - m`` would
      leave ``u |log|b_i||`` (some 700 u in float64).  ``s C2`` joins the
      rounding error of ``d`` rather than ``d + s C1``: XLA folds ``(y + c1) +
      c2`` into ``y + (c1 + c2)``, which is the rounded ``s ln 2`` again;
    * subnormal ``|b|``: ``exp(e_i - m)``, where ``exp(a_i - m)`` alone could
      overflow.

    One below ``log(max)`` bounds the argument of ``exp``: for normal ``|b|``
    ``d <= -log|b| <= max_log``, so the bound only bites on entries that are
    at the max (``+inf``) or that the final ``where`` discards.
    """
    info = xp.finfo(exponent.dtype)
    tiny = float(info.smallest_normal)
    s_high, s_low = underflow_shift(tiny, float(info.eps))
    zero, one = scalar(xp, 0.0, exponent), scalar(xp, 1.0, exponent)
    max_log = scalar(xp, math.log(float(info.max)) - 1.0, exponent)
    # An infinite weight sits at the max (e = +inf), out of the rest; in the
    # product form its 0 * inf would warn.
    normal = (weight >= scalar(xp, tiny, weight)) & (weight < scalar(xp, math.inf, weight))
    scaled = normal & (a - shift < scalar(xp, math.log(tiny), a))
    # Two selected offsets: XLA would fold (d + c1) + c2 into d + (c1 + c2),
    # the rounded s ln 2 again.
    offsets = tuple(xp.where(scaled, scalar(xp, c, a), zero) for c in (s_high, s_low))
    factor = xp.where(scaled, weight * scalar(xp, tiny, weight), xp.where(normal, weight, one))
    product = exp_difference(xp, a, shift, accumulator, upper=max_log, offsets=offsets) * factor
    terms = xp.where(normal, product, xp.exp(exponent - shift))
    return xp.astype(terms, accumulator)


def merge(xp, first: LSEState, second: LSEState) -> LSEState:
    """Combine two states of disjoint entry sets (associative, commutative).

    The state whose max is the overall max keeps its count and rest; the other
    contributes ``(count + rest) * exp(its max - overall max)`` to the rest.
    Differences of equal infinities are never formed, so ``-inf`` merged with
    ``-inf`` stays ``-inf`` and NaN propagates through ``maximum``.
    """
    m, count, _, sides = _merged_parts(xp, first, second)
    part1, part2 = (xp.where(on_top, part.rest, (part.count + part.rest) * weight)
                    for part, (on_top, weight) in zip((first, second), sides))
    return LSEState(m, count, (xp.zeros_like(count) + part1) + part2)


def merge_compensated(xp, first: LSEState, first_low: Array, second: LSEState, second_low: Array) -> tuple[LSEState, Array]:
    """:func:`merge` of states whose rests carry their rounding errors apart (``rest + low``).

    A chain of merges rounds the rest once each, and equal chunks after a
    larger one round the same way every time (float64 ``[0, -1]`` and then
    2000 chunks of ten ``-37``: 544 ulps).  TwoSum keeps each rounding in
    ``low``.  A state below the merged max is rescaled by
    ``w = exp(d)`` (``d`` its max minus the merged one, exact by TwoSum); for
    ``d >= -0.7`` as ``V + V (w - 1)`` with ``w - 1 = expm1(d)`` and the
    product's error kept (Dekker), so that only ``expm1``'s rounding, about
    ``u |d|`` of ``V``, is left: a max that rises a little at every merge
    rounded ``w`` by an ulp each time, which the chain kept (float64
    ``logsumexp_blocked`` of 100000 entries rising by ``1e-5``, blocks of 16:
    20 ulps).  Returns the merged state and its ``low``.  The rests are
    finite or NaN (a NaN ``low`` is set to 0: the rest is NaN already).
    """
    m, count, shift, sides = _merged_parts(xp, first, second)
    zero = xp.zeros_like(count)
    (high1, low1), (high2, low2) = (
        _rescaled(xp, part, part_low, on_top, weight, shift)
        for part, part_low, (on_top, weight) in zip((first, second), (first_low, second_low), sides)
    )
    high1 = zero + high1
    plain = high1 + high2
    finite = xp.isfinite(plain)  # TwoSum of inf or NaN would be NaN and warn
    rest, error = two_sum(xp, xp.where(finite, high1, zero), xp.where(finite, high2, zero))
    low = (low1 + low2) + error
    rest = xp.where(finite, rest, plain)
    return LSEState(m, count, rest), xp.where(xp.isfinite(low), low, xp.zeros_like(low))


# Below this rise, a rescaled state is V + V expm1(d): the relative error of
# expm1 costs u (e**|d| - 1) of the result, under one rounding of exp(d).
_NEAR_RISE = 0.7


def _rescaled(xp, part: LSEState, low: Array, on_top: Array, weight: Array, shift: Array) -> tuple[Array, Array]:
    """A state's share of a merged rest, as ``(high, low)``: its rest on top, else ``(count + rest + low) w``.

    Non-finite rests and counts take the plain product (NaN or ``inf``, as
    :func:`merge` gives), without the error terms, which would be NaN.
    """
    acc = part.rest.dtype
    zero = scalar(xp, 0.0, part.rest)
    summed = part.count + part.rest
    plain = summed * weight
    finite = ~on_top & xp.isfinite(part.max) & xp.isfinite(summed) & xp.isfinite(low)
    total, total_error = two_sum(xp, xp.where(finite, part.count, zero), xp.where(finite, part.rest, zero))
    total_error = total_error + xp.where(finite, low, zero)
    rise, rise_error = two_sum(xp, xp.astype(xp.where(finite, part.max, shift), acc), -xp.astype(shift, acc))
    near = finite & (rise >= -_NEAR_RISE)
    minus_one = xp.where(near, xp.expm1(rise) + rise_error * xp.exp(rise), zero)
    product = total * minus_one
    high_near, sum_error = two_sum(xp, total, product)
    finite_weight = xp.where(finite, weight, zero)
    near_low = (sum_error + _product_error(xp, total, minus_one, product)) + total_error * finite_weight
    high = xp.where(on_top, part.rest, xp.where(near, high_near, plain))
    far_low = total_error * finite_weight
    return high, xp.where(on_top, low, xp.where(near, near_low, far_low))


def _product_error(xp, a: Array, b: Array, product: Array) -> Array:
    """``a b - product`` exactly (Dekker's split; ``product = fl(a b)``, ``|b| <= 1``).

    Where the split of ``a`` would overflow (a weighted rest near the largest
    float), 0: that product's error is then left out, as before.
    """
    info = xp.finfo(a.dtype)
    factor = float(2 ** ((precision_bits(float(info.eps)) + 1) // 2) + 1)
    safe = xp.abs(a) <= float(info.max) / (2 * factor)
    a = xp.where(safe, a, xp.zeros_like(a))
    b = xp.where(safe, b, xp.zeros_like(b))
    product = xp.where(safe, product, xp.zeros_like(product))

    def split(x):
        scaled = factor * x
        high = scaled - (scaled - x)
        return high, x - high

    a_high, a_low = split(a)
    b_high, b_low = split(b)
    return ((a_high * b_high - product) + a_high * b_low + a_low * b_high) + a_low * b_low


def _merged_parts(xp, first: LSEState, second: LSEState):
    """The merged max, count and shift, and per state ``(on top, weight)``: whether its max is the
    merged one, and ``exp(its max - shift)`` (0 on top)."""
    m = xp.maximum(first.max, second.max)
    acc = first.rest.dtype
    count = xp.zeros_like(first.rest) + xp.zeros_like(second.rest)
    zero = scalar(xp, 0.0, count)
    shift = finite_shift(xp, m)
    sides = []
    for part in (first, second):
        on_top = part.max == m
        # exp(part.max - shift) is 0 for parts below a finite max, and the
        # where keeps its NaN-free branch for parts that sit on the max.
        below = xp.where(on_top, xp.full_like(part.max, -math.inf), part.max)
        weight = exp_difference(xp, below, shift, acc)  # without the rounding of below - shift
        count = count + xp.where(on_top, part.count, zero)
        sides.append((on_top, weight))
    return m, count, shift, sides


def finalize(xp, state: LSEState, dtype) -> tuple[Array, Array]:
    """Return ``(log|sum|, sign(sum))`` of a state, in ``dtype``.

    ``log|c + r| = log_norm(s c, s r) = log1p((s c - 1) + s r)`` with
    ``s = sign(c + r)``: ``s c - 1`` is an exact small integer, so a tiny
    ``r`` survives.
    """
    m, count, rest = state
    acc = rest.dtype
    total = count + rest
    sign = real_sign(xp, total)
    zero_sum = sign == 0
    # log|c + r| = log_norm(s c, s r).  A zero sum gets -inf below; its
    # log_norm argument is made 0 (log1p(-1) would warn in NumPy).
    signed_count = xp.where(zero_sum, scalar(xp, 1.0, count), sign * count)
    signed_rest = xp.where(zero_sum, scalar(xp, 0.0, rest), sign * rest)
    log_abs = xp.where(zero_sum, scalar(xp, -math.inf, total), log_norm(xp, signed_count, signed_rest))
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
    normaliser = log_norm(xp, xp.maximum(count, scalar(xp, 1.0, count)), rest)
    shift = xp.astype(finite_shift(xp, m), acc)
    return (xp.astype(x, acc) - shift) - normaliser


def two_sum(xp, a: Array, b: Array) -> tuple[Array, Array]:
    """``s = fl(a + b)`` and the exact rounding error ``a + b - s`` (Knuth).

    No optimization barrier under ``jax.jit``: XLA's algebraic simplifier
    folds ``(x + c) - c`` to ``x`` only for a compile-time constant ``c`` (as in
    the JAX numerics' ``_log1p`` note), never for two traced operands, and a barrier
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
    the difference's rounding recovered by TwoSum (:func:`exp_difference`):
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
    out = exp_difference(xp, x, finite_shift(xp, m), x.dtype) / total
    # The limits of _log_softmax_limits, in linear space.
    zero = scalar(xp, 0.0, out)
    out = xp.where(m == math.inf, xp.where(x == math.inf, one / xp.maximum(count, one), zero), out)
    if included is not None:
        out = xp.where(included, out, zero)
    return xp.where(xp.isnan(m), xp.astype(m, out.dtype), out)
