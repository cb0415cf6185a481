"""The compiled CPU kernels (``numpy.fused``, ``torch.fused``; numba) on each of their paths.

Paths: rows that fit a segment (state and outputs in one visit), rows longer
than a segment (segment states merged, or summed relative to the row's max,
then an output pass), columns whose whole length fits a tile (``TILE_BYTES``)
and columns in tiles down their length; float32 and float64; with and without
``where``; the ``STATE`` operation (``lse_state``) on each.  Every test forces
the kernel with ``use()`` and checks in the trace that it ran; values are
held to the oracle (4 ulps), with exact values in closed form for long lines
(a few distinct values with multiplicities).  Also: the exponential's error
bound on dense samples, the exact-split sum, the limits (``+inf``, NaN, all
``-inf``) handed to the shared functions, the fused backward, the library
without numba, and numba's cache in a read-only install.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import oracle
from lse_dispatch.backends import _fused_cpu

from ._helpers import INF, NAN, fused_kernels_loaded, in_threads
from ._helpers import LIMIT_ROWS as LIMITS

numba = pytest.importorskip("numba")
mpmath = pytest.importorskip("mpmath")

from lse_dispatch.backends import _numba_kernels as K  # noqa: E402  (needs numba)

ULPS = 4.0
EXACT = {"logsumexp": oracle.exact_logsumexp, "log_softmax": oracle.exact_log_softmax, "softmax": oracle.exact_softmax}
#: Rows longer than a segment (``SEGMENT`` entries): the kernel takes them in pieces.
LONG = K.SEGMENT + 37
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    with fused_kernels_loaded():
        yield


def _fused(library, op, x, **kwargs):
    name = f"{library}.fused"
    if library == "torch":
        torch = pytest.importorskip("torch")
        x = torch.from_numpy(np.ascontiguousarray(x))
        for name_ in ("where", "b"):
            if isinstance(kwargs.get(name_), np.ndarray):
                kwargs[name_] = torch.from_numpy(kwargs[name_])
    with lse_dispatch.use(name), lse_dispatch.trace() as seen:
        result = getattr(lse_dispatch, op)(x, **kwargs)
    (decision,) = seen.records
    assert decision.implementation == name, str(decision)
    if isinstance(result, tuple):
        return tuple(np.asarray(part) for part in result)
    return np.asarray(result)


def _assert_ulps(got, exact, dtype, what, bound=ULPS):
    errors = oracle.ulp_error(np.asarray(got, dtype=np.float64), exact, np.dtype(dtype))
    assert errors.max() <= bound, f"{what}: {errors.max():.2f} ulps at {int(np.argmax(errors))}"


def _assert_each_value(got, data, values, exact, dtype, what):
    """Every distinct output at the entries of ``data`` equal to ``values[k]`` within
    ``ULPS`` of ``exact[k]`` (lines of a few values repeated many times)."""
    for value, want in zip(values, exact):
        found = np.unique(got[data == value])
        _assert_ulps(found, np.full(found.size, want, dtype=object), dtype, f"{what} at {value}")


def _exact_from_counts(values, counts):
    with mpmath.workprec(160):
        lse = mpmath.log(mpmath.fsum(c * mpmath.exp(mpmath.mpf(float(v))) for v, c in zip(values, counts)))
        log_sm = [mpmath.mpf(float(v)) - lse for v in values]
        return lse, np.array(log_sm, dtype=object), np.array([mpmath.exp(t) for t in log_sm], dtype=object)


LIBRARIES = ["numpy", "torch"]
DTYPES = ["float32", "float64"]


# --------------------------------------------------------------------------
# The exponential and the sum.


def test_polynomial_fits_meet_their_bounds():
    """``1 + r q(r)`` with the float64 coefficients, against exp in mpmath on 4001 points of [-ln2/2, ln2/2]."""
    with mpmath.workprec(200):
        half = mpmath.log(2) / 2
        for coefficients, bound in ((K.EXP_COEFFICIENTS, 2.0**-56.5), (K.EXP7_COEFFICIENTS, 2.0**-33.08)):
            first, *rest = coefficients
            worst = 0
            for i in range(4001):
                r = (-half + 2 * half * i / 4000) * (1 + mpmath.mpf(2) ** -40)  # |r| exceeds ln2/2 by rounding only
                q = mpmath.mpf(first)
                for c in rest:
                    q = q * r + mpmath.mpf(c)
                worst = max(worst, abs((1 + r * q) / mpmath.exp(r) - 1))
            assert worst <= bound, f"degree {len(coefficients)}: {float(worst):.3g}"


def _samples():
    rng = np.random.default_rng(17)
    ln2 = math.log(2)
    k = rng.integers(0, 1022, 6000)
    # Dense on [-708, 0], the edges of the reduction (k ln2 +- ln2/2), near 0, the subnormal range.
    return np.concatenate([
        -rng.uniform(0, 708, 20000),
        -(k * ln2 + ln2 / 2) * (1 + rng.uniform(-1e-15, 1e-15, k.size)),
        -(k * ln2 - ln2 / 2) * (1 + rng.uniform(-1e-15, 1e-15, k.size)),
        -rng.uniform(0, 1e-6, 2000),
        [0.0, -0.0, -1e-300, -ln2 / 2, -ln2],
    ])


def _batch(function):
    def apply(d):
        out = np.empty_like(d)
        for i in range(d.size):
            out[i] = function(d[i])
        return out

    return numba.njit(apply)


def test_exp_within_its_bound():
    """:func:`_exp` within 1.7 float64 ulps (its proven bound) where exp(d) is normal,
    :func:`_exp7` within 2**-33 + 2**-52; both carry NaN and give 0 at -inf."""
    d = _samples()
    accurate, fast = _batch(K._exp)(d), _batch(K._exp7)(d)
    with mpmath.workprec(120):
        exact = np.array([float(mpmath.exp(mpmath.mpf(float(v)))) for v in d])
        # Relative errors against the exact values (mpf), not their float64 roundings.
        rel = np.array([float(abs(mpmath.mpf(float(a)) / mpmath.exp(mpmath.mpf(float(v))) - 1)) for a, v in zip(accurate, d)])
        rel7 = np.array([float(abs(mpmath.mpf(float(a)) / mpmath.exp(mpmath.mpf(float(v))) - 1)) for a, v in zip(fast, d)])
    normal = exact >= np.finfo(np.float64).smallest_normal
    assert rel[normal].max() <= 1.7 * 2.0**-53, rel[normal].max() / 2.0**-53
    assert rel7[normal].max() <= 2.0**-33 + 2.0**-52
    tiny = ~normal
    assert np.all(np.abs(accurate[tiny] - exact[tiny]) <= np.finfo(np.float64).smallest_subnormal)
    special = _batch(K._exp)(np.array([-np.inf, np.nan, -746.0, -1e308]))
    assert special[0] == 0 and np.isnan(special[1]) and special[2] == 0 and special[3] == 0


def test_terms_within_their_bounds_and_flushed_below():
    """The terms of the sums: :func:`_term` within 1.7 ulps and :func:`_term7` within
    ``TERM7_ERROR`` on ``[FLUSH, 0]`` (their exponent-bit scaling is exact there),
    exactly 1 at 0 (the max's own term); below, :func:`_term7` gives 0 and :func:`_term`
    goes on down the subnormal range (within a subnormal ulp), 0 below ``_LOWEST``."""
    d = _samples()
    d = d[d >= K.FLUSH]
    accurate, fast = _batch(K._term)(d), _batch(K._term7)(d)
    with mpmath.workprec(120):
        exact = [mpmath.exp(mpmath.mpf(float(v))) for v in d]
        rel = max(float(abs(mpmath.mpf(float(a)) / e - 1)) for a, e in zip(accurate, exact))
        rel7 = max(float(abs(mpmath.mpf(float(a)) / e - 1)) for a, e in zip(fast, exact))
    assert rel <= 1.7 * 2.0**-53, rel / 2.0**-53
    assert rel7 <= K.TERM7_ERROR, math.log2(rel7)
    for function in (K._term, K._term7):
        assert np.all(_batch(function)(np.array([0.0, -0.0])) == 1.0)
    assert not _batch(K._term7)(np.array([K.FLUSH - 1e-9, -701.0, -1e308, -np.inf])).any()
    assert not _batch(K._term)(np.array([-746.0, -1e308, -np.inf])).any()
    low = np.concatenate([np.linspace(-745.1, K.FLUSH, 4001), [-708.39, -708.4, -708.41, -744.44, -745.13]])
    got = _batch(K._term)(low)
    tiny = np.finfo(np.float64).tiny
    with mpmath.workprec(120):
        exact = [mpmath.exp(mpmath.mpf(float(v))) for v in low]
        for value, want in zip(got, exact):
            error = abs(mpmath.mpf(float(value)) - want)
            if want >= tiny:
                assert error <= 1.7 * 2.0**-53 * want, (value, want)
            else:  # one subnormal ulp (the rounding, and 1.7 u of a value below tiny)
                assert error <= np.spacing(0.0), (value, want)


@numba.njit(cache=False)
def _float32_term_errors(first, last, stride, negative):
    """Worst relative errors of :func:`_term32` and :func:`_stored_term32` (normal results,
    against float64 ``exp``, within ``2**-52``) over every ``stride``-th float32 bit
    pattern in ``[first, last)``, the sign bit from ``negative``; and whether the two
    functions differ anywhere there."""
    worst, stored_worst, differ = 0.0, 0.0, False
    sign = np.int64(1) << 31 if negative else np.int64(0)
    for bits in range(first, last, stride):
        d = K._from_bits32(bits | sign)
        exact = math.exp(np.float64(d))
        t, stored = np.float64(K._term32(d)), np.float64(K._stored_term32(d))
        worst = max(worst, abs(t / exact - 1.0))
        stored_worst = max(stored_worst, abs(stored / exact - 1.0))
        differ = differ or t != stored
    return worst, stored_worst, differ


def _float32_bits(value):
    return int(np.array(np.float32(value)).view(np.int32))


def test_float32_terms_within_their_bound():
    """:func:`_term32` and :func:`_stored_term32` agree and stay within ``EXPF_ERROR``
    on every 61st float32 in ``[-87, 88]`` (about 3.5 million; the whole range is
    checked by ``scripts/expf_exhaustive.py``), and on the worst input that found."""
    for negative, last in ((True, _float32_bits(87.0)), (False, _float32_bits(88.0))):
        worst, stored_worst, differ = _float32_term_errors(0, last + 1, 61, negative)
        assert worst <= K.EXPF_ERROR and stored_worst <= K.EXPF_ERROR, (worst * 2**24, stored_worst * 2**24)
        assert not differ
    for d in (-27.378822326660156,):  # the worst of every float32 in [-87, 88]: 1.2286 * 2**-24
        bits = _float32_bits(d) & 0x7FFFFFFF
        worst, _, _ = _float32_term_errors(bits, bits + 1, 1, d < 0)
        assert 1.2 * 2.0**-24 < worst <= K.EXPF_ERROR, worst * 2**24  # the bound is tight
    zero = np.float32(0.0)
    assert K._term32(zero) == 1.0 and K._stored_term32(-zero) == 1.0
    assert K._term32(np.float32(-87.01)) == 0.0 and K._term32(np.float32(-np.inf)) == 0.0


def test_stored_float32_terms_underflow_gradually():
    """Below ``FLUSH32`` softmax's stored terms are subnormal float32: within half a
    subnormal ulp plus ``EXPF_ERROR`` of the value, down to 0 at ``-104`` and ``-inf``."""
    d = np.concatenate([np.linspace(-104.5, -87.0, 20001), [-103.28, -103.97, -1e30, -np.inf]]).astype(np.float32)
    got = np.array([np.float64(K._stored_term32(v)) for v in d])
    exact = np.exp(d.astype(np.float64))
    tiny = np.finfo(np.float32).smallest_subnormal
    assert np.all(np.abs(got - exact) <= 0.5 * float(tiny) + K.EXPF_ERROR * exact)
    assert (got[exact < np.finfo(np.float32).smallest_normal] > 0).any()
    assert got[-1] == 0 and got[-2] == 0


def test_the_float32_shift_makes_every_difference_exact():
    """``x - s`` in float32 equals the exact ``x - s`` for every entry within 127 of the
    max, over maxima across the ranges of :func:`_shift32`; outside them it declines."""
    rng = np.random.default_rng(3)
    maxima = np.concatenate([
        -np.exp(rng.uniform(-30, math.log(2.0**20), 3000)), rng.uniform(0, 87, 500),
        [0.0, -0.0, -1e-38, -(2.0**20) + 1, 87.0, -1.0, -128.0, -127.99],
    ]).astype(np.float32)
    for m in maxima:
        s, ok = K._shift32(float(m))
        assert ok and float(np.float32(s)) == s, m
        s = np.float32(s)
        assert abs(float(m) - float(s)) <= (2.0**-4 if m <= 0 else 87.0)
        x = np.concatenate([m - rng.uniform(0, 127, 200), [m, np.nextafter(m, -np.inf)]]).astype(np.float32)
        x = x[x.astype(np.float64) >= float(m) - 127]
        assert np.array_equal((x - s).astype(np.float64), x.astype(np.float64) - float(s)), m
    for m in (87.01, 1e10, -(2.0**20), -1e30):
        assert not K._shift32(float(np.float32(m)))[1]


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("n", [5, 129, K.SEGMENT + 37])
def test_float64_terms_down_to_the_subnormal_range(library, n):
    """Found 2026-11-30 by ``benchmarks/fuzz_kernels.py``: ``_term`` gave 0 below ``e**-700``,
    so ``logsumexp([0, -700.63, ...])`` (``5.26e-305``, a normal float64) came out 0, and so
    did softmax outputs between ``e**-708.4`` and ``e**-700``: short rows, rows, long rows
    and columns."""
    rng = np.random.default_rng(14)
    rows = []
    long = n > K.SEGMENT  # (one row: the oracle takes microseconds an entry)
    for second in (-700.63,) if long else (-700.63, -705.0, -708.0, -708.39, -720.0, -744.0):
        for top in (0.0,) if long else (0.0, 3.5):
            row = np.full(n, -5e4)
            row[: 4] = (top, top + second, top + second - 1.5, top - 2e3)
            rows.append(rng.permutation(row))
    x = np.array(rows)
    for op in ("logsumexp", "softmax", "log_softmax"):
        exact = EXACT[op](x, axis=-1)
        _assert_ulps(_fused(library, op, x, axis=-1), exact, np.float64, f"{op} {library} rows")
        columns = _fused(library, op, np.ascontiguousarray(x.T), axis=0)
        _assert_ulps(columns if op == "logsumexp" else columns.T, exact, np.float64, f"{op} {library} columns")


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("layout", ["rows", "long-rows", "columns"])
def test_float32_log_softmax_keeps_a_rest_below_the_flushed_terms(library, layout):
    """Found 2026-11-30 by ``benchmarks/fuzz_kernels.py``: ``_term32`` flushes terms below
    ``e**-87`` of the shift, and ``-log1p(r)`` at the max of a row whose other entries are
    all 75 to 98 below it missed them (1242 ulps); such rows take the float64 terms.
    Long rows (in segments; their max in the second) and columns in two tiles (the max
    in the second, of 5 rows) take float32 terms per segment or tile, and each one
    whose rest is that small is summed again with float64 terms (without it: 2058
    ulps on long rows, 5275 on columns)."""
    rng = np.random.default_rng(12)
    n = {"rows": 128, "long-rows": LONG, "columns": _tall(np.float32, 12, 5)}[layout]
    rows = []
    spans = ((75.0, 98.0), (60.0, 90.0), (86.0, 89.0)) if n != LONG else ((75.0, 98.0), (86.0, 89.0))
    for top in (0.52183914, 40.0, -3.7, -9910.0):  # s = 0, and the rounded max
        for low, high in spans:
            row = top - rng.uniform(low, high, n)
            row[min(n - 1, K.SEGMENT + 5)] = top
            rows.append(row)
    x = np.array(rows, dtype=np.float32)
    if layout == "columns":
        assert x.shape[0] == 12 and _fused_cpu._geometry(x.T.shape, (0,), 4, K.LOG_SOFTMAX).plan[3] == 2
    where = rng.random(x.shape) < 0.7
    where[np.arange(x.shape[0]), np.argmax(x, axis=1)] = True
    # The oracle takes about a minute on long rows: there, float64 with an exact sum
    # (every difference to the max is exact, and L carries u64 relative).
    # (and the ulps are counted at the max, -L, and every 101st entry).
    exact_of = EXACT["log_softmax"] if n == 128 else _log_softmax_far_below_the_max
    seen = np.zeros(x.shape, bool)
    seen[:, ::1 if n != LONG else 101] = True
    seen[np.arange(x.shape[0]), np.argmax(x, axis=1)] = True

    def fused(**kwargs):  # rows, or the rows as columns
        if layout != "columns":
            return _fused(library, "log_softmax", x, axis=-1, **kwargs)
        kwargs = {key: np.ascontiguousarray(value.T) for key, value in kwargs.items()}
        return _fused(library, "log_softmax", np.ascontiguousarray(x.T), axis=0, **kwargs).T

    exact = exact_of(x.astype(np.float64), axis=-1)
    _assert_ulps(fused()[seen], exact[seen], np.float32, f"log_softmax {library}")
    exact = exact_of(x.astype(np.float64), axis=-1, where=where)
    got = fused(where=where)
    _assert_ulps(got[where & seen], exact[where & seen], np.float32, f"log_softmax {library} where")


def _log_softmax_far_below_the_max(x, axis, where=None):
    """float64 log_softmax of rows of float32 values: ``(x - m) - log1p(r)``, ``r`` the
    ``math.fsum`` of the other included terms (each ``exp`` of an exact difference)."""
    assert axis == -1
    where = np.ones(x.shape, bool) if where is None else where
    out = np.full(x.shape, -np.inf)
    for i in range(x.shape[0]):
        row = x[i][where[i]]
        top = row.max()
        rest = math.fsum(np.exp(row[row < top] - top)) + (np.count_nonzero(row == top) - 1)
        out[i][where[i]] = (row - top) - math.log1p(rest)
    return out


@pytest.mark.parametrize("library", LIBRARIES)
def test_float32_terms_on_every_range_of_the_max(library):
    """float32 softmax / log_softmax lines whose max takes each branch of :func:`_shift32`
    (``s = 0``, the rounded max, and the float64 terms beyond), with ties, ``-inf``
    entries, a ``where`` mask, and softmax outputs down in the subnormal range; as
    rows, as whole columns and as columns in several tiles."""
    rng = np.random.default_rng(11)
    tail = [0.0, -86.5, -87.5, -90.0, -95.0, -100.0, -103.0, -103.9, -110.0, -np.inf]
    rows = [row + shift for shift in (0.0, 40.0, 86.9, 87.5, 500.0, -3.7, -5000.25, -(2.0**20) + 200, -(2.0**21))
            for row in (np.array(tail + [-1.0, -1.0, -0.5]), rng.standard_normal(13) * 20)]
    x = np.array(rows, dtype=np.float32)
    x[1::2] -= x[1::2].max(axis=1, keepdims=True) - x[0::2].max(axis=1, keepdims=True)  # same maxima
    where = rng.random(x.shape) < 0.8
    where[:, 0] = True
    for op in ("softmax", "log_softmax"):
        exact = EXACT[op](x.astype(np.float64), axis=-1)
        _assert_ulps(_fused(library, op, x, axis=-1), exact, np.float32, f"{op} {library}")
        got = _fused(library, op, x, axis=-1, where=where)
        exact = EXACT[op](x.astype(np.float64), axis=-1, where=where)
        _assert_ulps(got[where], exact[where], np.float32, f"{op} {library} where")
    # logsumexp: float32 terms where the max is at least 1 or far below 0, float64
    # terms between (-3.7 here); every line within the keep rule's one ulp.
    for mask in (None, where):
        got = _fused(library, "logsumexp", x, axis=-1, where=mask)
        exact = oracle.exact_logsumexp(x.astype(np.float64), axis=-1, where=mask)
        _assert_ulps(got, exact, np.float32, f"logsumexp {library} where={mask is not None}", bound=1.0)
    subnormal = _fused(library, "softmax", x[:1], axis=-1)[0]
    assert 0 < subnormal[5] < np.finfo(np.float32).smallest_normal  # e**-100 / 2.34: 1.6e-44
    # The same lines as columns: whole columns in one tile, and (padded below
    # with entries 150 under each column's max, in other tiles whose own maxima
    # take their own shifts, or float64 terms) columns in several tiles.  A tile
    # takes float32 terms only if every column's max has a shift: all the lines
    # (float64 terms), and those whose maxima have shifts (float32 terms).
    shifted = (x.max(axis=1) <= 87.0) & (x.max(axis=1) > -(2.0**20))
    assert 0 < shifted.sum() < len(x) and shifted[0]
    for lines, included_here in ((x, where), (x[shifted], where[shifted])):
        _check_columns(library, lines, included_here)


def _check_columns(library, x, where):
    """The rows ``x`` of :func:`test_float32_terms_on_every_range_of_the_max` as columns."""
    padded = np.concatenate([x.T, np.repeat(x.max(axis=1)[None, :] - 150, 3 * K.TILE_BYTES // (4 * x.shape[0]), 0)])
    padded[-1] = x.max(axis=1) - 20  # a last tile with a max of its own
    for columns in (x.T.copy(), padded):
        assert (_fused_cpu._geometry(columns.shape, (0,), 4, K.SOFTMAX).plan[3] > 1) == (columns is padded)
        mask = np.ones(columns.shape, bool)
        mask[: x.shape[1]] = where.T
        for included in (np.ones(columns.shape, bool), mask):
            exact = _columns_oracle(columns, included)
            for op in ("softmax", "log_softmax"):
                got = _fused(library, op, columns, axis=0, where=None if included is not mask else mask)
                errors = oracle.ulp_errors(got[included], tuple(part[included] for part in exact[op]), "float32")
                assert errors.max() <= ULPS, f"{op} {library} columns {columns.shape}: {errors.max():.2f} ulps"
                if op == "softmax" and included is not mask:  # beyond the contract, as rows (above)
                    assert 0 < got[5, 0] < np.finfo(np.float32).smallest_normal


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("n", [1000, 20000, K.SEGMENT, LONG])
def test_float32_softmax_of_lines_whose_total_is_huge(library, n):
    """float32 softmax of lines with many entries near a max in ``(0, 87]``, where the
    float32 terms take the shift ``s = 0``: their total (up to ``n e**87``) has a
    reciprocal that is subnormal in float32, whose ``hi``/``lo`` pair (the output
    pass's FMA) would lose its low bits.  Such lines are scaled by the float64
    product (``SCALE_FLOOR``).  Found on 2026-12-02: ``(1, 65536)`` float32 entries
    of 87 (one of 86.5) came out 10,020 ulps off, ``(1, 1000)`` 347.  As rows (whole,
    and long: in segments), and as columns (whole, and in several tiles)."""
    rng = np.random.default_rng(n)
    for top in (87.0, 86.5, 80.0, 72.0, 52.0):
        values = np.float32(top) - np.array([0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0], np.float32)
        counts = [1] + [(n - 1) // 7] * 7
        counts[-1] += n - sum(counts)
        _, log_sm, soft = _exact_from_counts(values, counts)
        x = np.stack([rng.permutation(np.repeat(values, counts)) for _ in range(3)])
        for layout, data, axis in (("rows", x, -1), ("columns", np.ascontiguousarray(x.T), 0)):
            for op, want in (("softmax", soft), ("log_softmax", log_sm)):
                got = _fused(library, op, data, axis=axis)
                _assert_each_value(got, data, values, want, np.float32, f"{op} {library} {layout} n={n} max {values[0]}")


def _columns_oracle(columns, included):
    """Exact softmax and log_softmax along axis 0 over the ``included`` entries, as
    double-double ``(hi, lo)`` arrays: each column's distinct values once, weighted by
    how often they occur (the padded columns repeat one value thousands of times,
    which the oracle would take entry by entry)."""
    exact = {op: (np.zeros(columns.shape), np.zeros(columns.shape)) for op in ("softmax", "log_softmax")}
    for j in range(columns.shape[1]):
        rows = np.flatnonzero(included[:, j])
        values, inverse, counts = np.unique(columns[rows, j].astype(np.float64), return_inverse=True, return_counts=True)
        _, log_softmax, softmax = _exact_from_counts(values, counts)
        for op, parts in (("log_softmax", log_softmax), ("softmax", softmax)):
            hi, lo = oracle.double_double(parts)
            exact[op][0][rows, j], exact[op][1][rows, j] = hi[inverse], lo[inverse]
    return exact


@pytest.mark.parametrize("library", LIBRARIES)
def test_float32_terms_chunk_by_chunk(library):
    """Rows of several ``SINGLE_CHUNK`` steps of :func:`_row_sum_single`: the max tied in
    different chunks, a subnormal-range term (which has its chunk stored again) in
    one chunk only, ``-inf`` entries, with and without ``where`` (which excludes a
    tie and the subnormal entry in some rows); every operation against the oracle,
    and the counts of the ties in the logsumexp of ``[c, c, ...]`` rows."""
    rng = np.random.default_rng(5)
    n = 2 * K.SINGLE_CHUNK + 300
    x = (rng.standard_normal((6, n)) * 3).astype(np.float32)
    top = x.max(axis=1) + 1
    for i, (a, b) in enumerate([(5, K.SINGLE_CHUNK + 7), (K.SINGLE_CHUNK - 1, n - 1)] * 3):
        x[i, a] = x[i, b] = top[i]
    x[:, K.SINGLE_CHUNK + 50] = top - 95.0  # a term e**-95 (subnormal float32 softmax output)
    x[:, 2 * K.SINGLE_CHUNK + 10] = -np.inf
    x[3:] -= 40.0  # maxima below 0: the rounded-max shift
    where = rng.random(x.shape) < 0.9
    where[::2, K.SINGLE_CHUNK + 50] = False
    where[1::2, 5] = False
    for mask in (None, where):
        for op in ("softmax", "log_softmax", "logsumexp"):
            got = _fused(library, op, x, axis=-1, where=mask)
            exact = EXACT[op](x.astype(np.float64), axis=-1, where=mask)
            keep = np.ones(got.shape, bool) if (mask is None or op == "logsumexp") else mask
            _assert_ulps(got[keep], exact[keep], np.float32, f"{op} {library} where={mask is not None}")
        if mask is None:
            subnormal = _fused(library, "softmax", x, axis=-1)[:, K.SINGLE_CHUNK + 50]
            assert np.all((subnormal > 0) & (subnormal < np.finfo(np.float32).smallest_normal))
    ties = np.full((2, n), 7.0, np.float32)
    ties[1] = -7.0
    _assert_ulps(_fused(library, "logsumexp", ties, axis=-1), ties[:, 0] + np.log(float(n)), np.float32, "ties")


def test_wide_vectors_sets_its_attribute():
    """:func:`_wide_vectors` marks the compiled function (else LLVM's 256-bit preference
    on AVX-512 CPUs halves the lanes of every loop; the except clause would hide an
    llvmlite that refused the attribute)."""

    @numba.njit(cache=False)
    def marked(x):
        K._wide_vectors()
        return x + 1.0

    @numba.njit(cache=False)
    def unmarked(x):
        return x + 1.0

    assert marked(1.0) == unmarked(1.0) == 2.0
    assert K._WIDE in "".join(marked.inspect_llvm().values())
    assert K._WIDE not in "".join(unmarked.inspect_llvm().values())


def test_the_float32_recheck_is_what_the_cancelling_case_needs():
    """The fast float32 sum alone misses ``[-1, c, c]`` (lse = -1.7e-9) by far more
    than 4 ulps; the keep rule sends it to the exact sum, which the kernel then
    returns (so the oracle test below can fail)."""
    c = np.float32(-1 + np.log((np.e - 1) / 2))
    x = np.array([[-1.0, c, c]], dtype=np.float32)
    lse, _, _ = _exact_from_counts([-1.0, float(c)], [1, 2])
    empty = np.empty((0, 0), np.uint8)
    count, rest = K._row_sum_fast(x, empty, False, 0, 0, 3, float(c), np.empty((0, 0), np.float32), False)
    log_norm = math.log1p(count - 1 + rest)
    fast = np.float32(float(c) + log_norm)
    assert oracle.ulp_error(np.array([fast], np.float64), np.array([lse], dtype=object), np.float32)[0] > ULPS
    assert not K._kept(K.LOGSUMEXP, K.TERM7_ERROR + 2 * 2.0**-53, float(c), count, rest, log_norm)
    # An ordinary row of 4096 standard normal entries is kept.
    assert K._kept(K.LOGSUMEXP, K.TERM7_ERROR + 4095 * 2.0**-53, 3.3, 1.0, 253.9, math.log(254.9))
    got = _fused("numpy", "logsumexp", x, axis=-1).reshape(-1)
    _assert_ulps(got, np.array([lse], dtype=object), np.float32, "recheck")


def test_float32_logsumexp_terms_are_kept_wherever_they_are_taken():
    """The margins of :data:`LSE_SINGLE_ABOVE` / ``_BELOW``: on every row they let take
    float32 terms, the keep rule holds with their ``delta``, whatever the count and
    the rest (the argument in their comment; a margin of 0.5 above fails here)."""
    rng = np.random.default_rng(12)
    for n in (2, 13, 1000, K.SEGMENT):
        delta = K.EXPF_ERROR + (n + 1) * 2.0**-53
        count = rng.integers(1, n, size=4000, endpoint=True).astype(float)
        share = np.concatenate([rng.random(2000), 10.0 ** rng.uniform(-12, 0, 2000)])
        rest = share * (n - count)  # every rest a row of n entries can have
        count[:8] = 1.0
        rest[:8] = np.minimum((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 100.0, n - 1.0), n - 1.0)
        for m in (K.LSE_SINGLE_ABOVE, K.LSE_SINGLE_ABOVE + 0.25, 7.0, 87.0,
                  -K.LSE_SINGLE_BELOW - math.log(n), -K.LSE_SINGLE_BELOW - math.log(n) - 5.0, -1.0e5):
            for c, r in zip(count, rest):
                assert K._kept(K.LOGSUMEXP, delta, m, c, r, math.log1p((c - 1.0) + r)), (n, m, c, r)
    # Below the margin the rule does fail for some rows (so the margin is needed):
    # m = 0.5, one entry at the max and a rest of 1.5 (q = 0.6).
    assert not K._kept(K.LOGSUMEXP, K.EXPF_ERROR + 3 * 2.0**-53, 0.5, 1.0, 1.5, math.log1p(1.5))


def test_split_sum_is_exact_where_a_plain_sum_is_not():
    """1 + 1000 * 2**-53: a sequential float64 sum gives 1; the exact split keeps every term."""
    buffer = np.array([1.0] + [2.0**-53] * 1000 + [3.0 * 2.0**-60] * 3000)
    exponent = (int(buffer.max().view(np.int64)) >> 52) + 1 + 16
    sigma = float(np.array((exponent << 52) | (1 << 51), np.int64).view(np.float64))
    assert K._split_sum(buffer, buffer.size, sigma) == math.fsum(buffer)
    sequential = 0.0
    for value in buffer:
        sequential += value
    assert sequential == 1.0 != math.fsum(buffer)  # what the test would catch


# --------------------------------------------------------------------------
# Every path against the oracle.

# (shape, axis, path): rows in one segment, rows longer than a segment,
# columns fused in cache, columns in row segments.


def _tall(dtype, lines, extra):
    """Rows of a column layout of ``lines`` columns that take more than one tile."""
    width = min(lines, K.TILE_WIDTH)
    return K.TILE_BYTES // (width * np.dtype(dtype).itemsize) + extra


def _layouts(dtype):
    return [((37, 300), -1, "rows"), ((2, LONG), -1, "long rows"), ((300, 37), 0, "columns"),
            ((_tall(dtype, 5, 9), 5), 0, "column segments")]


def _spread_line(n, rng, offset=0.0):
    """A line of a few distinct values (the max once, a runner-up three times)."""
    values = np.array([12.0, 11.5, 3.25, -7.0, -30.2, -55.0, -62.029507, -72.9]) + offset
    counts = [1, 3] + [(n - 4) // 6] * 6
    counts[-1] += n - sum(counts)
    line = np.repeat(values, counts)
    rng.shuffle(line)
    return line, values, counts


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0e4], ids=["plain", "offset-1e4"])
def test_every_path_against_closed_form(library, dtype, offset):
    rng = np.random.default_rng(3)
    for shape, axis, path in _layouts(dtype):
        n = shape[axis]
        lines = shape[1 - (axis % 2)]
        data, exact = [], []
        for _ in range(lines):
            line, values, counts = _spread_line(n, rng, offset)
            line = line.astype(dtype)
            values = values.astype(dtype)
            data.append(line)
            exact.append((values, _exact_from_counts(values, counts)))
        x = np.stack(data, axis=0 if axis == -1 else 1)
        got = {op: _fused(library, op, x, axis=axis) for op in EXACT}
        for k, (values, (lse, log_sm, soft)) in enumerate(exact):
            line = x[k] if axis == -1 else x[:, k]
            picks = [int(np.flatnonzero(line == v)[0]) for v in values]
            what = f"{library} {dtype} {path} line {k} offset {offset}"
            lse_got = got["logsumexp"].reshape(-1)[k]
            _assert_ulps(np.array([lse_got]), np.array([lse], dtype=object), dtype, "logsumexp " + what)
            for op, want in (("log_softmax", log_sm), ("softmax", soft)):
                out = got[op][k] if axis == -1 else got[op][:, k]
                _assert_ulps(out[picks], want, dtype, f"{op} {what}")


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_column_segments_against_closed_form(library, dtype):
    """Columns in row segments wider than one output band (``OUTPUT_TILES`` tiles),
    the last band and the last tile partial.  Column ``c`` is a shuffled spread
    line scaled by one of 7 factors (``c % 7``), so that outputs written with
    another column's (or band's) scale, max or norm come out wrong."""
    rng = np.random.default_rng(11)
    lines = K.OUTPUT_TILES * K.TILE_WIDTH + K.TILE_WIDTH + 88
    n = _tall(dtype, lines, 3)
    line, values, counts = _spread_line(n, rng)
    kinds = np.arange(lines) % 7
    factors = (1.0 + np.arange(7) / 8).astype(dtype)
    x = np.empty((n, lines), dtype)
    for c in range(lines):
        x[:, c] = rng.permutation(line).astype(dtype) * factors[kinds[c]]
    geometry = _fused_cpu._geometry(x.shape, (0,), x.itemsize, K.SOFTMAX)
    assert geometry.plan[3] > 1 and geometry.phases[-1][1] == geometry.plan[3] * 2  # segments, two bands
    got = {op: _fused(library, op, x, axis=0) for op in EXACT}
    for k in range(7):
        scaled = (values.astype(dtype) * factors[k]).astype(dtype)
        lse, log_sm, soft = _exact_from_counts(scaled, counts)
        columns = kinds == k
        what = f"{library} {dtype} factor {factors[k]}"
        found = np.unique(got["logsumexp"][columns])
        _assert_ulps(found, np.full(found.size, lse, dtype=object), dtype, "logsumexp " + what)
        for op, want in (("log_softmax", log_sm), ("softmax", soft)):
            _assert_each_value(got[op][:, columns], x[:, columns], scaled, want, dtype, f"{op} {what}")


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_inputs_against_the_oracle(library, dtype):
    """Normal rows (sd 1 and 30), ties, a dominant max, per layout (short lines: mpmath per entry)."""
    rng = np.random.default_rng(5)
    cases = [
        ((rng.standard_normal((40, 257)) * 30), -1),
        ((rng.standard_normal((23, 64))), -1),
        ((rng.standard_normal((257, 19)) * 30), 0),
        (np.array([[3.0, 3.0, 3.0, -1.0, 0.5], [-2.0, 7.0, 7.0, 0.0, 7.0], [0.0, -40.0, -50.0, -17.5, -60.0]]), -1),
        (np.array([[0.0, -40.0], [-20.0, -745.0], [-30.0, 0.0]]), 0),
    ]
    for values, axis in cases:
        x = values.astype(dtype)
        for op in EXACT:
            got = _fused(library, op, x, axis=axis)
            exact = EXACT[op](x.astype(np.float64), axis=axis)
            if op == "logsumexp":
                got, exact = got.reshape(-1), exact.reshape(-1)
            _assert_ulps(got, exact, dtype, f"{op} {library} {dtype} {x.shape} axis {axis}")


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_float32_softmax_scale_rounds_once(layout):
    """softmax's output pass scales each stored float32 term ``t`` by ``scale = 1 / total``
    (float64) in float32 lanes: ``fma(t, hi, fl(t lo))`` with ``hi + lo`` the float32
    pair of ``scale``.  Against ``t * scale`` rounded once from float64: equal
    except within ``2**-47`` relative of a rounding tie, so within half an ulp plus
    that; outputs below ``2**-102`` (``t lo`` subnormal) within one ulp.  An output
    pass that rounded ``t hi`` alone (without ``lo``) is 0.5 ulps off on average and
    fails.  Rows scale by one number (:func:`_row_output`), column tiles by one a
    column (:func:`_tile_output`, here 64 rows of 64 columns)."""
    rng = np.random.default_rng(11)
    n = 4096
    no_mask = np.empty((0, 0), np.uint8)
    for scale in (1.0 / 3.0, 0.7310585786300049, 1.0 / 4093.7, float(np.float32(0.25))):
        terms = np.exp(rng.uniform(-103.0, 0.0, n)).astype(np.float32)
        terms[:8] = [1.0, 0.5, np.float32(2.0**-126), np.float32(1e-40), 0.0, 1.0 - 2.0**-24, 3.0, 0.9]
        if layout == "rows":
            x = np.zeros((1, n), np.float32)
            out = terms[None, :].copy()
            K._row_output(x, no_mask, False, 0, np.int64(0), np.int64(n), 0.0, 1.0 / scale, scale, out, K.SOFTMAX,
                          True)
        else:
            x = np.zeros((64, 64), np.float32)
            out = terms.reshape(64, 64).copy()
            halves = np.array([K._scale_halves(scale)] * 64, np.float32).T.copy()
            K._tile_output(x, no_mask, False, K.SOFTMAX, out, 0, 64, 0, 64, np.zeros(64), np.full(64, 1.0 / scale),
                           np.full(64, scale), halves, True)
        exact = terms.astype(np.float64) * scale
        want = exact.astype(np.float32)
        got = out.reshape(-1)
        ulp = np.spacing(np.abs(want)).astype(np.float64)
        err = np.abs(got.astype(np.float64) - exact)
        normal = np.abs(exact) >= 2.0**-102
        assert np.all(err[normal] <= ulp[normal] * 0.5 * (1 + 2.0**-20)), scale
        assert np.all(err[~normal] <= ulp[~normal]), scale
        assert np.mean(got[normal] == want[normal]) > 0.999, scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [40, 200])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "where"])
def test_rows_in_blocks_are_each_computed_alone(dtype, n, masked):
    """:func:`_rows_whole` takes rows in blocks (``ROW_BLOCK_BYTES``: every row's sums,
    then every row's norm, then the outputs): each row's results are, bit for bit,
    those of the row alone, whichever path the rows of a block take: float32 terms,
    log-probabilities whose logsumexp fails the float32 keep rule (summed again
    with float64 terms), maxima above 87 (no exact shift), a log_softmax rest of
    flushed terms (``FLUSHED_REST``), ties, and flagged rows (NaN, ``+inf``, all
    ``-inf``) between them."""
    rng = np.random.default_rng(n)
    rows = 3 * max(1, K.ROW_BLOCK_BYTES // (n * np.dtype(dtype).itemsize)) + 5
    x = rng.standard_normal((rows, n)) * 3
    x[1::7] = np.log(rng.dirichlet(np.ones(n), size=x[1::7].shape[0]))  # lse near 0
    x[2::7] += 120.0
    x[3::7] -= 200.0
    x[3::7, 0] = 0.5  # every other entry 75 or more below the max
    x[4::7] = np.round(x[4::7])
    x[5::11, 1], x[6::13, 2], x[8::17] = np.nan, np.inf, -np.inf
    x = x.astype(dtype)
    where = rng.random(x.shape) > 0.2 if masked else None
    for op in EXACT:
        kwargs = {"axis": -1} if where is None else {"axis": -1, "where": where}
        whole = _fused("numpy", op, x, **kwargs)
        for i in range(rows):
            alone = {**kwargs, "where": where[i:i + 1]} if masked else kwargs
            got = _fused("numpy", op, x[i:i + 1], **alone)
            np.testing.assert_array_equal(whole[i:i + 1], got, err_msg=f"{op}, row {i}")


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("pad", [0, 3000, LONG], ids=["short", "rows", "long-rows"])
def test_logsumexp_that_cancels_to_near_zero(library, pad):
    """``[-1, c, c]`` with ``e^-1 + 2 e^c`` about 1 (lse = -1.7e-9, condition 6e8): float32
    terms of float64 accuracy; short rows take the exact recheck, long ones the exact sum."""
    c = np.float32(-1 + np.log((np.e - 1) / 2))
    values = np.array([-1.0, c, c] + [-300.0] * pad, dtype=np.float32)
    lse, log_sm, _ = _exact_from_counts([-1.0, float(c), -300.0], [1, 2, pad])
    got = _fused(library, "logsumexp", values[None, :], axis=-1).reshape(-1)
    _assert_ulps(got, np.array([lse], dtype=object), np.float32, f"logsumexp pad {pad}")
    both = np.stack([values, np.full_like(values, 2.5)], axis=1)
    got = _fused(library, "logsumexp", both, axis=0).reshape(-1)
    with mpmath.workprec(160):
        second = mpmath.mpf(2.5) + mpmath.log(len(values))
    _assert_ulps(got, np.array([lse, second], dtype=object), np.float32, f"columns pad {pad}")
    got = _fused(library, "log_softmax", values[None, :], axis=-1)[0]
    _assert_ulps(got[:3], log_sm[[0, 1, 1]], np.float32, "log_softmax")


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 2, 3, 7, K.SHORT])
def test_short_rows_in_blocks(library, dtype, n):
    """Rows of at most ``SHORT`` entries run ``SHORT_BLOCK`` at a time, one to a lane
    (:func:`_short_rows`), with ties, ``-inf`` entries, signed zeros, subnormal
    softmax outputs and flagged rows (``+inf``, NaN, all ``-inf``) among them, over
    row counts that do not fill the last block: within 4 ulps of the oracle, and
    for float64 bit for bit the results of the row-by-row path (which the same rows
    take with a ``where`` that includes everything).  float32 rows take float64's
    arithmetic there, so they are held to 1 ulp (the row path's float32 terms are
    not: on these rows they are up to 1.16 ulps off)."""
    rng = np.random.default_rng(n)
    rows = 2 * K.SHORT_BLOCK + 11
    x = rng.standard_normal((rows, n)) * 5
    x[3] = x[3, 0]  # all tied
    x[5, -1] = -np.inf
    x[7] = -0.0
    x[8, 0] = 0.0
    x[9, -1], x[10, 0], x[11] = np.inf, np.nan, -np.inf
    x[12] = 1e4 + x[12]
    x[13, -1] = x[13, 0] - 100.0  # a subnormal float32 softmax output (about 3.7e-44)
    x = x.astype(dtype)
    everything = np.ones(x.shape, bool)
    for op in EXACT:
        got = _fused(library, op, x, axis=-1)
        if dtype == np.float64:
            np.testing.assert_array_equal(got, _fused(library, op, x, axis=-1, where=everything))
        exact = EXACT[op](x, axis=-1)
        if op == "logsumexp":
            got, exact = got.reshape(-1), exact.reshape(-1)
        keep = np.isfinite(x).all(axis=1)
        if op == "logsumexp" and dtype == np.float64:
            # float64 has no wider type: a sum that cancels toward 0 (lse = -8.6e-5 from
            # [-0.89, -0.53], condition 6000) is not well-conditioned and not in the contract.
            keep &= np.abs(np.asarray(exact, np.float64)) >= 1
        _assert_ulps(got[keep], exact[keep], dtype, f"{op} n={n}", bound=ULPS if dtype == np.float64 else 1.0)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("pad", [0, 3000, LONG], ids=["short", "rows", "long-rows"])
def test_log_softmax_of_a_dominant_max_without_a_recheck(library, pad):
    """``L`` of about ``e**-40`` (the max's output is ``-L``): the float64 terms' bound
    ``0.5 + (delta + 3.5 u) 2**24`` ulps needs no exact recheck, on rows, long rows
    and columns, for maxima above 87 (float64 terms) and at 0 (float32 terms)."""
    for top in (100.0, 0.0):
        values = np.array([top, top - 40, top - 41.5] + [top - 300] * pad, dtype=np.float32)
        _, log_sm, _ = _exact_from_counts([top, top - 40, top - 41.5, top - 300], [1, 1, 1, pad])
        got = _fused(library, "log_softmax", values[None, :], axis=-1)[0]
        errors = oracle.ulp_error(got[:3].astype(np.float64), log_sm[:3], np.float32)
        assert errors.max() <= 0.51 if top > 87 else errors.max() <= 1.75, errors
        got = _fused(library, "log_softmax", np.stack([values, values], axis=1), axis=0)[:3, 0]
        assert oracle.ulp_error(got.astype(np.float64), log_sm[:3], np.float32).max() <= ULPS


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_on_every_path(library, dtype):
    """``lse_state`` runs the compiled ``STATE`` kernel on every path: the max and the
    count exactly, ``rest`` within 4 float64 ulps of the exact sum (closed form); a
    flagged line (``+inf``, NaN, all ``-inf``) gets the generic state exactly."""
    rng = np.random.default_rng(11)
    layouts = [(shape if shape[0] > 2 else (5, shape[1]), axis, path) for shape, axis, path in _layouts(dtype)]
    for shape, axis, path in layouts:
        n = shape[axis]
        lines = shape[1 - (axis % 2)]
        data, exact = [], []
        for _ in range(lines):
            line, values, counts = _spread_line(n, rng)
            data.append(line.astype(dtype))
            with mpmath.workprec(160):
                top = mpmath.mpf(float(values.astype(dtype)[0]))
                exact.append(mpmath.fsum(k * mpmath.exp(mpmath.mpf(float(v)) - top)
                                         for v, k in zip(values.astype(dtype)[1:], counts[1:])))
        x = np.stack(data, axis=0 if axis == -1 else 1)
        flagged = {0: np.inf, 1: np.nan, 2: -np.inf}
        for k, value in flagged.items():
            line = x[k] if axis == -1 else x[:, k]
            if value == -np.inf:
                line[:] = value
            else:
                line[n // 2] = value
        state = _fused(library, "lse_state", x, axis=axis)
        assert state[0].dtype == np.dtype(dtype) and state[1].dtype == state[2].dtype == np.float64
        with lse_dispatch.use("generic"):
            generic = lse_dispatch.lse_state(x, axis=axis)
        for got, want in zip(state, generic):
            np.testing.assert_array_equal(got[:3], np.asarray(want)[:3], err_msg=f"{path}: flagged lines")
        m, count, rest = state
        assert np.all(count[3:] == 1.0) and np.array_equal(m[3:], np.asarray(generic.max)[3:]), path
        for k in range(3, lines):
            error = abs(mpmath.mpf(float(rest[k])) - exact[k]) / exact[k]
            assert error <= 4 * 2.0**-53, f"{library} {dtype} {path} line {k}: {float(error) / 2.0**-53:.2f} u"


def test_streaming_and_dask_blocks_run_the_compiled_state():
    """``OnlineLogSumExp`` and the blocks of a Dask reduction dispatch ``STATE`` to ``numpy.fused``."""
    from lse_dispatch import OnlineLogSumExp

    x = np.random.default_rng(12).standard_normal((64, 1000)).astype(np.float32)
    with lse_dispatch.trace() as seen:
        running = OnlineLogSumExp(axis=1).update(np.ascontiguousarray(x[:, :500]))
        running.update(np.ascontiguousarray(x[:, 500:]))
    assert set(seen.implementations) == {"numpy.fused"}, seen.implementations
    want = oracle.exact_logsumexp(x.astype(np.float64), axis=1)
    _assert_ulps(running.result(), want, np.float32, "online")
    da = pytest.importorskip("dask.array")
    import dask

    with dask.config.set(scheduler="synchronous"), lse_dispatch.trace() as seen:
        got = lse_dispatch.logsumexp(da.from_array(x, chunks=(32, 250)), axis=1).compute()
    assert seen.implementations.count("numpy.fused") == 8, seen.implementations
    _assert_ulps(got, want, np.float32, "dask")


def test_read_only_input_reuses_the_compiled_code():
    """Read-only arrays (broadcasts, frozen arrays) convert to the entry points' read-only
    signature: no compile of another copy, results as for a writable array."""
    x = np.random.default_rng(13).standard_normal((40, 300))
    frozen = x.copy()
    frozen.flags.writeable = False
    view = np.broadcast_to(x, x.shape)  # a read-only, contiguous view
    assert not view.flags.writeable and view.flags.c_contiguous
    overloads = len(K._items.overloads)
    np.testing.assert_array_equal(_fused("numpy", "softmax", frozen, axis=-1), _fused("numpy", "softmax", x, axis=-1))
    np.testing.assert_array_equal(_fused("numpy", "log_softmax", view, axis=0), _fused("numpy", "log_softmax", x, axis=0))
    assert len(K._items.overloads) == overloads == 2  # one per dtype (both warmed up)




@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", [0, 300, LONG], ids=["short", "rows", "long-rows"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_limits_go_to_the_shared_functions(library, dtype, pad, axis):
    """Flagged lines (max not finite, a NaN) take the shared limit rules: the
    contract's values exactly, next to an ordinary line, on every path."""
    if axis == 0 and pad == LONG:
        pad = _tall(dtype, len(LIMITS) + 1, 5)  # columns in several tiles
    fill = {"softmax": 0.0, "log_softmax": -INF}
    rows = [row[0] + [-INF] * pad for row in LIMITS] + [[0.0, -1.0, -2.0] + [-INF] * pad]
    values = np.array(rows, dtype=dtype)
    x = values if axis == -1 else np.ascontiguousarray(values.T)
    ordinary = np.array([0.0, -1.0, -2.0])
    expected = {
        "logsumexp": [row[1] for row in LIMITS] + [float(np.log(np.exp(ordinary).sum()))],
        "softmax": [row[2] + [fill["softmax"] if row[1] == row[1] else NAN] * pad for row in LIMITS],
        "log_softmax": [row[3] + [fill["log_softmax"] if row[1] == row[1] else NAN] * pad for row in LIMITS],
    }
    for op in EXACT:
        got = _fused(library, op, x, axis=axis)
        got = got.reshape(-1) if op == "logsumexp" else (got if axis == -1 else got.T)
        if op == "logsumexp":
            np.testing.assert_array_equal(got[:-1], np.array(expected[op][:-1], dtype=dtype), err_msg=op)
            np.testing.assert_allclose(got[-1], expected[op][-1], rtol=4e-7)
        else:
            np.testing.assert_array_equal(got[:-1], np.array(expected[op], dtype=dtype), err_msg=f"{op} {axis}")
            exact = EXACT[op](values[-1:, :3].astype(np.float64), axis=-1)
            _assert_ulps(got[-1:, :3], exact, dtype, f"{op} ordinary line")


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_where_masks(library, dtype):
    """Excluded entries: softmax 0, log_softmax -inf; a line with nothing
    included: the shared limits; a broadcast mask; both layouts, long rows."""
    rng = np.random.default_rng(9)
    for shape, axis, path in _layouts(dtype):
        x = (rng.standard_normal(shape) * 10).astype(dtype)
        mask = rng.uniform(size=shape) < 0.7
        first_line = (slice(0, 1), slice(None)) if axis == -1 else (slice(None), slice(0, 1))
        mask[first_line] = False  # nothing included
        x[~mask & (rng.uniform(size=shape) < 0.1)] = np.nan  # excluded NaN entries change nothing
        for op in EXACT:
            got = _fused(library, op, x, axis=axis, where=mask)
            reference = np.where(mask, x, 0.0).astype(np.float64)
            if op == "logsumexp":
                exact = oracle.exact_logsumexp(reference, axis=axis, where=mask)
                first = got.reshape(-1)[0]
                assert first == -np.inf
                _assert_ulps(got.reshape(-1)[1:], exact.reshape(-1)[1:], dtype, f"{op} {path}")
                continue
            line = got[first_line]
            assert np.all(line == (0.0 if op == "softmax" else -np.inf))
            if shape[axis] > 4096:
                continue  # long lines: the closed-form test covers their values
            exact = EXACT[op](reference, axis=axis, where=mask)
            keep = mask.copy()
            keep[first_line] = False
            _assert_ulps(got[keep], exact[keep], dtype, f"{op} {path}")
            assert np.all(got[~mask] == (0.0 if op == "softmax" else -np.inf))
    # A mask broadcast along the kept axis.
    x = (rng.standard_normal((16, 50)) * 3).astype(dtype)
    row_mask = rng.uniform(size=(1, 50)) < 0.6
    got = _fused(library, "softmax", x, axis=-1, where=row_mask)
    exact = oracle.exact_softmax(x.astype(np.float64), axis=-1, where=np.broadcast_to(row_mask, x.shape))
    _assert_ulps(got[:, row_mask[0]], exact[:, row_mask[0]], dtype, "broadcast mask")


# --------------------------------------------------------------------------
# Weighted logsumexp: numpy.fused with b (any layout, rows of float64 terms).


def _signed_bound(a, b, axis, where=None):
    """4 ulps times ``sum|b e^a| / |sum b e^a|``, the amplification of signed weights that cancel."""
    with np.errstate(all="ignore"):
        terms = np.where(True if where is None else where, b * np.exp(a - np.max(a)), 0.0)
        ratio = np.sum(np.abs(terms), axis=axis) / np.abs(np.sum(terms, axis=axis))
    return ULPS * np.maximum(1.0, np.nan_to_num(ratio, nan=1.0, posinf=1.0))


WEIGHTED_LAYOUTS = [((7, 50), -1, "rows"), ((50, 7), 0, "columns"), ((3, 40, 5), 1, "middle axis"),
                    ((4, 30, 6), (0, 2), "two axes"), ((6, 33), None, "everything")]


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis", "path"), WEIGHTED_LAYOUTS, ids=[w[2] for w in WEIGHTED_LAYOUTS])
def test_weighted_logsumexp_against_the_oracle(library, dtype, shape, axis, path):
    """Positive weights within 4 ulps, signed ones within 4 ulps times their cancellation
    ratio, the sign exactly; zero weights and excluded entries count for nothing."""
    rng = np.random.default_rng(21)
    a = (rng.standard_normal(shape) * 8).astype(dtype)
    positive = rng.uniform(0.01, 3.0, shape).astype(dtype)
    positive[rng.uniform(size=shape) < 0.1] = 0
    got = _fused(library, "logsumexp", a, axis=axis, b=positive)
    exact = oracle.exact_logsumexp(a.astype(np.float64), axis=axis, b=positive.astype(np.float64))
    _assert_ulps(got, exact, dtype, f"positive weights, {path}")
    signed = rng.uniform(-1.0, 2.0, shape).astype(dtype)
    where = rng.uniform(size=shape) < 0.8
    value, sign = _fused(library, "logsumexp", a, axis=axis, b=signed, where=where, return_sign=True)
    a64, b64 = a.astype(np.float64), signed.astype(np.float64)
    exact = oracle.exact_logsumexp(a64, axis=axis, b=b64, where=where)
    errors = oracle.ulp_error(value, exact, np.dtype(dtype))
    assert np.all(errors <= _signed_bound(a64, b64, axis, where)), f"signed weights, {path}: {errors.max():.2f}"
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(sign, np.sign(np.sum(np.where(where, b64 * np.exp(a64), 0.0), axis=axis)))
    # Broadcast weights: a row of them, and a scalar.
    row = positive[(0,) * (len(shape) - 1)]
    got = _fused(library, "logsumexp", a, axis=axis, b=row)
    exact = oracle.exact_logsumexp(a.astype(np.float64), axis=axis, b=np.broadcast_to(row, shape).astype(np.float64))
    _assert_ulps(got, exact, dtype, f"a row of weights, {path}")
    got = _fused(library, "logsumexp", a, axis=axis, b=np.asarray(2.5, dtype))
    exact = oracle.exact_logsumexp(a.astype(np.float64), axis=axis, b=np.full(shape, 2.5))
    _assert_ulps(got, exact, dtype, f"a scalar weight, {path}")


# (a, b, dtype): the extreme weights of tests/test_outside_findings.py, forced through the kernel.
EXTREME_WEIGHTS = {
    "huge-weight-exp-underflows": ([0.0, -745.5, -3.0], [1.0, 1e308, 0.5], "float64"),
    "huge-weight-far": ([0.0, -1000.0], [1.0, 1e308], "float64"),
    "subnormal-weight": ([16.5, 0.0, 1.0], [1e-310, 5e-324, 2.0], "float64"),
    "subnormal-weight-dominant": ([760.0, 0.0], [1e-310, 1.0], "float64"),
    "float32-subnormal-weight": ([16.5, -3.0], [1e-40, 1.0], "float32"),
    "float32-tiny-rest": ([0.0, -40.0], [1.0, 1.0], "float32"),
    "float32-huge-weight": ([0.0, -120.0], [1.0, 3e38], "float32"),
    "float32-cancels-to-near-zero": ([1.0], [0.36787945], "float32"),
}


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("case", list(EXTREME_WEIGHTS))
def test_weighted_extremes(library, case):
    values, weights, dtype = EXTREME_WEIGHTS[case]
    a, b = np.asarray(values, dtype), np.asarray(weights, dtype)
    exact = oracle.exact_logsumexp(a.astype(np.float64), b=b.astype(np.float64))
    far = abs(values[1]) - 1022 * math.log(2) if case.startswith("huge") else 0.0  # |y| of the scaled term
    _assert_ulps(_fused(library, "logsumexp", a, b=b), exact, dtype, case, bound=ULPS + far)
    value, sign = _fused(library, "logsumexp", a, b=-b, return_sign=True)
    _assert_ulps(value, exact, dtype, case + " negated", bound=ULPS + far)
    assert sign == -1.0


@numba.njit(cache=False)
def _rough_logs(values):
    out = np.empty_like(values)
    for j in range(values.shape[0]):
        out[j] = K._rough_log(values[j])
    return out


def test_rough_log_is_below_the_log_by_at_most_its_deficit():
    """The candidates for the max rest on ``rough <= log|b| <= rough + ROUGH_DEFICIT``:
    checked on 2**20 magnitudes across the normal range, the ends and powers of two."""
    rng = np.random.default_rng(26)
    normal = float(np.finfo(np.float64).smallest_normal)
    values = np.concatenate([
        np.exp(rng.uniform(math.log(normal), math.log(np.finfo(np.float64).max), 1 << 20)),
        np.ldexp(1.0, np.arange(-1022, 1024)), np.ldexp(1.0 / math.log(2), np.arange(-1022, 1023)),
        [normal, np.nextafter(normal, 1.0), np.finfo(np.float64).max, 1.0, np.nextafter(1.0, 0.0)],
    ])
    rough, exact = _rough_logs(values), np.log(values)
    assert np.all(rough <= exact + 4 * 2.0**-53 * np.abs(exact))
    assert np.max(exact - rough) <= K.ROUGH_DEFICIT - 3e-5


@pytest.mark.parametrize("weight", [2.0, 2, True])
def test_torch_weighted_python_scalar_is_weak(weight):
    """Found 2026-11-30 by CI (order-dependent: only once the weighted kernel was loaded):
    ``torch.fused`` ran a float32 tensor with ``b=2.0`` on NumPy views of ``a`` and of
    ``b``'s float64 tensor, which promoted the result to float64; SciPy and the other
    paths keep float32 (``tests/test_scipy_fidelity.py::test_python_scalars_are_weak``)."""
    torch = pytest.importorskip("torch")
    _fused_cpu.warm_up(("float32",))
    a = torch.tensor([1.0, 2.0])
    with lse_dispatch.use("torch.fused"), lse_dispatch.trace() as seen:
        out = lse_dispatch.logsumexp(a, b=weight)
    assert seen.records[-1].implementation == "torch.fused"
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(math.log(float(weight) * (math.e + math.e**2)), rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_long_rows_and_ties(dtype):
    """Rows of several chunks of terms (``CHUNK``), entries tied at the max with signed
    weights (the count), entries whose rough exponent is near the max without being at
    it, and ``a - m > 0`` (weights below 1 on entries above the max exponent)."""
    rng = np.random.default_rng(25)
    n = 2 * K.CHUNK + 37
    a = (rng.standard_normal((3, n)) * 4).astype(dtype)
    b = rng.uniform(0.01, 2.0, (3, n)).astype(dtype)
    b[1] *= np.where(rng.uniform(size=n) < 0.3, -1, 1).astype(dtype)
    a[2, :4], b[2, :4] = 30.0, np.array([2.0, 2.0, -2.0, 2.0], dtype)  # three 2s and a -2 at the max: count 2
    a[2, 4], b[2, 4] = 30.0 + math.log(1.9) - math.log(2.0), 1.9  # rough exponent near the max, exponent below
    a[2, 5], b[2, 5] = 33.0, 0.01  # a - m = 3 > 0, exponent 28.4 below the max
    value, sign = _fused("numpy", "logsumexp", a, axis=1, b=b, return_sign=True)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact = oracle.exact_logsumexp(a64, axis=1, b=b64)
    errors = oracle.ulp_error(value, exact, np.dtype(dtype))
    assert np.all(errors <= _signed_bound(a64, b64, 1)), errors
    assert np.all(sign == 1.0)
    state = _fused("numpy", "lse_state", a, axis=1, b=b)
    assert state[1][2] == 2.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_state_is_the_shared_state(dtype):
    """``lse_state`` with ``b``: the max and the count exactly the shared code's, the rest
    within 4 ulps of it; rows the kernel flags (non-finite entries or weights, nothing
    included) get the shared state exactly."""
    rng = np.random.default_rng(22)
    a = (rng.standard_normal((12, 40)) * 5).astype(dtype)
    b = rng.uniform(-1.0, 2.0, (12, 40)).astype(dtype)
    a[0, 3], a[1, 5], a[2, :] = np.inf, np.nan, -np.inf
    b[3, 7], b[4, 2], b[5, :] = np.inf, np.nan, 0.0
    a[6, 4], b[6, 4] = np.inf, 0.0  # excluded by its zero weight: an ordinary row
    state = _fused("numpy", "lse_state", a, axis=1, b=b)
    with lse_dispatch.use("generic"):
        shared = [np.asarray(part) for part in lse_dispatch.lse_state(a, axis=1, b=b)]
    for got, want in zip(state, shared):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got[:6], want[:6], err_msg="flagged rows")
    np.testing.assert_array_equal(state[0], shared[0])
    np.testing.assert_array_equal(state[1], shared[1])
    np.testing.assert_allclose(state[2][6:], shared[2][6:], rtol=4 * 2.0**-52 * 40)
    for op_value, want in zip(_fused("numpy", "logsumexp", a, axis=1, b=b, return_sign=True),
                              lse_dispatch.logsumexp(a, axis=1, b=b, return_sign=True, backend="generic")):
        np.testing.assert_array_equal(op_value[:6], np.asarray(want)[:6])


def test_weighted_rows_on_threads_give_the_same_result(monkeypatch):
    x = np.random.default_rng(23).standard_normal((512, 1024))
    b = np.random.default_rng(24).uniform(0.0, 2.0, x.shape)
    assert x.size >= _fused_cpu.PARALLEL_ELEMENTS
    _fused_cpu.set_num_threads(1)
    try:
        one = _fused("numpy", "logsumexp", x, axis=1, b=b)
        _fused_cpu.set_num_threads(2)
        two = _fused("numpy", "logsumexp", x, axis=1, b=b)
    finally:
        _fused_cpu.set_num_threads(None)
    np.testing.assert_array_equal(one, two)


# --------------------------------------------------------------------------
# Declines, threads, gradients.


def test_declines_say_why():
    x = np.ones((300, 40))
    with lse_dispatch.use("numpy.fused"), lse_dispatch.trace() as seen:
        lse_dispatch.logsumexp(x, b=x.astype(np.complex128))
        lse_dispatch.logsumexp(x.astype(np.complex128))
        lse_dispatch.logsumexp(x.astype(">f8"))
        lse_dispatch.logsumexp(np.ones((3, 4, 5)), axis=1)
        lse_dispatch.logsumexp(x.T, axis=0)
        lse_dispatch.logsumexp(x, axis=())
        lse_dispatch.logsumexp(np.frombuffer(b"\0" + x.tobytes(), np.float64, offset=1, count=x.size).reshape(x.shape))
    reasons = [dict(record.declined)["numpy.fused"] for record in seen.records]
    assert seen.implementations == ["generic"] * 7
    assert reasons[0] == "input needs a cast" and reasons[1] == "complex input" and reasons[2] == "non-native byte order"
    assert reasons[3].startswith("layout") and reasons[4].startswith("layout")
    assert reasons[5] == "nothing reduced" and reasons[6] == "unaligned data"


def test_masked_arrays_arrive_as_where():
    """A MaskedArray is unwrapped before dispatch: the kernel takes its mask as ``where``."""
    x = np.random.default_rng(14).standard_normal((30, 40))
    mask = np.random.default_rng(15).uniform(size=x.shape) < 0.3
    got = _fused("numpy", "softmax", np.ma.array(x, mask=mask), axis=-1)
    np.testing.assert_array_equal(np.ma.getdata(got), _fused("numpy", "softmax", x, axis=-1, where=~mask))


def _printed(code: str) -> list[str]:
    """The lines ``code`` prints, run in a fresh Python process (which must succeed)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()


def test_a_fresh_process_compiles_only_for_large_inputs():
    code = textwrap.dedent("""
        import sys, numpy as np, lse_dispatch
        with lse_dispatch.trace() as t:
            lse_dispatch.softmax(np.ones((64, 1000), np.float32), axis=-1)
        assert "numba" not in sys.modules, "a small call imported numba"
        print(t.records[0].implementation, dict(t.records[0].declined)["numpy.fused"][:16])
        with lse_dispatch.trace() as t:
            lse_dispatch.softmax(np.ones((1024, 1024), np.float32), axis=-1)
            lse_dispatch.softmax(np.ones((64, 1000), np.float32), axis=-1)
        print(*t.implementations)
    """)
    first, second = _printed(code)
    assert first == "numpy.blocked not compiled yet"
    # The large call compiles (or loads) the dtype's entry point; after it the small call is taken too.
    assert second.split() == ["numpy.fused", "numpy.fused"]


def test_small_calls_add_up_to_loading_the_kernel():
    """Calls below FIRST_CALL_ELEMENTS decline while the dtype is not loaded, and
    count: the first call past CUMULATIVE_ELEMENTS entries in all loads it.  The
    dispatcher does not reuse a decision made past that (provisional) decline,
    or the later calls of the signature would never be counted."""
    code = textwrap.dedent("""
        import sys, numpy as np, lse_dispatch
        from lse_dispatch.backends import _fused_cpu
        _fused_cpu.CUMULATIVE_SECONDS = float("inf")  # the entries alone (their time: the next test)
        x = np.ones((64, 1000), np.float32)
        below = (_fused_cpu.CUMULATIVE_ELEMENTS - 1) // x.size  # calls that stay below it
        with lse_dispatch.trace() as t:
            lse_dispatch.softmax(x, axis=-1)
        for _ in range(below - 1):  # untraced: the dispatcher reuses what it can here
            lse_dispatch.softmax(x, axis=-1)
        print(set(t.implementations), "numba" in sys.modules)
        with lse_dispatch.trace() as t:
            lse_dispatch.softmax(x, axis=-1)
            lse_dispatch.logsumexp(np.ones((3, 10), np.float32), axis=-1)
        print(*t.implementations)
    """)
    first, second = _printed(code)
    assert first == "{'numpy.blocked'} False"
    # The call that passes the total loads the dtype; then a small call of another signature is taken too.
    assert second.split() == ["numpy.fused", "numpy.fused"]


def test_slow_small_calls_add_up_to_loading_by_their_time():
    """Tiny calls on a slow path (float64 softmax of (100, 3) runs the generic one while
    numpy.fused declines it) count by the time they take: the dispatcher times each
    call made past a provisional decline and charges the kernel, which loads its code
    once the charges reach CUMULATIVE_SECONDS (their entries would take 65536 calls)."""
    code = textwrap.dedent("""
        import time, numpy as np, lse_dispatch
        from lse_dispatch.backends import _fused_cpu
        _fused_cpu.CUMULATIVE_ELEMENTS = 1 << 60  # the time alone
        _fused_cpu.CUMULATIVE_SECONDS = 0.2
        x = np.ones((100, 3))
        with lse_dispatch.trace() as t:
            lse_dispatch.softmax(x, axis=-1)
        calls, start = 1, time.perf_counter()
        while "float64" not in _fused_cpu._SIGNATURES_SEEN and calls < 100000:
            lse_dispatch.softmax(x, axis=-1)
            calls += 1
        took = time.perf_counter() - start
        print(t.implementations[0], calls < 100000, _fused_cpu._DECLINED_SECONDS["float64"] >= 0.2, took >= 0.2)
        with lse_dispatch.trace() as t:
            lse_dispatch.softmax(x, axis=-1)
        print(*t.implementations)
    """)
    first, second = _printed(code)
    assert first == "generic True True True"
    assert second == "numpy.fused"


def test_warm_up_loads_the_kernels_for_every_later_call():
    """The public lse_dispatch.warm_up() loads the compiled code in a fresh process (numba
    is not imported before it), names what it loaded, and small calls take it after."""
    code = textwrap.dedent("""
        import importlib.util, sys, numpy as np, lse_dispatch
        assert "numba" not in sys.modules
        loaded = lse_dispatch.warm_up()
        torch_here = importlib.util.find_spec("torch") is not None
        assert loaded == (("numpy.fused", "torch.fused") if torch_here else ("numpy.fused",)), loaded
        with lse_dispatch.trace() as t:
            lse_dispatch.softmax(np.ones((3, 10), np.float32), axis=-1)
            lse_dispatch.log_softmax(np.ones((3, 10)), axis=-1)
        print(*t.implementations)
    """)
    assert _printed(code) == ["numpy.fused numpy.fused"]


def test_warm_up_without_numba_loads_nothing(monkeypatch):
    monkeypatch.setitem(_fused_cpu._STATUS, "available", False)
    assert lse_dispatch.warm_up() == ()


def test_threads_setting(monkeypatch):
    with pytest.raises(ValueError, match="'threads'"):
        _fused_cpu.set_num_threads(0)
    try:
        _fused_cpu.set_num_threads(1)
        assert _fused_cpu.get_num_threads() == 1
        x = np.random.default_rng(1).standard_normal((1024, 512))
        got = _fused("numpy", "logsumexp", x, axis=-1)
        np.testing.assert_allclose(got.reshape(-1), np.log(np.exp(x).sum(axis=-1)), rtol=1e-14)
    finally:
        _fused_cpu.set_num_threads(None)
    monkeypatch.setenv(_fused_cpu.ENV_THREADS, "1")
    assert _fused_cpu.get_num_threads() == 1
    torch = pytest.importorskip("torch")
    monkeypatch.delenv(_fused_cpu.ENV_THREADS)
    assert _fused_cpu.get_num_threads("torch") == torch.get_num_threads()


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_torch_autograd_uses_the_fused_forward_and_backward(op, axis, monkeypatch):
    torch = pytest.importorskip("torch")
    calls = []
    original = _fused_cpu.softmax_backward

    def spy(*args):
        result = original(*args)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(_fused_cpu, "softmax_backward", spy)
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((33, 47)) * 3).requires_grad_(True)
    weights = torch.from_numpy(rng.standard_normal((33, 47)))
    with lse_dispatch.trace() as seen:
        (getattr(lse_dispatch, op)(x, axis=axis) * weights).sum().backward()
    assert seen.implementations == ["autodiff"]
    assert calls == [True]
    want = torch.autograd.grad((getattr(torch, op)(x, dim=axis) * weights).sum(), x)[0]
    torch.testing.assert_close(x.grad, want, rtol=1e-12, atol=1e-14)
    # Inside the Function's forward, torch.fused ran (grad mode is off there).
    with lse_dispatch.trace() as inner, torch.no_grad():
        getattr(lse_dispatch, op)(x.detach(), axis=axis)
    assert inner.implementations == ["torch.fused"]
    # Double backward keeps the op form (create_graph): gradgradcheck holds.
    small = torch.from_numpy(rng.standard_normal((3, 5))).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: getattr(lse_dispatch, op)(t, axis=axis), (small,))


@pytest.mark.parametrize("axis", [-1, 0])
def test_torch_logsumexp_gradient_runs_the_fused_kernels(axis, monkeypatch):
    """Forward through the LOGSUMEXP kernel (the value alone: the plain backward needs
    no state), backward as softmax(a) * g: both torch.fused; limits as analytic."""
    torch = pytest.importorskip("torch")
    _fused_cpu.warm_up(("float64",))
    ran = []
    original = _fused_cpu._run

    def spy(call, *args):
        ran.append(str(call.op.value))
        return original(call, *args)

    monkeypatch.setattr(_fused_cpu, "_run", spy)
    rng = np.random.default_rng(5)
    values = rng.standard_normal((40, 60)) * 3
    values[0, :3] = np.inf  # a line of three +inf: 1/3 each
    values[1, :] = -np.inf  # nothing included: 0
    values[2, 5] = np.nan  # NaN propagates
    if axis == 0:
        values = np.ascontiguousarray(values.T)
    x = torch.from_numpy(values).requires_grad_(True)
    g = torch.from_numpy(rng.standard_normal(values.shape[1 - (axis % 2)]))
    with lse_dispatch.trace() as seen:
        (lse_dispatch.logsumexp(x, axis=axis) * g).sum().backward()
    assert seen.implementations == ["autodiff"]
    assert ran == ["logsumexp", "softmax"]
    lines = np.moveaxis(values, axis, -1)
    grad = np.moveaxis(x.grad.numpy(), axis, -1)
    np.testing.assert_allclose(grad[0, :3], np.full(3, g[0].item() / 3), rtol=4 * np.finfo(np.float64).eps)
    np.testing.assert_array_equal(grad[0, 3:], 0.0)
    np.testing.assert_array_equal(grad[1], 0.0)
    assert np.isnan(grad[2]).all()
    finite = lines[3:]
    expected = np.exp(finite - np.log(np.exp(finite).sum(axis=-1, keepdims=True))) * g.numpy()[3:, None]
    np.testing.assert_allclose(grad[3:], expected, rtol=1e-13, atol=1e-300)
    # Both passes ran torch.fused (grad mode is off inside the Function).
    with lse_dispatch.trace() as inner, torch.no_grad():
        lse_dispatch.logsumexp(x.detach(), axis=axis)
        lse_dispatch.softmax(x.detach(), axis=axis)
    assert inner.implementations == ["torch.fused", "torch.fused"]


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("shape", [(33, 47), (8, 300)])
def test_float32_fused_backward_is_float64_accurate(op, axis, shape):
    """The float32 backward equals the VJP of its float32 arguments computed in float64,
    rounded once: within an ulp of the result plus ``2**-30`` of its terms' size.

    (The op form in float32 would be off by a few ulps of the terms; an ``exp``
    with 2**-20 relative error, 8 float32 ulps, fails this.)
    """
    torch = pytest.importorskip("torch")
    _fused_cpu.warm_up(("float32",))
    rng = np.random.default_rng(5)
    x = torch.from_numpy((rng.standard_normal(shape) * 4).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    with torch.no_grad():
        y = getattr(lse_dispatch, op)(x, axis=axis)
    axes = (y.ndim + axis if axis < 0 else axis,)
    got = _fused_cpu.softmax_backward(op, y, None, g, axes)
    assert got is not None and got.dtype == torch.float32
    y64, g64 = y.numpy().astype(np.float64), g.numpy().astype(np.float64)
    if op == "softmax":
        total = np.sum(y64 * g64, axis=axis, keepdims=True)
        want = y64 * (g64 - total)
        size = np.abs(y64) * (np.abs(g64) + np.abs(total))
    else:
        total = np.sum(g64, axis=axis, keepdims=True)
        p = np.exp(y64)
        want = g64 - p * total
        size = np.abs(g64) + p * np.abs(total)
    err = np.abs(got.numpy().astype(np.float64) - want)
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert np.all(err <= ulp + 2.0**-30 * size), float(np.max(err / (ulp + 2.0**-30 * size)))


def test_masked_log_softmax_backward_matches_the_op_form():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((20, 30)).astype(np.float32)).requires_grad_(True)
    mask = torch.from_numpy(rng.uniform(size=(20, 30)) < 0.6)
    g = torch.from_numpy(rng.standard_normal((20, 30)).astype(np.float32))
    (lse_dispatch.log_softmax(x, axis=-1, where=mask) * g).sum().backward()
    fused = x.grad.clone()
    x.grad = None
    with lse_dispatch.use("generic"):
        (lse_dispatch.log_softmax(x, axis=-1, where=mask) * g).sum().backward()
    torch.testing.assert_close(fused, x.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Imports, no numba, the cache in a read-only install.


def test_importing_lse_dispatch_imports_no_numba():
    code = "import sys, lse_dispatch, lse_dispatch.backends; print('numba' in sys.modules)"
    assert _printed(code) == ["False"]


def test_everything_works_without_numba():
    """numba made unimportable: the fused kernels decline, results are the oracle's."""
    code = textwrap.dedent("""
        import sys
        sys.modules["numba"] = None
        import numpy as np, torch, lse_dispatch
        from lse_dispatch import oracle
        x = np.random.default_rng(0).standard_normal((1100, 1000)).astype(np.float32)
        with lse_dispatch.trace() as t:
            got = lse_dispatch.log_softmax(x, axis=-1)
            lse_dispatch.logsumexp(torch.from_numpy(x), axis=0)
        with lse_dispatch.use("numpy.fused"), lse_dispatch.trace() as forced:
            lse_dispatch.softmax(x, axis=0)
        print(*t.implementations, forced.records[0].implementation)
        print(dict(t.records[0].declined)["numpy.fused"])
        print(oracle.ulp_error(got[:3], oracle.exact_log_softmax(x[:3].astype(float), axis=-1), np.float32).max())
    """)
    ran, reason, worst = _printed(code)
    assert ran == "numpy.blocked torch.blocked generic"
    assert reason.startswith("numba is not installed")
    assert float(worst) <= ULPS


def test_cache_survives_a_read_only_install(tmp_path):
    """The package copied to a read-only folder: numba caches in the user-wide folder instead,
    and a second process loads from there."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "lse_dispatch", site / "lse_dispatch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "backends", site / "lse_dispatch" / "backends", ignore=shutil.ignore_patterns("__pycache__"))
    if os.geteuid() == 0:
        # Permission bits do not stop root: block the in-tree cache folder
        # with a file of its name, which fails numba's writability probe
        # (os.makedirs, then a temporary file) exactly as a read-only folder does.
        (site / "lse_dispatch" / "backends" / "__pycache__").write_text("")
    for path in [site, *site.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    cache_home = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(site), "XDG_CACHE_HOME": str(cache_home), "HOME": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    code = textwrap.dedent("""
        import numpy as np, lse_dispatch
        from lse_dispatch.backends import _numba_kernels as K
        assert K.__file__.startswith(SITE), K.__file__
        from lse_dispatch.backends import _fused_cpu
        _fused_cpu._compiled("float64")  # the forward entry point alone: the one this checks
        x = np.random.default_rng(0).standard_normal((8, 100))
        with lse_dispatch.use("numpy.fused"), lse_dispatch.trace() as seen:
            values = lse_dispatch.logsumexp(x, axis=1)
        assert seen.implementations == ["numpy.fused"], seen.implementations
        assert np.allclose(values, np.log(np.exp(x).sum(axis=1)))
        print(sum(K._items.stats.cache_hits.values()), sum(K._items.stats.cache_misses.values()))
    """).replace("SITE", repr(str(site)))
    try:
        first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr[-2000:]
        assert first.stdout.split() == ["0", "1"]  # compiled, and written...
        written = list(cache_home.rglob("*.nbi"))
        assert written, "no cache index in the user-wide folder"
        assert not list(site.rglob("*.nbi"))  # ...not into the read-only install
        second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert second.returncode == 0, second.stderr[-2000:]
        assert second.stdout.split() == ["1", "0"]  # loaded from the user-wide cache
    finally:
        for path in [site, *site.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_the_per_signature_layouts_stay_bounded_and_right_across_threads():
    """More call signatures than the layout cache holds, from four threads at once:
    the cache stays within its size, and every result is the oracle's."""
    _fused_cpu.warm_up(("float64",))
    rng = np.random.default_rng(31)
    shapes = [(rows, n) for rows in range(1, 21) for n in range(2, 18)]  # 320 signatures
    assert len(shapes) > _fused_cpu._GEOMETRIES_SIZE
    inputs = [rng.standard_normal(shape) * 5 for shape in shapes]
    results: dict = {}

    def work(part):
        for index in range(part, len(inputs), 4):
            results[index] = _fused("numpy", "log_softmax", inputs[index], axis=-1)

    in_threads(work, range(4))  # raises what a thread raised
    assert len(_fused_cpu._GEOMETRIES) <= _fused_cpu._GEOMETRIES_SIZE
    # The oracle on this thread only: mpmath's working precision is process-wide.
    for index, x in enumerate(inputs):
        _assert_ulps(results[index], oracle.exact_log_softmax(x, axis=-1), np.float64, f"shape {x.shape}")
