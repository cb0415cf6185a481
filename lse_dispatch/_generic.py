"""The generic implementations: pure array-API code that runs on any backend.

Each function takes a prepared :class:`~lse_dispatch._call.Call` (namespace
resolved, arguments validated, dtypes planned) and returns results with the
reduced axes kept: the state of the call (:func:`state`, the ``STATE``
operation), then the one finalisation or normalisation of
:mod:`lse_dispatch._state`, which holds the math itself.  The functions that
turn a state into results (:func:`logsumexp_from_state`,
:func:`normalised_from_state`) are the ones every kernel finishes with.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

from ._call import Call
from ._namespace import scalar
from ._numerics import binary_log_parts, numerics_for
from ._ops import Op
from ._state import (
    LSEState,
    finalize,
    ln2_parts,
    log_norm,
    log_softmax_from_state,
    narrow_max,
    precision_bits,
    softmax_from_state,
    state_from_exponents,
    two_sum,
    undefined_where,
    underflow_shift,
    weight_parts,
)

__all__ = [
    "IMPLEMENTATIONS",
    "keepdims_shape",
    "log_softmax",
    "logsumexp",
    "logsumexp_from_state",
    "logsumexp_of_finite_lines",
    "logsumexp_state",
    "normalised_from_state",
    "softmax",
    "state",
]

Array = Any


def is_empty(call: Call) -> bool:
    """Nothing to reduce, or nothing to return (an empty kept axis).

    Either way the answer is a constant of the keepdims shape: ``-inf`` where
    the reduction is empty, an empty array where a kept axis is.  Dask's
    max refuses zero-size chunks, so these never reach a reduction.
    """
    # Unknown (NaN) extents of lazy arrays compare unequal to 0.
    return any(extent == 0 for extent in call.shape)


def keepdims_shape(call: Call) -> tuple:
    """The shape of a reduction's result with the reduced axes kept."""
    return tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape))


def _weights(call: Call):
    """``(exponent, included, sign, weight, a)`` of a real call, ``exponent = a + log|b|``.

    Without weights: ``(a, where, None, None, None)``.  With weights and an
    accumulator wider than the compute dtype (float32 where float64 exists),
    everything is formed in the accumulator: a float32 ``a + log|b|`` rounds,
    and the entry at the max would then count as exactly 1 where its term is
    ``exp`` of that rounding -- 1.9e7 ulps on a logsumexp that cancels to near
    0 (``logsumexp([1], b=[0.36787945])``, exactly 2.49e-8).  The state's max
    is narrowed back afterwards (:func:`~lse_dispatch._state.narrow_max`).

    Nothing is broadcast explicitly: elementwise operations broadcast, which
    also works for Dask arrays of unknown chunk sizes, where
    ``broadcast_arrays`` cannot.
    """
    xp, plan = call.xp, call.plan
    if call.b is None:
        return xp.astype(call.a, plan.compute), call.where, None, None, None
    work = plan.accumulator
    a = xp.astype(call.a, work)
    nonzero, sign, log_weight = weight_parts(xp, xp.astype(call.b, plan.compute), work)
    included = nonzero if call.where is None else (call.where & nonzero)
    weight = xp.abs(xp.astype(call.b, work))
    return a + log_weight, included, sign, weight, a


def logsumexp_state(call: Call) -> LSEState:
    """The :class:`LSEState` of a real, non-empty call, over ``call.axes`` (keepdims).

    Its ``max`` is in the compute dtype, ``count`` and ``rest`` in the
    accumulator dtype, whatever the arguments.
    """
    xp, plan = call.xp, call.plan
    exponent, included, sign, weight, a = _weights(call)
    found = state_from_exponents(
        xp, exponent, call.axes, plan.accumulator, included=included, sign=sign, weight=weight, unweighted=a
    )
    return narrow_max(xp, found, plan.compute) if exponent.dtype != plan.compute else found


def state(call: Call) -> LSEState:
    """The ``STATE`` operation: the keepdims state of a real call; an empty reduction gives ``(-inf, 0, 0)``."""
    xp, plan = call.xp, call.plan
    if plan.is_complex:
        raise TypeError(
            f"argument 'a' must be real for a log-sum-exp state, got dtype {call.a.dtype}; "
            "use logsumexp() for complex input"
        )
    if any(call.shape[ax] == 0 for ax in call.axes):
        shape, device = keepdims_shape(call), call.device
        return LSEState(
            xp.full(shape, -math.inf, dtype=plan.compute, device=device),
            xp.zeros(shape, dtype=plan.accumulator, device=device),
            xp.zeros(shape, dtype=plan.accumulator, device=device),
        )
    return logsumexp_state(call)


def logsumexp(call: Call) -> tuple[Array, Array]:
    """``(log|sum b exp(a)|, sign)`` with the reduced axes kept."""
    xp, plan = call.xp, call.plan
    if is_empty(call):
        shape = keepdims_shape(call)
        device = call.device
        out = xp.full(shape, -math.inf, dtype=plan.result, device=device)
        return out, xp.zeros(shape, dtype=plan.result, device=device)
    if plan.is_complex:
        return _complex_logsumexp(call)
    return logsumexp_from_state(call, logsumexp_state(call))


def logsumexp_of_finite_lines(call: Call, state: LSEState) -> tuple[Array, Array] | None:
    """``(m + log_norm, 1)`` of a real call whose every max is finite and every sum positive, else ``None``.

    What :func:`logsumexp_from_state` gives such lines (no limit or sign
    applies), without its dozen small array operations: for eager kernels,
    which can read ``all(isfinite(m))`` on the host.  Without weights every
    sum with a finite max is positive; with them the signs are checked.
    """
    if call.plan.is_complex:
        return None
    xp = call.xp
    m, count, rest = state
    if not bool(xp.all(xp.isfinite(m))):
        return None
    if call.b is not None and not bool(xp.all(count + rest > 0)):
        return None
    dtype = call.plan.result
    value = xp.astype(xp.astype(m, rest.dtype) + log_norm(xp, count, rest), dtype)
    return value, xp.ones(value.shape, dtype=dtype)


def logsumexp_from_state(call: Call, state: LSEState) -> tuple[Array, Array]:
    """``(value, sign)`` of a real, non-empty call from its state: the one finalisation.

    Every kernel's logsumexp ends here (or, for lines whose max is finite
    and whose sum has no sign, in ``m + log_norm``, the same rule).
    """
    xp = call.xp
    value, sign = finalize(xp, state, call.plan.result)
    if not call.return_sign:
        # A negative sum has no real logarithm.
        value = value + undefined_where(xp, sign < 0, value)
    return value, sign


def _complex_logsumexp(call: Call) -> tuple[Array, Array]:
    """Complex input, as SciPy defines it: shift by the max of the real part.

    The sum is ``exp(m) * sum b exp(a - m)``; its log takes the principal
    branch.  With ``return_sign`` the magnitude's log and the unit phase come
    back separately.  Limits: nothing included gives ``-inf`` (sign 0);
    entries with real part ``+inf`` dominate, so the value is
    ``inf + i theta`` and the sign ``exp(i theta)``, ``theta`` the phase of
    ``sum b exp(i imag(a))`` over those entries (NaN if that sum is 0).
    """
    xp, plan = call.xp, call.plan
    a = xp.astype(call.a, plan.compute)
    real = xp.real(a)
    b = None if call.b is None else xp.astype(call.b, plan.compute)
    included = call.where
    if b is not None:
        nonzero, log_b, weighted_exp = _complex_weights(xp, b)
        included = nonzero if included is None else included & nonzero
        real = real + log_b
    if included is None:
        included = xp.ones_like(real, dtype=xp.bool)
    neg_inf = scalar(xp, -math.inf, real)
    real = xp.where(included, real, neg_inf)
    m = xp.max(real, axis=call.axes, keepdims=True) if call.axes else real
    finite = xp.isfinite(m)
    shift = xp.where(finite, m, scalar(xp, 0.0, m))
    complex_zero = xp.zeros_like(a)

    def total(terms, dtype=plan.compute):
        summed = xp.sum(terms, axis=call.axes, keepdims=True, dtype=plan.accumulator) if call.axes else terms
        return xp.astype(summed, dtype)

    # Finite rows: the shifted sum (other rows get 0 terms, no inf - inf).
    in_finite_row = included & finite & (real != neg_inf)
    terms = _complex_terms(xp, a, shift, in_finite_row, None if b is None else weighted_exp)
    # The terms at the max apart from the rest, in the accumulator (_log_abs_sum).
    at_top = in_finite_row & (real == m)
    top, rest = (total(xp.where(mask, terms, complex_zero), plan.accumulator) for mask in (at_top, in_finite_row & ~at_top))
    finite_total = xp.astype(top + rest, plan.compute)
    # Rows with a +inf entry: the phases of the +inf entries.
    at_inf = included & (real == math.inf)
    unit_terms = xp.exp(xp.astype(xp.imag(xp.where(at_inf, a, complex_zero)), plan.compute) * 1j)
    inf_total = total(xp.where(at_inf, unit_terms if b is None else b * unit_terms, complex_zero))
    row_total = xp.where(m == math.inf, inf_total, finite_total)

    magnitude = xp.abs(row_total)
    real_dtype = magnitude.dtype
    empty = magnitude == 0
    safe_magnitude = xp.where(empty, scalar(xp, 1.0, magnitude), magnitude)
    unit = row_total / xp.astype(safe_magnitude, row_total.dtype)
    # A zero sum of +inf entries' phases has no limit.
    inf_undefined = (m == math.inf) & empty
    log_magnitude = xp.astype(shift, real_dtype) + _log_abs_sum(xp, top, rest, safe_magnitude, finite)
    log_magnitude = xp.where(empty, scalar(xp, -math.inf, log_magnitude), log_magnitude)
    log_magnitude = xp.where(finite, log_magnitude, xp.astype(m, real_dtype))
    log_magnitude = log_magnitude + undefined_where(xp, inf_undefined, log_magnitude)
    # NaN rows: NaN everywhere (m is NaN there).
    nan_row = xp.isnan(m)
    unit = xp.where(nan_row | inf_undefined, xp.astype(log_magnitude, unit.dtype), unit)
    if call.return_sign:
        return log_magnitude, unit
    # Principal branch: the imaginary part lies in (-pi, pi].
    angle = xp.atan2(xp.imag(unit), xp.real(unit))
    value = xp.astype(log_magnitude, plan.compute) + xp.astype(angle, plan.compute) * 1j
    return xp.astype(value, plan.result), xp.ones_like(value)


def _complex_terms(xp, a: Array, shift: Array, rows: Array, weighted_exp) -> Array:
    """``b exp(a - shift)`` (``exp(a - shift)`` without weights) where ``rows``, 0 elsewhere;
    the real part of ``a - shift`` taken exactly.

    A rounded difference ``d`` is off by half an ulp of ``|d|``, which ``exp``
    turns into ``|d| / 2`` ulps of the term.  With a huge weight such a term
    can be as large as the max's (``b`` near ``1e264`` and ``d = -608``: 208
    eps off, and 86 eps in the phase of a sum of two such terms).  As for real
    terms (``_state.exp_difference``), TwoSum gives the error ``e`` of the real
    part and the term is ``exp(d) (1 + e)`` (``weighted_exp(d, e)`` with
    weights, which adds the roundings of its own offsets to ``e``).  ``shift``
    is finite on ``rows`` (other entries get ``d = 0``, ``e = 0``); a difference
    that overflows (its term is 0) gets ``e = 0`` (:func:`_offset`).
    """
    zero = scalar(xp, 0.0, shift)
    shifted, error = _offset(xp, xp.where(rows, a, xp.zeros_like(a)), xp.where(rows, -shift, zero),
                             xp.zeros_like(xp.real(a)))
    if weighted_exp is not None:
        return weighted_exp(shifted, error)
    return xp.exp(shifted) * xp.astype(1 + error, a.dtype)


def _log_abs_sum(xp, top: Array, rest: Array, magnitude: Array, finite: Array) -> Array:
    """``log|S|`` of a complex sum ``S = top + rest`` (the terms at the max, the others;
    accumulator dtype) in the dtype of ``magnitude`` (``|S|`` rounded, 1 where ``S = 0``).

    Where ``|S|`` is within [1/2, 2] (and the row finite), ``log1p(x (x + 2) + y**2) / 2``
    with ``x = (Re top - 1) + Re rest`` and ``y = Im S``: ``|S|**2 - 1`` without forming
    ``|S|``, so a rest far below 1 survives as it does in the real state
    (``logsumexp([0, -40])`` of complex input is 4.25e-18, which ``log|S|`` rounded to 0,
    as SciPy's does).  Elsewhere ``log|S|``.
    """
    near_one = finite & (magnitude >= 0.5) & (magnitude <= 2.0)
    x = (xp.real(top) - 1) + xp.real(rest)
    y = xp.imag(top) + xp.imag(rest)
    zero = xp.zeros_like(x)
    argument = xp.where(near_one, x * (x + 2) + y * y, zero)
    near = xp.astype(numerics_for(xp).log1p(xp, argument) / 2, magnitude.dtype)
    return xp.where(near_one, near, xp.log(magnitude))


def _complex_weights(xp, b: Array):
    """``(b != 0, log|b|, weighted_exp)`` of complex weights; ``weighted_exp(d)`` is ``b exp(d)``.

    ``d = a - m`` has real part at most ``-log|b|``, so ``exp(d)`` can leave
    the normal range where ``b`` does not, and the product then loses what
    ``exp(d)`` lost:

    * a subnormal part, and both below ``tiny 2**s`` (``tiny`` the smallest
      normal, ``s = nmant + 2``): ``exp(d)`` could overflow where ``|b|`` is
      subnormal, and a subnormal part would be flushed.  ``b`` is taken exactly as
      ``b * 2**s``, its term is ``(b 2**s) exp(d - s log 2)`` and ``log|b|``
      comes from ``b 2**s`` too.  Subnormal parts are read as :meth:`Numerics.subnormal_scaled
      <lse_dispatch._numerics.Numerics.subnormal_scaled>` reads them, from
      the bits where the library flushes subnormals (XLA), so such weights
      count there too.
    * where the library flushes subnormals (XLA, CuPy's float32):
      ``exp(d)`` below the smallest normal (a large ``|b|``, the term still
      normal), or a part of it (``|b|`` above ``eps / tiny``, where losing a
      part below ``tiny`` costs more than an ulp), would flush to 0.  The
      term is ``(b / |b|) exp(d + log|b|)``, whose ``exp`` argument is the
      term's own log, at most 0.  Elsewhere, ``exp(d)`` below the smallest
      normal (subnormal or 0, a large ``|b|``): ``(b tiny) exp((d + s C1) +
      s C2)``, the scaled form of the real terms (``_state._weighted_terms``).

    ``log|b|`` is ``log h + log1p((l / h)**2) / 2`` with ``h``, ``l`` the
    larger and smaller part magnitudes: ``|b|`` itself overflows for parts
    near the largest float (``3e38 + 3e38j`` in complex64).
    """
    numerics = numerics_for(xp)
    real_part, imag_part = xp.real(b), xp.imag(b)
    info = xp.finfo(real_part.dtype)
    s = round(-math.log2(float(info.eps))) + 2  # nmant + 2 (the standard's finfo has no nmant)
    real_subnormal, real_scaled = numerics.subnormal_scaled(xp, real_part, s)
    imag_subnormal, imag_scaled = numerics.subnormal_scaled(xp, imag_part, s)
    tiny = scalar(xp, float(info.smallest_normal), real_part)
    one = scalar(xp, 1.0, real_part)
    high = xp.maximum(xp.abs(real_part), xp.abs(imag_part))
    low = xp.minimum(xp.abs(real_part), xp.abs(imag_part))
    nonzero = (b != 0) | real_subnormal | imag_subnormal
    # A subnormal part, the other below tiny 2**s (else the subnormal one is under
    # 2**-s of it): both parts scale exactly, a normal one by a plain product.
    small = nonzero & (high < tiny * 2.0**s) & (real_subnormal | imag_subnormal | (high < tiny))
    normal = nonzero & ~small
    high = xp.where(normal, high, one)
    ratio_log = xp.log1p(xp.square(xp.where(normal, low, xp.zeros_like(low)) / high)) / 2
    log_b = xp.log(high) + ratio_log

    def scale(part, subnormal, part_scaled):
        return xp.where(subnormal, part_scaled, xp.where(small, part, xp.zeros_like(part)) * 2.0**s)

    scaled = (xp.astype(scale(real_part, real_subnormal, real_scaled), b.dtype)
              + xp.astype(scale(imag_part, imag_subnormal, imag_scaled), b.dtype) * 1j)
    # (Unselected entries get safe arguments: JAX differentiates both branches of where.)
    safe_scaled = xp.where(small, scaled, xp.ones_like(scaled))
    log_b = xp.where(small, xp.log(xp.abs(safe_scaled)) - s * math.log(2.0), log_b)
    # b / |b| from its angle: divisions by |b| overflow near the largest float
    # (XLA turns (x / h) / n into x / (h n), and divides complex numbers through |divisor|**2).
    angle = xp.atan2(xp.where(normal, imag_part, xp.zeros_like(imag_part)), xp.where(normal, real_part, one))
    unit = xp.astype(xp.cos(angle), b.dtype) + xp.astype(xp.sin(angle), b.dtype) * 1j
    # Where the library flushes subnormal results (numerics.bitcast): above
    # eps / tiny, a part of exp(d) flushed to 0 (even where |exp(d)| is normal)
    # costs more than an ulp of the line's largest term.  Where it does not,
    # the scaled form (_weighted_exp) keeps such terms to a few ulps of themselves (a
    # subnormal exp(d) kept a few ulps of the largest term: nothing of a result
    # near 0, which _log_abs_sum now keeps).
    huge = normal & (log_b > math.log(float(info.eps) / float(info.smallest_normal)))
    split = None
    if numerics.bitcast is not None:
        # log|b| = k ln 2 + (log f + log1p((l / h)**2) / 2), h = f 2**k: the flushing
        # form's exponent takes k ln 2 as Cody and Waite split it (_weighted_exp).
        k, log_f = binary_log_parts(xp, high, numerics.bitcast)
        c1, c2 = ln2_parts(info.bits - precision_bits(float(info.eps)), float(info.eps))
        split = (k * c1, (k * c2 + log_f) + ratio_log)
    parts = _WeightParts(b, scaled, unit, log_b, small, normal, huge, s, split, info)
    return nonzero, log_b, functools.partial(_weighted_exp, xp, parts)


class _WeightParts(NamedTuple):
    """What :func:`_complex_weights` works out of the weights for :func:`_weighted_exp`."""

    b: Array
    scaled: Array  # b 2**s where small
    unit: Array  # b / |b| where normal
    log_b: Array
    small: Array
    normal: Array
    huge: Array
    s: int
    #: Where the library flushes: ``log|b|`` as ``k C1`` (exact) and the rest; else ``None``.
    log_b_split: tuple[Array, Array] | None
    info: Any


def _offset(xp, d: Array, offset: Array, error: Array) -> tuple[Array, Array]:
    """``d + offset`` (complex ``d``, real ``offset``), and ``error`` plus the rounding of its real part."""
    _, rounding = two_sum(xp, xp.real(d), offset)
    return d + xp.astype(offset, d.dtype), error + xp.where(xp.isfinite(rounding), rounding, xp.zeros_like(rounding))


def _weighted_exp(xp, w: _WeightParts, d: Array, error: Array) -> Array:
    """``b exp(d + error)`` for ``d = a - m`` (real part rounded, ``error`` its rounding).

    Small weights: ``(b 2**s) exp(d - s ln 2)``, ``s ln 2`` as ``s C1`` (exact)
    plus ``s C2``, the rounding of ``d - s C1`` recovered by TwoSum.  Where
    the library flushes: ``(b / |b|) exp(d + log|b|)`` for huge weights and
    where ``exp(d)`` is not normal, ``log|b|`` added as ``k C1`` (exact) and
    the rest (below 2 in magnitude), each addition's rounding recovered (a
    rounded ``log|b|`` was off by half an ulp of ``|log|b||``: 18.6 eps on
    JAX's complex64 with ``|b|`` near ``3e34``).  Elsewhere, ``exp(d)`` below the smallest normal: ``(b
    tiny) exp((d + s C1) + s C2)``, the real terms' scaled form (``d + s C1``
    is exact there).  Every form is multiplied by ``1 + error``.
    """
    info = w.info
    zero = xp.zeros_like(xp.real(d))
    small_high, small_low = underflow_shift(2.0**-w.s, float(info.eps))
    small_d, small_error = _offset(xp, d, xp.where(w.small, scalar(xp, -small_high, zero), zero), error)
    small_error = small_error - xp.where(w.small, scalar(xp, small_low, zero), zero)
    log_tiny = math.log(float(info.smallest_normal))
    if w.log_b_split is not None:
        under = w.huge | (w.normal & (xp.real(d) < log_tiny))
        high, low = (xp.where(under, part, zero) for part in w.log_b_split)
        under_d, under_error = _offset(xp, d, high, error)
        under_d, under_error = _offset(xp, under_d, low, under_error)
        d, error = xp.where(under, under_d, small_d), xp.where(under, under_error, small_error)
        factor = xp.where(under, w.unit, xp.where(w.small, w.scaled, w.b))
    else:
        s_high, s_low = underflow_shift(float(info.smallest_normal), float(info.eps))
        below = w.normal & (xp.real(d) < log_tiny)
        d = xp.where(below, (d + s_high) + s_low, small_d)
        error = xp.where(below, error, small_error)
        factor = xp.where(below, w.b * float(info.smallest_normal), xp.where(w.small, w.scaled, w.b))
    return factor * xp.exp(d) * xp.astype(1 + error, d.dtype)


def normalised_from_state(call: Call, state: LSEState, log: bool) -> Array:
    """log_softmax (``log``) or softmax of a real, non-empty call from its state."""
    xp, plan = call.xp, call.plan
    x = xp.astype(call.a, plan.compute)
    from_state = log_softmax_from_state if log else softmax_from_state
    return xp.astype(from_state(xp, x, state, call.where), plan.result)


def _normalised(call: Call, log: bool) -> Array:
    if is_empty(call):
        return call.xp.astype(call.a, call.plan.result)
    return normalised_from_state(call, logsumexp_state(call), log)


def log_softmax(call: Call) -> Array:
    """``x - logsumexp(x)`` over ``call.axes``, the max entry kept exact."""
    return _normalised(call, True)


def softmax(call: Call) -> Array:
    """``exp(log_softmax(x))``, its exponent compensated for rounding."""
    return _normalised(call, False)


#: The generic implementation of each operation.
IMPLEMENTATIONS = {
    Op.LOGSUMEXP: logsumexp,
    Op.SOFTMAX: softmax,
    Op.LOG_SOFTMAX: log_softmax,
    Op.STATE: state,
}
