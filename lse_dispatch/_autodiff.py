"""Derivative rules of logsumexp, softmax and log_softmax, written once.

The per-backend wrappers (``backends/_torch_grad.py``, ``backends/_jax_grad.py``)
only plumb these array-API formulas into ``torch.autograd.Function`` and
``jax.custom_jvp``.  Every rule is expressed through *outputs* of the forward
(the log-sum-exp value and sign, the softmax, the log-softmax), so that it
inherits the forward's limit semantics instead of re-deriving them with
``exp(a - lse)`` at ``inf - inf``.

The derivative of ``lse = log|S|``, ``S = sum_i b_i exp(a_i)``, is carried by
two weight arrays, the output of :func:`lse_weights`:

* ``w_i = d lse / d a_i = b_i exp(a_i) / S`` -- the (signed) softmax;
* ``u_i = d lse / d b_i = exp(a_i) / S``     -- nonzero also where ``b_i == 0``.

Their own derivatives close over themselves (``dw_i/da_j = w_i (d_ij - w_j)``,
``dw_i/db_j = d_ij u_i - w_i u_j``, ``du_i/da_j = u_i (d_ij - w_j)``,
``du_i/db_j = -u_i u_j``), which is what makes second and higher derivatives
(the Hessian ``diag(p) - p p^T``) come out of the same formulas.

Limits (the contract's semantics table, applied to derivatives):

* nothing included, all ``-inf``, or a zero sum (``lse = -inf``): ``lse`` is
  constant in ``a``, every weight is 0;
* ``k`` entries at ``+inf``: they share the derivative as the forward shares
  the value, ``s_i / (sum of signs at +inf)``, 1/k without weights; finite
  entries get 0;
* entries excluded by ``where=False`` get exactly 0 (``b == 0`` entries get
  ``w = 0`` but a true ``u``);
* a NaN forward value gives NaN weights on the included entries.

Products with a weight that is exactly 0 go through :func:`_times_weight`, so
that an infinite or NaN cotangent on a masked entry cannot turn ``0 * inf``
into NaN, in the first or any higher derivative.
"""

from __future__ import annotations

import math
from typing import Any

from ._namespace import real_sign, scalar
from ._state import LSEState, log_norm, undefined_where, weight_parts

__all__ = [
    "log_softmax_jvp",
    "log_softmax_vjp",
    "lse_jvp",
    "lse_vjp",
    "lse_weights",
    "softmax_jvp",
    "softmax_vjp",
    "unbroadcast",
    "weights_jvp",
    "weights_vjp",
]

Array = Any


def _times_weight(xp, weight: Array, other: Array, support: Array | None = None) -> Array:
    """``weight * other``, exactly 0 where ``support == 0`` whatever ``other`` is.

    ``support`` (``weight`` itself by default) must be 0 only where ``weight``
    is identically 0 in a neighbourhood -- masked entries, ``-inf`` entries --
    so that no derivative is lost: for ``lse`` weights it is ``u``, because
    ``w`` is also 0 at ``b == 0``, where its derivative ``dw/db = u`` is not.
    The inner ``where`` matters for higher derivatives: the product's
    derivative with respect to ``weight`` is ``other``, which must be finite
    on the discarded branch too (the "double where" rule).
    """
    support = weight if support is None else support
    zero = scalar(xp, 0.0, other)
    safe = xp.where(support == 0, zero, other)
    return weight * safe


def _sum(xp, x: Array, axes: tuple[int, ...]) -> Array:
    return xp.sum(x, axis=axes, keepdims=True) if axes else x


def unbroadcast(xp, grad: Array, shape: tuple) -> Array:
    """Sum ``grad`` down to ``shape`` (the reverse of broadcasting)."""
    shape = tuple(shape)
    if tuple(grad.shape) == shape:
        return grad
    lead = grad.ndim - len(shape)
    if lead:
        grad = xp.sum(grad, axis=tuple(range(lead)))
    axes = tuple(ax for ax, n in enumerate(shape) if n == 1 and grad.shape[ax] != 1)
    if axes:
        grad = xp.sum(grad, axis=axes, keepdims=True)
    return grad


def lse_weights(
    xp,
    a: Array,
    b: Array | None,
    where: Array | None,
    axes: tuple[int, ...],
    value: Array,
    sign: Array,
    state: LSEState,
) -> tuple[Array, Array | None]:
    """``(w, u)``: ``d lse/d a`` and ``d lse/d b`` from the forward's result.

    ``a`` and ``b`` are in the compute dtype and broadcast together; ``where``
    is ``None`` or a boolean array broadcasting to them; ``value`` is the
    forward's ``log|S|`` with the reduced axes kept (NaN where the forward
    gave NaN), ``sign`` its sign and ``state`` the :class:`LSEState` of the
    same reduction.  ``u`` is ``None`` without weights.

    Finite weights are formed as ``exp((a_i - m) - log|c + r|)`` from the
    state, as :func:`~lse_dispatch._state.log_softmax_from_state` does, not as
    ``exp(a_i - lse)``: the rounding of ``lse`` (``|lse| * eps/2``) would
    otherwise be the relative error of every weight, 1e-12 at ``lse = 1e4``.
    """
    value = xp.astype(value, a.dtype)
    sign = xp.astype(sign, a.dtype)
    zero = scalar(xp, 0.0, a)
    finite = xp.isfinite(value)
    selected = xp.ones_like(a, dtype=xp.bool) if where is None else where
    # b != 0, sign and log|b| as the forward took them (subnormal b on JAX).
    parts = None if b is None else weight_parts(xp, b, state.rest.dtype)
    included = selected if parts is None else (selected & parts[0])
    w_finite, u_finite = _finite_weights(xp, a, b, parts, selected & finite, included & finite, sign, state, finite)
    w_inf, u_inf = _infinite_weights(xp, a, b, parts, selected, included, axes)

    # A NaN forward value makes the included weights NaN (taken from value:
    # no NaN constant, see _state.undefined_where).
    undefined = xp.isnan(value) & selected
    at_pos_inf = value == math.inf
    w = xp.where(undefined, value, xp.where(at_pos_inf, w_inf, xp.where(finite, w_finite, zero)))
    if b is None:
        return w, None
    u = xp.where(undefined, value, xp.where(at_pos_inf, u_inf, xp.where(finite, u_finite, zero)))
    return w, u


def _finite_weights(xp, a, b, parts, selected, included, sign, state: LSEState, finite):
    """``(w, u)`` where the forward value is finite: ``exp((a - m) - log|c + r|)`` from the state.

    ``selected``/``included`` are already restricted to finite lines, whose
    ``log|c + r|`` is formed exactly as :func:`~lse_dispatch._state.finalize`
    forms it; elsewhere the argument of ``exp`` is ``-inf``, so that neither
    ``exp`` nor its derivative sees ``inf - inf``.
    """
    m, count, rest = state
    acc = rest.dtype
    total_sign = real_sign(xp, count + rest)
    signed_count = xp.where(finite, total_sign * count, scalar(xp, 1.0, count))
    normaliser = log_norm(xp, signed_count, xp.where(finite, total_sign * rest, scalar(xp, 0.0, rest)))
    m = xp.where(finite, m, xp.zeros_like(m))
    acc_neg_inf = scalar(xp, -math.inf, rest)
    offset = (xp.astype(a, acc) - xp.astype(m, acc)) - normaliser
    exponential = xp.astype(xp.exp(xp.where(selected, offset, acc_neg_inf)), a.dtype)
    if b is None:
        return exponential, None
    _, b_sign, log_b = parts
    # u = sign * exp(a - lse) is d lse / d b, also where b == 0.
    u = sign * exponential
    normal = xp.abs(b) >= scalar(xp, xp.finfo(a.dtype).smallest_normal, a)
    # a - lse <= -log|b| keeps b * u finite for normal b; for subnormal b,
    # form exp(a + log|b| - lse) instead, where exp(a - lse) may overflow.
    small = xp.exp(xp.where(included, offset + log_b, acc_neg_inf))
    small = sign * b_sign * xp.astype(small, a.dtype)
    w = xp.where(included, xp.where(normal, b * u, small), scalar(xp, 0.0, a))
    return w, u


def _infinite_weights(xp, a, b, parts, selected, included, axes):
    """``(w, u)`` where the forward value is ``+inf``: the entries at ``+inf`` share it by sign.

    The forward is NaN where those signs cancel.  A ``b == 0`` entry that is
    itself at ``+inf`` has no limit of ``u`` (it depends on how fast it grows
    compared with the others).
    """
    zero, one = scalar(xp, 0.0, a), scalar(xp, 1.0, a)
    at_inf = included & (a == math.inf)
    share = xp.ones_like(a) if b is None else parts[1]
    count = _sum(xp, xp.where(at_inf, share, zero), axes)
    w = xp.where(at_inf, share / xp.where(count == 0, one, count), zero)
    if b is None:
        return w, None
    nonzero = parts[0]
    u = xp.where(nonzero, w / xp.where(nonzero, b, one), undefined_where(xp, selected & (a == math.inf), a))
    return w, u


def lse_jvp(xp, w: Array, u: Array | None, da: Array, db: Array | None, axes: tuple[int, ...]) -> Array:
    """Tangent of ``lse``: ``sum w * da + sum u * db`` (reduced axes kept)."""
    support = w if u is None else u
    total = _sum(xp, _times_weight(xp, w, da, support), axes)
    if u is not None and db is not None:
        total = total + _sum(xp, _times_weight(xp, u, db), axes)
    return total


def lse_vjp(xp, w: Array, u: Array | None, g: Array) -> tuple[Array, Array | None]:
    """Cotangents of ``a`` and ``b`` (broadcast shape) from that of ``lse``."""
    support = w if u is None else u
    grad_a = _times_weight(xp, w, g, support)
    grad_b = None if u is None else _times_weight(xp, u, g)
    return grad_a, grad_b


def weights_jvp(xp, w, u, da, db, axes) -> tuple[Array, Array | None]:
    """Tangents of ``(w, u)``: ``dw = w (da - t) + u db``, ``du = u (da - t)``.

    ``t`` is the tangent of ``lse`` itself.
    """
    support = w if u is None else u
    t = lse_jvp(xp, w, u, da, db, axes)
    dw = _times_weight(xp, w, da - t, support)
    if u is None:
        return dw, None
    if db is not None:
        dw = dw + _times_weight(xp, u, db)
    return dw, _times_weight(xp, u, da - t)


def weights_vjp(xp, w, u, gw, gu, axes) -> tuple[Array, Array | None]:
    """Cotangents of ``a`` and ``b`` from those of ``(w, u)`` (transpose of the JVP).

    With ``r = gw - sum(gw w) - sum(gu u)``: ``ga = w r + u gu``, ``gb = u r``.
    """
    support = w if u is None else u
    r = gw - _sum(xp, _times_weight(xp, w, gw, support), axes)
    if u is None:
        return _times_weight(xp, w, r, support), None
    if gu is not None:
        r = r - _sum(xp, _times_weight(xp, u, gu), axes)
    grad_a = _times_weight(xp, w, r, support)
    if gu is not None:
        grad_a = grad_a + _times_weight(xp, u, gu)
    return grad_a, _times_weight(xp, u, r)


def softmax_jvp(xp, y: Array, dx: Array, axes: tuple[int, ...]) -> Array:
    """``dy = y (dx - sum y dx)``; entries with ``y == 0`` get exactly 0.

    The Jacobian ``diag(y) - y y^T`` is symmetric, so this is also the VJP.
    """
    return _times_weight(xp, y, dx - _sum(xp, _times_weight(xp, y, dx), axes))


softmax_vjp = softmax_jvp


def _log_softmax_mask(xp, z: Array, where: Array | None) -> Array:
    if where is None:
        return xp.ones_like(z, dtype=xp.bool)
    return xp.broadcast_to(where, z.shape)


def log_softmax_jvp(xp, z: Array, where: Array | None, dx: Array, axes) -> Array:
    """``dz = dx - sum p dx`` on included entries (``p = exp z``), 0 on excluded.

    An included ``-inf`` entry keeps ``dz_i = dx_i``: ``z_i = x_i - lse``
    moves with ``x_i`` even there.
    """
    included = _log_softmax_mask(xp, z, where)
    zero = scalar(xp, 0.0, dx)
    p = xp.exp(z)
    shift = _sum(xp, _times_weight(xp, p, dx), axes)
    return xp.where(included, dx - shift, zero)


def log_softmax_vjp(xp, z: Array, where: Array | None, g: Array, axes) -> Array:
    """``gx = g - p sum g`` over included entries, 0 on excluded ones."""
    included = _log_softmax_mask(xp, z, where)
    zero = scalar(xp, 0.0, g)
    total = _sum(xp, xp.where(included, g, zero), axes)
    p = xp.exp(z)
    return xp.where(included, g - _times_weight(xp, p, total), zero)
