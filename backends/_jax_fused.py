"""JAX kernel ``jax.fused``: plain float32 calls without x64, with lean derivative rules.

It takes every call that JAX computes in float32 without a float64
accumulator (float32, float16 and bfloat16 input with x64 off), without ``b``
or ``where``, traced (inside the user's ``jit``, ``grad``, ``vmap``...) or
concrete, through one ``jax.jit`` with the call's signature static: inside
the user's program it is a nested jit, traced once per signature however
many layers and programs call it (XLA inlines it: the optimized program is
the same).  The state comes from :mod:`._jax_traced`; the outputs and their
limits from the shared functions of :mod:`lse_dispatch._state`.

Derivatives (``jax.custom_jvp``, formulas of :mod:`lse_dispatch._autodiff`):

* ``softmax``: ``dy = y (dx - sum y dx)``, from the output ``y`` alone;
* ``log_softmax``: ``dz = dx - sum w dx`` and ``logsumexp``: ``d lse = sum w dx``,
  with ``w = softmax(x)`` kept as ``(t, f)``, ``w = t f``: the terms and a
  factor per line, formed in the same pass as the value by the rule's
  forward (``with_weights``), so that the backward pass reads the terms and
  forms ``t (f g)`` in one loop, as ``jax.nn``'s reads its ``exp``, and
  ``log_softmax``'s needs no ``exp`` of its own.

Each tangent map runs under ``jax.checkpoint``, so that reverse mode saves
only the map's inputs: the output (softmax) or the terms and their factor
(logsumexp, log_softmax), one array of the input's size as ``jax.nn``'s
rules save, instead of the masks and products the map forms (which it
recomputes in the backward pass, fused into it).  The weights have a rule
of their own (``dt = t dx``, ``df = -f sum(w dx)``, whose product is
softmax's tangent), so that second and higher derivatives (``hessian``,
``jacfwd`` of ``grad``) come out of the same formulas, limits included.
"""

from __future__ import annotations

import functools

from lse_dispatch import _autodiff

from . import _jax_traced

__all__ = ["KERNELS", "NAME"]

NAME = "jax.fused"


def _declines(call) -> str | None:
    # Only JAX arrays reach it (the dispatcher offers a backend's kernels to its own arrays).
    return _jax_traced.declines(call)


@functools.cache
def _rules():
    """The ``custom_jvp`` functions on lines (reduced axis last), built once JAX is imported.

    Long because the three operations' rules are defined here together, as
    closures over JAX (imported here, not at import time) and over the
    shared vmap wrapper, each forward beside its tangent map.
    """
    import jax
    import jax.numpy as jnp

    def last(y):
        return (y.ndim - 1,)

    def batched(forward):
        """``forward`` with a vmap rule: batched lines are more lines.

        The batch axis comes first and the reduced axis stays last, so the
        forward runs once on the whole batch, with one ``lax.cond`` for all of
        it, rather than vmap's select between both branches.
        """
        wrapped = jax.custom_batching.custom_vmap(forward)

        @wrapped.def_vmap
        def _rule(axis_size, in_batched, lines):
            # (Unbatched lines reach the rule when only a tangent is batched,
            # as under jacfwd: the forward itself then, not the wrapper again.)
            out = wrapped(lines) if in_batched[0] else forward(lines)
            return out, jax.tree_util.tree_map(lambda _: in_batched[0], out)

        return wrapped

    softmax_forward = batched(_jax_traced.softmax)
    log_softmax_forward = batched(_jax_traced.log_softmax)
    logsumexp_forward = batched(_jax_traced.logsumexp)
    log_softmax_weights_forward = batched(functools.partial(_jax_traced.log_softmax, weights=True))
    logsumexp_weights_forward = batched(functools.partial(_jax_traced.logsumexp, weights=True))

    # -- softmax: the tangent map needs y only.
    @jax.custom_jvp
    def softmax(lines):
        return softmax_forward(lines)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def softmax_tangent(y, dx):
        return _autodiff.softmax_jvp(jnp, y, dx, last(y))

    @softmax.defjvp
    def _softmax_jvp(primals, tangents):
        (lines,), (dx,) = primals, tangents
        y = softmax(lines)
        return y, softmax_tangent(y, jnp.asarray(dx, y.dtype))

    # -- logsumexp and log_softmax: the tangent maps need the weights
    # w = softmax(x), as (t, f) with w = t f: the terms and a factor per line
    # (see _jax_traced.logsumexp).  The public functions' forwards do not form
    # them; their rules call a forward that does, in the same pass as the
    # value, and reverse mode then saves t and f, and forms t (f g) in one
    # loop.  The weights' own rule (below) gives higher derivatives.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def weighted_sum(t, f, dx):
        return jnp.sum(_autodiff._times_weight(jnp, t, dx), axis=-1, keepdims=True) * f

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def times_terms(t, dx):
        return _autodiff._times_weight(jnp, t, dx)

    def with_weights(forward, weights_forward, value_tangents):
        """The public function ``forward`` with its rule, over ``weights_forward`` with its own.

        ``weights_forward`` maps lines to ``(*values, t, f)``: ``forward``'s
        values and the weights' factors.  ``t f`` is softmax, and its rule is
        that of ``t = exp(x - s)`` and ``f = 1 / sum t`` for a constant ``s``:
        ``dt = t dx`` and ``df = -f sum(t f dx)``, whose product's tangent is
        softmax's, ``w (dx - sum w dx)``.  ``value_tangents(dx, sum(w dx))``
        gives the tangents of the values, in both rules.
        """

        @jax.custom_jvp
        def weighted(lines):
            return weights_forward(lines)

        @weighted.defjvp
        def _weighted_jvp(primals, tangents):
            (lines,), (dx,) = primals, tangents
            out = weighted(lines)
            t, f = out[-2:]
            dx = jnp.asarray(dx, t.dtype)
            mean = weighted_sum(t, f, dx)
            return out, (*value_tangents(dx, mean), times_terms(t, dx), -f * mean)

        @jax.custom_jvp
        def public(lines):
            return forward(lines)

        @public.defjvp
        def _public_jvp(primals, tangents):
            (lines,), (dx,) = primals, tangents
            *values, t, f = weighted(lines)
            dx = jnp.asarray(dx, t.dtype)
            dots = value_tangents(dx, weighted_sum(t, f, dx))
            if len(values) == 1:  # log_softmax: one array, not a tuple
                return values[0], dots[0]
            return tuple(values), dots

        return public

    logsumexp = with_weights(logsumexp_forward, logsumexp_weights_forward,
                             lambda dx, mean: (mean, jnp.zeros_like(mean)))
    log_softmax = with_weights(log_softmax_forward, log_softmax_weights_forward, lambda dx, mean: (dx - mean,))

    return {"softmax": softmax, "log_softmax": log_softmax, "logsumexp": logsumexp}


def _run_traced(call):
    """The call's computation in the current trace (the nested jit's, see :func:`_run`)."""
    import jax.numpy as jnp

    plan = call.plan
    x = jnp.asarray(call.a, dtype=plan.compute)
    lines, back = _jax_traced.to_lines(x, call.axes)
    rule = _rules()[call.op]
    if call.op == "logsumexp":
        value, sign = rule(lines)
        return back(value).astype(plan.result), back(sign).astype(plan.result)
    return back(rule(lines)).astype(plan.result)


def _in_place(call, a):
    """The call on the array ``a`` (``call`` carries everything else), traced where it is called."""
    import dataclasses

    return _run_traced(dataclasses.replace(call, a=a))


@functools.cache
def _compiled():
    """:func:`_in_place` under ``jax.jit`` with the call static: one trace per signature."""
    import jax

    return jax.jit(_in_place, static_argnums=0)


def _run(call):
    import dataclasses

    # Traced or concrete, the call goes through the same jitted function: inside
    # the user's trace it is a nested jit, traced once per signature however
    # many times and in however many programs the user calls it.
    return _compiled()(dataclasses.replace(call, a=None), call.a)


def _kernels():
    from lse_dispatch._kernel import Kernel, Priority
    from lse_dispatch._ops import Op

    # Ahead of the shared derivative rules for the calls it takes: it brings its own.
    priority = Priority.COMPILED_WITH_DERIVATIVES
    return tuple(Kernel(op, NAME, _run, _declines, priority) for op in (Op.LOGSUMEXP, Op.SOFTMAX, Op.LOG_SOFTMAX))


KERNELS = _kernels()
