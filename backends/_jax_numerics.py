"""JAX's numerics: what XLA needs of the shared math, behind the declared hook.

:class:`JaxNumerics` is the ``numerics`` of the JAX backend's spec
(:mod:`lse_dispatch._numerics` says what the hook is).  Each method works
around one measured behaviour of XLA (jax 0.10, CPU):

* ``max``: XLA's CPU ``max`` under ``jax.jit`` was seen to skip a NaN among
  finite entries (a (10, 1024) row), so the NaN is put back, taken from the
  input itself (a NaN constant would trip ``jax.debug_nans``);
* ``log1p``: XLA's float64 ``log1p`` is up to 128 ulps off on (-0.5, 0);
* ``sum``: sums without a wider accumulator are grouped sums plus exact
  limb sums along one trailing axis, fused by XLA (no optimization
  barriers), instead of the default's extraction, whose three reductions
  XLA would not fuse with the terms;
* ``bitcast``: XLA flushes subnormal operands (``1e-310 != 0`` is False),
  so weights are read from their bits (``Numerics.weight_parts``);
* ``weights``: a concrete ``b`` with subnormal entries inside a staged
  trace (a weight the user's ``jax.jit`` function closes over) would be a
  constant of the compiled program, and XLA rewrites such constants (it
  replaced ``[1e-310, 1, 2]`` by ``iota`` = ``[0, 1, 2]``, and folds the
  bitcast of a subnormal constant to 0); it is handed to the program as its
  integer bits behind an optimization barrier instead (a complex ``b``
  always: XLA aborts on some complex constants);
* ``undefined_where``: NaN made as ``inf - inf``, never selected from a
  constant (``jax.debug_nans``).

Plain float32 calls without x64 (no ``b``, no ``where``) are the
``jax.fused`` kernel's (``backends/_jax_traced.py``), not this hook's.

Importing this module imports no array library; JAX is imported by the
methods, which run only on JAX arrays.
"""

from __future__ import annotations

import math
from typing import Any

from lse_dispatch._namespace import scalar
from lse_dispatch._numerics import Numerics

__all__ = ["JaxNumerics"]

Array = Any

# Sums over more than this many elements run along a contiguous trailing axis,
# as limb sums (JaxNumerics.sum).
PAIRWISE_THRESHOLD = 32


class JaxNumerics(Numerics):
    """The shared math's hook for JAX arrays (see the module docstring)."""

    lazy = True  # traced under jit: no value reaches the host

    def semiring(self):
        from . import _jax_semiring

        return _jax_semiring

    def cummax(self, xp, x: Array, axis: int) -> Array:
        import jax

        return jax.lax.cummax(x, axis=axis)

    def fold_chunks(self, xp, step, carry, arrays: tuple, axes: tuple[int, ...], chunk: int):
        """One ``lax.scan`` over the chunks (padded with zeros to whole chunks), not a graph per chunk.

        float32 ``logmatmulexp`` without x64 over ``k = 4096`` (128 chunks of
        one product) compiles in 1.5 s so, 5.7 s as a Python loop (25 s for
        a loop of the float64 form's split chunks, six products each).
        """
        import jax

        length = arrays[0].shape[axes[0]]
        count = -(-length // chunk)
        stacked = []
        for x, axis in zip(arrays, axes):
            axis %= x.ndim
            if count * chunk != length:
                x = xp.pad(x, [(0, count * chunk - length) if i == axis else (0, 0) for i in range(x.ndim)])
            x = xp.reshape(x, x.shape[:axis] + (count, chunk) + x.shape[axis + 1 :])
            stacked.append(xp.moveaxis(x, axis, 0))
        carry, _ = jax.lax.scan(lambda state, pieces: (step(state, pieces), None), carry, tuple(stacked))
        return carry

    def matmul(self, xp, x: Array, y: Array) -> Array:
        import jax

        return xp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)

    def max(self, xp, x: Array, axes: tuple[int, ...]) -> Array:
        m = xp.max(x, axis=axes, keepdims=True)
        # The NaN is taken from x itself (a sum of its NaN entries, 0 when there
        # are none): a NaN constant would trip jax.debug_nans on NaN-free input.
        return m + xp.sum(xp.where(xp.isnan(x), x, xp.zeros_like(x)), axis=axes, keepdims=True)

    def log1p(self, xp, x: Array) -> Array:
        return _log1p(xp, x)

    def sum(self, xp, x: Array, axes: tuple[int, ...], dtype, *, nonnegative: bool = False, integral: bool = False) -> Array:
        # Fused limb sums (_fused_sum_last) along one contiguous trailing axis:
        # within about a rounding, in passes XLA fuses (the default's three
        # reductions would not fuse with the terms).
        reduced = math.prod([x.shape[ax] for ax in axes])
        if x.dtype != dtype or reduced < PAIRWISE_THRESHOLD:
            return xp.sum(x, axis=axes, dtype=dtype, keepdims=True)
        kept = tuple(ax for ax in range(x.ndim) if ax not in axes)
        order = kept + tuple(axes)
        moved = x if order == tuple(range(x.ndim)) else xp.permute_dims(x, order)
        kept_shape = tuple(x.shape[ax] for ax in kept)
        # Through 1-D: a reshape to (kept, n) may return the strided view itself,
        # while flattening lays the reduced entries out contiguously, last.
        flat = xp.reshape(xp.reshape(moved, (-1,)), kept_shape + (reduced,))
        total = _fused_sum_last(xp, flat)
        keep_shape = tuple(1 if ax in axes else x.shape[ax] for ax in range(x.ndim))
        return xp.reshape(total, keep_shape)

    def bitcast(self, x: Array, dtype) -> Array:
        import jax

        return jax.lax.bitcast_convert_type(x, dtype)

    def replaced(self, xp, value: Array, need: Array, recompute) -> Array:
        # Under a lax.cond: calls where no entry needs it pay one predicate.
        import jax

        return jax.lax.cond(xp.any(need), lambda: xp.where(need, recompute(), value), lambda: value)

    def weights(self, xp, b: Array) -> Array:
        return _weights_out_of_reach(b)

    def undefined_where(self, xp, mask: Array, like: Array) -> Array:
        z = xp.where(mask, scalar(xp, math.inf, like), scalar(xp, 0.0, like))
        return z - z


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


def _staging() -> bool:
    """Whether JAX is staging operations into a program (``jit``, ``make_jaxpr``, a loop body).

    JAX's trace context is private API (:func:`_staging_from_trace_context`,
    0.1 us), so where it is missing the public test runs instead (26 us: it
    stages or runs a zero): under a staging trace a new array is a tracer.
    """
    import jax

    try:
        return _staging_from_trace_context()
    except (ImportError, AttributeError):  # another JAX's internals (a test removes them)
        return isinstance(jax.numpy.zeros(()), jax.core.Tracer)


def _staging_from_trace_context() -> bool:
    from jax._src import core

    return not isinstance(core.trace_ctx.trace, core.EvalTrace)


def _weights_out_of_reach(b: Array) -> Array:
    """``b``, as a value XLA cannot rewrite where it would be a constant it mishandles.

    Only a concrete ``b`` met while staging is read (on the host, once per
    trace); a traced ``b`` is an argument or a computed value and is left
    alone, as is every ``b`` of an eager call.  Real weights are hidden when
    they hold subnormals; complex ones always: XLA aborts the process when it
    rewrites ``abs`` of a complex constant that looks like ``iota``
    (``[0, 1, 2]``, jax 0.10.2, CPU).
    """
    import jax
    import numpy as np

    jnp = jax.numpy
    if isinstance(b, jax.core.Tracer) or not jnp.issubdtype(b.dtype, jnp.inexact) or not _staging():
        return b
    host = np.asarray(b)
    if jnp.issubdtype(b.dtype, jnp.complexfloating):
        return jax.lax.complex(_from_bits(np.ascontiguousarray(host.real)), _from_bits(np.ascontiguousarray(host.imag)))
    if not np.any((host != 0) & (np.abs(host) < jnp.finfo(b.dtype).smallest_normal)):
        return b
    return _from_bits(host)


def _from_bits(host) -> Array:
    """A real NumPy array as a value of the staged program: its integer bits behind a barrier, cast back."""
    import jax
    import numpy as np

    bits = host.view({8: np.int64, 4: np.int32, 2: np.int16}[host.dtype.itemsize])
    return jax.lax.bitcast_convert_type(jax.lax.optimization_barrier(jax.numpy.asarray(bits)), host.dtype)
