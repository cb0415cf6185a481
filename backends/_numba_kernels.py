"""Fused CPU kernels compiled with numba: the code of ``numpy.fused`` / ``torch.fused``.

Imported only when one of those kernels runs (``import lse_dispatch`` never
imports numba).  Every function is ``@njit(cache=True)``; the Python side is
:mod:`lse_dispatch.backends._fused_cpu`.

Layouts
-------
The input arrives as a C-contiguous 2-D view: ``(lines, n)`` with the reduced
axis last (*rows*), or ``(n, lines)`` with it first (*columns*).  Each line
gets the state of :mod:`lse_dispatch._state` -- max ``m``, ``count`` of
included entries equal to ``m``, ``rest`` = sum of ``exp(x - m)`` over the
other included entries -- and, for softmax and log_softmax, its outputs:

* rows of at most ``SEGMENT`` entries (all the common shapes) are done in
  one visit while the row is in the L1/L2 cache: an integer-keyed max (below),
  the sum of the terms, and the output pass; softmax stores each term in the
  output during the sum pass and scales it afterwards, so there is one
  ``exp`` per entry;
* longer rows are cut into segments of ``SEGMENT`` entries; each segment's
  state is computed in cache (two passes over it), the states are merged as
  :func:`lse_dispatch._state.merge` does, and an output pass reads the row
  once more;
* columns are processed in blocks of adjacent lines: whole columns when 16
  of them fit in ``FUSED_BYTES`` (then outputs are fused as for rows),
  otherwise in row segments whose states are merged; each block is
  transposed into a scratch array and goes through the row code (per-column
  accumulation loops did not vectorise: LLVM gave up on aliasing checks).

Lines whose max is not finite (``+inf``, NaN, nothing included) are only
*flagged* here (``bad[line] = 1``): their limits are the shared Python
functions' business (:func:`lse_dispatch._state.finalize` and friends), so
compiled code never decides a limit.  A NaN among finite entries shows up as
a NaN ``rest`` (the exponential below carries NaN through) and flags the line
too.

The exponential
---------------
``exp`` from libm does not vectorise in a numba loop; :func:`_exp` does:
Cody-Waite range reduction ``d = k ln2 + r`` with ``k = round(d / ln2)``
obtained by the ``1.5 * 2**52`` shifter (no branch, no float-to-int
conversion: ``k`` is read from the shifter sum's bits), ``r = (d - k C1) - k
C2`` with ``C1`` holding the 32 leading bits of ln2, and ``exp(r) = 1 + r q(r)``
with ``q`` a polynomial fitted to ``(exp(r) - 1) / r`` on ``|r| <= ln2 / 2``
(Chebyshev fit, mpmath, 200 bits), then ``2**k`` applied as two exact powers of
two (so that results down to the subnormal range round once).

Error bound of :func:`_exp` (``d <= 0``, ``u = 2**-53``):

* ``d - k C1`` is exact: ``k C1`` is exact (``|k| <= 1077 < 2**11`` and
  ``C1`` has 32 significant bits), and ``d`` and ``k C1`` lie within a factor
  two of each other whenever ``k != 0`` (Sterbenz); ``k C2`` and the second
  subtraction round to at most ``2**-54 |r| + 2**-80``, and ``C1 + C2``
  differs from ln2 by under ``2**-85``, so ``r`` is off by at most
  ``0.18 u`` (``|r| <= 0.347``), which ``exp`` passes on relatively;
* the fitted polynomial of degree 11 is within ``2**-56.5`` relative of
  ``exp(r)`` on the interval (checked in the tests, 4001 points in mpmath);
* Horner on ``q`` (terms decreasing, ``|r q| < 0.42``) and the final
  ``1 + r q`` (whose result lies in [0.70, 1.42]) add at most ``0.5 u`` from
  the last addition plus ``0.42 (2.1 u)`` from ``r q``: under ``1.5 u``;
* scaling by powers of two is exact for normal results.

So ``|_exp(d) / exp(d) - 1| <= 1.7 u`` (about 2**-52.2); the tests measure it
against mpmath on dense samples of ``[-745, 0]`` (largest seen: under 1 ulp).
:func:`_exp7` uses the degree-7 fit (``2**-33.08`` relative), for float32
softmax and log_softmax, where the terms need ``2**-30`` at most (below).

Accuracy of the results
-----------------------
float32 input: differences ``x - m`` are formed in float64 (exact), terms and
sums are float64.

* logsumexp: terms from :func:`_exp` (``<= 1.7 u``), summed with
  ``fastmath={'reassoc'}`` so that LLVM keeps vector partial sums: in *any*
  order, the sum of ``n`` positive terms is within ``(n - 1) u`` relative.  So
  ``rest`` is within ``delta = 1.7 u + (n - 1) u`` and ``L = log1p(count - 1 +
  rest)`` within ``delta`` absolutely (``r / (c + r) <= 1``).  A line is kept
  when ``delta <= 2**-25 |lse|`` (half a float32 ulp of ``lse``; the result then
  rounds to within 1 ulp plus float64 noise), otherwise it is recomputed by
  the compensated path below (``delta`` about ``3 u``), which is what the
  cancelling case ``[-1, c, c]`` (``lse = -1.7e-9``) needs.
* softmax: ``exp7(x - m)`` (``2**-33`` relative) over the float64 total, the
  term rounded to float32 when it is stored and the scaled value rounded
  again: at most 1 ulp plus ``2**-8`` ulp.
* log_softmax: ``(x - m) - L`` in float64, rounded once: 0.5 ulp plus L's
  relative error (``L >= r / (c + r)``, so ``delta * rho <= delta * L``).

float64 input (no wider accumulator): ``x - m`` by TwoSum (``d + e``
exact), terms ``exp(d) + exp(d) e``, and every sum exact-split
(:func:`_split_sum`: within about ``1.1 u``), so ``rest`` is within about
``2.8 u``.  softmax is ``t / total``; log_softmax ``(x - m) - L`` with both
terms non-positive (1.5 ulps plus ``L``'s error).  Bounds and measurements:
docs/fused_cpu.md.

Compile time and the cache
--------------------------
Each function compiles on its first call for a signature (dtype; a mask or
``None``; an output or ``None``), and is cached on disk (``cache=True``): in
``__pycache__`` next to this file, or numba's user-wide cache folder when that
is not writable (numba's own fallback, ``NUMBA_CACHE_DIR`` overrides both).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

__all__ = ["FUSED_BYTES", "SEGMENT", "logsumexp_lines", "normalised_backward", "normalised_lines"]

# Entries of a row processed in one visit (two or three passes in cache):
# 256 KiB of float32, 512 KiB of float64, within a 1 MiB L2.
SEGMENT = 1 << 16
# Bytes of a block of whole columns whose outputs are fused (in L2).
FUSED_BYTES = 1 << 18
# Lines per block of columns when they are processed in segments.
COLUMN_BLOCK = 256
# Compensated lanes of the float64 row sums (one 512-bit vector of float64).
LANES = 8

_STRICT = {"cache": True, "nogil": True, "error_model": "numpy"}
# Only for loops whose sole reduction is a sum of positive float64 terms:
# LLVM may then keep vector partial sums (the bound above holds in any order).
_REASSOC = {**_STRICT, "fastmath": {"reassoc"}}

MODE_LOGSUMEXP, MODE_LOG_SOFTMAX, MODE_SOFTMAX = 0, 1, 2

# ---------------------------------------------------------------------------
# Bit-level helpers (vectorisable: bitcasts and integer ops only).


def _int_type(ty):
    if ty == types.float32:
        return types.int32, 32
    if ty == types.float64:
        return types.int64, 64
    return None, 0


@intrinsic
def _key(typingctx, value):
    """An integer that orders like ``value`` (IEEE bits, negatives flipped).

    Integer max reductions vectorise without fast-math flags (floating ones
    need ``nnan``); a positive NaN orders above ``+inf`` (the line is then
    flagged), a negative one below ``-inf`` (its NaN term flags the line).
    """
    int_ty, width = _int_type(value)
    if int_ty is None:
        return None

    def codegen(context, builder, signature, args):
        ity = ir.IntType(width)
        bits = builder.bitcast(args[0], ity)
        sign = builder.ashr(bits, ir.Constant(ity, width - 1))
        return builder.xor(bits, builder.and_(sign, ir.Constant(ity, (1 << (width - 1)) - 1)))

    return int_ty(value), codegen


@intrinsic
def _unkey(typingctx, key, like):
    """The float of ``like``'s type whose :func:`_key` is ``key`` (an involution)."""
    int_ty, width = _int_type(like)
    if int_ty is None or key != int_ty:
        return None

    def codegen(context, builder, signature, args):
        ity = ir.IntType(width)
        bits = args[0]
        sign = builder.ashr(bits, ir.Constant(ity, width - 1))
        bits = builder.xor(bits, builder.and_(sign, ir.Constant(ity, (1 << (width - 1)) - 1)))
        return builder.bitcast(bits, context.get_value_type(like))

    return like(key, like), codegen


@intrinsic
def _minus_inf_key(typingctx, like):
    """:func:`_key` of ``-inf`` in ``like``'s type, as a constant."""
    int_ty, width = _int_type(like)
    if int_ty is None:
        return None
    bits = np.array(-np.inf, dtype=np.float32 if width == 32 else np.float64).view(
        np.int32 if width == 32 else np.int64
    )
    key = int(bits) ^ ((1 << (width - 1)) - 1)

    def codegen(context, builder, signature, args):
        return ir.Constant(ir.IntType(width), key)

    return int_ty(like), codegen


@intrinsic
def _single(typingctx, array):
    """Whether ``array`` holds float32 (a compile-time constant)."""
    if not isinstance(array, types.Array):
        return None
    answer = array.dtype == types.float32

    def codegen(context, builder, signature, args):
        return ir.Constant(ir.IntType(1), int(answer))

    return types.boolean(array), codegen


@intrinsic
def _bits(typingctx, value):
    """The IEEE bits of a float64, as int64."""
    if value != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(value), codegen


@intrinsic
def _from_bits(typingctx, bits):
    """The float64 whose IEEE bits are ``bits`` (int64)."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(bits), codegen


# ---------------------------------------------------------------------------
# The exponential of d <= 0 (see the module docstring for the bound).

_LOG2E = 1.4426950408889634
_SHIFTER = 6755399441055744.0  # 1.5 * 2**52: d * log2(e) + it rounds to an integer
_SHIFTER_BITS = int(np.array(_SHIFTER).view(np.int64))
_LN2_HI = 0.6931471803691238  # ln 2 to 32 bits (0x1.62e42fee00000p-1)
_LN2_LO = 1.9082149292705877e-10  # ln 2 - _LN2_HI
# Below this exp(d) is under half the smallest subnormal: clamping keeps k small.
_LOWEST = -746.0


@njit(**_STRICT)
def _reduce(d):
    """``(r, k)`` with ``d = k ln2 + r``, ``|r| <= ln2 / 2``; NaN stays NaN."""
    d = _LOWEST if d < _LOWEST else d
    shifted = d * _LOG2E + _SHIFTER
    k = shifted - _SHIFTER
    r = (d - k * _LN2_HI) - k * _LN2_LO
    return r, _bits(shifted) - _SHIFTER_BITS


@njit(**_STRICT)
def _scale(p, k):
    """``p * 2**k`` for ``-1077 <= k <= 0``: two normal powers of two, one rounding."""
    half = k >> 1
    return p * _from_bits((half + 1023) << 52) * _from_bits((k - half + 1023) << 52)


# Coefficients of q (highest degree first), fitted to (exp(r) - 1) / r on
# |r| <= ln2 / 2 (mpmath.chebyfit, 200 bits); 1 + r q(r) is within 2**-56.5
# (degree 11) and 2**-33.08 (degree 7) of exp(r), checked by the tests.
EXP_COEFFICIENTS = (
    2.510520637395701e-08, 2.7626357241447223e-07, 2.7557255425746435e-06, 2.4801504346997686e-05,
    0.00019841269874800493, 0.0013888888932488599, 0.008333333333326141, 0.04166666666657314,
    0.1666666666666667, 0.5000000000000006, 1.0,
)
EXP7_COEFFICIENTS = (
    0.0001989927395864936, 0.0013941108433972674, 0.008333298483754886, 0.04166635289677516,
    0.16666666718997508, 0.5000000047117757, 1.0,
)


@njit(**_STRICT)
def _exp(d):
    """``exp(d)`` for ``d <= 0`` within 1.7 float64 ulps (module docstring)."""
    r, k = _reduce(d)
    c = EXP_COEFFICIENTS
    q = c[0]
    q = q * r + c[1]
    q = q * r + c[2]
    q = q * r + c[3]
    q = q * r + c[4]
    q = q * r + c[5]
    q = q * r + c[6]
    q = q * r + c[7]
    q = q * r + c[8]
    q = q * r + c[9]
    q = q * r + c[10]
    return _scale(1.0 + r * q, k)


@njit(**_STRICT)
def _exp7(d):
    """``exp(d)`` for ``d <= 0`` within ``2**-33`` relative (degree-7 fit)."""
    r, k = _reduce(d)
    c = EXP7_COEFFICIENTS
    q = c[0]
    q = q * r + c[1]
    q = q * r + c[2]
    q = q * r + c[3]
    q = q * r + c[4]
    q = q * r + c[5]
    q = q * r + c[6]
    return _scale(1.0 + r * q, k)


@njit(**_STRICT)
def _two_sum(a, b):
    """``(s, e)``: ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth)."""
    s = a + b
    virtual = s - a
    return s, (a - (s - virtual)) + (b - virtual)


@njit(**_STRICT)
def _exp_exact_difference(v, mf):
    """``exp(v - mf)`` without the rounding of ``v - mf``: ``exp(d) + exp(d) e``.

    ``d + e = v - mf`` exactly (TwoSum); for float32 ``v`` the difference is
    exact and ``e = 0``.  Where ``d`` is below ``_LOWEST`` (``-inf`` included,
    whose ``e`` is NaN) the term is 0 and ``e`` is dropped; a NaN ``v`` gives NaN.
    """
    d, e = _two_sum(np.float64(v), -mf)
    e = e if d >= _LOWEST else 0.0
    t = _exp(d)
    return t + t * e


@njit(inline="always")
def _included(mask, i, j):
    if mask is None:
        return True
    return mask[i, j]


@njit(inline="always")
def _store(out, i, j, value):
    if out is not None:
        out[i, j] = value


# ---------------------------------------------------------------------------
# Rows: x[i, a:b] is (part of) a line.


@njit(**_STRICT)
def _row_max(x, mask, i, a, b):
    lowest = _minus_inf_key(x[i, a])
    best = lowest
    for j in range(a, b):
        key = _key(x[i, j]) if _included(mask, i, j) else lowest
        best = key if key > best else best
    return _unkey(best, x[i, a])


@njit(**_REASSOC)
def _row_sum_fast(x, mask, i, a, b, m, out, accurate):
    """float32 rows: ``(count, rest)`` in a vectorised (reassociated) float64 sum.

    Any order of ``n`` positive terms is within ``(n - 1) u`` relative.
    ``accurate``: terms from :func:`_exp` (logsumexp: the caller rechecks
    lines whose bound is too loose), else :func:`_exp7` (softmax and
    log_softmax, which need ``2**-30``).  ``out`` (or ``None``): receives
    each included term.
    """
    mf = np.float64(m)
    total = 0.0
    count = 0
    if accurate:
        for j in range(a, b):
            v = x[i, j]
            inc = _included(mask, i, j)
            at_max = inc and v == m
            t = _exp(np.float64(v) - mf)
            total += t if inc and not at_max else 0.0
            count += 1 if at_max else 0
    else:
        for j in range(a, b):
            v = x[i, j]
            inc = _included(mask, i, j)
            at_max = inc and v == m
            t = _exp7(np.float64(v) - mf)
            t = t if inc else 0.0
            _store(out, i, j, t)
            total += 0.0 if at_max else t
            count += 1 if at_max else 0
    return np.float64(count), total


# Entries per buffer of the accurate row sum: 16 KiB of float64 terms, in L1.
CHUNK = 2048


@njit(**_STRICT)
def _row_terms(x, mask, i, a, b, m, buffer, out):
    """Terms of ``x[i, a:b]`` into ``buffer`` (0 at the max and for excluded
    entries); returns the count of included entries equal to ``m``.

    float32: ``exp(x - m)`` of the exact float64 difference; float64: of the
    TwoSum-split difference (:func:`_exp_exact_difference`).  ``out`` (or
    ``None``) receives every included term, 1 at the max (softmax).
    """
    mf = np.float64(m)
    count = 0
    if _single(x):
        for j in range(a, b):
            v = x[i, j]
            inc = _included(mask, i, j)
            at_max = inc and v == m
            t = _exp(np.float64(v) - mf)
            t = t if inc else 0.0
            _store(out, i, j, t)
            buffer[j - a] = 0.0 if at_max else t
            count += 1 if at_max else 0
    else:
        for j in range(a, b):
            v = x[i, j]
            inc = _included(mask, i, j)
            at_max = inc and v == m
            t = _exp_exact_difference(v, mf)
            t = t if inc else 0.0
            _store(out, i, j, t)
            buffer[j - a] = 0.0 if at_max else t
            count += 1 if at_max else 0
    return count


@njit(**_STRICT)
def _largest_bits(buffer, n):
    """The IEEE bits of the largest of ``buffer[:n]`` (non-negative or NaN):
    for those, the bits order like the values, and an integer max vectorises."""
    best = 0
    for j in range(n):
        bits = _bits(buffer[j])
        best = bits if bits > best else best
    return best


@njit(**_STRICT)
def _split(t, sigma):
    """``(hi, lo)``: ``t`` rounded to the grid of ``ulp(sigma)``, and the exact remainder."""
    hi = (t + sigma) - sigma
    return hi, t - hi


@njit(**_REASSOC)
def _split_sum(buffer, n, sigma):
    """Sum of ``buffer[:n]`` (values in ``[0, 2**E)``, ``sigma = 1.5 * 2**(E + 16)``).

    Each value splits exactly (:func:`_split`, compiled without fast-math, so
    the reassociation allowed here cannot fold it) into ``hi``, a multiple of
    ``g = 2**(E - 36)`` below ``2**36 g``, and ``|lo| <= g / 2``.  Up to
    ``2**16`` of the ``hi`` sum exactly (every partial sum is a multiple of
    ``g`` below ``2**52 g``) in whatever order LLVM adds them; the ``lo``
    sum is off by at most ``(n - 1) u n g / 2 <= 2**-5 u 2**E``, and
    ``2**E <= 2 max``.  So the result is within ``u`` (the last rounding)
    plus ``2**-4 u`` of the exact sum: the accuracy of a compensated sum, at
    the speed of a vectorised one.  (Rump, Ogita & Oishi's error-free
    extraction, "Accurate floating-point summation", SIAM J. Sci. Comput.
    31, 2008, with one fixed extraction level.)
    """
    high = 0.0
    low = 0.0
    for j in range(n):
        hi, lo = _split(buffer[j], sigma)
        high += hi
        low += lo
    return high + low


@njit(**_STRICT)
def _row_sum_exact(x, mask, i, a, b, m, out, buffer):
    """``(count, rest)`` of ``x[i, a:b]`` to about a float64 ulp (:func:`_split_sum`).

    Chunks of ``CHUNK`` terms are formed into ``buffer`` (vectorised), their
    largest found by an integer max, summed by the exact split, and the chunk
    sums added with TwoSum.
    """
    count = 0
    total = 0.0
    error = 0.0
    for c in range(a, b, CHUNK):
        d = min(c + CHUNK, b)
        count += _row_terms(x, mask, i, c, d, m, buffer, out)
        top = _largest_bits(buffer, d - c)
        # sigma = 1.5 * 2**(E + 16), 2**E the power of two above the largest term.
        exponent = (top >> 52) + 1 + 16
        sigma = _from_bits((exponent << 52) | (1 << 51))
        total, e = _two_sum(total, _split_sum(buffer, d - c, sigma))
        error += e
    return np.float64(count), total + error


@njit(**_STRICT)
def _finish_line(m, count, rest, mode):
    """``(value, flagged)``: ``m + L`` (logsumexp), ``L`` or ``count + rest`` (the
    normaliser of log_softmax / softmax); flagged when the limits are the
    shared functions' (max not finite, or a NaN in the line)."""
    if not (math.isfinite(m) and rest == rest):
        return 0.0, True
    if mode == MODE_SOFTMAX:
        return count + rest, False
    log_norm = math.log1p((count - 1.0) + rest)
    if mode == MODE_LOG_SOFTMAX:
        return log_norm, False
    return np.float64(m) + log_norm, False


@njit(**_STRICT)
def _row_output(x, mask, i, a, b, m, norm, out, mode, stored):
    """softmax / log_softmax of ``x[i, a:b]`` into ``out`` given the line's state.

    log_softmax: ``(x - m) - L`` (float64 for float32 input, where ``x - m``
    is exact).  softmax: the stored term over the total when ``stored``,
    otherwise the term recomputed (:func:`_exp7` for float32).
    """
    if out is None:  # logsumexp: pruned at compile time
        return
    mf = np.float64(m)
    if mode == MODE_LOG_SOFTMAX:
        if _single(x):
            for j in range(a, b):
                value = (np.float64(x[i, j]) - mf) - norm
                out[i, j] = value if _included(mask, i, j) else -np.inf
        else:
            for j in range(a, b):
                value = (x[i, j] - mf) - norm
                out[i, j] = value if _included(mask, i, j) else -np.inf
    elif stored:
        if _single(x):
            scale = 1.0 / norm
            for j in range(a, b):
                out[i, j] = np.float64(out[i, j]) * scale
        else:
            for j in range(a, b):
                out[i, j] = out[i, j] / norm
    elif _single(x):
        scale = 1.0 / norm
        for j in range(a, b):
            t = _exp7(np.float64(x[i, j]) - mf) * scale
            out[i, j] = t if _included(mask, i, j) else 0.0
    else:
        for j in range(a, b):
            t = _exp_exact_difference(x[i, j], mf) / norm
            out[i, j] = t if _included(mask, i, j) else 0.0


@njit(**_STRICT)
def _row_state(x, mask, i, a, b, out, exact, accurate=False):
    """``(m, count, rest)`` of ``x[i, a:b]``; ``out``: store terms (softmax).

    ``exact``: the accurate sum (:func:`_row_sum_exact`, always for float64),
    otherwise the vectorised float32 one (:func:`_row_sum_fast`, with
    :func:`_exp` terms when ``accurate``).
    """
    m = _row_max(x, mask, i, a, b)
    if exact or not _single(x):
        count, rest = _row_sum_exact(x, mask, i, a, b, m, out, np.empty(CHUNK))
    else:
        count, rest = _row_sum_fast(x, mask, i, a, b, m, out, accurate)
    return m, count, rest


# A float32 logsumexp from the fast sum is kept when its error bound
# ``(n + 0.7) u`` (terms 1.7 u, sum (n - 1) u; ``L`` inherits it absolutely)
# is within 2**-25 |lse|: half a float32 ulp, so the result is within one ulp
# plus float64 noise.  Other lines (lse near 0) are redone exactly.
_KEEP_BELOW = 2.0**-25
_U = 2.0**-53


@njit(**_STRICT)
def _row_line(x, mask, i, out, mode, values, bad):
    """One row that fits a segment: state and outputs in one visit."""
    n = x.shape[1]
    if mode == MODE_SOFTMAX:
        m, count, rest = _row_state(x, mask, i, 0, n, out, False)
    else:
        m, count, rest = _row_state(x, mask, i, 0, n, None, False, mode == MODE_LOGSUMEXP)
    value, flagged = _finish_line(m, count, rest, mode)
    if flagged:
        bad[i] = 1
    elif mode == MODE_LOGSUMEXP:
        if _single(x) and (n + 0.7) * _U > _KEEP_BELOW * abs(value):
            m, count, rest = _row_state(x, mask, i, 0, n, None, True)
            value, flagged = _finish_line(m, count, rest, mode)
        values[i] = value
    else:
        _row_output(x, mask, i, 0, n, m, value, out, mode, mode == MODE_SOFTMAX)


@njit(**_STRICT)
def _merge_line(ms, cs, rs):
    """Merge segment states (as ``_state.merge``), compensated; ``(m, count, rest)``."""
    top = ms[0]
    for s in range(1, ms.shape[0]):
        top = ms[s] if ms[s] > top else top
    if not math.isfinite(top):
        top = np.nan if top != top else top
        return top, 0.0, 0.0
    tf = np.float64(top)
    count = 0.0
    rest = 0.0
    error = 0.0
    for s in range(ms.shape[0]):
        if ms[s] == top:
            count += cs[s]
            part = rs[s]
        else:
            part = (cs[s] + rs[s]) * _exp_exact_difference(ms[s], tf)
        rest, e = _two_sum(rest, part)
        error += e
    return top, count, rest + error


# ---------------------------------------------------------------------------
# Row drivers: lines that fit a segment in one item each; longer lines in
# (line, segment) items, merged, then an output pass.


@njit(**_STRICT)
def _segment_item(x, mask, item, segments, ms, cs, rs, mode):
    i = item // segments
    s = item % segments
    a = s * SEGMENT
    b = min(a + SEGMENT, x.shape[1])
    exact = mode == MODE_LOGSUMEXP or not _single(x)
    m, count, rest = _row_state(x, mask, i, a, b, None, exact)
    ms[i, s] = m
    cs[i, s] = count
    rs[i, s] = rest


@njit(**_STRICT)
def _segment_merge(i, ms, cs, rs, mode, tops, norms, values, bad):
    m, count, rest = _merge_line(ms[i], cs[i], rs[i])
    value, flagged = _finish_line(m, count, rest, mode)
    tops[i] = m
    if flagged:
        bad[i] = 1
    elif mode == MODE_LOGSUMEXP:
        values[i] = value
    else:
        norms[i] = value


@njit(**_STRICT)
def _segment_output(x, mask, item, segments, tops, norms, bad, out, mode):
    i = item // segments
    if bad[i]:
        return
    a = (item % segments) * SEGMENT
    b = min(a + SEGMENT, x.shape[1])
    _row_output(x, mask, i, a, b, tops[i], norms[i], out, mode, False)


@njit(**_STRICT)
def _rows_scratch(x):
    lines, n = x.shape
    segments = (n + SEGMENT - 1) // SEGMENT
    return (segments, np.empty((lines, segments), x.dtype), np.empty((lines, segments)),
            np.empty((lines, segments)), np.empty(lines, x.dtype), np.empty(lines))


@njit(**{**_STRICT, "parallel": True})
def _rows_parallel(x, mask, out, mode, values, bad):
    lines, n = x.shape
    if n <= SEGMENT:
        for i in prange(lines):
            _row_line(x, mask, i, out, mode, values, bad)
        return
    segments, ms, cs, rs, tops, norms = _rows_scratch(x)
    for item in prange(lines * segments):
        _segment_item(x, mask, item, segments, ms, cs, rs, mode)
    for i in prange(lines):
        _segment_merge(i, ms, cs, rs, mode, tops, norms, values, bad)
    if mode != MODE_LOGSUMEXP:
        for item in prange(lines * segments):
            _segment_output(x, mask, item, segments, tops, norms, bad, out, mode)


@njit(**_STRICT)
def _rows_serial(x, mask, out, mode, values, bad):
    lines, n = x.shape
    if n <= SEGMENT:
        for i in range(lines):
            _row_line(x, mask, i, out, mode, values, bad)
        return
    segments, ms, cs, rs, tops, norms = _rows_scratch(x)
    for item in range(lines * segments):
        _segment_item(x, mask, item, segments, ms, cs, rs, mode)
    for i in range(lines):
        _segment_merge(i, ms, cs, rs, mode, tops, norms, values, bad)
    if mode != MODE_LOGSUMEXP:
        for item in range(lines * segments):
            _segment_output(x, mask, item, segments, tops, norms, bad, out, mode)


# ---------------------------------------------------------------------------
# Columns: x[r0:r1, c0:c1], lines are the columns; loops run along each row
# of the block (contiguous), so they vectorise across lines without any
# reduction, and every sum is compensated.


@njit(**_STRICT)
def _transposed(x, r0, r1, c0, c1):
    """``x[r0:r1, c0:c1].T`` as a C-contiguous copy (columns become rows)."""
    block = np.empty((c1 - c0, r1 - r0), x.dtype)
    for i in range(r1 - r0):
        for j in range(c1 - c0):
            block[j, i] = x[r0 + i, c0 + j]
    return block


@njit(**_STRICT)
def _column_state(x, mask, r0, r1, c0, c1, exact, ms, cs, rs, g):
    """States of columns ``c0:c1`` over rows ``r0:r1`` into ``ms[g, c0:c1]`` etc.

    The block is transposed into a scratch array whose rows are the columns
    (in cache: at most ``FUSED_BYTES``), and each goes through the row code,
    so that every loop runs along contiguous memory and vectorises.
    """
    block = _transposed(x, r0, r1, c0, c1)
    if mask is None:
        for j in range(c1 - c0):
            m, count, rest = _row_state(block, None, j, 0, r1 - r0, None, exact)
            ms[g, c0 + j] = m
            cs[g, c0 + j] = count
            rs[g, c0 + j] = rest
    else:
        included = _transposed(mask, r0, r1, c0, c1)
        for j in range(c1 - c0):
            m, count, rest = _row_state(block, included, j, 0, r1 - r0, None, exact)
            ms[g, c0 + j] = m
            cs[g, c0 + j] = count
            rs[g, c0 + j] = rest


@njit(**_STRICT)
def _column_output(x, mask, r0, r1, c0, c1, tops, norms, bad, out, mode, stored):
    """softmax / log_softmax of the block given each column's state (as :func:`_row_output`).

    Flagged columns get garbage here; the caller overwrites them.
    """
    if out is None:  # logsumexp: pruned at compile time
        return
    width = c1 - c0
    shifts = np.empty(width)
    for j in range(width):
        shifts[j] = np.float64(tops[c0 + j])
    norm = norms[c0:c1]
    for i in range(r0, r1):
        row = x[i, c0:c1]
        target = out[i, c0:c1]
        if mode == MODE_LOG_SOFTMAX:
            for j in range(width):
                value = (np.float64(row[j]) - shifts[j]) - norm[j] if _single(x) else (row[j] - shifts[j]) - norm[j]
                target[j] = value if _included(mask, i, c0 + j) else -np.inf
        elif stored:
            for j in range(width):
                target[j] = np.float64(target[j]) / norm[j]
        elif _single(x):
            for j in range(width):
                t = _exp7(np.float64(row[j]) - shifts[j]) / norm[j]
                target[j] = t if _included(mask, i, c0 + j) else 0.0
        else:
            for j in range(width):
                t = _exp_exact_difference(row[j], shifts[j]) / norm[j]
                target[j] = t if _included(mask, i, c0 + j) else 0.0


@njit(**_STRICT)
def _column_finish(c0, c1, ms, cs, rs, mode, tops, norms, values, bad):
    """Merge the row segments' states of columns ``c0:c1`` and finish each line."""
    for j in range(c0, c1):
        if ms.shape[0] == 1:
            m, count, rest = ms[0, j], cs[0, j], rs[0, j]
        else:
            m, count, rest = _merge_line(ms[:, j], cs[:, j], rs[:, j])
        value, flagged = _finish_line(m, count, rest, mode)
        tops[j] = m
        if flagged:
            bad[j] = 1
        elif mode == MODE_LOGSUMEXP:
            values[j] = value
        else:
            norms[j] = value


@njit(**_STRICT)
def _column_plan(x):
    """``(fused, width, rows, blocks, segments)`` of a column layout."""
    n, lines = x.shape
    itemsize = x.itemsize
    if n * 16 * itemsize <= FUSED_BYTES:
        width = max(16, (FUSED_BYTES // (n * itemsize)) // 16 * 16)
        width = min(width, lines)
        return True, width, n, (lines + width - 1) // width, 1
    width = min(COLUMN_BLOCK, lines)
    rows = max(16, FUSED_BYTES // (width * itemsize))
    return False, width, rows, (lines + width - 1) // width, (n + rows - 1) // rows


@njit(**_STRICT)
def _column_fused_item(x, mask, out, mode, values, bad, block, width, ms, cs, rs, tops, norms):
    """A block of whole columns: state and outputs while the block is in cache."""
    n, lines = x.shape
    c0 = block * width
    c1 = min(c0 + width, lines)
    exact = mode == MODE_LOGSUMEXP or not _single(x)
    _column_state(x, mask, 0, n, c0, c1, exact, ms, cs, rs, 0)
    _column_finish(c0, c1, ms, cs, rs, mode, tops, norms, values, bad)
    if mode != MODE_LOGSUMEXP:
        _column_output(x, mask, 0, n, c0, c1, tops, norms, bad, out, mode, False)


@njit(**_STRICT)
def _column_segment_item(x, mask, item, blocks, width, rows, ms, cs, rs):
    n, lines = x.shape
    g = item // blocks
    c0 = (item % blocks) * width
    r0 = g * rows
    _column_state(x, mask, r0, min(r0 + rows, n), c0, min(c0 + width, lines), True, ms, cs, rs, g)


@njit(**_STRICT)
def _column_output_item(x, mask, item, blocks, width, rows, tops, norms, bad, out, mode):
    n, lines = x.shape
    r0 = (item // blocks) * rows
    c0 = (item % blocks) * width
    _column_output(x, mask, r0, min(r0 + rows, n), c0, min(c0 + width, lines), tops, norms, bad, out, mode, False)


@njit(**_STRICT)
def _columns_scratch(x, segments):
    lines = x.shape[1]
    return (np.empty((segments, lines), x.dtype), np.empty((segments, lines)), np.empty((segments, lines)),
            np.empty(lines, x.dtype), np.empty(lines))


@njit(**{**_STRICT, "parallel": True})
def _columns_parallel(x, mask, out, mode, values, bad):
    fused, width, rows, blocks, segments = _column_plan(x)
    ms, cs, rs, tops, norms = _columns_scratch(x, segments)
    if fused:
        for block in prange(blocks):
            _column_fused_item(x, mask, out, mode, values, bad, block, width, ms, cs, rs, tops, norms)
        return
    for item in prange(blocks * segments):
        _column_segment_item(x, mask, item, blocks, width, rows, ms, cs, rs)
    for block in prange(blocks):
        c0 = block * width
        _column_finish(c0, min(c0 + width, x.shape[1]), ms, cs, rs, mode, tops, norms, values, bad)
    if mode != MODE_LOGSUMEXP:
        for item in prange(blocks * segments):
            _column_output_item(x, mask, item, blocks, width, rows, tops, norms, bad, out, mode)


@njit(**_STRICT)
def _columns_serial(x, mask, out, mode, values, bad):
    fused, width, rows, blocks, segments = _column_plan(x)
    ms, cs, rs, tops, norms = _columns_scratch(x, segments)
    if fused:
        for block in range(blocks):
            _column_fused_item(x, mask, out, mode, values, bad, block, width, ms, cs, rs, tops, norms)
        return
    for item in range(blocks * segments):
        _column_segment_item(x, mask, item, blocks, width, rows, ms, cs, rs)
    for block in range(blocks):
        c0 = block * width
        _column_finish(c0, min(c0 + width, x.shape[1]), ms, cs, rs, mode, tops, norms, values, bad)
    if mode != MODE_LOGSUMEXP:
        for item in range(blocks * segments):
            _column_output_item(x, mask, item, blocks, width, rows, tops, norms, bad, out, mode)


# ---------------------------------------------------------------------------
# Entry points (called from _fused_cpu with NumPy arrays).


def _driver(axis, parallel):
    if axis == 1:
        return _rows_parallel if parallel else _rows_serial
    return _columns_parallel if parallel else _columns_serial


def logsumexp_lines(view, axis, mask, values, bad, parallel):
    """``values[line] = lse`` (float64) of every line of ``view``; ``bad`` flags the others."""
    _driver(axis, parallel)(view, mask, None, MODE_LOGSUMEXP, values, bad)


def normalised_lines(view, axis, mask, out, log, bad, parallel):
    """log_softmax (``log``) or softmax of every line into ``out``; ``bad`` as above."""
    mode = MODE_LOG_SOFTMAX if log else MODE_SOFTMAX
    _driver(axis, parallel)(view, mask, out, mode, np.empty(0), bad)


# ---------------------------------------------------------------------------
# Backward of softmax / log_softmax (torch autograd): one pass to sum, one to
# write, sums in float64.  Values where y (or exp(z)) is 0 are those of the
# op form in lse_dispatch._autodiff (softmax_vjp, log_softmax_vjp).


@njit(**_REASSOC)
def _backward_sum(y, g, mask, i, log):
    total = 0.0
    if log:
        for j in range(y.shape[1]):
            total += np.float64(g[i, j]) if _included(mask, i, j) else 0.0
    else:
        for j in range(y.shape[1]):
            w = np.float64(y[i, j])
            total += 0.0 if w == 0.0 else w * np.float64(g[i, j])
    return total


@njit(**_STRICT)
def _backward_row(y, g, mask, i, log, out):
    total = _backward_sum(y, g, mask, i, log)
    if log:
        for j in range(y.shape[1]):
            p = _exp(np.float64(y[i, j]))
            value = np.float64(g[i, j]) - (0.0 if p == 0.0 else p * total)
            out[i, j] = value if _included(mask, i, j) else 0.0
    else:
        for j in range(y.shape[1]):
            w = np.float64(y[i, j])
            out[i, j] = w * (0.0 if w == 0.0 else np.float64(g[i, j]) - total)


@njit(**_STRICT)
def _backward_columns(y, g, mask, log, out, c0, c1):
    width = c1 - c0
    totals = np.zeros(width)
    for i in range(y.shape[0]):
        for j in range(width):
            if log:
                totals[j] += np.float64(g[i, c0 + j]) if _included(mask, i, c0 + j) else 0.0
            else:
                w = np.float64(y[i, c0 + j])
                totals[j] += 0.0 if w == 0.0 else w * np.float64(g[i, c0 + j])
    for i in range(y.shape[0]):
        for j in range(width):
            if log:
                p = _exp(np.float64(y[i, c0 + j]))
                value = np.float64(g[i, c0 + j]) - (0.0 if p == 0.0 else p * totals[j])
                out[i, c0 + j] = value if _included(mask, i, c0 + j) else 0.0
            else:
                w = np.float64(y[i, c0 + j])
                out[i, c0 + j] = w * (0.0 if w == 0.0 else np.float64(g[i, c0 + j]) - totals[j])


@njit(**{**_STRICT, "parallel": True})
def _backward_parallel(y, g, mask, axis, log, out):
    if axis == 1:
        for i in prange(y.shape[0]):
            _backward_row(y, g, mask, i, log, out)
    else:
        blocks = (y.shape[1] + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        for block in prange(blocks):
            c0 = block * COLUMN_BLOCK
            _backward_columns(y, g, mask, log, out, c0, min(c0 + COLUMN_BLOCK, y.shape[1]))


@njit(**_STRICT)
def _backward_serial(y, g, mask, axis, log, out):
    if axis == 1:
        for i in range(y.shape[0]):
            _backward_row(y, g, mask, i, log, out)
    else:
        blocks = (y.shape[1] + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        for block in range(blocks):
            c0 = block * COLUMN_BLOCK
            _backward_columns(y, g, mask, log, out, c0, min(c0 + COLUMN_BLOCK, y.shape[1]))


def normalised_backward(y, g, mask, axis, log, out, parallel):
    """Gradient of softmax (``y`` its output) or log_softmax (``y`` = ``z``) into ``out``."""
    (_backward_parallel if parallel else _backward_serial)(y, g, mask, axis, log, out)
