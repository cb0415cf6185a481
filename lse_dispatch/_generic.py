"""The generic implementations: pure array-API code that runs on any backend.

Each function takes a prepared :class:`~lse_dispatch._call.Call` (namespace
resolved, arguments validated, dtypes planned) and returns results with the
reduced axes kept.  The math itself lives in :mod:`lse_dispatch._state`.
"""

from __future__ import annotations

import math
from typing import Any

from ._call import Call
from ._namespace import real_sign, scalar
from ._state import LSEState, finalize, log_softmax_from_state, softmax_from_state, state_from_exponents

__all__ = ["log_softmax", "logsumexp", "logsumexp_from_state", "logsumexp_state", "softmax"]

Array = Any


def _reduced_is_empty(call: Call) -> bool:
    """Nothing to reduce, or nothing to return (an empty kept axis).

    Either way the answer is a constant of the keepdims shape: ``-inf`` where
    the reduction is empty, an empty array where a kept axis is.  Dask's
    max refuses zero-size chunks, so these never reach a reduction.
    """
    # Unknown (NaN) extents of lazy arrays compare unequal to 0.
    return any(extent == 0 for extent in call.shape)


def _keepdims_shape(call: Call) -> tuple:
    return tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape))


def _weights(call: Call):
    """``(exponent, included, sign, scale, log_scale)`` for a real call."""
    xp, plan = call.xp, call.plan
    a = xp.astype(call.a, plan.compute)
    included = call.where
    if call.b is None:
        return a, included, None, None, None
    b = xp.astype(call.b, plan.compute)
    scale = xp.abs(b)
    nonzero = b != 0
    included = nonzero if included is None else (included & nonzero)
    # log|b| only where b != 0: log(0) would warn, and those entries are excluded.
    log_scale = xp.log(xp.where(nonzero, scale, scalar(xp, 1.0, scale)))
    a, b, scale, log_scale = xp.broadcast_arrays(a, b, scale, log_scale)
    return a + log_scale, included, real_sign(xp, b), scale, a


def logsumexp_state(call: Call) -> LSEState:
    """The :class:`LSEState` of a real call, over ``call.axes`` (keepdims)."""
    exponent, included, sign, scale, log_scale = _weights(call)
    if included is not None:
        included = call.xp.broadcast_to(included, exponent.shape)
    return state_from_exponents(
        call.xp,
        exponent,
        call.axes,
        call.plan.accumulator,
        included=included,
        sign=sign,
        scale=scale,
        log_scale=log_scale,
    )


def logsumexp(call: Call) -> tuple[Array, Array]:
    """``(log|sum b exp(a)|, sign)`` with the reduced axes kept."""
    xp, plan = call.xp, call.plan
    if _reduced_is_empty(call):
        shape = _keepdims_shape(call)
        device = call.device
        out = xp.full(shape, -math.inf, dtype=plan.result, device=device)
        return out, xp.zeros(shape, dtype=plan.result, device=device)
    if plan.is_complex:
        return _complex_logsumexp(call)
    return logsumexp_from_state(call, logsumexp_state(call))


def logsumexp_from_state(call: Call, state: LSEState) -> tuple[Array, Array]:
    """``(value, sign)`` of a real, non-empty call from its state.

    Separate so that the derivative rules can keep the state of the forward.
    """
    xp = call.xp
    value, sign = finalize(xp, state, call.plan.result)
    if not call.return_sign:
        # A negative sum has no real logarithm.
        value = xp.where(sign < 0, scalar(xp, math.nan, value), value)
    return value, sign


def _complex_logsumexp(call: Call) -> tuple[Array, Array]:
    """Complex input, as SciPy defines it: shift by the max of the real part.

    The sum is ``exp(m) * sum b exp(a - m)``; its log takes the principal
    branch.  With ``return_sign`` the magnitude's log and the unit phase come
    back separately.
    """
    xp, plan = call.xp, call.plan
    a = xp.astype(call.a, plan.compute)
    real = xp.real(a)
    b = None if call.b is None else xp.astype(call.b, plan.compute)
    included = call.where
    if b is not None:
        nonzero = b != 0
        included = nonzero if included is None else included & nonzero
        real = real + xp.log(xp.where(nonzero, xp.abs(b), scalar(xp, 1.0, real)))
    neg_inf = scalar(xp, -math.inf, real)
    if included is not None:
        included = xp.broadcast_to(included, xp.broadcast_arrays(a, real)[0].shape)
        real = xp.where(included, real, neg_inf)
    m = xp.max(real, axis=call.axes, keepdims=True) if call.axes else real
    shift = xp.where(xp.isfinite(m), m, scalar(xp, 0.0, m))
    terms = xp.exp(a - xp.astype(shift, plan.compute))
    if b is not None:
        terms = b * terms
    if included is not None:
        terms = xp.where(included, terms, xp.zeros_like(terms))
    total = xp.sum(terms, axis=call.axes, keepdims=True, dtype=plan.accumulator) if call.axes else terms
    total = xp.astype(total, plan.compute)
    magnitude = xp.abs(total)
    real_dtype = magnitude.dtype
    log_magnitude = xp.astype(shift, real_dtype) + xp.log(magnitude)
    log_magnitude = xp.where(m == math.inf, m, log_magnitude)
    if call.return_sign:
        unit = total / xp.astype(xp.where(magnitude == 0, scalar(xp, 1.0, magnitude), magnitude), total.dtype)
        return log_magnitude, unit
    # Principal branch: the imaginary part lies in (-pi, pi].
    value = xp.astype(xp.log(total) + xp.astype(shift, total.dtype), plan.result)
    return value, xp.ones_like(value)


def _normalized(call: Call, from_state) -> Array:
    """The state over ``call.axes``, then ``from_state`` elementwise."""
    xp, plan = call.xp, call.plan
    if _is_empty(call):
        return xp.astype(call.a, plan.result)
    state = logsumexp_state(call)
    x = xp.astype(call.a, plan.compute)
    included = None if call.where is None else xp.broadcast_to(call.where, x.shape)
    return xp.astype(from_state(xp, x, state, included), plan.result)


def log_softmax(call: Call) -> Array:
    """``x - logsumexp(x)`` over ``call.axes``, the max entry kept exact."""
    return _normalized(call, log_softmax_from_state)


def softmax(call: Call) -> Array:
    """``exp(log_softmax(x))``, its exponent compensated for rounding."""
    return _normalized(call, softmax_from_state)


def _is_empty(call: Call) -> bool:
    return any(extent == 0 for extent in call.shape)
