"""JAX kernels of ``logcumsumexp`` and ``logmatmulexp``: ``jax.jit`` and ``jax.custom_jvp``.

The forward passes are the lazy-safe forms of :mod:`lse_dispatch.semiring`:

* ``logcumsumexp``: ``lax.associative_scan`` of the state merge
  (O(n) work, depth ``2 log2 n``), then ``finalize``;
* ``logmatmulexp``: the rescaled products of ``product_states``; the
  entries they cannot give are recomputed from their pairs for the whole
  matrix under ``lax.cond`` (so the common case pays nothing for them), a
  few rows at a time through ``lax.map``.

The derivative rules are ``custom_jvp`` s whose tangents are the linear
recurrence and the weighted matrix products of ``lse_dispatch.semiring``;
JAX derives reverse mode by transposing them, and ``vmap`` and ``jit`` need
nothing more.  Concrete arrays are computed by the same functions compiled
with ``jax.jit`` once per signature.

Importing this module imports no array library; JAX is imported when a
JAX array arrives (so JAX is already loaded).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from lse_dispatch import semiring
from lse_dispatch._namespace import DtypePlan
from lse_dispatch._state import LSEState, finalize

__all__ = ["logcumsumexp", "logmatmulexp", "takes"]


@dataclass(frozen=True)
class _Static:
    """The non-array arguments (hashable: ``nondiff_argnums`` and jit's static argument)."""

    plan: DtypePlan
    axis: int = 0
    reverse: bool = False


def _scan_last(jnp, x, static):
    """The forward along the last axis of ``x`` (compute dtype, scan order): the running max and a
    log-step linear recurrence (``semiring.recurrence_states``), which XLA compiles several times faster
    than an associative scan of ``merge``."""
    state = semiring.recurrence_states(jnp, x, static.plan.accumulator)
    value, _ = finalize(jnp, state, static.plan.result)
    return value


def _to_scan_order(jnp, x, static):
    x = semiring._move(jnp, x, static.axis, -1)
    return jnp.flip(x, axis=-1) if static.reverse else x


def _from_scan_order(jnp, x, static):
    x = jnp.flip(x, axis=-1) if static.reverse else x
    return semiring._move(jnp, x, -1, static.axis)


def _row_chunks(k: int, m: int) -> int:
    return max(1, semiring._FALLBACK_BATCH // max(1, k * m))


def _flat_rows(jnp, a, b):
    """``a`` as rows ``(batch * n, k)`` with each row's batch index, and ``b`` as ``(batch, k, m)``."""
    n, k = a.shape[-2], a.shape[-1]
    m = b.shape[-1]
    batches = 1
    for extent in a.shape[:-2]:
        batches *= extent
    rows = jnp.reshape(a, (batches * n, k))
    owner = jnp.arange(batches * n) // n
    return rows, owner, jnp.reshape(b, (batches, k, m)), batches, n


def _dense_states(jnp, a, b, plan):
    """The state of every entry from its own pairs, a few rows at a time (``lax.map``)."""
    import jax

    rows, owner, mats, _, n = _flat_rows(jnp, a, b)
    k, m = a.shape[-1], b.shape[-1]

    def one(args):
        row, index = args
        state = semiring.pair_states(jnp, row[:, None], mats[index], 0, plan)
        return LSEState(*(field[0] for field in state))

    states = jax.lax.map(one, (rows, owner), batch_size=_row_chunks(k, m))
    return LSEState(*(jnp.reshape(field, a.shape[:-2] + (n, m)) for field in states))


def _dense_slow_jvp(jnp, a, b, y, slow, da, db, plan):
    """The tangent of the slow entries from their pairs' weights (0 elsewhere), row by row."""
    import jax

    rows, owner, mats, batches, n = _flat_rows(jnp, a, b)
    k, m = a.shape[-1], b.shape[-1]
    y_rows = jnp.reshape(y, (batches * n, m))
    slow_rows = jnp.reshape(slow, (batches * n, m))
    da_rows = jnp.reshape(jnp.zeros_like(a) if da is None else da, (batches * n, k))
    db_mats = jnp.reshape(jnp.zeros_like(b) if db is None else db, (batches, k, m))

    def one(args):
        row, index, y_row, keep, da_row = args
        weights = semiring.pair_weights(jnp, row[None, :], mats[index][None], y_row[None, :], plan)[0]
        weights = jnp.where(keep[None, :], weights, 0)
        tangent = (da_row[:, None] + db_mats[index]).astype(weights.dtype)
        return jnp.sum(semiring._times(jnp, weights, tangent), axis=0)

    out = jax.lax.map(one, (rows, owner, y_rows, slow_rows, da_rows), batch_size=_row_chunks(k, m))
    return jnp.reshape(out, y.shape)


def _matrices(jnp, a, b):
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    batch = jnp.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    return jnp.broadcast_to(a2, batch + a2.shape[-2:]), jnp.broadcast_to(b2, batch + b2.shape[-2:])


def _drop(y, a, b):
    if a.ndim == 1:
        y = y[..., 0, :]
    if b.ndim == 1:
        y = y[..., 0]
    return y


def _product_forward(jnp, a, b, plan):
    import jax

    a2, b2 = _matrices(jnp, a.astype(plan.compute), b.astype(plan.compute))
    n, k, m = a2.shape[-2], a2.shape[-1], b2.shape[-1]
    if n == 0 or m == 0 or k == 0:
        out = jnp.full(a2.shape[:-2] + (n, m), -jnp.inf, dtype=plan.result)
        return _drop(out, a, b)
    columns = semiring.column_side(jnp, b2, plan.accumulator)
    state, fallback = semiring.product_states(jnp, a2, b2, columns, plan)
    state = jax.lax.cond(
        jnp.any(fallback),
        lambda: LSEState(*(jnp.where(fallback, d, s) for d, s in zip(_dense_states(jnp, a2, b2, plan), state))),
        lambda: state,
    )
    value, _ = finalize(jnp, state, plan.result)
    return _drop(value, a, b)


@functools.cache
def _rules():
    """Build the ``custom_jvp`` functions once JAX is imported."""
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def cumulative(static, x):
        value = _scan_last(jnp, _to_scan_order(jnp, x.astype(static.plan.compute), static), static)
        return _from_scan_order(jnp, value, static)

    @cumulative.defjvp
    def _cumulative_jvp(static, primals, tangents):
        (x,), (dx,) = primals, tangents
        y = cumulative(static, x)
        compute = static.plan.compute
        order = lambda t: _to_scan_order(jnp, jnp.asarray(t).astype(compute), static)  # noqa: E731
        dy = semiring.cumulative_jvp(jnp, order(x), order(y), order(dx))
        return y, _from_scan_order(jnp, dy, static).astype(y.dtype)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def product(static, a, b):
        return _product_forward(jnp, a, b, static.plan)

    @product.defjvp
    def _product_jvp(static, primals, tangents):
        a, b = primals
        da, db = tangents
        y = product(static, a, b)
        plan = static.plan
        compute = plan.compute
        a2, b2 = _matrices(jnp, jnp.asarray(a).astype(compute), jnp.asarray(b).astype(compute))
        da2, db2 = _matrices(jnp, jnp.asarray(da).astype(compute), jnp.asarray(db).astype(compute))
        y2 = y.astype(compute)
        if b.ndim == 1:
            y2 = y2[..., None]
        if a.ndim == 1:
            y2 = y2[..., None, :]
        if 0 in a2.shape or 0 in b2.shape:
            return y, jnp.zeros_like(y)
        parts = semiring.product_parts(jnp, a2, b2, y2)
        slow = parts[3]
        dy = semiring.product_jvp_fast(jnp, parts, da2, db2)
        dy = dy + jax.lax.cond(
            jnp.any(slow),
            lambda: _dense_slow_jvp(jnp, a2, b2, y2, slow, da2, db2, plan),
            lambda: jnp.zeros_like(dy),
        )
        return y, _drop(dy, a, b).astype(y.dtype)

    return jax.jit(cumulative, static_argnums=0), jax.jit(product, static_argnums=0)


def takes(*arrays) -> bool:
    """Every array of this library takes this module's rules."""
    return True


def logcumsumexp(x, axis: int, include_initial: bool, reverse: bool, plan: DtypePlan):
    """The public function on JAX arrays (concrete or traced)."""
    import jax.numpy as jnp

    cumulative, _ = _rules()
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(plan.result)
    out = cumulative(_Static(plan, axis, reverse), x)
    if include_initial:
        shape = list(out.shape)
        shape[axis] = 1
        initial = jnp.full(shape, -jnp.inf, dtype=out.dtype)
        out = jnp.concatenate([out, initial] if reverse else [initial, out], axis=axis)
    return out


def logmatmulexp(a, b, plan: DtypePlan):
    """The public function on JAX arrays (concrete or traced)."""
    import jax.numpy as jnp

    _, product = _rules()
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(plan.result)
    if not jnp.issubdtype(b.dtype, jnp.floating):
        b = b.astype(plan.result)
    return product(_Static(plan), a, b)
