"""The declared hook for backend numerics: the few operations whose accurate form depends on the backend.

The shared math (:mod:`lse_dispatch._state`) is written once against the
array API, but a handful of its operations are not equally accurate on
every library: XLA's float64 ``log1p`` is 128 ulps off on (-0.5, 0), its CPU
``max`` can skip a NaN under ``jit``, it flushes subnormal operands, NumPy
sums strided axes one element after another and every library rounds a sum
in an order of its own (the default :meth:`Numerics.sum` is therefore
order-free, :func:`extracted_sum`), Dask's reductions are chunked trees.
Those operations go through a :class:`Numerics` object: the defaults here
are plain array-API calls, and a backend whose library needs care declares
a subclass in its spec (``BackendSpec.numerics``; JAX's is in
``backends/_jax_numerics.py``, Dask's in ``backends/dask.py``).  The core
never branches on the library.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

from ._namespace import real_sign, scalar

__all__ = ["Numerics", "bind_lookup", "compile_time_constant", "numerics_for"]

Array = Any

# Sums of at most this many terms are plain: their roundings, even all one
# way, stay within an ulp.
PLAIN_SUM_TERMS = 3


def compile_time_constant(fn):
    """Mark ``fn`` as host logic whose result torch.compile takes as a constant.

    This is what ``torch.compiler.assume_constant_result`` does (it sets this
    attribute and nothing else), done here by hand so that importing
    lse_dispatch imports no array library.  Dynamo then calls ``fn`` once
    while tracing instead of tracing into it: context variables, entry points
    and ``sys.modules`` are beyond its reach.
    """
    fn._dynamo_marked_constant = True
    return fn


class Numerics:
    """The backend-dependent operations of the shared math, in their array-API form."""

    #: Values cannot be read on the host (traced or lazy arrays): no ``bool(array)``.
    lazy = False

    def max(self, xp, x: Array, axes: tuple[int, ...]) -> Array:
        """``max`` over ``axes`` with ``keepdims=True``; NaN wins, as in the standard."""
        return xp.max(x, axis=axes, keepdims=True)

    def log1p(self, xp, x: Array) -> Array:
        """``log(1 + x)`` to about an ulp."""
        return xp.log1p(x)

    def sum(self, xp, x: Array, axes: tuple[int, ...], dtype, *, nonnegative: bool = False, integral: bool = False) -> Array:
        """Sum over ``axes`` (keepdims) accumulating in ``dtype``, in no order's debt.

        A wider ``dtype`` than ``x``'s is a plain sum (its roundings are far
        below ``x``'s ulp).  In ``x``'s own dtype, a library's sum rounds once
        per addition in an order of its own (NumPy pairwise along a contiguous
        axis and one element after another along a strided one, torch by
        cascade): equal terms after a larger one round the same way each time
        (float64 ``logsumexp([0, -1] + [-37] * 100000)``: 3.5 ulps on NumPy,
        11.5 on torch).  :func:`extracted_sum` is within about one rounding
        whatever the order.  ``nonnegative``: every entry is ``>= 0`` (its
        plain sum then bounds the magnitudes); ``integral``: every entry is a
        small integer (counts, signs), summed exactly in any order.
        """
        reduced = math.prod([x.shape[ax] for ax in axes])  # a list: torch.compile traces no generator here
        if integral or x.dtype != dtype or reduced <= PLAIN_SUM_TERMS:
            return xp.sum(x, axis=axes, dtype=dtype, keepdims=True)
        return extracted_sum(xp, x, axes, nonnegative=nonnegative)

    #: ``bitcast(x, int_dtype)``: the bits of a float array as integers of its
    #: width (and ``bitcast(bits, float_dtype)`` back), for a library that
    #: flushes subnormal operands to zero (XLA;
    #: CuPy's float32 kernels, compiled with ``-ftz=true``).  Weights are then
    #: read from their bits (:meth:`weight_parts`).  ``None``: no flushing.
    bitcast: Callable[[Array, Any], Array] | None = None

    def replaced(self, xp, value: Array, need: Array, recompute: Callable[[], Array]) -> Array:
        """``value`` with the entries where ``need`` taken from ``recompute()``.

        Both are formed here; a compiler with a conditional runs ``recompute``
        only when some entry needs it (:meth:`JaxNumerics.replaced
        <lse_dispatch.backends._jax_numerics.JaxNumerics.replaced>`).
        """
        return xp.where(need, recompute(), value)

    def weights(self, xp, b: Array) -> Array:
        """The weights as the library's own operations should take them; ``b`` itself by default.

        A hook for a compiler that would rewrite a constant ``b`` (XLA:
        :meth:`JaxNumerics.weights <lse_dispatch.backends._jax_numerics.JaxNumerics.weights>`).
        """
        return b

    def weight_parts(self, xp, b: Array, dtype) -> tuple[Array, Array, Array]:
        """``(b != 0, sign(b), log|b|)`` of real weights; ``log|b|`` in ``dtype``, 0 where ``b == 0``."""
        if self.bitcast is not None:
            return _weight_parts_from_bits(xp, b, dtype, self.bitcast)
        nonzero = b != 0
        log_abs = xp.log(xp.astype(xp.where(nonzero, xp.abs(b), scalar(xp, 1.0, b)), dtype))
        return nonzero, real_sign(xp, b), log_abs

    def subnormal_scaled(self, xp, x: Array, s: int) -> tuple[Array, Array]:
        """``(subnormal, x * 2**s)`` of real ``x``: where ``x`` is subnormal, and ``x`` scaled exactly there (0 elsewhere).

        ``s >= nmant + 2`` makes every subnormal normal.  Read from the bits
        where the library flushes subnormal operands (:attr:`bitcast`).
        """
        if self.bitcast is not None:
            return _subnormal_scaled_from_bits(xp, x, s, self.bitcast)
        subnormal = (x != 0) & (xp.abs(x) < scalar(xp, float(xp.finfo(x.dtype).smallest_normal), x))
        return subnormal, xp.where(subnormal, x, xp.zeros_like(x)) * scalar(xp, float(2**s), x)

    def undefined_where(self, xp, mask: Array, like: Array) -> Array:
        """NaN where ``mask`` is True and 0 elsewhere, in the dtype of ``like``.

        Added to a result whose value has no limit there.  A selected NaN
        constant: ``inf - inf`` would raise NumPy's "invalid value" warning.
        """
        return xp.where(mask, scalar(xp, math.nan, like), scalar(xp, 0.0, like))

    # -- the log semiring (lse_dispatch.semiring) ---------------------------------

    def semiring(self):
        """The backend's own ``logcumsumexp`` / ``logmatmulexp`` (derivative rules, lazy graphs), or ``None``.

        An object with ``takes(*arrays)``, ``logcumsumexp(x, axis,
        include_initial, reverse, plan)`` and ``logmatmulexp(a, b, plan)``;
        ``None`` runs the shared eager code.
        """
        return None

    #: The library's native running maximum, ``cummax(xp, x, axis)`` (NaN
    #: propagating), or ``None``: the semiring's scan then takes the log-step form.
    cummax: Callable[[Any, Array, int], Array] | None = None

    def matmul(self, xp, x: Array, y: Array) -> Array:
        """``x @ y`` at the library's full precision."""
        return xp.matmul(x, y)

    def fold_chunks(self, xp, step: Callable, carry: Any, arrays: tuple, axes: tuple[int, ...], chunk: int) -> Any:
        """``carry = step(carry, pieces)`` over consecutive chunks of ``chunk`` entries along each array's axis.

        ``pieces`` holds one chunk of every array (``axes[i]`` of ``arrays[i]``,
        all of one length); the last chunk may be shorter.  Returns the last
        carry.  Lazy libraries may run it as a loop of their own (JAX: one
        ``lax.scan``, whose body compiles once, the last chunk padded with zeros).
        """
        length = arrays[0].shape[axes[0]]
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            pieces = tuple(x[(slice(None),) * (axis % x.ndim) + (slice(start, stop),)] for x, axis in zip(arrays, axes))
            carry = step(carry, pieces)
        return carry

    def elementwise(self, xp, fn: Callable, arrays: tuple, outputs: int) -> tuple:
        """``fn(xp, *arrays)``: ``outputs`` arrays computed entry by entry from ``arrays`` (all of one shape).

        Lazy libraries may run it as one task per block (Dask: ``fn`` on the
        NumPy blocks), instead of a graph layer for every operation in ``fn``.
        """
        return tuple(fn(xp, *arrays))

    def quiet(self):
        """A context in which overflow to ``inf`` and underflow to 0 raise no warning."""
        return contextlib.nullcontext()

    def scaled_exp(self, x: Array, shift: Array, chosen: Array, acc) -> Array | None:
        """``exp(x - shift)`` in ``acc`` with 0 at ``chosen``, in one buffer, or ``None`` (the ``where`` form)."""
        return None


DEFAULT = Numerics()
_BY_NAMESPACE: dict[str, Numerics] = {}
# Finds the numerics a backend declares for a namespace; bound by
# lse_dispatch._dispatch, which knows the backends (this module must not
# import them: they import it).
_LOOKUP: Callable[[Any], Numerics | None] | None = None


def extracted_sum(xp, x: Array, axes: tuple[int, ...], *, nonnegative: bool = False) -> Array:
    """Sum of real ``x`` over ``axes`` (keepdims, ``x``'s dtype), within about one rounding, in any order.

    One error-free extraction (Rump, Ogita and Oishi's ``ExtractVector``),
    its bound taken from a plain sum: with ``S`` the plain sum of ``|x|`` (of
    ``x`` itself where ``nonnegative``) and ``sigma = 4 S``, each
    ``high = (sigma + x) - sigma`` is exact (Sterbenz: ``|x| <= sigma / 4``)
    and a multiple of ``ulp(sigma) / 2``, and every partial sum of the
    ``high`` is such a multiple of magnitude below ``sigma / 2``: exact in
    any order of addition.  ``low = x - high`` is exact too, and
    ``|low| <= ulp(sigma) / 2``, so the sum of the ``low`` rounds by at most
    ``n**2 2**-51 u S`` (in any order; ``2**-11 u S`` for ``n = 2**20`` in
    float64).  The result, ``sum(high) + sum(low)``, rounds once more.  A
    non-finite plain sum is returned as it is (NaN and infinite entries
    have no parts), as is the plain sum where ``4 S`` overflows.  Three
    reductions and four elementwise passes where a plain sum is one
    reduction: a price paid only without a wider accumulator (float64).
    """
    total = xp.sum(x, axis=axes, keepdims=True)
    bound = total if nonnegative else xp.sum(xp.abs(x), axis=axes, keepdims=True)
    sigma = bound * 4
    ok = xp.isfinite(sigma)  # a finite bound makes every entry, and so the plain sum, finite
    zero = xp.zeros_like(sigma)
    sigma = xp.where(ok, sigma, zero)
    # Lines without a finite bound keep high = 0 (low = x: no inf - inf, which NumPy warns of).
    high = xp.where(ok, (sigma + x) - sigma, zero)
    low = x - high
    refined = xp.sum(high, axis=axes, keepdims=True) + xp.sum(low, axis=axes, keepdims=True)
    return xp.where(ok, refined, total)


def bind_lookup(lookup: Callable[[Any], Numerics | None]) -> None:
    """Install ``lookup(xp)``, the declared numerics of a namespace or ``None``."""
    global _LOOKUP
    _LOOKUP = lookup


def numerics_for(xp) -> Numerics:
    """The :class:`Numerics` of namespace ``xp``: its backend's, else the defaults.

    Looked up once per namespace (a namespace's module name identifies it).
    The lookup is host logic that torch.compile takes as a constant; the
    object itself comes from a module-level dict, where Dynamo can trace
    its methods.
    """
    return _BY_NAMESPACE[_numerics_key(xp)]


@compile_time_constant
def _numerics_key(xp) -> str:
    key = getattr(xp, "__name__", None)
    if key is None:  # not as getattr's default: repr() on every call costs a microsecond
        key = repr(xp)
    if key not in _BY_NAMESPACE:
        declared = None if _LOOKUP is None else _LOOKUP(xp)
        _BY_NAMESPACE[key] = DEFAULT if declared is None else declared
    return key


# Cody and Waite's split of log 2: _LN2_HIGH has 32 significant bits, so
# k * _LN2_HIGH is exact for |k| < 2**20 and k log 2 is formed to an ulp.
_LN2_HIGH = 6.93147180369123816490e-01
_LN2_LOW = 1.90821492927058770002e-10


def _weight_parts_from_bits(xp, b: Array, dtype, bitcast) -> tuple[Array, Array, Array]:
    """``(b != 0, sign(b), log|b|)`` from the bits of ``b`` (float16/32/64), immune to flushing.

    A subnormal ``b`` is ``n * 2**-k`` with ``n`` its integer significand
    (``k`` = 1074 for float64, 149 for float32, 24 for float16); ``n`` is
    exact as a float of ``b``'s dtype and ``log|b| = log n - k log 2``.
    (A flushing library flushes the float32 to float64 conversion of a
    subnormal too, so the log is taken from the significand, never from a
    converted ``b``.)
    """
    bits, magnitude, nonzero, subnormal, k = _bit_fields(xp, b, bitcast)
    one = scalar(xp, 1.0, b)
    sign = xp.where(bits < 0, -one, one)
    sign = xp.where(nonzero, sign, xp.zeros_like(sign))
    significand = xp.astype(xp.where(subnormal, magnitude, xp.ones_like(magnitude)), dtype)
    log_subnormal = (xp.log(significand) - k * _LN2_LOW) - k * _LN2_HIGH
    log_normal = xp.log(xp.astype(xp.where(nonzero & ~subnormal, xp.abs(b), one), dtype))
    return nonzero, sign, xp.where(subnormal, log_subnormal, log_normal)


def _subnormal_scaled_from_bits(xp, x: Array, s: int, bitcast) -> tuple[Array, Array]:
    """:meth:`Numerics.subnormal_scaled` from the bits: ``x = n * 2**-k``, so ``x * 2**s = n * 2**(s - k)``, exact."""
    bits, magnitude, _, subnormal, k = _bit_fields(xp, x, bitcast)
    n = xp.astype(xp.where(subnormal, magnitude, xp.zeros_like(magnitude)), x.dtype)  # < 2**nmant: exact
    signed = xp.where(bits < 0, -n, n)
    return subnormal, signed * scalar(xp, float(2.0 ** (s - k)), x)


def _nonzero(xp, magnitude: Array, width: int) -> Array:
    """``magnitude != 0`` of the sign-cleared bits of a ``width``-bit float, in a form no compiler turns back into ``x != 0``.

    LLVM rewrites ``(bits & ~sign) != 0`` into the float comparison ``x !=
    0.0`` (equivalent under IEEE arithmetic), which XLA's CPU runtime then
    evaluates with subnormal operands read as 0.  Found on 2026-11-30: one
    more conditional in a ``jax.grad`` program under ``jax.jit`` changed how
    XLA fused the test, and the subnormal weight ``1e-310`` was dropped
    (``d lse/d a`` 0 for 1).  LLVM also sees through a conversion of the
    integer compared with 0, but not through the sum of the two halves'
    conversions: both are exact small integers, and they add to 0 only
    where both are 0.
    """
    half = width // 2
    high = xp.astype(magnitude >> half, xp.float32)
    low = xp.astype(magnitude & ((1 << half) - 1), xp.float32)
    return high + low > 0


def binary_log_parts(xp, h: Array, bitcast) -> tuple[Array, Array]:
    """``(k, log f)`` with ``h = f 2**k``, ``f`` in ``[1, 2)``, of positive normal ``h`` (float16/32/64),
    read from the bits: ``k`` exactly (as a float of ``h``'s dtype), ``log f`` rounded once.

    ``log h = k log 2 + log f`` then holds to the rounding of ``log f``
    (below ``ln 2``) where ``k log 2`` is split as Cody and Waite split it:
    ``log h`` itself is off by half an ulp of ``|log h|``.  Entries that are
    not positive normal numbers give values of no meaning.
    """
    info = xp.finfo(h.dtype)
    nmant = info.nmant
    bias = (1 << (info.bits - nmant - 2)) - 1
    bits = _int_bits(xp, h, bitcast)
    field = (bits >> nmant) & ((1 << (info.bits - nmant - 1)) - 1)
    f = bitcast((bits & ((1 << nmant) - 1)) | (bias << nmant), h.dtype)
    return xp.astype(field - bias, h.dtype), xp.log(f)


def _int_bits(xp, x: Array, bitcast) -> Array:
    """The bits of a float16/32/64 array as integers of its width."""
    return bitcast(x, {8: xp.int64, 4: xp.int32, 2: xp.int16}[xp.finfo(x.dtype).bits // 8])


def _bit_fields(xp, x: Array, bitcast) -> tuple[Array, Array, Array, Array, int]:
    """``(bits, magnitude, nonzero, subnormal, k)`` of a float16/32/64 array: its bits as
    integers, those without the sign, where it is not zero (:func:`_nonzero`), where it is
    subnormal, and ``k`` with ``2**-k`` the smallest subnormal."""
    info = xp.finfo(x.dtype)
    bits = _int_bits(xp, x, bitcast)
    magnitude = bits & ((1 << (info.bits - 1)) - 1)
    nonzero = _nonzero(xp, magnitude, info.bits)
    subnormal = nonzero & (magnitude < (1 << info.nmant))
    k = -math.frexp(float(info.smallest_subnormal))[1] + 1
    return bits, magnitude, nonzero, subnormal, k
