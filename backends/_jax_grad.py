"""JAX derivative kernels: ``jax.custom_jvp`` rules over the shared math.

The formulas are those of :mod:`lse_dispatch._autodiff`.  JAX derives
reverse mode (``grad``, ``jacrev``) by transposing the JVP, and higher
derivatives (``hessian``) by differentiating the JVP rule, whose weights are
themselves a ``custom_jvp`` function; ``vmap`` and ``jit`` need nothing more.

The kernels apply whenever the input is traced (``jit``, ``grad``, ``vmap``
and the rest), since only a traced call can be differentiated; under ``jit``
a ``custom_jvp`` lowers to its primal computation, so it costs nothing.
Eager calls on concrete arrays are declined and run as before.

Importing this module imports no array library; JAX is imported the first
time a kernel sees a JAX array (so JAX is already loaded).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from lse_dispatch import _autodiff, _generic, _kernel
from lse_dispatch._call import Call
from lse_dispatch._kernel import Kernel, Priority
from lse_dispatch._namespace import DtypePlan
from lse_dispatch._ops import Op

from ._spec import AUTODIFF

__all__ = ["KERNELS"]


@dataclass(frozen=True)
class _Static:
    """The non-array arguments of a call (hashable, for ``nondiff_argnums``)."""

    axes: tuple[int, ...]
    op: str
    plan: DtypePlan
    return_sign: bool = False
    #: Whether ``d lse/d b`` is wanted: without it the weights' rules carry no
    #: ``u``, which is infinite or NaN at ``b == 0`` entries on ``+inf`` or NaN
    #: and would turn a zero tangent of ``b`` into NaN (Hessians in ``a``).
    with_u: bool = True


def _declines(call: Call) -> str | None:
    import jax

    if call.plan.is_complex:
        return "complex input: the generic operations' own derivatives apply"
    if any(call.shape[ax] == 0 for ax in call.axes) or any(n == 0 for n in call.shape):
        return "empty input: nothing to differentiate"
    arrays = (call.a,) if call.b is None else (call.a, call.b)
    if not any(isinstance(x, jax.core.Tracer) for x in arrays):
        return "concrete input: no transform can differentiate it"
    return None


def _rebuild(static: _Static, a, b, where) -> Call:
    import jax.numpy as jnp

    # Inside custom_jvp rules primals may arrive as NumPy arrays (jax.test_util).
    a = jnp.asarray(a)
    b = None if b is None else jnp.asarray(b)
    where = None if where is None else jnp.asarray(where)
    shape = tuple(a.shape) if b is None else tuple(jnp.broadcast_shapes(a.shape, b.shape))
    return Call(static.op, jnp, a, b, where, static.axes, shape, static.plan, static.return_sign)


def _undifferentiated(call: Call):
    """The forward that would run without derivatives: native kernel or generic."""
    return _kernel.dispatch(call, without=AUTODIFF)


@functools.cache
def _rules():
    """Build the ``custom_jvp`` functions once JAX is imported.

    Long because the rules are defined inside, as closures over the JAX
    module (imported here, not at import time) and over each other: the
    weights' rule is the derivative of the forward's.
    """
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def weights(static, a, b, where, value, sign):
        """``(w, u) = (d lse/d a, d lse/d b)``; ``value``, ``sign`` are not differentiated."""
        state = _generic.logsumexp_state(_rebuild(static, a, b, where))
        w, u = _autodiff.lse_weights(jnp, a, b, where, static.axes, value, sign, state)
        return w, (u if static.with_u else None)

    def _tangent(t, ref):
        """A tangent as an array like ``ref``; ``None`` for JAX's symbolic zero."""
        if isinstance(t, SymbolicZero):
            return None
        return jnp.asarray(t, dtype=ref.dtype)

    @functools.partial(weights.defjvp, symbolic_zeros=True)
    def _weights_jvp(static, primals, tangents):
        w, u = weights(static, *primals)
        da = _tangent(tangents[0], w)
        da = jnp.zeros_like(w) if da is None else da
        db = None if u is None else _tangent(tangents[1], w)
        return (w, u), _autodiff.weights_jvp(jnp, w, u, da, db, static.axes)

    def weights_of(static, a, b, where, value, sign, plan):
        """``(w, u)`` on the broadcast shape, in the compute dtype."""
        a = jnp.asarray(a, dtype=plan.compute)
        if b is not None:
            a, b = jnp.broadcast_arrays(a, jnp.asarray(b, dtype=plan.compute))
        if where is not None:
            where = jnp.broadcast_to(jnp.asarray(where), a.shape)
        stop = jax.lax.stop_gradient
        return weights(static, a, b, where, stop(value), stop(sign))

    def _tangent_like(t, ref, plan):
        # Tangents may arrive as NumPy arrays (jax.test_util, user code).
        return jnp.broadcast_to(jnp.asarray(t, dtype=plan.compute), ref.shape)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def logsumexp(static, a, b, where):
        return _undifferentiated(_rebuild(static, a, b, where))

    @functools.partial(logsumexp.defjvp, symbolic_zeros=True)
    def _logsumexp_jvp(static, primals, tangents):
        a, b, where = primals
        da, db, _ = tangents
        value, sign = logsumexp(static, a, b, where)
        plan = static.plan
        # b is differentiated only if its tangent is not JAX's symbolic zero.
        with_u = b is not None and not isinstance(db, SymbolicZero)
        w, u = weights_of(dataclasses.replace(static, with_u=with_u), a, b, where, value, sign, plan)
        da = jnp.zeros_like(w) if isinstance(da, SymbolicZero) else _tangent_like(da, w, plan)
        db = _tangent_like(db, w, plan) if with_u else None
        tangent = _autodiff.lse_jvp(jnp, w, u, da, db, static.axes)
        return (value, sign), (tangent.astype(value.dtype), jnp.zeros_like(sign))

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def normalized(static, x, where):
        return _undifferentiated(_rebuild(static, x, None, where))

    @normalized.defjvp
    def _normalized_jvp(static, primals, tangents):
        x, where = primals
        out = normalized(static, x, where)
        compute = static.plan.compute
        out_c, dx = out.astype(compute), jnp.asarray(tangents[0], dtype=compute)
        if static.op == Op.SOFTMAX:
            tangent = _autodiff.softmax_jvp(jnp, out_c, dx, static.axes)
        else:
            tangent = _autodiff.log_softmax_jvp(jnp, out_c, where, dx, static.axes)
        return out, tangent.astype(out.dtype)

    return logsumexp, normalized


def _logsumexp(call: Call):
    logsumexp, _ = _rules()
    return logsumexp(_Static(call.axes, call.op, call.plan, call.return_sign), call.a, call.b, call.where)


def _normalised(call: Call):
    _, normalized = _rules()
    return normalized(_Static(call.axes, call.op, call.plan), call.a, call.where)


#: Kernels for backends/jax.py: they take every traced call.
KERNELS = (
    Kernel(Op.LOGSUMEXP, AUTODIFF, _logsumexp, _declines, Priority.DERIVATIVE),
    Kernel(Op.SOFTMAX, AUTODIFF, _normalised, _declines, Priority.DERIVATIVE),
    Kernel(Op.LOG_SOFTMAX, AUTODIFF, _normalised, _declines, Priority.DERIVATIVE),
)
