"""Fused CPU kernels compiled with numba: the code of ``numpy.fused`` / ``torch.fused``.

Imported only when one of those kernels runs (``import lse_dispatch`` never
imports numba).  The Python side is :mod:`lse_dispatch.backends._fused_cpu`.

What is compiled, and why so little
-----------------------------------
Compile time is what a user of a compiled kernel pays first, and CI pays it
on every run that starts without a cache; so every choice that does not change
the machine code is a runtime argument, and every dtype gets two compiled
entry points for the unweighted operations (:func:`compiled`):

* one loop, :func:`_items`, that does a range of *items* (a line, a segment
  of a line, a tile of columns) of one *phase* of any operation: the mode
  (``STATE``, ``LOGSUMEXP``, ``LOG_SOFTMAX``, ``SOFTMAX``), the layout (rows or
  columns), whether a ``where`` mask is given and the phase are ``int``
  arguments, branched on once per line or tile, never per entry;
* "no mask" and "no output" are empty arrays, not ``None`` (each ``None`` would
  be another signature of every function below);
* Python threads call it on disjoint ranges (it releases the GIL), so no
  numba parallel driver is compiled;
* the same for the softmax / log_softmax backward (:func:`_backward_items`);
* a third entry point, :func:`_weighted_rows` (logsumexp with ``b``), is
  compiled only when a weighted call (or :func:`warm_up`) first needs it.

The entry points are compiled for an explicit signature whose arrays are
typed read-only (a writable array converts to it), so that read-only input
(``np.broadcast_to`` results, read-only memory maps, arrays from JAX) reuses
the same machine code instead of compiling another copy; :func:`compiled`
returns numba's compiled entry points, called without the dispatcher's type
resolution.  Everything is ``cache=True``: the first use in a fresh
environment compiles, later processes load from the on-disk cache.

Layouts
-------
The input arrives as a C-contiguous 2-D view: ``(lines, n)`` with the reduced
axis last (*rows*), or ``(n, lines)`` with it first (*columns*).  Each line
gets the state of :mod:`lse_dispatch._state` -- max ``m``, ``count`` of
included entries equal to ``m``, ``rest`` = sum of ``exp(x - m)`` over the
other included entries -- and, unless the mode is ``STATE``, its result:

* rows of at most ``SEGMENT`` entries: one item per row, done while it is in
  the L1/L2 cache: an integer-keyed max, the sum of the terms, the output pass
  (softmax stores each term in the output during the sum and scales it
  afterwards: one ``exp`` per entry); rows of at most ``SHORT`` entries
  without a mask go ``SHORT_BLOCK`` at a time, one row to a vector lane
  (:func:`_short_rows`: float64's arithmetic, for float32 input too);
* longer rows: ``(row, segment)`` items (phase 0: the segment's state in
  cache; float32 softmax stores the terms relative to the segment's max),
  merged per row as :func:`lse_dispatch._state.merge` does (phase 1), and an
  output pass per segment (phase 2: a scale of the stored terms, or
  ``(x - m) - L``);
* columns: tiles of ``rows x width`` entries (``TILE_BYTES``), every loop
  running along the rows of the tile, so that it vectorises *across* lines
  with per-line accumulators; the lines' maxima, counts and sums are
  accumulated column-wise, and no tile is ever transposed.  When whole
  columns fit in a tile, state and outputs are done in one visit of the tile;
  otherwise the tiles' states are merged per column and an output pass
  follows, as for long rows.

Lines whose max is not finite (``+inf``, NaN, nothing included) or that hold
a NaN are only *flagged* here (``bad[line] = 1``): their state and results are
the shared Python functions' business (``_generic.state``,
``logsumexp_from_state``, ``normalised_from_state`` on the flagged lines), so
compiled code never decides a limit.  The max pass finds NaN itself (below),
so the terms of an unflagged line never see one.

The max
-------
An integer max over :func:`_key` (the IEEE bits with negatives' magnitude
bits flipped, which orders like the values): integer reductions vectorise
without fast-math flags.  A positive NaN orders above ``+inf`` (the max is
then NaN), a negative NaN below ``-inf``: the same pass keeps the least key,
and a line whose least key is below ``-inf``'s holds a NaN.

The exponential
---------------
``exp`` from libm does not vectorise in a numba loop; :func:`_exp` and the
term functions do: Cody-Waite range reduction ``d = k ln2 + r`` with ``k =
round(d / ln2)`` obtained by the ``1.5 * 2**52`` shifter (no branch, no
float-to-int conversion: ``k`` is read from the shifter sum's bits), ``r = (d
- k C1) - k C2`` with ``C1`` holding the 32 leading bits of ln2, and ``exp(r)
= 1 + r q(r)`` with ``q`` a polynomial fitted to ``(exp(r) - 1) / r`` on ``|r|
<= ln2 / 2`` (Chebyshev fit, mpmath, 200 bits).

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

So ``|_exp(d) / exp(d) - 1| <= 1.7 u``; the tests measure it against mpmath
on dense samples of ``[-745, 0]``.  :func:`_exp` scales by two powers of two
(results down to the subnormal range round once); it serves the merges and the
backward.  The terms of the sums use :func:`_term` (the same degree 11) and
:func:`_term7` (degree 7: ``2**-33.08`` relative, so within ``2**-33`` with
the roundings), which scale ``p = 1 + r q`` by adding to its exponent bits
(two integer operations instead of eight): :func:`_term` adds ``k + 64`` and
multiplies by ``2**-64`` (exact for normal results, one rounding below, as
float64 outputs down to the subnormal range need), :func:`_term7` adds ``k``
and gives 0 below ``FLUSH = -700``, where ``2**k p`` would no longer be
normal (a float32 result never sees a term that small).

Sums, and the accuracy of each result
-------------------------------------
``x - m`` is formed in float64: exact for float32 input; for float64 input
by TwoSum (``d + e`` exact) and the term is ``exp(d) + exp(d) e``.

* *Fast* sums (float32 input, every mode but ``STATE``): :func:`_term7`
  terms in a float64 sum compiled with ``fastmath={'reassoc'}`` (rows: LLVM
  keeps vector partial sums; columns: a sequential sum per column), whose
  error in *any* order of ``n`` positive terms is within ``(n - 1) u``.  So
  ``rest`` is within ``delta = 2**-33 + (n - 1) u`` relatively, and ``L =
  log1p(count - 1 + rest)`` within ``delta`` absolutely (``r / (c + r) <=
  1``).
* *Exact* sums (float64 input, ``STATE``, and the float32 logsumexp recheck):
  :func:`_term` terms (``1.7 u``); rows in chunks of ``CHUNK`` terms summed by
  an error-free split (:func:`_split_sum`: within ``1.1 u``), columns by
  TwoSum per column (``u |S| + n**2 u**2 S``).  ``rest`` is within about
  ``2.8 u``.
* float32 logsumexp: the fast state; a line is kept when ``delta + 3 u (1 +
  L)`` (with the roundings of ``log1p`` and of ``m + L``) is at most ``2**-25
  |lse|`` (half a float32 ulp: the result then rounds to within one ulp),
  otherwise its sum is redone exactly (:data:`KEEP_BELOW`).  That recheck is
  what the cancelling case ``[-1, c, c]`` (``lse = -1.7e-9``) needs; lines
  whose ``lse`` is within ``2**-7`` of 0 take it.
* float32 softmax and log_softmax of lines whose max (of the row, the long
  row's segment, the column tile) allows it: float32 terms (below).
* float32 softmax otherwise: ``term7 / (c + r)``, the term rounded to float32
  when it is stored and the scaled value rounded again: at most 1 ulp plus
  ``2**-8`` ulp (long rows and column tiles scale the stored term by
  ``exp(m_s - M) / (c + r)``, computed in float64: the same bound plus
  float64 noise).
* float32 log_softmax otherwise: ``(x - m) - L`` in float64 (exact
  difference), rounded once.  ``L``'s error is at most ``(delta + 3.5 u) L``:
  ``delta r / (c + r)`` from the rest, which is at most ``delta L`` (``c =
  1``: ``L >= r / (1 + r)``; ``c >= 2``: ``L >= ln 2``), ``(c - 1) + r`` exact
  for ``c = 1`` and within ``u <= 1.45 u L`` otherwise, and ``log1p``'s own
  ``2 u L``.  As ``|y| >= L`` the result is within ``0.5 + (delta + 3.5 u)
  2**24`` ulps: under 0.51 ulps for the pieces summed here (``delta <=
  2**-33 + (2**16 + 4) u``), so no recheck is needed.
* float64: logsumexp ``m + L``; log_softmax ``(x - m) - L``, both terms
  non-positive; softmax ``t / (c + r)`` (stored term, or recomputed from the
  final max where a line's segments had other maxima).

float32 terms
-------------
float32 softmax and log_softmax form their terms in float32 lanes, twice as
many per vector as float64, per row of at most ``SEGMENT`` entries, per
segment of a longer row and per tile of columns (without a mask, and where
every column of the tile has a shift), where the max allows an exact shift (:func:`_shift32`: ``s = 0`` for ``0 < m <=
87``, ``m`` rounded to the float32 ulp of ``|m| + 128`` for ``-2**20 < m <=
0``; other rows take the float64 terms above).  ``x - s`` is then exact in
float32 for every entry within 127 of the max, and the term is
:func:`_term32` (Cody-Waite in float32 with explicit FMAs, a degree-4
polynomial for ``(exp(r) - 1 - r) / r**2``, ``1 + r`` split exactly).  Its
error, measured on every float32 in ``[-87, 88]`` (``scripts/expf_exhaustive.py``),
is at most ``1.2286 * 2**-24`` relative: ``EXPF_ERROR = 1.25 * 2**-24``.  The
code is strict IEEE arithmetic (the FMAs are ``llvm.fma`` calls, no
contraction), so the vector loops compute exactly the values that check saw.
The terms are summed in float64.

The terms of each ``SINGLE_CHUNK`` entries are formed in a loop of their own
and summed in float64 by another (one loop would run at the float64 sum's
vector width); every loop over entries asks for the CPU's widest vectors
(:func:`_wide_vectors`).

* softmax: every term stored (:func:`_stored_term32`, the same values, with
  gradual underflow below ``e**-87``), the float64 total of the stored terms
  (the max's own included), the output ``t * (1 / total)`` rounded once.  A
  stored term and the total are each within ``EXPF_ERROR`` (the total's
  error is an average of its terms'), so the quotient is within ``2
  EXPF_ERROR`` plus float64 noise: at most ``2 * 1.25 + 0.5 = 3`` ulps
  (``ulp(y) >= 2**-24 y``); subnormal outputs within about one subnormal ulp.
  The scale goes in as a float32 pair by one FMA (:func:`_scale_halves`), or
  as the float64 product below ``SCALE_FLOOR``.  A segment's or tile's
  terms are relative to its own shift ``s``, and its scale carries the
  weight ``exp(s - S)`` (float64) to the largest reference ``S``.
* log_softmax and logsumexp of a segment or a tile: the state relative to
  its own max, as below; a log_softmax piece whose rest is below its length
  times ``FLUSHED_REST`` is summed again with ``_term7`` terms, and a
  logsumexp piece takes float32 terms only where its max is at least 1.
* log_softmax: ``rest`` of the entries below the max brought back to it by
  ``exp(s - m)`` (float64), within ``EXPF_ERROR``; ``L = log1p(c - 1 + r)``
  is off by at most ``EXPF_ERROR r / (c + r) <= EXPF_ERROR L`` (``c = 1``:
  ``L >= r / (1 + r)``; ``c >= 2``: ``r / ((c + r) log(c + r)) <= 0.38``), and
  ``|y| >= L``, so ``(x - m) - L`` rounded once is within ``1.25 + 0.5`` ulps:
  no recheck is needed.
* logsumexp takes float32 terms only on rows where they provably pass the
  keep rule (``m >= 1``, or ``m + log n <= -3``: :data:`LSE_SINGLE_ABOVE`
  has the argument), and still checks it, with ``delta = EXPF_ERROR + (n +
  1) u`` (the terms, the float64 sum, the rescale), falling back to the
  float64 terms; so the line stays within one ulp.  Rows between
  (log-probabilities, sums cancelling near 0) keep the float64 ``_term7``
  terms, whose ``2**-33`` the keep rule needs there.

The tests hold every path to the oracle (4 ulps) and the exponential and the
sum to their bounds (``tests/test_fused_cpu.py``); docs/fused_cpu.md has the
figures.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from lse_dispatch._state import underflow_shift

__all__ = ["CHUNK", "LOGSUMEXP", "LOG_SOFTMAX", "SEGMENT", "SOFTMAX", "STATE", "TILE_BYTES", "compiled", "plan"]

# Modes (runtime arguments).
STATE, LOGSUMEXP, LOG_SOFTMAX, SOFTMAX = 0, 1, 2, 3

# Entries of a row processed in one item (two or three passes in cache):
# 256 KiB of float32, 512 KiB of float64, within a 1 MiB L2.
SEGMENT = 1 << 16
# Bytes of a tile of columns (rows x width), in L2 between its passes.
TILE_BYTES = 1 << 18
# Columns per tile: wide enough that the per-row overhead of the inner loops
# is small (measured: 64 columns cost 1.5x what 1024 do per entry).
TILE_WIDTH = 512
# Columns per item of the backward.
BACKWARD_WIDTH = 256
# Entries per buffer of the exact row sum: 16 KiB of float64 terms, in L1.
CHUNK = 2048

_STRICT = {"cache": True, "nogil": True, "error_model": "numpy"}
# Only for loops whose sole floating-point reduction is a sum of positive
# float64 terms (the bound above holds in any order): LLVM may then keep
# vector partial sums.  The terms come from functions compiled strictly,
# whose instructions keep their own flags when inlined.
_REASSOC = {**_STRICT, "fastmath": {"reassoc"}}
# Functions that allocate nothing are compiled without numba's reference
# counting (``_nrt=False``): they only borrow the arrays their caller holds,
# and the atomic increments and decrements of every array argument and slice
# (measured: 130 ns a line, a third of a short row's time, and a cache line
# that two threads would fight over) are not emitted.
_BORROWED = {**_STRICT, "_nrt": False}
_REASSOC_BORROWED = {**_REASSOC, "_nrt": False}
# The exponentials may fuse a multiply and an add into one FMA (one rounding
# where the bounds count two: they still hold).  Nowhere else: TwoSum must see
# the rounded products it is given.
_CONTRACT = {**_STRICT, "fastmath": {"contract"}}


# ---------------------------------------------------------------------------
# Bit-level helpers (vectorisable: bitcasts and integer ops only).


def _int_type(ty):
    if ty == types.float32:
        return types.int32, 32
    if ty == types.float64:
        return types.int64, 64
    return None, 0


#: The LLVM function attribute :func:`_wide_vectors` sets.
_WIDE = '"prefer-vector-width"="512"'


@intrinsic
def _wide_vectors(typingctx):
    """Let LLVM vectorise the loops of the calling function with the CPU's widest vectors.

    On CPUs with AVX-512 LLVM prefers 256-bit vectors unless a function says
    otherwise (``prefer-vector-width``; numba has no option for it), which
    halves the lanes of every loop here: a float32 softmax's term loop took
    30 us on (64, 1000) with 256-bit vectors and 25 with 512-bit ones
    (measured on an AVX-512 Xeon, one thread).  Elsewhere the widest vectors
    are what LLVM uses anyway.  The attribute is a tuning hint: every loop
    computes the same values element by element whatever the width (the
    reassociated sums are within their bounds in any order).  llvmlite
    validates attribute names against a fixed list that lacks it, so it is
    added to the underlying set; should llvmlite ever reject that, the code
    is compiled without it.
    """

    def codegen(context, builder, signature, args):
        try:
            set.add(builder.function.attributes, _WIDE)
        except Exception:  # pragma: no cover - an llvmlite without a set of attributes
            pass
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _key(typingctx, value):
    """An integer that orders like ``value`` (IEEE bits, negatives' magnitude bits flipped).

    A positive NaN orders above ``+inf``, a negative one below ``-inf``.
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
    """The IEEE bits of a float64 (as int64) or a float32 (as int32)."""
    int_ty, width = _int_type(value)
    if int_ty is None:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(width))

    return int_ty(value), codegen


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
#: The degree-7 terms (float32 input's fast sums) below exp(FLUSH) are 0 (there
#: 2**k p would not be normal; a float32 result never sees them).
FLUSH = -700.0
_TWO_M64 = 2.0**-64
_U = 2.0**-53

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
#: Relative error bound of a :func:`_term7` term (the fit plus the roundings).
TERM7_ERROR = 2.0**-33


@njit(**_CONTRACT)
def _q11(r):
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
    return 1.0 + r * q


@njit(**_CONTRACT)
def _q7(r):
    c = EXP7_COEFFICIENTS
    q = c[0]
    q = q * r + c[1]
    q = q * r + c[2]
    q = q * r + c[3]
    q = q * r + c[4]
    q = q * r + c[5]
    q = q * r + c[6]
    return 1.0 + r * q


@njit(**_CONTRACT)
def _reduce(d):
    """``(r, k)`` with ``d = k ln2 + r``, ``|r| <= ln2 / 2``; NaN stays NaN."""
    d = _LOWEST if d < _LOWEST else d
    shifted = d * _LOG2E + _SHIFTER
    k = shifted - _SHIFTER
    r = (d - k * _LN2_HI) - k * _LN2_LO
    return r, _bits(shifted) - _SHIFTER_BITS


@njit(**_CONTRACT)
def _scale(p, k):
    """``p * 2**k`` for ``-1077 <= k <= 0``: two normal powers of two, one rounding."""
    half = k >> 1
    return p * _from_bits((half + 1023) << 52) * _from_bits((k - half + 1023) << 52)


@njit(**_CONTRACT)
def _exp(d):
    """``exp(d)`` for ``d <= 0`` within 1.7 float64 ulps, down to the subnormal range; NaN stays NaN."""
    r, k = _reduce(d)
    return _scale(_q11(r), k)


@njit(**_CONTRACT)
def _exp7(d):
    """``exp(d)`` for ``d <= 0`` within ``2**-33`` relative (degree-7 fit)."""
    r, k = _reduce(d)
    return _scale(_q7(r), k)


@njit(**_CONTRACT)
def _term(d):
    """``exp(d)`` for ``d <= 0`` within 1.7 ulps where it is normal, within a subnormal ulp
    below, 0 below ``_LOWEST`` (``d`` not NaN).

    Written out (no calls): every level of calls is another optimisation of
    the code below it (see :func:`compiled`).  The scaling adds ``k + 64`` to
    the exponent bits of ``1 + r q`` (normal for every ``k >= _LOWEST / ln 2``)
    and multiplies by ``2**-64``: exact for normal results, one rounding for
    subnormal ones.  (Until 2026-11-30 it added ``k`` and gave 0 below ``FLUSH
    = -700``, where that sum leaves the normal range: fine next to a max's 1,
    but float64 softmax outputs between ``e**-708.4`` and ``e**-700`` came out
    0, and so did ``log1p`` of a rest that small, ``logsumexp([0, -700.63])``
    = ``5.26e-305``; found by ``benchmarks/fuzz_kernels.py``.)
    """
    d = _LOWEST if d < _LOWEST else d
    shifted = d * _LOG2E + _SHIFTER
    k = shifted - _SHIFTER
    r = (d - k * _LN2_HI) - k * _LN2_LO
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
    return _from_bits(_bits(1.0 + r * q) + ((_bits(shifted) - _SHIFTER_BITS + 64) << 52)) * _TWO_M64


@njit(**_CONTRACT)
def _term7(d):
    """``exp(d)`` for ``FLUSH <= d <= 0`` within ``2**-33``, 0 below (``d`` not NaN)."""
    shifted = d * _LOG2E + _SHIFTER
    k = shifted - _SHIFTER
    r = (d - k * _LN2_HI) - k * _LN2_LO
    c = EXP7_COEFFICIENTS
    q = c[0]
    q = q * r + c[1]
    q = q * r + c[2]
    q = q * r + c[3]
    q = q * r + c[4]
    q = q * r + c[5]
    q = q * r + c[6]
    p = _from_bits(_bits(1.0 + r * q) + ((_bits(shifted) - _SHIFTER_BITS) << 52))
    return p if d >= FLUSH else 0.0


@njit(**_STRICT)
def _two_sum(a, b):
    """``(s, e)``: ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth)."""
    s = a + b
    virtual = s - a
    return s, (a - (s - virtual)) + (b - virtual)


@njit(**_CONTRACT)
def _exp_exact_difference(v, mf):
    """``exp(v - mf)`` (full range) without the rounding of ``v - mf``: ``exp(d) + exp(d) e``.

    For the weights of merged states.  ``d + e = v - mf`` exactly (TwoSum);
    where ``d`` is below ``_LOWEST`` (``-inf`` included, whose ``e`` is NaN)
    the term is 0 and ``e`` is dropped.
    """
    d, e = _two_sum(np.float64(v), -mf)
    e = e if d >= _LOWEST else 0.0
    t = _exp(d)
    return t + t * e


@njit(**_CONTRACT)
def _fast_term(x, v, mf):
    """The term of a fast sum: ``exp7`` of the exact float64 ``v - mf`` (float32 ``v``)."""
    return _term7(np.float64(v) - mf)


@njit(**_CONTRACT)
def _exact_term(x, v, mf):
    """The term of an exact sum: ``exp(v - mf)`` within 1.7 ulps, plus TwoSum's ``e`` for float64."""
    if _single(x):
        return _term(np.float64(v) - mf)
    d, e = _two_sum(np.float64(v), -mf)
    t = _term(d)
    return t + t * e if d >= _LOWEST else 0.0  # (-inf entries: e is NaN)


# ---------------------------------------------------------------------------
# float32 terms in float32 lanes (twice the lanes of float64), for softmax and
# log_softmax of float32 rows whose max allows an exact shift (see the module
# docstring, "float32 terms").


@intrinsic
def _from_bits32(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif bits.bitwidth < 32:
            value = builder.sext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _fma32(typingctx, a, b, c):
    """``a * b + c`` in float32 with one rounding (``llvm.fma``): the same value in
    scalar and vector code, whatever the fast-math flags around it."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()] * 3)
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.f32"), args)

    return types.float32(a, b, c), codegen


_F32 = np.float32
_LOG2E_32 = _F32(_LOG2E)
_SHIFTER_32 = _F32(12582912.0)  # 1.5 * 2**23
_SHIFTER_32_BITS = np.int32(np.array(_SHIFTER_32).view(np.int32))
_LN2_HI_32 = _F32(0.693359375)  # 9 significant bits: k * it is exact for |k| < 2**15
_LN2_LO_32 = _F32(float.fromhex("-0x1.bd0106p-13"))  # ln 2 - _LN2_HI_32, rounded to float32
_ONE_32 = _F32(1.0)
_ZERO_32 = _F32(0.0)
# Coefficients of h (highest degree first), fitted to (exp(r) - 1 - r) / r**2
# on |r| <= 1.001 ln2 / 2 (mpmath.chebyfit, 100 bits), rounded to float32.
EXPF_COEFFICIENTS = tuple(_F32(float.fromhex(c)) for c in (
    "0x1.6d117cp-10", "0x1.120be2p-7", "0x1.555518p-5", "0x1.5554dcp-3", "0x1p-1"))
#: Relative error bound of :func:`_term32` and :func:`_stored_term32` where the
#: result is normal: ``1.229 * 2**-24`` at most over every float32 ``d`` in
#: ``[-87, 88]`` (``scripts/expf_exhaustive.py``; the tests check a sample).
EXPF_ERROR = 1.25 * 2.0**-24
#: float32 terms of differences below this are 0 in the sums (under
#: ``e**-87`` of the max's term, which is at least ``e**-(1/16)``).
FLUSH32 = _F32(-87.0)
# Below this a stored term rounds to 0 (exp(-104) is under half the least subnormal).
_LOWEST32 = _F32(-104.0)


@njit(**_STRICT)
def _expf_parts(d):
    """``(p, k)``, ``exp(d) = p 2**k`` with ``p`` in ``[0.70, 1.42]`` (float32 ``d <= 88``).

    Cody-Waite as in :func:`_term`, in float32 with explicit FMAs: ``k =
    round(d / ln2)`` by the ``1.5 * 2**23`` shifter, ``r = (d - k C1) - k C2``
    (the first step exact), ``exp(r) = 1 + r + r**2 h(r)`` with the last two
    additions compensated: ``1 + r`` is split exactly (Fast2Sum, ``|r| < 1``)
    and its rounding error is added back with ``r**2 h``, so that only the
    final addition rounds at the scale of the result.
    """
    shifted = _fma32(d, _LOG2E_32, _SHIFTER_32)
    k = shifted - _SHIFTER_32
    r = _fma32(k, -_LN2_LO_32, _fma32(k, -_LN2_HI_32, d))
    c = EXPF_COEFFICIENTS
    h = _fma32(c[0], r, c[1])
    h = _fma32(h, r, c[2])
    h = _fma32(h, r, c[3])
    h = _fma32(h, r, c[4])
    high = _ONE_32 + r
    low = r - (high - _ONE_32)
    return high + ((r * r) * h + low), _bits(shifted) - _SHIFTER_32_BITS


@njit(**_STRICT)
def _term32(d):
    """``exp(d)`` of a float32 ``d <= 88`` within :data:`EXPF_ERROR` relative, 0 below
    :data:`FLUSH32` (the scaling by ``2**k`` adds ``k`` to the exponent bits,
    exact for normal results)."""
    p, k = _expf_parts(d)
    t = _from_bits32(_bits(p) + (k << 23))
    return t if d >= FLUSH32 else _ZERO_32


@njit(**_STRICT)
def _stored_term32(d):
    """``exp(d)`` of a float32 ``d <= 88`` (``-inf`` included), down to the subnormal range.

    The value of :func:`_term32` where that is normal (both scalings are
    exact there); below, ``p 2**k`` rounds once, as ``2**(k - k//2)`` times the
    normal ``p 2**(k//2)`` (within half a subnormal ulp plus
    :data:`EXPF_ERROR` of the value).  For softmax's stored terms, whose
    quotients by the line's total (at least ``e**-(1/16)``) can be normal or
    subnormal float32 down to ``d = -104``.
    """
    d = d if d >= _LOWEST32 else _LOWEST32
    p, k = _expf_parts(d)
    half = k >> 1
    return (p * _from_bits32((half + 127) << 23)) * _from_bits32((k - half + 127) << 23)


@njit(**_BORROWED)
def _shift32(m):
    """``(s, ok)`` for a line of float32 entries with the finite max ``m`` (float64).

    ``s`` (float32) makes ``x - s`` exact in float32 for every entry
    ``x >= m - 127`` (the entries below have terms under ``e**-126`` of the
    max's and are flushed):

    * ``0 < m <= 87``: ``s = 0``, ``x - s = x``; the terms ``exp(x)`` are
      normal float32 down to ``e**-87`` (the max's term is ``e**m > 1``);
    * ``-2**20 < m <= 0``: ``s`` is ``m`` rounded to a multiple of ``G``, the
      float32 ulp of the binade of ``|m| + 128``.  Every such ``x`` has
      ``|x| < |m| + 128``, so ``G`` is a multiple of ``ulp(x)``; ``x - s`` is
      then a multiple of ``ulp(x)`` no larger than ``|x|`` (``s`` is 0 when
      ``|m| < G / 2``), hence a float32.  ``|m - s| <= G / 2 <= 2**-4``;
    * otherwise ``ok`` is False (the float64 terms).
    """
    if 0.0 < m <= 87.0:
        return _ZERO_32, True
    if not (-(2.0**20) < m <= 0.0):
        return _ZERO_32, False
    # G from the exponent bits of 128 - m (exact, in [128, 2**20 + 128)); m rounded
    # to a multiple of G by adding and subtracting 1.5 * 2**52 G (|m| < 2**24 G).
    grid = _from_bits(((_bits(128.0 - m) >> 52) - 23) << 52)
    shifter = 1.5 * 2.0**52 * grid
    return _F32((m + shifter) - shifter), True


# ---------------------------------------------------------------------------
# Rows: x[i, a:b] is (part of) a line.  Maxima are passed as float64 (exact
# for float32 input): one type for every caller, so one compiled copy.


@njit(**_BORROWED)
def _row_max(x, mask, masked, i, a, b):
    """``(m, nan)``: the max of the included entries of ``x[i, a:b]`` (float64), and
    whether one is NaN.

    Every loop here runs over a 1-D slice from 0: an index that may be
    negative (``x[i, j]`` with ``j`` from a runtime start) takes numba's
    wraparound select, which LLVM turns into gathers (2.5x slower, measured).
    """
    _wide_vectors()
    row = x[i, a:b]
    lowest = _minus_inf_key(row[0])
    high = lowest
    low = lowest
    if masked:
        include = mask[i, a:b]
        for j in range(row.shape[0]):
            key = _key(row[j]) if include[j] else lowest
            high = key if key > high else high
            low = key if key < low else low
    else:
        for j in range(row.shape[0]):
            key = _key(row[j])
            high = key if key > high else high
            low = key if key < low else low
    return np.float64(_unkey(high, row[0])), low < lowest


@njit(**_REASSOC_BORROWED)
def _row_sum_fast(x, mask, masked, i, a, b, m, out, store):
    """float32: ``(count, rest)`` of ``x[i, a:b]`` from :func:`_term7` terms, a reassociated sum.

    ``store``: every term goes to ``out`` (rounded to float32; 1 at the max,
    0 for excluded entries), for softmax to scale.
    """
    _wide_vectors()
    row = x[i, a:b]
    total = 0.0
    count = 0
    if masked:
        include = mask[i, a:b]
        target = out[i, a:b] if store else out[0, 0:0]
        for j in range(row.shape[0]):
            v = row[j]
            inc = include[j] != 0
            t = _fast_term(x, v, m) if inc else 0.0
            top = inc and v == m
            if store:
                target[j] = t
            total += 0.0 if top else t
            count += 1 if top else 0
    elif store:
        target = out[i, a:b]
        for j in range(row.shape[0]):
            v = row[j]
            t = _fast_term(x, v, m)
            target[j] = t
            total += 0.0 if v == m else t
            count += 1 if v == m else 0
    else:
        for j in range(row.shape[0]):
            v = row[j]
            t = _fast_term(x, v, m)
            total += 0.0 if v == m else t
            count += 1 if v == m else 0
    return np.float64(count), total


#: float32 terms per step of :func:`_row_sum_single`: formed in float32 lanes into
#: ``buffer`` (viewed as float32), then summed in float64 by a loop of their own.
SINGLE_CHUNK = 1024


@njit(**_REASSOC_BORROWED)
def _row_sum_single(x, mask, masked, i, a, b, m, s, out, store, buffer):
    """float32 terms of ``x[i, a:b]`` relative to the exact shift ``s`` (:func:`_shift32`).

    ``store`` (softmax): every term goes to ``out`` (:func:`_stored_term32`, 0
    for excluded entries) and the result is ``(0, total)``, the float64 sum of
    the stored terms, the max's included.  Otherwise ``(count, rest)``: the
    entries equal to ``m`` counted, the :func:`_term32` terms of the others
    summed in float64 (relative to ``s``).

    Each ``SINGLE_CHUNK`` entries take two loops: the terms in float32 alone
    (stored, or into ``buffer``; the count of the max too, in float32, exact
    below ``2**24``), then their float64 sum.  In one loop the float64 sum
    set the vector width for all of it: four float32 lanes instead of eight,
    half the speed (measured: ``benchmarks/fused_passes.py`` "sum f32", 60
    against 30 us on (64, 1000)).  Stored terms are :func:`_term32`'s, which
    equal :func:`_stored_term32`'s except below ``FLUSH32``: a chunk with an
    entry in ``[_LOWEST32, FLUSH32)`` (a subnormal term) is stored again by
    :func:`_stored_term32` (below ``_LOWEST32`` both are 0, ``-inf``
    included).
    """
    _wide_vectors()
    row = x[i, a:b]  # float32 (the casts below only type the float64 copy, which never runs this)
    scratch = buffer.view(out.dtype)  # float32 (float64 input never runs this)
    top = _F32(m)
    one = _F32(1.0)
    total = 0.0
    count = 0.0
    for c in range(0, row.shape[0], SINGLE_CHUNK):
        d = min(c + SINGLE_CHUNK, row.shape[0])
        part = row[c:d]
        include = mask[i, a + c:a + d] if masked else mask[0, 0:0]
        terms = out[i, a + c:a + d] if store else scratch[0:d - c]
        if store:
            band = _ZERO_32
            for j in range(part.shape[0]):
                e = _F32(part[j]) - s
                inc = (not masked) or include[j] != 0
                terms[j] = _term32(e) if inc else _ZERO_32
                band += one if (inc and _LOWEST32 <= e < FLUSH32) else _ZERO_32
            if band != _ZERO_32:
                for j in range(part.shape[0]):
                    inc = (not masked) or include[j] != 0
                    terms[j] = _stored_term32(_F32(part[j]) - s) if inc else _ZERO_32
        else:
            found = _ZERO_32
            for j in range(part.shape[0]):
                v = _F32(part[j])
                inc = (not masked) or include[j] != 0
                counted = inc and v == top
                t = _term32(v - s)
                terms[j] = t if (inc and not counted) else _ZERO_32
                found += one if counted else _ZERO_32
            count += np.float64(found)
        for j in range(terms.shape[0]):
            total += np.float64(terms[j])
    return count, total


@njit(**_BORROWED)
def _chunk_terms(x, mask, masked, i, a, b, m, buffer, out, store):
    """Exact terms of ``x[i, a:b]`` into ``buffer`` (0 at the max and for excluded
    entries): ``(count at the max, IEEE bits of the largest term)``.

    ``store``: also into ``out``, 1 at the max (softmax).
    """
    _wide_vectors()
    row = x[i, a:b]
    target = out[i, a:b] if store else out[0, 0:0]
    count = 0
    largest = 0
    if masked:
        include = mask[i, a:b]
        for j in range(row.shape[0]):
            v = row[j]
            inc = include[j] != 0
            t = _exact_term(x, v, m) if inc else 0.0
            top = inc and v == m
            if store:
                target[j] = t
            t = 0.0 if top else t
            buffer[j] = t
            bits = _bits(t)
            largest = bits if bits > largest else largest
            count += 1 if top else 0
    else:
        for j in range(row.shape[0]):
            v = row[j]
            t = _exact_term(x, v, m)
            if store:
                target[j] = t
            t = 0.0 if v == m else t
            buffer[j] = t
            bits = _bits(t)
            largest = bits if bits > largest else largest
            count += 1 if v == m else 0
    return count, largest


@njit(**_BORROWED)
def _split(t, sigma):
    """``(hi, lo)``: ``t`` rounded to the grid of ``ulp(sigma)``, and the exact remainder."""
    hi = (t + sigma) - sigma
    return hi, t - hi


@njit(**_BORROWED)
def _split_sigma(largest):
    """``sigma = 1.5 * 2**(E + 16)`` of :func:`_split_sum`, ``2**E`` the power of two above
    the term whose magnitude has the IEEE bits ``largest``."""
    return _from_bits((((largest >> 52) + 1 + 16) << 52) | (1 << 51))


@njit(**_REASSOC_BORROWED)
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
    _wide_vectors()
    high = 0.0
    low = 0.0
    for j in range(n):
        hi, lo = _split(buffer[j], sigma)
        high += hi
        low += lo
    return high + low


#: Lines up to this long take the exact sum as a cascaded TwoSum (no buffer).
SHORT = 16


@njit(**_BORROWED)
def _row_sum_exact(x, mask, masked, i, a, b, m, out, store, buffer):
    """``(count, rest)`` of ``x[i, a:b]`` to about a float64 ulp.

    Up to ``SHORT`` entries: cascaded TwoSum (``u |S| + n**2 u**2 S``).
    Longer: chunks of ``CHUNK`` terms go to ``buffer``, are summed by the
    exact split (:func:`_split_sum`) with ``sigma`` from their largest
    term, and the chunk sums are added with TwoSum.
    """
    _wide_vectors()
    count = 0
    total = 0.0
    error = 0.0
    if b - a <= SHORT:
        row = x[i, a:b]
        target = out[i, a:b] if store else out[0, 0:0]
        include = mask[i, a:b] if masked else mask[0, 0:0]
        for j in range(row.shape[0]):
            v = row[j]
            inc = (not masked) or include[j] != 0
            t = _exact_term(x, v, m) if inc else 0.0
            top = inc and v == m
            if store:
                target[j] = t
            total, e = _two_sum(total, 0.0 if top else t)
            error += e
            count += 1 if top else 0
        return np.float64(count), total + error
    for c in range(a, b, CHUNK):
        d = min(c + CHUNK, b)
        found, largest = _chunk_terms(x, mask, masked, i, c, d, m, buffer, out, store)
        count += found
        total, e = _two_sum(total, _split_sum(buffer, d - c, _split_sigma(largest)))
        error += e
    return np.float64(count), total + error


#: float32 logsumexp from fast sums is kept when the error of ``L`` is at most
#: this fraction of ``|lse|``: half a float32 ulp at most (``ulp(y) >= 2**-24
#: |y|``), so the result is within one ulp.
KEEP_BELOW = 2.0**-25
#: float32 logsumexp rows take float32 terms (:func:`_term32`) when ``m >=
#: LSE_SINGLE_ABOVE`` or ``m + log n <= -LSE_SINGLE_BELOW``, where the keep
#: rule holds with ``delta = EXPF_ERROR + (n + 1) u`` (``2**-25 (2.5 + (n + 1)
#: 2**-28)``, at most ``2**-25 * 2.50025`` for rows of ``SEGMENT``):
#:
#: * ``m >= 1``: with ``q = r / (1 + r)``, ``r / (c + r) <= q`` and ``L =
#:   log(c + r) >= -log(1 - q)``, so ``delta r / (c + r) <= 2**-25 |lse|``
#:   needs ``2.50025 q <= m - log(1 - q)``, whose worst case (``q = 0.6``)
#:   asks ``m >= 0.584``; 1 leaves ``0.4 * 2**-25`` for the float64 roundings;
#: * ``m + log n <= -3``: ``|lse| >= -(m + log n) >= 3 > 2.50025``.
#:
#: (The terms :func:`_term32` flushes, under ``e**-87`` of the max's, change
#: ``c + r`` by under ``n e**-87 < 2**-109`` for rows of ``SEGMENT``.)
#: Rows between (log-probabilities, sums cancelling near 0) keep the float64
#: ``_term7`` terms, whose ``2**-33`` the keep rule needs there.
LSE_SINGLE_ABOVE = 1.0
LSE_SINGLE_BELOW = 3.0
#: float32 log_softmax rows whose rest (relative to the max) is below ``n`` times
#: this take the float64 terms: :func:`_term32` flushes terms below ``e**-87``
#: of the shift (``e**-86.9 < 2**-125.4`` of the max's), at most ``n 2**-125.4``
#: in all, and ``-L = -log1p(r)`` at the max must keep ``r`` to ``2**-26``
#: (found by fuzzing: a row with max 0.52 and every other entry 75 to 98 below
#: gave ``-1.5185409e-33`` for ``-1.5186549e-33``, 1242 ulps).
FLUSHED_REST = 2.0**-99

#: float32 softmax terms relative to ``s = 0`` (:func:`_shift32`, a max in ``(0,
#: 87]``) total up to ``n e**87``.  The output pass multiplies by the float32 pair
#: ``hi + lo`` of ``1 / total`` (:func:`_scale_halves`), which carries the scale to
#: ``2**-48`` only while ``lo`` is normal: ``1 / total >= 2**-102``.  Below this
#: scale the output pass multiplies by the float64 product instead (found on
#: 2026-12-02: ``(1, 65536)`` entries of 87 came out 10,020 ulps off).
SCALE_FLOOR = 2.0**-102


@njit(**_BORROWED, inline="always")
def _single_rest(mode, m, shift, total, n):
    """``(rest, kept)`` of ``n`` entries' float32 terms (:func:`_term32`, the max's left
    out) whose float64 ``total`` is relative to the shift: the rest brought back to
    the max ``m`` by ``exp(s - m)``, and whether it stands.  logsumexp's does (its
    keep rule is checked later); a log_softmax rest below ``n * FLUSHED_REST``
    would miss the terms ``_term32`` flushes, and is summed again with ``_term7``
    terms by the caller."""
    rest = total * _exp(np.float64(shift) - m)  # |s - m| <= 2**-4, or s = 0: k <= 0
    return rest, mode == LOGSUMEXP or rest >= n * FLUSHED_REST


@njit(**_BORROWED)
def _kept(mode, delta, m, count, rest, log_norm):
    """Whether a float32 logsumexp line whose ``rest`` is within ``delta`` relatively is
    accurate as it is (``mode`` is ``LOGSUMEXP``).

    ``L = log(c + r)`` is then within ``delta r / (c + r)``, plus the
    roundings of ``(c - 1) + r`` (``u``) and of ``log1p`` (``2 u L``), and
    ``m + L`` rounds by ``u |lse|``.  Lines that fail (``lse`` near 0: the
    cancelling case ``[-1, c, c]``, lines of log-probabilities) are redone
    with exact sums.  log_softmax needs no such rule: its ``L`` is within
    ``(delta + 3.5 u) L`` (the module docstring, "Sums") and every output has
    ``|y| >= L``.
    """
    error = delta * rest / (count + rest) + _U * (1.0 + 2.0 * log_norm)
    value = abs(m + log_norm)
    return error + _U * value <= KEEP_BELOW * value


@njit(**_BORROWED, inline="always")
def _scale_halves(scale):
    """``(hi, lo)``: float32 ``hi = fl32(scale)`` and ``lo = fl32(scale - hi)`` of a
    float64 softmax scale (``scale - hi`` is exact)."""
    hi = _F32(scale)
    return hi, _F32(scale - np.float64(hi))


@njit(**_BORROWED)
def _row_output(x, mask, masked, i, a, b, m, norm, scale, out, mode, stored):
    """softmax / log_softmax of ``x[i, a:b]`` into ``out`` given the line's state.

    log_softmax: ``(x - m) - norm`` (``norm = L``; float64 for float32 input,
    where ``x - m`` is exact).  softmax: the stored term times ``scale``
    (float32) or over ``norm = c + r`` (float64) when ``stored``, otherwise
    the term recomputed from ``m`` (float64 only) over ``norm``.
    """
    _wide_vectors()
    row = x[i, a:b]
    target = out[i, a:b]
    include = mask[i, a:b] if masked else mask[0, 0:0]
    if mode == LOG_SOFTMAX:
        if masked:
            for j in range(row.shape[0]):
                value = (np.float64(row[j]) - m) - norm
                target[j] = value if include[j] else -np.inf
        else:
            for j in range(row.shape[0]):
                target[j] = (np.float64(row[j]) - m) - norm
    elif stored:
        if _single(x):
            # t * scale in float32 lanes: scale = hi + lo (+ 2**-48 scale), and one
            # FMA rounds t hi + fl(t lo) once (docs/fused_cpu.md, "The softmax scale").
            hi, lo = _scale_halves(scale)
            if scale < SCALE_FLOOR:
                for j in range(row.shape[0]):
                    target[j] = np.float64(target[j]) * scale
            else:
                for j in range(row.shape[0]):
                    t = _F32(target[j])  # float32 (the cast only types the float64 copy)
                    target[j] = _fma32(t, hi, t * lo)
        else:
            for j in range(row.shape[0]):
                target[j] = target[j] / norm
    elif masked:
        for j in range(row.shape[0]):
            t = _exact_term(x, row[j], m) / norm
            target[j] = t if include[j] else 0.0
    else:
        for j in range(row.shape[0]):
            target[j] = _exact_term(x, row[j], m) / norm


#: Rows of at most ``SHORT`` entries go through :func:`_short_rows` this many at a
#: time, one to a vector lane.
SHORT_BLOCK = 32


@njit(**_BORROWED)
def _short_rows(x, mode, out, tops, counts, rests, values, bad, buffer, start, stop):
    """Rows ``start:stop`` of at most ``SHORT`` entries, without a mask, ``SHORT_BLOCK`` at a
    time: for float64 the same results as :func:`_rows_whole`'s loop.

    A row of three entries has a chain of dependent steps (max, terms, sum,
    ``log1p``, outputs) that one row at a time leaves the vector units idle on
    (74 ns a row of 3, measured); here every loop runs across the rows of a
    block, one row to a lane.  The block is transposed into ``buffer``
    (entries, then their terms), and each row gets exactly what
    :func:`_rows_whole` computes: the integer-keyed max and NaN check, the
    terms ``exp(d) + exp(d) e`` of the TwoSum-exact difference, the count at
    the max, the rest as a cascaded TwoSum (:func:`_row_sum_exact`'s short
    path), and the same outputs.  Every per-row array is taken as a slice
    from 0 (a runtime offset would take numba's wraparound select).

    float32 rows take the same float64 arithmetic (their entries, copied to
    ``buffer``, are exact in float64; the terms of the exact differences
    and their TwoSum sum are the float64 path's): more accurate than the
    row path's float32 terms, and on rows this short faster, because the
    row path pays each of its loops' vector set-up per row (float32 (1024,
    10) and (64, 8), public calls: 1.1x to 2.1x faster than the row path;
    docs/fused_cpu.md).
    """
    _wide_vectors()
    n = x.shape[1]
    width = SHORT_BLOCK
    entries = buffer[0:n * width]
    terms = buffer[n * width:2 * n * width]
    lowest = _minus_inf_key(buffer[0])  # float64 keys: the entries are float64 copies
    for i0 in range(start, stop, width):
        rows = min(width, stop - i0)
        top, count, rest = tops[i0:i0 + rows], counts[i0:i0 + rows], rests[i0:i0 + rows]
        value, flag = values[i0:i0 + rows], bad[i0:i0 + rows]
        block = x[i0:i0 + rows]
        for k in range(rows):
            for j in range(n):
                entries[j * width + k] = block[k, j]
        for k in range(rows):
            high = lowest
            low = lowest
            for j in range(n):
                key = _key(entries[j * width + k])
                high = key if key > high else high
                low = key if key < low else low
            m = _unkey(high, buffer[0])
            top[k] = m
            flag[k] = 1 if (low < lowest or not math.isfinite(m)) else 0
            count[k] = 0.0
            rest[k] = 0.0
            value[k] = 0.0  # the TwoSum error of the rest, until the end
        for j in range(n):
            column = entries[j * width:j * width + rows]
            stored = terms[j * width:j * width + rows]
            for k in range(rows):
                v = column[k]
                m = top[k]
                t = _exact_term(x, v, m)
                stored[k] = t
                at_top = v == m
                total, error = _two_sum(rest[k], 0.0 if at_top else t)
                rest[k] = total
                value[k] += error
                count[k] += 1.0 if at_top else 0.0
        for k in range(rows):
            rest[k] += value[k]
            if flag[k]:
                continue
            if mode == LOGSUMEXP:
                value[k] = top[k] + math.log1p((count[k] - 1.0) + rest[k])
            elif mode == LOG_SOFTMAX:
                value[k] = math.log1p((count[k] - 1.0) + rest[k])
            else:
                value[k] = count[k] + rest[k]
        if mode == LOG_SOFTMAX or mode == SOFTMAX:
            _short_outputs(block, terms, mode, out[i0:i0 + rows], top, value, flag)


@njit(**_BORROWED)
def _short_outputs(block, terms, mode, target, top, norm, flag):
    """softmax (the block's stored terms over ``c + r``) or log_softmax (``(x - m) - L``)
    of the unflagged rows of a :func:`_short_rows` block."""
    _wide_vectors()
    width = SHORT_BLOCK
    for k in range(block.shape[0]):
        if flag[k]:
            continue
        for j in range(block.shape[1]):
            if mode == SOFTMAX:
                target[k, j] = terms[j * width + k] / norm[k]
            else:
                target[k, j] = (block[k, j] - top[k]) - norm[k]


#: Rows go through :func:`_rows_whole` in blocks of about this many bytes (at least
#: one row): every row's sums, then every row's norm, then every row's outputs.
ROW_BLOCK_BYTES = 1 << 13
# What _row_sums leaves in ``values[i]`` for a logsumexp row: the keep rule that
# the row's sums must pass (:func:`_row_norms`).
_KEEP_NONE, _KEEP_SINGLE, _KEEP_FAST = 0.0, 1.0, 2.0


@njit(**_BORROWED)
def _rows_per_block(n, itemsize):
    """Rows of ``n`` entries in a block of about ``ROW_BLOCK_BYTES`` (at least one)."""
    return max(1, ROW_BLOCK_BYTES // max(1, n * itemsize))


@njit(**_BORROWED)
def _rows_whole(x, mask, masked, mode, out, tops, counts, rests, values, bad, buffer, start, stop):
    """Rows ``start:stop`` of at most ``SEGMENT`` entries: state and results of each in one visit.

    The loop over rows is here, not in the caller: a call per row passing
    nine arrays (their fields one by one) cost 15-20 ns a row, a quarter of
    a row of 8 entries (measured).  The rows go in blocks of
    ``ROW_BLOCK_BYTES`` (16 rows of 128 float32 entries; one row from 2048),
    still in cache when their outputs are written: first every row's max and
    sums (:func:`_row_sums`), then every row's norm (:func:`_row_norms`),
    then the outputs.  Row by row, each row's ``log1p`` (or reciprocal) sat
    between its sums and its outputs, a chain the next row could not start
    behind; in blocks they are independent steps, and the arithmetic of each
    row is the same (float32 (1024, 128), one thread: 0.83x to 0.90x the time
    row by row; docs/fused_cpu.md).
    """
    n = x.shape[1]
    if not masked and mode != STATE and n <= SHORT:
        _short_rows(x, mode, out, tops, counts, rests, values, bad, buffer, start, stop)
        return
    block = _rows_per_block(n, x.itemsize)
    first = np.int64(0)  # not the literal 0: a literal argument compiles another copy of the callee
    # logsumexp takes float32 terms on rows whose lse is certainly far enough
    # from 0 (LSE_SINGLE_ABOVE, LSE_SINGLE_BELOW) for them to keep it within an ulp.
    low = -LSE_SINGLE_BELOW - math.log(n)
    for b0 in range(start, stop, block):
        b1 = min(b0 + block, stop)
        for i in range(b0, b1):
            _row_sums(x, mask, masked, mode, out, tops, counts, rests, values, bad, buffer, low, i)
        if mode == STATE:
            continue
        _row_norms(x, mask, masked, mode, out, tops, counts, rests, values, bad, buffer, b0, b1)
        if mode == LOGSUMEXP:
            continue
        # softmax: the stored terms times the reciprocal of their total; log_softmax: (x - m) - L.
        # (The literal True and False compile copies of _row_output without the other branches.)
        for i in range(b0, b1):
            if bad[i]:
                continue
            norm = values[i]
            if mode == SOFTMAX:
                _row_output(x, mask, masked, i, first, n, tops[i], norm, 1.0 / norm, out, mode, True)
            else:
                _row_output(x, mask, masked, i, first, n, tops[i], norm, 0.0, out, mode, False)


@njit(**_BORROWED, inline="always")
def _row_sums(x, mask, masked, mode, out, tops, counts, rests, values, bad, buffer, low, i):
    """Row ``i`` of :func:`_rows_whole`: its max (``tops``) or its flag (``bad``), and its sums.

    ``counts``, ``rests``: the row's count and rest (softmax's stored float32
    terms: NaN, not formed); ``values``: softmax's norm (the total of the
    stored terms), or for logsumexp the keep rule its sums must pass
    (``_KEEP_*``).  log_softmax rows whose float32 rest is too small for
    their flushed terms are summed again here in float64 (``FLUSHED_REST``).
    """
    n = x.shape[1]
    first = np.int64(0)
    store = mode == SOFTMAX
    fast = _single(x) and mode != STATE
    m, nan = _row_max(x, mask, masked, i, first, n)
    tops[i] = m
    if nan or not math.isfinite(m):
        bad[i] = 1
        return
    # logsumexp: float32 terms where m >= LSE_SINGLE_ABOVE or m <= low (_rows_whole).
    single = fast and (store or mode == LOG_SOFTMAX or (mode == LOGSUMEXP and (m >= LSE_SINGLE_ABOVE or m <= low)))
    s, shifted = _shift32(m) if single else (_ZERO_32, False)
    if shifted:
        # float32 terms: softmax scales its stored terms by their total;
        # log_softmax and logsumexp take L from the rest brought back to the max.
        count, total = _row_sum_single(x, mask, masked, i, first, n, m, s, out, store, buffer)
        if store:
            counts[i], rests[i], values[i] = np.nan, np.nan, total
            return
        rest, kept = _single_rest(mode, m, s, total, n)
        if kept:
            counts[i], rests[i], values[i] = count, rest, _KEEP_SINGLE
            return
    if fast:
        count, rest = _row_sum_fast(x, mask, masked, i, first, n, m, out, store)
        keep = _KEEP_FAST
    else:
        count, rest = _row_sum_exact(x, mask, masked, i, first, n, m, out, store, buffer)
        keep = _KEEP_NONE
    counts[i], rests[i] = count, rest
    values[i] = count + rest if store else keep


@njit(**_BORROWED)
def _row_norms(x, mask, masked, mode, out, tops, counts, rests, values, bad, buffer, b0, b1):
    """``values[b0:b1]`` of :func:`_rows_whole` after :func:`_row_sums`: logsumexp's
    values, log_softmax's ``L``; softmax's are its norms already.

    A logsumexp row whose sums fail their keep rule (:func:`_kept`) is summed
    again: float32 terms by the float64 ``_term7`` terms, those by the exact
    sum.
    """
    n = x.shape[1]
    first = np.int64(0)
    for i in range(b0, b1):
        if bad[i] or mode == SOFTMAX:
            continue
        count, rest = counts[i], rests[i]
        log_norm = math.log1p((count - 1.0) + rest)
        if mode == LOG_SOFTMAX:
            values[i] = log_norm
            continue
        m, keep = tops[i], values[i]
        if keep == _KEEP_SINGLE and not _kept(mode, EXPF_ERROR + (n + 1) * _U, m, count, rest, log_norm):
            count, rest = _row_sum_fast(x, mask, masked, i, first, n, m, out, False)
            counts[i], rests[i] = count, rest
            log_norm = math.log1p((count - 1.0) + rest)
            keep = _KEEP_FAST
        if keep == _KEEP_FAST and not _kept(mode, TERM7_ERROR + (n - 1) * _U, m, count, rest, log_norm):
            count, rest = _row_sum_exact(x, mask, masked, i, first, n, m, out, False, buffer)
            counts[i], rests[i] = count, rest
            log_norm = math.log1p((count - 1.0) + rest)
        values[i] = m + log_norm


@njit(**_BORROWED)
def _exact_sums(x, mode):
    """Whether the sums are exact (float64, and the float32 state) rather than fast."""
    return not _single(x) or mode == STATE


@njit(**_BORROWED)
def _row_piece(x, mask, masked, mode, out, ms, cs, rs, tops, buffer, span, parts, phase, item):
    """Segment ``item % parts`` of row ``item // parts``, in phase 0 or 2.

    Fast sums (phase 0): the segment's state, relative to its own max, from
    float32 terms where the max has an exact shift (:func:`_row_sum_single`;
    logsumexp: a max of at least ``LSE_SINGLE_ABOVE``; a log_softmax rest
    below ``span * FLUSHED_REST`` is summed again with ``_term7`` terms), else
    ``_term7`` terms.  float32 softmax stores the terms for phase 4 to scale
    (zeros where nothing is included); its state from float32 terms is
    ``(s, 0, total)``, relative to the shift.  Exact sums: phase 0 finds the segment's max only,
    phase 2 sums relative to the row's (``tops``, from phase 1), so that no
    merge weight adds its rounding to a float64 sum.
    """
    i = item // parts
    s = item % parts
    a = s * span
    b = min(a + span, x.shape[1])
    cs[i, s] = 0.0
    rs[i, s] = 0.0
    store = mode == SOFTMAX and not _exact_sums(x, mode)
    if phase == 2:
        top = tops[i]
        ms[i, s] = top
        if math.isfinite(top):
            cs[i, s], rs[i, s] = _row_sum_exact(x, mask, masked, i, a, b, top, out, store, buffer)
        return
    m, nan = _row_max(x, mask, masked, i, a, b)
    ms[i, s] = np.nan if nan else m
    if _exact_sums(x, mode):
        return
    if nan or not math.isfinite(m):
        if store:
            out[i, a:b] = 0.0
        return
    shift, single = _shift32(m)
    if single and (mode != LOGSUMEXP or m >= LSE_SINGLE_ABOVE):
        count, total = _row_sum_single(x, mask, masked, i, a, b, m, shift, out, store, buffer)
        if store:
            ms[i, s], rs[i, s] = np.float64(shift), total
            return
        rest, kept = _single_rest(mode, m, shift, total, b - a)
        if kept:
            cs[i, s], rs[i, s] = count, rest
            return
    cs[i, s], rs[i, s] = _row_sum_fast(x, mask, masked, i, a, b, m, out, store)


@njit(**_BORROWED)
def _line_top(ms, line, axis):
    """The merged max of a line's pieces (``ms[line, :]`` for rows, ``ms[:, line]``
    for columns): NaN if any is NaN."""
    top = ms[line, 0] if axis == 1 else ms[0, line]
    for s in range(1, ms.shape[axis]):
        v = ms[line, s] if axis == 1 else ms[s, line]
        top = v if (v > top or v != v) else top
    return top


@njit(**_BORROWED)
def _merge_line(ms, cs, rs, line, axis):
    """Merge the states of a line's segments (``ms[line, :]`` for rows, ``ms[:, line]``
    for columns) as ``_state.merge`` does, compensated: ``(m, count, rest)``;
    a NaN ``m`` if any is NaN."""
    parts = ms.shape[axis]
    top = _line_top(ms, line, axis)
    if not math.isfinite(top):
        return top, 0.0, 0.0
    count = 0.0
    rest = 0.0
    error = 0.0
    for s in range(parts):
        m, c, r = (ms[line, s], cs[line, s], rs[line, s]) if axis == 1 else (ms[s, line], cs[s, line], rs[s, line])
        if m == top:
            count += c
            part = r
        else:
            part = (c + r) * _exp_exact_difference(m, top)
        rest, e = _two_sum(rest, part)
        error += e
    return top, count, rest + error


@njit(**_BORROWED)
def _finish_merged(x, mask, masked, mode, out, tops, counts, rests, values, bad, buffer, line, m, count, rest, n,
                   span, axis):
    """Phase 3 of a line in pieces: its merged state and, for logsumexp, its value.

    A float32 logsumexp whose bound fails is redone with an exact sum over
    the whole line (``axis`` 1: the line is a row of ``x``, 0: a column).
    """
    tops[line] = m
    if not math.isfinite(m):
        bad[line] = 1
        return
    if _single(x) and mode == LOGSUMEXP:
        # Merged fast states: each piece's rest within TERM7_ERROR + (span - 1) u,
        # the merge weights (1.7 u) and roundings of the compensated merge 5 u more.
        # Segments and column tiles whose max is at least LSE_SINGLE_ABOVE may
        # have taken float32 terms (EXPF_ERROR; only where the line's is too).
        log_norm = math.log1p((count - 1.0) + rest)
        single = m >= LSE_SINGLE_ABOVE
        delta = (EXPF_ERROR if single else TERM7_ERROR) + (span + 4) * _U
        if not _kept(mode, delta, m, count, rest, log_norm):
            if axis == 1:
                count, rest = _row_sum_exact(x, mask, masked, line, n - n, n, m, out, mode == SOFTMAX, buffer)
            else:
                count, rest = _column_sum_exact(x, mask, masked, line, m)
    counts[line] = count
    rests[line] = rest
    if mode == SOFTMAX:
        values[line] = count + rest
    elif mode == LOG_SOFTMAX:
        values[line] = math.log1p((count - 1.0) + rest)
    elif mode == LOGSUMEXP:
        values[line] = m + math.log1p((count - 1.0) + rest)


@njit(**_BORROWED)
def _row_merge(x, mask, masked, mode, out, ms, cs, rs, tops, counts, rests, values, bad, buffer, span, axis, i):
    m, count, rest = _merge_line(ms, cs, rs, i, axis)
    _finish_merged(x, mask, masked, mode, out, tops, counts, rests, values, bad, buffer, i, m, count, rest,
                   x.shape[1], span, axis)


@njit(**_BORROWED)
def _row_segment_output(x, mask, masked, mode, out, ms, tops, values, bad, span, parts, item):
    """Phase 4 of a long row: the outputs of one segment (flagged rows are skipped)."""
    i = item // parts
    if bad[i] or not (mode == SOFTMAX or mode == LOG_SOFTMAX):
        return
    s = item % parts
    a = s * span
    b = min(a + span, x.shape[1])
    top = tops[i]
    # float32 softmax scales the stored terms, relative to the segment's max or
    # shift (ms); float64 recomputes them from the row's max.
    stored = mode == SOFTMAX and _single(x)
    weight = 1.0
    if stored and ms[i, s] != top:
        weight = _exp_exact_difference(ms[i, s], top)
    _row_output(x, mask, masked, i, a, b, top, values[i], weight / values[i], out, mode, stored)


# ---------------------------------------------------------------------------
# Columns: tiles x[r0:r1, c0:c0 + w]; the lines are the columns; every loop
# runs along a row of the tile (contiguous), with per-column accumulators.


@njit(**_BORROWED)
def _tile_max(x, mask, masked, r0, r1, c0, w, high, low):
    """Per-column max keys (``high``) and least keys (``low``, for NaN) of the tile
    (both arrays start at ``-inf``'s key).  Four rows a step without a mask:
    the per-column keys are loaded and stored once for four rows."""
    _wide_vectors()
    lowest = _minus_inf_key(x[r0, c0])
    if masked:
        for i in range(r0, r1):
            row = x[i, c0:c0 + w]
            include = mask[i, c0:c0 + w]
            for j in range(w):
                key = _key(row[j]) if include[j] else lowest
                high[j] = key if key > high[j] else high[j]
                low[j] = key if key < low[j] else low[j]
        return
    last = r1 - (r1 - r0) % 4
    for i in range(r0, last, 4):
        a, b, c, d = x[i, c0:c0 + w], x[i + 1, c0:c0 + w], x[i + 2, c0:c0 + w], x[i + 3, c0:c0 + w]
        for j in range(w):
            ka, kb, kc, kd = _key(a[j]), _key(b[j]), _key(c[j]), _key(d[j])
            top = max(max(ka, kb), max(kc, kd))
            bottom = min(min(ka, kb), min(kc, kd))
            high[j] = top if top > high[j] else high[j]
            low[j] = bottom if bottom < low[j] else low[j]
    for i in range(last, r1):
        row = x[i, c0:c0 + w]
        for j in range(w):
            key = _key(row[j])
            high[j] = key if key > high[j] else high[j]
            low[j] = key if key < low[j] else low[j]


@njit(**_BORROWED)
def _tile_sum_fast(x, mask, masked, r0, r1, c0, w, m, mf, count, rest, out, store):
    """float32: per-column counts and sums of :func:`_term7` terms (sequential per column),
    also stored in ``out`` when ``store`` (softmax).

    Without a mask, four rows per step: four independent terms per column in
    flight, the accumulators loaded and stored once.
    """
    _wide_vectors()
    if masked:
        for i in range(r0, r1):
            row = x[i, c0:c0 + w]
            include = mask[i, c0:c0 + w]
            target = out[i, c0:c0 + w] if store else out[0, 0:0]
            for j in range(w):
                v = row[j]
                inc = include[j] != 0
                t = _fast_term(x, v, mf[j]) if inc else 0.0
                top = inc and v == m[j]
                if store:
                    target[j] = t
                rest[j] += 0.0 if top else t
                count[j] += 1 if top else 0
        return
    last = r1 - (r1 - r0) % 4
    if store:
        for i in range(r0, last, 4):
            a, b, c, d = x[i, c0:c0 + w], x[i + 1, c0:c0 + w], x[i + 2, c0:c0 + w], x[i + 3, c0:c0 + w]
            oa, ob, oc, od = out[i, c0:c0 + w], out[i + 1, c0:c0 + w], out[i + 2, c0:c0 + w], out[i + 3, c0:c0 + w]
            for j in range(w):
                top, shift = m[j], mf[j]
                va, vb, vc, vd = a[j], b[j], c[j], d[j]
                ta, tb = _fast_term(x, va, shift), _fast_term(x, vb, shift)
                tc, td = _fast_term(x, vc, shift), _fast_term(x, vd, shift)
                oa[j], ob[j], oc[j], od[j] = ta, tb, tc, td
                rest[j] += ((0.0 if va == top else ta) + (0.0 if vb == top else tb)) + (
                    (0.0 if vc == top else tc) + (0.0 if vd == top else td))
                count[j] += (1 if va == top else 0) + (1 if vb == top else 0) + (1 if vc == top else 0) + (
                    1 if vd == top else 0)
    else:
        for i in range(r0, last, 4):
            a, b, c, d = x[i, c0:c0 + w], x[i + 1, c0:c0 + w], x[i + 2, c0:c0 + w], x[i + 3, c0:c0 + w]
            for j in range(w):
                top, shift = m[j], mf[j]
                va, vb, vc, vd = a[j], b[j], c[j], d[j]
                ta = 0.0 if va == top else _fast_term(x, va, shift)
                tb = 0.0 if vb == top else _fast_term(x, vb, shift)
                tc = 0.0 if vc == top else _fast_term(x, vc, shift)
                td = 0.0 if vd == top else _fast_term(x, vd, shift)
                rest[j] += (ta + tb) + (tc + td)
                count[j] += (1 if va == top else 0) + (1 if vb == top else 0) + (1 if vc == top else 0) + (
                    1 if vd == top else 0)
    for i in range(last, r1):
        row = x[i, c0:c0 + w]
        target = out[i, c0:c0 + w] if store else out[0, 0:0]
        for j in range(w):
            v = row[j]
            t = _fast_term(x, v, mf[j])
            if store:
                target[j] = t
            rest[j] += 0.0 if v == m[j] else t
            count[j] += 1 if v == m[j] else 0


@njit(**_REASSOC_BORROWED)
def _tile_sum_single(x, r0, r1, c0, w, top, s, found, total, out, store, scratch):
    """float32 terms of the tile ``x[r0:r1, c0:c0 + w]`` (no mask) relative to each
    column's exact shift ``s`` (:func:`_shift32` of the tile's column max ``top``),
    as :func:`_row_sum_single` does for a row.

    ``store`` (softmax): every term goes to ``out`` and ``total`` gets their
    float64 sums, the max's included (:func:`_term32`'s terms, stored again by
    :func:`_stored_term32` where a step holds an entry in ``[_LOWEST32,
    FLUSH32)``).  Otherwise the entries equal to ``top`` are counted in
    ``found`` (float32, exact below ``2**24`` rows) and ``total`` gets the
    float64 sums of the other entries' :func:`_term32` terms.

    Four rows a step, in two loops: their terms in float32 lanes (into ``out``
    or ``scratch``, four rows of ``out``'s dtype: one type for both), then
    their float64 sums, each column's accumulators loaded and stored once.  A
    row a step ran no faster than the float64 terms of :func:`_tile_sum_fast`
    (four rows a step).  The last step may hold fewer rows (``k``): the others
    repeat its first row and are left out of the sums.
    """
    _wide_vectors()
    one = _F32(1.0)
    for i in range(r0, r1, 4):
        k = min(4, r1 - i)
        ib, ic, id = i + (1 if k > 1 else 0), i + (2 if k > 2 else 0), i + (3 if k > 3 else 0)
        a, b, c, d = x[i, c0:c0 + w], x[ib, c0:c0 + w], x[ic, c0:c0 + w], x[id, c0:c0 + w]
        if store:
            ta, tb, tc, td = out[i, c0:c0 + w], out[ib, c0:c0 + w], out[ic, c0:c0 + w], out[id, c0:c0 + w]
            band = _ZERO_32
            for j in range(w):
                shift = s[j]
                ea, eb, ec, ed = _F32(a[j]) - shift, _F32(b[j]) - shift, _F32(c[j]) - shift, _F32(d[j]) - shift
                ta[j], tb[j], tc[j], td[j] = _term32(ea), _term32(eb), _term32(ec), _term32(ed)
                band += ((one if _LOWEST32 <= ea < FLUSH32 else _ZERO_32) + (
                    one if _LOWEST32 <= eb < FLUSH32 else _ZERO_32)) + ((
                        one if _LOWEST32 <= ec < FLUSH32 else _ZERO_32) + (
                        one if _LOWEST32 <= ed < FLUSH32 else _ZERO_32))
            if band != _ZERO_32:
                for j in range(w):
                    shift = s[j]
                    ta[j], tb[j] = _stored_term32(_F32(a[j]) - shift), _stored_term32(_F32(b[j]) - shift)
                    tc[j], td[j] = _stored_term32(_F32(c[j]) - shift), _stored_term32(_F32(d[j]) - shift)
        else:
            ta, tb, tc, td = scratch[0], scratch[1], scratch[2], scratch[3]
            for j in range(w):
                shift, high = s[j], top[j]
                va, vb, vc, vd = _F32(a[j]), _F32(b[j]), _F32(c[j]), _F32(d[j])
                ta[j] = _ZERO_32 if va == high else _term32(va - shift)
                tb[j] = _ZERO_32 if vb == high else _term32(vb - shift)
                tc[j] = _ZERO_32 if vc == high else _term32(vc - shift)
                td[j] = _ZERO_32 if vd == high else _term32(vd - shift)
                found[j] += ((one if va == high else _ZERO_32) + (one if vb == high and k > 1 else _ZERO_32)) + (
                    (one if vc == high and k > 2 else _ZERO_32) + (one if vd == high and k > 3 else _ZERO_32))
        for j in range(w):
            total[j] += (np.float64(ta[j]) + (np.float64(tb[j]) if k > 1 else 0.0)) + (
                (np.float64(tc[j]) if k > 2 else 0.0) + (np.float64(td[j]) if k > 3 else 0.0))


@njit(**_BORROWED)
def _tile_sum_exact(x, mask, masked, r0, r1, c0, w, m, mf, count, rest, error, out, store):
    """Per-column counts and TwoSum-compensated sums of exact terms.

    ``rest + error`` is within ``u |S| + n**2 u**2 S`` of the exact sum ``S``
    of the terms (cascaded TwoSum: Ogita, Rump & Oishi's Sum2).
    """
    _wide_vectors()
    for i in range(r0, r1):
        row = x[i, c0:c0 + w]
        include = mask[i, c0:c0 + w] if masked else mask[0, 0:0]
        target = out[i, c0:c0 + w] if store else out[0, 0:0]
        for j in range(w):
            v = row[j]
            inc = (not masked) or include[j] != 0
            t = _exact_term(x, v, mf[j]) if inc else 0.0
            top = inc and v == m[j]
            if store:
                target[j] = t
            t = 0.0 if top else t
            s = rest[j] + t
            virtual = s - rest[j]
            error[j] += (rest[j] - (s - virtual)) + (t - virtual)
            rest[j] = s
            count[j] += 1 if top else 0


@njit(**_REASSOC_BORROWED)
def _tile_accumulate(total, part):
    for j in range(total.shape[0]):
        total[j] += part[j]


@njit(**_STRICT)
def _tile_maxima(x, mask, masked, r0, r1, c0, w, m, mf):
    """The tile's column maxima ``m`` (float64; NaN where a column holds one) and
    ``mf``: the max where it is finite (0 elsewhere: those columns' terms are
    never used)."""
    lowest = _minus_inf_key(x[r0, c0])
    high = np.full(w, lowest)
    low = np.full(w, lowest)
    _tile_max(x, mask, masked, r0, r1, c0, w, high, low)
    for j in range(w):
        value = np.float64(_unkey(high[j], x[r0, c0]))
        nan = low[j] < lowest or value != value
        m[j] = np.nan if nan else value
        mf[j] = value if math.isfinite(value) and not nan else 0.0


@njit(**_STRICT)
def _tile_sums_single(x, mask, mode, out, store, r0, r1, c0, w, m, mf, count, rest):
    """float32 terms for the tile (:func:`_tile_sum_single`) where every column whose
    max is finite has an exact shift (and, for logsumexp, a max of at least
    ``LSE_SINGLE_ABOVE``): whether it took them.

    softmax: ``count`` 0, ``rest`` the total of the stored terms relative to
    the shift, and ``m`` replaced by the shift (the reference of the column's
    state: the merge and the output pass weigh the tile by ``exp(s - M)``).
    log_softmax and logsumexp: ``(count, rest)`` relative to the max, the rest
    brought back by ``exp(s - m)``; a log_softmax column whose rest is below
    ``rows * FLUSHED_REST`` is summed again with float64 terms, as a row is
    (each tile's rest then keeps its flushed terms under ``2**-26`` of it, and
    so does their merge).
    """
    shift = np.zeros(w, np.float32)
    top = np.zeros(w, np.float32)
    for j in range(w):
        if not math.isfinite(m[j]):
            continue  # its sums are never used (flagged, or an empty tile of the column: rest 0)
        shift[j], ok = _shift32(m[j])
        if not ok or (mode == LOGSUMEXP and m[j] < LSE_SINGLE_ABOVE):
            return False
        top[j] = _F32(m[j])
    found = np.zeros(w, np.float32)
    total = np.zeros(w)
    _tile_sum_single(x, r0, r1, c0, w, top, shift, found, total, out, store, np.empty((4, w), out.dtype))
    rows = r1 - r0
    for j in range(w):
        if not math.isfinite(m[j]):
            count[j], rest[j] = 0.0, 0.0
        elif store:
            count[j], rest[j] = 0.0, total[j]
            m[j] = np.float64(shift[j])
        else:
            rest[j], kept = _single_rest(mode, m[j], shift[j], total[j], rows)
            count[j] = np.float64(found[j])
            if not kept:
                counts = np.zeros(1, np.int64)
                rest[j] = 0.0
                _tile_sum_fast(x, mask, False, r0, r1, c0 + j, 1, m[j:j + 1], mf[j:j + 1], counts, rest[j:j + 1], out,
                               False)
                count[j] = np.float64(counts[0])
    return True


@njit(**_STRICT)
def _tile_sums(x, mask, masked, mode, out, store, r0, r1, c0, w, m, mf, count, rest):
    """Per-column ``count`` and ``rest`` of the tile relative to the maxima ``m``
    (fast or exact sums); 0 for columns whose max is not finite.

    float32 tiles without a mask take float32 terms where they can
    (:func:`_tile_sums_single`, which may replace softmax's ``m`` by the
    reference its rest is relative to)."""
    if _single(x) and not masked and mode != STATE:
        if _tile_sums_single(x, mask, mode, out, store, r0, r1, c0, w, m, mf, count, rest):
            return
    counts = np.zeros(w, np.int64)
    for j in range(w):
        rest[j] = 0.0
    if _exact_sums(x, mode):
        error = np.zeros(w)
        _tile_sum_exact(x, mask, masked, r0, r1, c0, w, m, mf, counts, rest, error, out, store)
        _tile_accumulate(rest, error)
    else:
        _tile_sum_fast(x, mask, masked, r0, r1, c0, w, m, mf, counts, rest, out, store)
    for j in range(w):
        finite = math.isfinite(m[j])
        count[j] = np.float64(counts[j]) if finite else 0.0
        rest[j] = rest[j] if finite else 0.0


@njit(**_BORROWED)
def _column_sum_exact(x, mask, masked, c, m):
    """``(count, rest)`` of column ``c`` with exact terms and TwoSum (the float32 recheck; strided)."""
    _wide_vectors()
    count = 0
    rest = 0.0
    error = 0.0
    for i in range(x.shape[0]):
        v = x[i, c]
        inc = (not masked) or mask[i, c] != 0
        t = _exact_term(x, v, m) if inc else 0.0
        top = inc and v == m
        rest, e = _two_sum(rest, 0.0 if top else t)
        error += e
        count += 1 if top else 0
    return np.float64(count), rest + error


@njit(**_BORROWED)
def _tile_output(x, mask, masked, mode, out, r0, r1, c0, w, mf, norm, scale, halves, stored):
    """softmax / log_softmax of the tile, given each column's ``mf`` (float64 max),
    ``norm`` (``L``, or ``c + r``), and the ``scale`` of stored float32 terms with
    its float32 ``halves`` (``hi``, ``lo``: :func:`_scale_halves`).

    The stored terms are scaled by one FMA of the halves, unless a column's
    scale is below ``SCALE_FLOOR`` (terms relative to the shift 0 with a huge
    total, or weighed far down by the merge): then by the float64 product.
    Flagged columns get garbage here; the caller overwrites them.
    """
    _wide_vectors()
    fma = True
    if stored and _single(x):
        low = 1.0
        for j in range(w):
            low = min(low, scale[j])
        fma = not (low < SCALE_FLOOR)  # (a NaN scale is a flagged column's)
    for i in range(r0, r1):
        row = x[i, c0:c0 + w]
        target = out[i, c0:c0 + w]
        include = mask[i, c0:c0 + w] if masked else mask[0, 0:0]
        if mode == LOG_SOFTMAX:
            if masked:
                for j in range(w):
                    value = (np.float64(row[j]) - mf[j]) - norm[j]
                    target[j] = value if include[j] else -np.inf
            else:
                for j in range(w):
                    target[j] = (np.float64(row[j]) - mf[j]) - norm[j]
        elif stored:
            if _single(x):
                # As for rows (_row_output): one FMA in float32 lanes.
                hi, lo = halves[0], halves[1]
                if fma:
                    for j in range(w):
                        t = _F32(target[j])  # float32 (the cast only types the float64 copy)
                        target[j] = _fma32(t, hi[j], t * lo[j])
                else:
                    for j in range(w):
                        target[j] = np.float64(target[j]) * scale[j]
            else:
                for j in range(w):
                    target[j] = target[j] / norm[j]
        else:
            for j in range(w):
                t = _exact_term(x, row[j], mf[j]) / norm[j]
                target[j] = t if (not masked) or include[j] else 0.0


@njit(**_STRICT)
def _tile_item(x, mask, masked, mode, out, ms, cs, rs, tops, counts, rests, values, bad, buffer, axis, rows, width,
               parts, blocks, phase, item):
    """Tile ``(item // blocks, item % blocks)`` of the columns, in phase 0 or 2.

    Whole columns in the tile (``parts == 1``): their state and results
    while the tile is in cache.  Otherwise as for long rows: phase 0 the
    tile's state (fast sums) or its maxima only (exact sums), phase 2 the
    exact sums relative to the columns' maxima (``tops``, from phase 1).
    """
    n, lines = x.shape
    g = item // blocks
    c0 = (item % blocks) * width
    w = min(width, lines - c0)
    r0 = g * rows
    r1 = min(r0 + rows, n)
    m = np.empty(w)
    mf = np.empty(w)
    count = np.zeros(w)
    rest = np.zeros(w)
    # softmax stores its terms: float32 always (scaled in phase 4 when the
    # tile is a segment), float64 when the tile holds whole columns.
    store = mode == SOFTMAX and (parts == 1 or not _exact_sums(x, mode))
    if phase == 2:
        for j in range(w):
            m[j] = tops[c0 + j]
            mf[j] = m[j] if math.isfinite(m[j]) else 0.0
    else:
        _tile_maxima(x, mask, masked, r0, r1, c0, w, m, mf)
    if phase == 2 or parts == 1 or not _exact_sums(x, mode):
        _tile_sums(x, mask, masked, mode, out, store, r0, r1, c0, w, m, mf, count, rest)
    for j in range(w):
        ms[g, c0 + j] = m[j]
        cs[g, c0 + j] = count[j]
        rs[g, c0 + j] = rest[j]
    if parts > 1:
        return
    # Whole columns: finish them and write their results now.
    norm = np.empty(w)
    scale = np.empty(w)
    halves = np.empty((2, w), np.float32)
    for j in range(w):
        c = c0 + j
        _finish_merged(x, mask, masked, mode, out, tops, counts, rests, values, bad, buffer, c, m[j], count[j],
                       rest[j], n, n, axis)
        norm[j] = values[c] if not bad[c] else 1.0
        scale[j] = 1.0 / norm[j]
        halves[0, j], halves[1, j] = _scale_halves(scale[j])
    if mode == SOFTMAX or mode == LOG_SOFTMAX:
        _tile_output(x, mask, masked, mode, out, r0, r1, c0, w, mf, norm, scale, halves, store)


@njit(**_BORROWED)
def _tile_top(ms, tops, width, block):
    """Phase 1 of exact sums in column tiles: each column's merged max into ``tops``."""
    c0 = block * width
    for c in range(c0, min(c0 + width, ms.shape[1])):
        tops[c] = _line_top(ms, c, 0)


@njit(**_BORROWED)
def _tile_merge(x, mask, masked, mode, out, ms, cs, rs, tops, counts, rests, values, bad, buffer, axis, rows, width,
                block):
    """Phase 3 of columns in row segments: merge the tiles' states of the block's columns."""
    lines = x.shape[1]
    c0 = block * width
    for c in range(c0, min(c0 + width, lines)):
        m, count, rest = _merge_line(ms, cs, rs, c, axis)
        _finish_merged(x, mask, masked, mode, out, tops, counts, rests, values, bad, buffer, c, m, count, rest,
                       x.shape[0], rows, axis)


@njit(**_BORROWED)
def _tile_scales(piece_tops, tops, values, bad, stored, mf, norm, scale, halves):
    """Phase 4's per-column ``mf``, ``norm``, ``scale`` and its ``halves`` of a band
    (flagged columns: 0, 1, 1).

    ``stored`` (float32 softmax): the scale carries the weight ``exp(m_g - m)``
    of the tile's reference ``m_g`` (its max, or the shift of its float32
    terms) against the column's ``m``.  Branch-free, so that the weights'
    ``exp`` vectorises across the columns.
    """
    _wide_vectors()
    for j in range(tops.shape[0]):
        top = tops[j]
        ok = bad[j] == 0
        mf[j] = top if ok else 0.0
        norm[j] = values[j] if ok else 1.0
        here = piece_tops[j]
        weight = _exp_exact_difference(here, top if ok else here) if stored else 1.0
        scale[j] = (weight if ok and here != top else 1.0) / norm[j]
        halves[0, j], halves[1, j] = _scale_halves(scale[j])


#: Phase 4 of columns in row segments takes bands of this many tiles' columns
#: (the rows of a tile's height, this wide): writing one array while reading
#: another, 2 KiB pieces of rows at a stride ran 1.35x slower than whole rows
#: (16 KiB) in a microbenchmark of the log_softmax pass, (4096, 4096) float32.
OUTPUT_TILES = 8


@njit(**_STRICT)
def _tile_segment_output(x, mask, masked, mode, out, ms, tops, values, bad, rows, width, blocks, item):
    """Phase 4 of columns in row segments: the outputs of one band (:data:`OUTPUT_TILES`)."""
    if not (mode == SOFTMAX or mode == LOG_SOFTMAX):
        return
    n, lines = x.shape
    bands = -(-blocks // OUTPUT_TILES)
    g = item // bands
    c0 = (item % bands) * OUTPUT_TILES * width
    w = min(OUTPUT_TILES * width, lines - c0)
    r0 = g * rows
    r1 = min(r0 + rows, n)
    mf = np.empty(w)
    norm = np.empty(w)
    scale = np.empty(w)
    halves = np.empty((2, w), np.float32)
    stored = _single(x) and mode == SOFTMAX
    _tile_scales(ms[g, c0:c0 + w], tops[c0:c0 + w], values[c0:c0 + w], bad[c0:c0 + w], stored, mf, norm, scale,
                 halves)
    _tile_output(x, mask, masked, mode, out, r0, r1, c0, w, mf, norm, scale, halves, stored)


# ---------------------------------------------------------------------------
# The work function and its drivers.


#: Phases of lines in pieces (long rows, tall columns); one item is a piece
#: (segment, tile) or a line (a block of columns).
PIECES, TOPS, EXACT_SUMS, MERGE, OUTPUT = 0, 1, 2, 3, 4


@njit(**_STRICT)
def _items(x, mask, masked, mode, phase, out, pieces, per_line, bad, axis, span, width, parts, blocks, start, stop):
    """Items ``start:stop`` of phase ``phase`` of the plan (:func:`plan`): the forward
    entry point (threads take disjoint ranges).  Returns how many of the lines
    it finished are flagged.

    ``per_line`` holds each line's max, count, rest and value (float64 rows);
    ``pieces`` the max, count and rest of each piece of a line (segments of
    rows: ``(lines, parts)``; tiles down columns: ``(parts, lines)``).
    """
    tops, counts, rests, values = per_line[0], per_line[1], per_line[2], per_line[3]
    ms, cs, rs = pieces[0], pieces[1], pieces[2]
    buffer = np.empty(CHUNK)
    if axis == 1 and parts == 1:
        _rows_whole(x, mask, masked, mode, out, tops, counts, rests, values, bad, buffer, start, stop)
    else:
        for item in range(start, stop):
            if axis == 1:
                if phase == PIECES or phase == EXACT_SUMS:
                    _row_piece(x, mask, masked, mode, out, ms, cs, rs, tops, buffer, span, parts, phase, item)
                elif phase == TOPS:
                    tops[item] = _line_top(ms, item, axis)
                elif phase == MERGE:
                    _row_merge(x, mask, masked, mode, out, ms, cs, rs, tops, counts, rests, values, bad, buffer, span,
                               axis, item)
                else:
                    _row_segment_output(x, mask, masked, mode, out, ms, tops, values, bad, span, parts, item)
            elif phase == PIECES or phase == EXACT_SUMS:
                _tile_item(x, mask, masked, mode, out, ms, cs, rs, tops, counts, rests, values, bad, buffer, axis, span,
                           width, parts, blocks, phase, item)
            elif phase == TOPS:
                _tile_top(ms, tops, width, item)
            elif phase == MERGE:
                _tile_merge(x, mask, masked, mode, out, ms, cs, rs, tops, counts, rests, values, bad, buffer, axis, span,
                            width, item)
            else:
                _tile_segment_output(x, mask, masked, mode, out, ms, tops, values, bad, span, width, blocks, item)
    # The number of lines this call finished and flagged (the caller's check).
    if not (parts == 1 or phase == MERGE):
        return 0
    first, last = (start, stop) if axis == 1 else (start * width, min(stop * width, x.shape[1]))
    flagged = 0
    for line in range(first, last):
        flagged += bad[line]
    return flagged


def plan(shape, axis, itemsize, exact, normalised):
    """``(span, width, parts, blocks, phases)`` of a 2-D view; ``phases``: ``(phase, items)`` pairs.

    Rows: ``span`` entries per segment, ``parts`` segments per row.  Columns:
    tiles of ``span`` rows by ``width`` columns, ``parts`` tiles down a
    column, ``blocks`` across.  Lines in one piece take one phase; lines in
    pieces take ``PIECES``, (exact sums) ``TOPS`` and ``EXACT_SUMS``,
    ``MERGE``, and (softmax, log_softmax) ``OUTPUT``.
    """
    if axis == 1:
        lines, n = shape
        span, width, blocks = min(n, SEGMENT), 0, 0
        parts = -(-n // SEGMENT)
        groups = lines
    else:
        n, lines = shape
        width = min(lines, TILE_WIDTH)
        span = max(16, TILE_BYTES // (width * itemsize))
        if span >= n:
            # Whole columns fit: widen the tile to what the budget allows.
            span = n
            width = min(lines, max(width, (TILE_BYTES // (n * itemsize)) // 16 * 16))
        blocks = -(-lines // width)
        parts = -(-n // span)
        groups = blocks
    pieces = groups * parts if axis == 0 else lines * parts
    if parts == 1:
        return span, width, parts, blocks, ((PIECES, pieces),)
    phases = [(PIECES, pieces)]
    if exact:
        phases += [(TOPS, groups), (EXACT_SUMS, pieces)]
    phases.append((MERGE, groups))
    if normalised:
        phases.append((OUTPUT, pieces if axis == 1 else parts * -(-blocks // OUTPUT_TILES)))
    return span, width, parts, blocks, tuple(phases)


# ---------------------------------------------------------------------------
# Backward of softmax / log_softmax (torch autograd): one pass to sum, one to
# write, sums in float64.  Values where y (or exp(z)) is 0 are those of the
# op form in lse_dispatch._autodiff (softmax_vjp, log_softmax_vjp).


@njit(**_REASSOC_BORROWED)
def _backward_sums(y, g, mask, masked, log, totals, b0, b1):
    """``totals[:b1 - b0]``: each row's ``sum y g`` (softmax) or ``sum g`` over included
    entries (log_softmax), rows ``b0:b1``, in float64 (reassociated: vectorised)."""
    _wide_vectors()
    for i in range(b0, b1):
        row, grad = y[i], g[i]
        include = mask[i] if masked else mask[0, 0:0]
        total = 0.0
        if log:
            for j in range(row.shape[0]):
                total += np.float64(grad[j]) if (not masked) or include[j] else 0.0
        else:
            for j in range(row.shape[0]):
                w = np.float64(row[j])
                total += 0.0 if w == 0.0 else w * np.float64(grad[j])
        totals[i - b0] = total


@njit(**_BORROWED)
def _backward_rows(y, g, mask, masked, log, out, totals, start, stop):
    """Rows ``start:stop`` of the backward, ``totals.shape[0]`` at a time: every row's
    sum, then every row's output, as :func:`_rows_whole` (a row's output waits on
    its sum; in blocks the next row's sum need not wait behind it).  The loop
    is here, not in the caller: a call per row passing five arrays cost more
    than a short row's work."""
    _wide_vectors()
    block = totals.shape[0]
    for b0 in range(start, stop, block):
        b1 = min(b0 + block, stop)
        _backward_sums(y, g, mask, masked, log, totals, b0, b1)
        for i in range(b0, b1):
            total = totals[i - b0]
            row, grad, target = y[i], g[i], out[i]
            include = mask[i] if masked else mask[0, 0:0]
            if log:
                for j in range(row.shape[0]):
                    # float32 input: the degree-7 exp (2**-33 relative) is exact enough.
                    p = _exp7(np.float64(row[j])) if _single(y) else _exp(np.float64(row[j]))
                    value = np.float64(grad[j]) - (0.0 if p == 0.0 else p * total)
                    target[j] = value if (not masked) or include[j] else 0.0
            else:
                for j in range(row.shape[0]):
                    w = np.float64(row[j])
                    target[j] = w * (0.0 if w == 0.0 else np.float64(grad[j]) - total)


@njit(**_STRICT)
def _backward_columns(y, g, mask, masked, log, out, c0, c1):
    _wide_vectors()
    width = c1 - c0
    totals = np.zeros(width)
    for i in range(y.shape[0]):
        row, grad = y[i, c0:c1], g[i, c0:c1]
        include = mask[i, c0:c1] if masked else mask[0, 0:0]
        if log:
            for j in range(width):
                totals[j] += np.float64(grad[j]) if (not masked) or include[j] else 0.0
        else:
            for j in range(width):
                w = np.float64(row[j])
                totals[j] += 0.0 if w == 0.0 else w * np.float64(grad[j])
    for i in range(y.shape[0]):
        row, grad, target = y[i, c0:c1], g[i, c0:c1], out[i, c0:c1]
        include = mask[i, c0:c1] if masked else mask[0, 0:0]
        if log:
            for j in range(width):
                p = _exp7(np.float64(row[j])) if _single(y) else _exp(np.float64(row[j]))
                value = np.float64(grad[j]) - (0.0 if p == 0.0 else p * totals[j])
                target[j] = value if (not masked) or include[j] else 0.0
        else:
            for j in range(width):
                w = np.float64(row[j])
                target[j] = w * (0.0 if w == 0.0 else np.float64(grad[j]) - totals[j])


@njit(**_STRICT)
def _backward_items(y, g, mask, masked, axis, log, out, start, stop):
    """Items ``start:stop`` of the backward (rows, or blocks of columns): its entry point."""
    if axis == 1:
        totals = np.empty(_rows_per_block(y.shape[1], y.itemsize))
        _backward_rows(y, g, mask, masked, log, out, totals, start, stop)
        return
    for item in range(start, stop):
        c0 = item * BACKWARD_WIDTH
        _backward_columns(y, g, mask, masked, log, out, c0, min(c0 + BACKWARD_WIDTH, y.shape[1]))


def backward_items(shape, axis):
    """Items of the backward of a 2-D view: rows, or blocks of ``BACKWARD_WIDTH`` columns."""
    return shape[0] if axis == 1 else -(-shape[1] // BACKWARD_WIDTH)


# ---------------------------------------------------------------------------
# Weighted rows: the state of logsumexp with ``b``, in float64 (float32 input
# and weights too, as the shared code forms them), with the terms of
# lse_dispatch._state._weighted_terms.  A row of finite entries and finite
# weights that includes some entry gets its state; any other row is flagged
# for the shared functions.

_TINY = 2.2250738585072014e-308  # the smallest normal float64
_LOG_TINY = math.log(_TINY)
_S_HIGH, _S_LOW = underflow_shift(_TINY, 2.0**-52)
_MANTISSA = (1 << 52) - 1
_ONE_BITS = 1023 << 52
_LN2_DOUBLE = math.log(2.0)
#: ln 2 times the largest ``log2(1 + f) - f`` on [0, 1] (at ``f = 1/ln 2 - 1``:
#: 0.0596603), rounded up: the most :func:`_rough_log` is below ``ln|b|``.  The
#: 4e-5 it is rounded up by covers the roundings of the rough and the exact
#: exponents where ``|log|b||`` is at most 710 (a few ``u 710``); the floor of
#: the candidates adds ``2**-46 |rough max|`` for large exponents.
ROUGH_DEFICIT = 0.0597


@njit(**_CONTRACT)
def _rough_log(magnitude):
    """``ln(magnitude)`` of a normal float64 from its bits: ``(k + f) ln 2`` for
    ``magnitude = 2**k (1 + f)``, never above it (``log2(1 + f) >= f``) and at
    most ``ROUGH_DEFICIT`` below, up to the roundings of the product."""
    bits = _bits(magnitude)
    fraction = _from_bits((bits & _MANTISSA) | _ONE_BITS) - 1.0
    return (np.float64((bits >> 52) - 1023) + fraction) * _LN2_DOUBLE


@njit(**_STRICT)
def _weighted_term(a, m, b):
    """``|b| exp(a - m)`` of an entry below the max, as ``_state._weighted_terms`` forms it."""
    magnitude = abs(b)
    if magnitude < _TINY:  # subnormal b: exp(a - m) alone could overflow
        return np.exp((a + np.log(magnitude)) - m)
    d, error = _two_sum(a, -m)
    if d >= _LOG_TINY:
        return np.exp(d) * (1.0 + error) * magnitude
    # exp(d) would be subnormal or 0 while |b| is huge: (|b| 2**-1022) exp(d + 1022 ln 2).
    return np.exp((d + _S_HIGH) + _S_LOW) * (1.0 + error) * (magnitude * _TINY)


@njit(**_BORROWED)
def _weighted_rough(row, weights, include, masked, rough):
    """``(rough max, ordinary)``: the max of the rough exponents ``a + _rough_log|b|``
    (stored in ``rough``, ``-inf`` for entries not included or with ``b == 0``), and
    whether the included entries are all finite with normal weights."""
    _wide_vectors()
    rough_max = -np.inf
    ordinary = True
    for j in range(row.shape[0]):
        b = np.float64(weights[j])
        v = -np.inf
        if b != 0.0 and ((not masked) or include[j] != 0):
            a = np.float64(row[j])
            magnitude = abs(b)
            ordinary = ordinary and np.isfinite(a) and _TINY <= magnitude < np.inf
            v = a + _rough_log(magnitude)
            rough_max = max(rough_max, v)
        rough[j] = v
    return rough_max, ordinary


@njit(**_BORROWED)
def _weighted_exact(row, weights, include, masked, exponents):
    """``(m, count, rest, flagged)`` of a row with a log per entry and a term per entry:
    rows with subnormal weights (which :func:`_rough_log` cannot read); rows with a
    non-finite entry or weight, or nothing included, are flagged."""
    _wide_vectors()
    m = -np.inf
    for j in range(row.shape[0]):
        b = np.float64(weights[j])
        v = -np.inf
        if b != 0.0 and ((not masked) or include[j] != 0):
            a = np.float64(row[j])
            if not (np.isfinite(a) and np.isfinite(b)):
                return m, 0.0, 0.0, True
            v = a + np.log(abs(b))
            m = max(m, v)
        exponents[j] = v
    if m == -np.inf:
        return m, 0.0, 0.0, True
    count = 0.0
    total = 0.0
    error = 0.0
    for j in range(row.shape[0]):
        v = exponents[j]
        b = np.float64(weights[j])
        if v == m:
            count += 1.0 if b > 0.0 else -1.0
        elif v != -np.inf:
            term = _weighted_term(np.float64(row[j]), m, b)
            total, e = _two_sum(total, term if b > 0.0 else -term)
            error += e
    return m, count, total + error, False


@njit(**_CONTRACT)
def _weighted_chunk(row, weights, rough, m, floor, buffer, c0, c1):
    """Signed terms of entries ``c0:c1`` into ``buffer``, branch-free (it vectorises):
    the product form with ``a - m`` clamped to ``[log tiny, 0]``.  Returns the IEEE
    bits of the largest magnitude and how many entries need another form (``a - m``
    outside that range, or possibly at the max: rough exponent at least ``floor``)."""
    _wide_vectors()
    largest = 0
    special = 0
    for j in range(c0, c1):
        a = np.float64(row[j])
        b = np.float64(weights[j])
        included = rough[j] != -np.inf
        d, error = _two_sum(a, -m)
        clamped = min(max(d, _LOG_TINY), 0.0)
        t = _exp(clamped) * (1.0 + error) * abs(b)
        t = t if included else 0.0
        odd = included and (d != clamped or rough[j] >= floor)
        special += 1 if odd else 0
        bits = _bits(t)
        largest = bits if bits > largest else largest
        buffer[j - c0] = -t if b < 0.0 else t
    return largest, special


@njit(**_BORROWED)
def _weighted_fixups(row, weights, rough, m, floor, buffer, c0, c1, largest):
    """The entries :func:`_weighted_chunk` counted as special: those at the max go to the
    count (0 in ``buffer``), the others get :func:`_weighted_term`.  Returns the count's
    part and the largest magnitude's bits."""
    _wide_vectors()
    count = 0.0
    for j in range(c0, c1):
        v = rough[j]
        a = np.float64(row[j])
        d = a - m
        if v == -np.inf or not (v >= floor or d < _LOG_TINY or d > 0.0):
            continue
        b = np.float64(weights[j])
        t = 0.0
        if v >= floor and a + np.log(abs(b)) == m:
            count += 1.0 if b > 0.0 else -1.0
        else:
            t = _weighted_term(a, m, b)
        bits = _bits(t)
        largest = bits if bits > largest else largest
        buffer[j - c0] = -t if b < 0.0 else t
    return count, largest


@njit(**_BORROWED)
def _weighted_ordinary(row, weights, rough, rough_max, buffer):
    """``(m, count, rest)`` of a row whose included entries are finite with normal weights.

    Only entries whose rough exponent ``a + _rough_log|b|`` is within the rough
    log's deficit (and the roundings) of the rough max can be at the max; they
    alone take a ``log``.  The terms go ``CHUNK`` at a time through
    :func:`_weighted_chunk` (and :func:`_weighted_fixups` for the few that need
    another form), summed by the exact split (:func:`_split_sum`: signed terms
    below ``2**E`` split as exactly as positive ones), the chunk sums by TwoSum.
    """
    _wide_vectors()
    floor = rough_max - (ROUGH_DEFICIT + 2.0**-46 * (abs(rough_max) + 1.0))
    m = -np.inf
    for j in range(row.shape[0]):
        if rough[j] >= floor:
            m = max(m, np.float64(row[j]) + np.log(abs(np.float64(weights[j]))))
    count = 0.0
    total = 0.0
    error = 0.0
    n = row.shape[0]
    for c0 in range(0, n, CHUNK):
        c1 = min(c0 + CHUNK, n)
        largest, special = _weighted_chunk(row, weights, rough, m, floor, buffer, c0, c1)
        if special:
            found, largest = _weighted_fixups(row, weights, rough, m, floor, buffer, c0, c1, largest)
            count += found
        total, e = _two_sum(total, _split_sum(buffer, c1 - c0, _split_sigma(largest)))
        error += e
    return m, count, total + error


@njit(**_STRICT)
def _weighted_rows(x, w, mask, masked, per_line, bad, start, stop):
    """Rows ``start:stop`` of a weighted logsumexp state: the weighted entry point.

    ``per_line`` gets each row's max ``m`` (of ``a + log|b|`` over included
    entries with ``b != 0``), count (the signs at the max) and rest (the
    signed terms).  Returns the number of rows flagged.
    """
    exponents = np.empty(x.shape[1])  # rough exponents, or exact ones (_weighted_exact)
    buffer = np.empty(CHUNK)
    flagged = 0
    for i in range(start, stop):
        row, weights = x[i], w[i]
        include = mask[i] if masked else mask[0, 0:0]
        rough_max, ordinary = _weighted_rough(row, weights, include, masked, exponents)
        flag = False
        if ordinary and rough_max > -np.inf:
            m, count, rest = _weighted_ordinary(row, weights, exponents, rough_max, buffer)
        else:
            m, count, rest, flag = _weighted_exact(row, weights, include, masked, exponents)
        per_line[0, i] = m
        per_line[1, i] = count
        per_line[2, i] = rest
        bad[i] = 1 if flag else 0
        flagged += 1 if flag else 0
    return flagged


# ---------------------------------------------------------------------------
# The compiled entry points, per dtype.


def _signatures(dtype_name):
    real = types.float32 if dtype_name == "float32" else types.float64
    readonly = types.Array(real, 2, "C", readonly=True)
    mask = types.Array(types.uint8, 2, "C", readonly=True)
    matrix = types.Array(real, 2, "C")
    wide = types.Array(types.float64, 2, "C")
    flags = types.Array(types.uint8, 1, "C")
    i64, boolean = types.int64, types.boolean
    forward = (readonly, mask, boolean, i64, i64, matrix, types.Array(types.float64, 3, "C"), wide, flags,
               i64, i64, i64, i64, i64, i64, i64)
    backward = (readonly, readonly, mask, boolean, i64, boolean, matrix, i64, i64)
    weighted = (readonly, readonly, mask, boolean, wide, flags, i64, i64)
    return forward, backward, weighted


@functools.cache
def compiled(dtype_name, kind="forward"):
    """The compiled entry point ``kind`` (``"forward"``, ``"backward"`` or ``"weighted"``) of a dtype.

    Compiled on first use, or loaded from numba's on-disk cache; the entry
    points are called directly, without the dispatcher's type resolution
    (arguments must have the signature's types, which :mod:`._fused_cpu`
    ensures).  They release the GIL: threads run disjoint item ranges.
    """
    forward, backward, weighted = _signatures(dtype_name)
    if kind == "forward":
        return _items.compile(forward)
    if kind == "weighted":
        return _weighted_rows.compile(weighted)
    return _backward_items.compile(backward)
