"""High-precision reference values (mpmath) and ulp errors against them.

The oracle works on NumPy float64 copies of the inputs, which hold every
float16/bfloat16/float32 value exactly, and returns exact results as object
arrays of ``mpmath.mpf``.  Used by the tests, ``lse-dispatch report`` and the
conformance suite.  mpmath is a dependency of the package (pure Python); it
is imported when an oracle function first runs, not with ``lse_dispatch``.
mpmath's working precision is one setting for the whole process: the oracle's
computations take turns (a lock), so it may be called from several threads;
other code that changes mpmath's precision while it runs is not covered.

This module also owns the unit every accuracy figure of the project is
counted in (:func:`ulp`) and the rounding of test inputs to a dtype
(:func:`round_to`), both in plain NumPy for the four float formats, bfloat16
included, so that neither needs ml_dtypes.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from ._validate import normalize_axis

__all__ = [
    "FORMATS",
    "double_double",
    "dtype_name",
    "exact_exp",
    "exact_log_softmax",
    "exact_logsumexp",
    "exact_softmax",
    "move_to_end",
    "round_to",
    "ulp",
    "ulp_error",
    "ulp_errors",
]

# Bits of working precision: enough that every sum of up to 2**24 terms in
# the exponent range of float64 is far more accurate than a float64 ulp.
PRECISION = 160

#: name -> (significand bits including the implicit one, smallest normal
#: exponent, largest exponent) of the formats the contract covers.  bfloat16
#: has float32's exponent range and 8 significand bits.
FORMATS = {
    "float64": (53, -1022, 1023),
    "float32": (24, -126, 127),
    "float16": (11, -14, 15),
    "bfloat16": (8, -126, 127),
}


def _mp():
    import mpmath

    return mpmath


#: mpmath's working precision is one setting for the whole process, so oracle
#: computations on several threads at once would change it under each other
#: (measured: results off by thousands of ulps).  They take turns.
_PRECISION_LOCK = threading.RLock()


@contextlib.contextmanager
def _precise(mp):
    """``mp.workprec(PRECISION)``, one thread at a time."""
    with _PRECISION_LOCK, mp.workprec(PRECISION):
        yield


def dtype_name(dtype) -> str:
    """``"float32"`` for ``"float32"``, ``np.float32``, ``np.dtype("float32")``,
    ``ml_dtypes.bfloat16`` or ``torch.float32``."""
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype).rsplit(".", 1)[-1]
    if name not in FORMATS:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(FORMATS)}")
    return name


def round_to(values, dtype) -> np.ndarray:
    """``values`` rounded to ``dtype`` (nearest, ties to even) and returned as float64.

    The result holds the rounded values exactly.  Overflow gives infinities
    and results below the smallest normal number are the format's subnormals,
    as a cast to the dtype would give; NaN and infinities pass through.
    """
    values = np.asarray(values, dtype=np.float64)
    name = dtype_name(dtype)
    if name != "bfloat16":
        with np.errstate(over="ignore"):
            return values.astype(name).astype(np.float64)
    bits, emin, emax = FORMATS[name]
    # Through float32 first, as ml_dtypes and the libraries' casts do (a
    # double rounding that differs from direct rounding only at rare ties).
    with np.errstate(over="ignore"):
        values = values.astype(np.float32).astype(np.float64)
    _, exponent = np.frexp(values)  # |x| = m 2**e with m in [0.5, 1)
    # One ulp of the format at x; below the normal range the subnormal step.
    quantum = np.ldexp(1.0, np.maximum(exponent, emin + 1) - bits)
    with np.errstate(invalid="ignore"):
        rounded = np.where(np.isfinite(values), np.rint(values / quantum) * quantum, values)
    largest = (2.0 - 2.0 ** (1 - bits)) * 2.0**emax
    return np.where(np.abs(rounded) > largest, np.copysign(np.inf, values), rounded)


def ulp(values, dtype) -> np.ndarray:
    """The unit in the last place of ``dtype`` in the binade of each ``|value|``.

    ``values`` are taken as they are (not rounded to ``dtype`` first):
    ``2**floor(log2 |x|) * eps``.  Below the smallest normal number the unit
    is that number: XLA on CPU and GPUs flush subnormal results to zero, and
    gradual underflow is not part of the contract.  Infinities and NaN give
    NaN: there is no tolerance around a limit, so every comparison with such
    a unit fails and limits must be compared exactly.  Callers that want the
    spacing at the value rounded to ``dtype`` pass ``round_to(values, dtype)``.
    """
    bits, emin, _ = FORMATS[dtype_name(dtype)]
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    _, exponent = np.frexp(magnitude)
    binade = np.where(magnitude > 0, exponent - 1, emin - 1)  # |x| in [2**binade, 2**(binade + 1))
    unit = np.where(binade < emin, np.ldexp(1.0, emin), np.ldexp(1.0, binade - (bits - 1)))
    return np.where(np.isfinite(magnitude), unit, np.nan)


def move_to_end(array: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Move ``axes`` to the end and flatten them: shape (kept..., n).  Works
    for empty arrays (the flattened length is computed, not inferred)."""
    kept = tuple(ax for ax in range(array.ndim) if ax not in axes)
    moved = np.transpose(array, kept + axes)
    length = math.prod(array.shape[ax] for ax in axes)
    return moved.reshape(tuple(array.shape[ax] for ax in kept) + (length,))


def exact_logsumexp(a, axis=None, b=None, where=None) -> np.ndarray:
    """Exact ``log(sum(b * exp(a)))`` over finite-or-masked inputs, as ``mpf``.

    Returns an object array of the reduced shape (empty when that shape is).
    Excluded entries (``where`` False or ``b == 0``) do not count; an empty
    or all-excluded slice gives ``-inf``.  A negative sum gives the log of
    its magnitude (callers compare signs separately).
    """
    mp = _mp()
    a = np.asarray(a, dtype=np.float64)
    shape = np.broadcast_shapes(a.shape, np.shape(b) if b is not None else (), np.shape(where) if where is not None else ())
    a = np.broadcast_to(a, shape)
    weights = np.broadcast_to(np.ones(()) if b is None else np.asarray(b, dtype=np.float64), shape)
    mask = np.broadcast_to(np.ones((), bool) if where is None else np.asarray(where, bool), shape)
    axes = normalize_axis(axis, len(shape))
    flat_a, flat_b, flat_w = (move_to_end(x, axes) for x in (a, weights, mask))
    out = np.empty(flat_a.shape[:-1], dtype=object)
    if flat_a.shape[-1] > _LONG_SLICE and b is None and where is None:
        return _long_logsumexp(flat_a, out)
    with _precise(mp):
        for index in np.ndindex(out.shape):
            kept = [(x, w) for x, w, keep in zip(flat_a[index], flat_b[index], flat_w[index]) if keep and w != 0]
            if len(kept) == 1:
                # One term: log(w exp(x)) = x + log|w| exactly, not through
                # exp and log, whose rounding would leave x - lse ~ 1e-48
                # instead of 0 (log_softmax over a single entry).
                x, w = kept[0]
                out[index] = mp.mpf(float(x)) + mp.log(abs(mp.mpf(float(w))))
                continue
            out[index] = _log_abs_sum(mp, [_weighted_exp(mp, x, w) for x, w in kept])
    return out


def _weighted_exp(mp, x, w) -> object:
    """``w exp(x)`` at the working precision (``exp(x)`` itself where ``w`` is 1: the product is exact)."""
    term = mp.exp(mp.mpf(float(x)))
    return term if w == 1 else mp.mpf(float(w)) * term


def _log_abs_sum(mp, terms) -> object:
    """``log|sum(terms)|`` of ``mpf`` terms, to the working precision even where the sum is near 1 in magnitude.

    The terms within ``2**-SPAN`` of the largest are added exactly and, where
    their sum is near 1, the log is ``log1p(|sum| - 1)`` of the exact
    difference: a sum rounded to the working precision would hold no more
    than 160 bits of ``1 + 5e-127`` (``logsumexp([0, -745.5], b=[1,
    1e308])``, ``logsumexp([0, -290])``) and give 0 for its log.  (mpmath's
    ``fsum`` rounds too: ``fsum([1, 1e-200, -1])`` is 0.)  Smaller terms are
    added to that difference at the working precision (an exact ``1 +
    exp(-1e30)`` would not fit in memory); if the larger ones cancel
    exactly, the log is the smaller ones' own.
    """
    terms = list(terms)
    if len(terms) == 1:  # the running sums of the prefix oracle: the same steps, without the sorting
        return _log_abs_one(mp, terms[0])
    if any(mp.isnan(term) for term in terms):
        return mp.nan
    terms.sort(key=abs, reverse=True)
    if not terms or terms[0] == 0:
        return mp.mpf("-inf")
    floor = abs(terms[0]) * mp.ldexp(1, -_SPAN)
    large = [term for term in terms if abs(term) >= floor]
    small = terms[len(large):]
    total = mp.mpf(0)
    for term in large:
        total = mp.fadd(total, term, exact=True)
    if total == 0:
        return _log_abs_sum(mp, small)
    sign = -1 if total < 0 else 1
    rest = sign * mp.fsum(small)  # what the smaller terms add to |sum|
    magnitude = mp.fneg(total, exact=True) if total < 0 else total  # abs() would round
    if 0.5 <= magnitude <= 2:
        return mp.log1p(mp.fadd(mp.fadd(magnitude, -1, exact=True), rest))
    return mp.log(magnitude + rest)


def _log_abs_one(mp, term) -> object:
    """:func:`_log_abs_sum` of one term (nothing smaller to add)."""
    if mp.isnan(term):
        return mp.nan
    if term == 0:
        return mp.mpf("-inf")
    magnitude = mp.fneg(term, exact=True) if term < 0 else term  # abs() would round
    if 0.5 <= magnitude <= 2:
        return mp.log1p(mp.fadd(magnitude, -1, exact=True) + 0)
    return mp.log(magnitude + 0)


#: Terms below ``2**-_SPAN`` of the largest are added at the working precision.
_SPAN = 4000


_LONG_SLICE = 65_536


def _long_logsumexp(flat_a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Long unweighted slices: ``max + L`` from :func:`_long_log_norm`."""
    mp = _mp()
    with _precise(mp):
        for index in np.ndindex(out.shape):
            top, log_norm = _long_log_norm(mp, flat_a[index])
            out[index] = top + log_norm
    return out


def _long_log_norm(mp, values: np.ndarray) -> tuple:
    """``(max, log(sum exp(values - max)))`` of a long slice: float64 terms, summed by
    ``math.fsum`` (correctly rounded).

    mpmath costs microseconds per entry.  The entries at the max are counted
    exactly and kept out of the float64 sum, so that ``count + rest`` is
    formed in mpmath: a float64 ``1 + rest`` would round a dominant row's
    tiny rest away (7.7e-7 relative on a row of 70,001 entries).  Each
    float64 ``exp(x - max)`` is within one float64 ulp (plus ``|x - max|``
    half-ulps from the shift), and an exact sum of terms with relative errors
    below ``d`` has relative error below ``d``; that bounds the oracle's
    error by about 1e-15 of ``rest`` relative, far under a float32 ulp and
    under half a float64 ulp of the catalogue's long logsumexps.
    """
    top = float(values.max())
    below = values[values < top]
    count = values.size - below.size
    rest = math.fsum(np.exp(below - top).tolist())
    return mp.mpf(top), mp.log1p((count - 1) + mp.mpf(rest))


def _log_norms(x: np.ndarray, axes: tuple[int, ...], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(m, L)`` of each slice (keepdims shape, ``mpf``): its max and ``log(sum exp(x - m))``
    over the included entries; ``m = -inf``, ``L = 0`` where none is."""
    mp = _mp()
    flat_x, flat_mask = move_to_end(x, axes), move_to_end(mask, axes)
    tops, norms = (np.empty(flat_x.shape[:-1], dtype=object) for _ in range(2))
    with _precise(mp):
        for index in np.ndindex(tops.shape):
            values = flat_x[index][flat_mask[index]]
            if values.size > _LONG_SLICE:
                tops[index], norms[index] = _long_log_norm(mp, values)
                continue
            if not values.size:
                tops[index], norms[index] = mp.mpf("-inf"), mp.mpf(0)
                continue
            top = mp.mpf(float(values.max()))
            tops[index] = top
            norms[index] = _log_abs_sum(mp, [mp.exp(mp.mpf(float(v)) - top) for v in values])
    keep = tuple(1 if ax in axes else n for ax, n in enumerate(x.shape))
    return tops.reshape(keep), norms.reshape(keep)


def exact_log_softmax(x, axis=None, where=None) -> np.ndarray:
    """Exact ``x - logsumexp(x)``; excluded entries get ``-inf``.

    Formed as ``(x - m) - L`` with ``m`` the slice's max and ``L`` the log of
    its sum relative to ``m``, not as ``x - lse``: ``lse = m + L`` rounded to
    the working precision loses a tiny ``L`` (``log_softmax`` at the max of a
    column whose second entry is 108 below is ``-1.25e-47``; ``x - lse`` gave
    0 at 160 bits).
    """
    mp = _mp()
    x = np.asarray(x, dtype=np.float64)
    axes = normalize_axis(axis, x.ndim)
    mask = np.broadcast_to(np.ones((), bool) if where is None else np.asarray(where, bool), x.shape)
    tops, norms = _log_norms(x, axes, mask)
    out = np.empty(x.shape, dtype=object)
    with _precise(mp):
        for index in np.ndindex(x.shape):
            line = tuple(0 if ax in axes else i for ax, i in enumerate(index))
            if not mask[index]:
                out[index] = mp.mpf("-inf")
                continue
            # x - m exactly (both doubles), then one rounding at the working precision.
            out[index] = mp.fsub(mp.mpf(float(x[index])), tops[line], exact=True) - norms[line]
    return out


def exact_softmax(x, axis=None, where=None) -> np.ndarray:
    """Exact ``exp(x - logsumexp(x))``; excluded entries get 0."""
    return exact_exp(exact_log_softmax(x, axis=axis, where=where))


def exact_exp(values) -> np.ndarray:
    """``exp`` of each of the oracle's ``mpf`` values, at its working precision
    (softmax from :func:`exact_log_softmax`'s values, where a caller has them)."""
    mp = _mp()
    values = np.asarray(values, dtype=object)
    out = np.empty(values.shape, dtype=object)
    with _precise(mp):
        for index in np.ndindex(out.shape):
            out[index] = mp.exp(values[index])
    return out


def double_double(exact) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's ``mpf`` values as double-double ``hi + lo`` (NaN/inf in ``hi``, ``lo`` 0).

    For vectorised error measures over many entries (``ulp_error`` loops in
    mpmath: tens of microseconds per entry).
    """
    exact = np.asarray(exact, dtype=object)
    flat = exact.reshape(-1)
    hi = np.array([float(e) for e in flat], dtype=np.float64)
    lo = np.array([float(e - h) if np.isfinite(h) else 0.0 for e, h in zip(flat, hi)], dtype=np.float64)
    return hi.reshape(exact.shape), lo.reshape(exact.shape)


def ulp_error(got, exact: np.ndarray, dtype) -> np.ndarray:
    """``|got - exact|`` in units of the last place of ``dtype`` at ``exact``.

    The unit is :func:`ulp` at the exact value rounded to ``dtype``, so a
    correctly rounded result scores at most 0.5; below the smallest normal
    number it is the smallest normal number (flush to zero is allowed).
    Equal infinities and matching NaNs score 0; anything else non-finite
    scores ``inf``.  ``exact`` may hold ``mpf`` or floats.
    """
    mp = _mp()
    got = np.asarray(got, dtype=np.float64)
    exact = np.asarray(exact, dtype=object)
    got, exact = np.broadcast_arrays(got, exact)
    nearest = exact.astype(np.float64) if exact.size else np.zeros(exact.shape)
    rounded = round_to(nearest, dtype)
    # A finite exact value beyond the dtype's range is counted in the units
    # of its own binade (rounding it gives infinity, which has none).
    units = ulp(np.where(np.isinf(rounded), nearest, rounded), dtype)
    errors = np.empty(got.shape, dtype=np.float64)
    for index in np.ndindex(got.shape):
        g, e = got[index], exact[index]
        if not mp.isfinite(e) or not np.isfinite(g):
            same = (mp.isnan(e) and np.isnan(g)) or (not mp.isnan(e) and float(e) == g)
            errors[index] = 0.0 if same else np.inf
            continue
        errors[index] = float(abs(mp.mpf(float(g)) - e) / mp.mpf(float(units[index])))
    return errors


def ulp_errors(got, exact, dtype) -> np.ndarray:
    """:func:`ulp_error`, vectorised through a double-double copy of the exact values.

    ``exact`` holds ``mpf`` or floats, or is a ``(hi, lo)`` pair from
    :func:`double_double` (made once for many comparisons).  The same units
    and limits as :func:`ulp_error`; the difference ``(got - hi) - lo`` is
    rounded once in float64, which moves an error by a relative ``2**-53``
    (the loop of :func:`ulp_error` costs tens of microseconds per entry).
    """
    hi, lo = exact if isinstance(exact, tuple) else double_double(exact)
    got, hi, lo = np.broadcast_arrays(np.asarray(got, dtype=np.float64), hi, lo)
    finite = np.isfinite(hi) & np.isfinite(got)
    same = (hi == got) | (np.isnan(hi) & np.isnan(got))
    nearest = np.where(finite, hi, 0.0)
    rounded = round_to(nearest, dtype)
    units = ulp(np.where(np.isinf(rounded), nearest, rounded), dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        value = np.abs((got - hi) - lo) / units
    return np.where(finite, value, np.where(same, 0.0, np.inf))


# --- the log semiring (lse_dispatch.semiring) --------------------------------


def _exact_lse_of(values, mp) -> object:
    """``log(sum(exp(v)))`` of Python floats with the contract's limits: NaN, then ``+inf``, then ``-inf``."""
    if any(v != v for v in values):
        return mp.mpf("nan")
    if any(v == np.inf for v in values):
        return mp.mpf("inf")
    finite = [v for v in values if v != -np.inf]
    if not finite:
        return mp.mpf("-inf")
    if len(finite) == 1:
        return finite[0] if isinstance(finite[0], mp.mpf) else mp.mpf(finite[0])
    return _log_abs_sum(mp, [mp.exp(v) for v in finite])


def exact_logcumsumexp(x, axis=None, reverse=False) -> np.ndarray:
    """Exact prefix log-sum-exps of ``x`` along ``axis`` (``None``: 1-D input), as ``mpf``.

    Entry ``i`` is ``log(sum(exp(x[..., :i+1])))`` (of ``x[..., i:]`` with
    ``reverse``): ``-inf`` entries add nothing, an empty or all ``-inf``
    prefix gives ``-inf``, ``+inf`` from the first ``+inf`` on and NaN from
    the first NaN on.  The running sum is kept exactly (see :func:`_log_abs_sum`).
    """
    mp = _mp()
    x = np.asarray(x, dtype=np.float64)
    axis = 0 if axis is None else axis % x.ndim
    moved = np.moveaxis(x, axis, -1)
    if reverse:
        moved = moved[..., ::-1]
    out = np.empty(moved.shape, dtype=object)
    with _precise(mp):
        for index in np.ndindex(moved.shape[:-1]):
            total = mp.mpf(0)
            state = "finite"
            for position, value in enumerate(moved[index].tolist()):
                if value != value:
                    state = "nan"
                elif value == np.inf and state != "nan":
                    state = "inf"
                elif value != -np.inf:
                    total = mp.fadd(total, mp.exp(mp.mpf(value)), exact=True)
                if state == "nan":
                    out[index + (position,)] = mp.mpf("nan")
                elif state == "inf":
                    out[index + (position,)] = mp.mpf("inf")
                else:
                    out[index + (position,)] = _log_abs_sum(mp, [total])
    if reverse:
        out = out[..., ::-1]
    return np.moveaxis(out, -1, axis)


def exact_logmatmulexp(a, b) -> np.ndarray:
    """Exact ``log(exp(a) @ exp(b))`` with ``matmul``'s shapes (1-D rules included), as ``mpf``.

    Entry ``(i, j)`` is ``log(sum_k exp(a_ik + b_kj))`` with every
    ``a_ik + b_kj`` formed exactly (in ``PRECISION`` bits); the limits are
    those of the pairs: NaN or ``-inf + inf`` gives NaN, a ``+inf`` pair
    ``+inf``, no finite pair ``-inf``.
    """
    mp = _mp()
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    a2 = np.broadcast_to(a2, batch + a2.shape[-2:])
    b2 = np.broadcast_to(b2, batch + b2.shape[-2:])
    n = a2.shape[-2]
    m = b2.shape[-1]
    out = np.empty(batch + (n, m), dtype=object)
    with _precise(mp):
        for index in np.ndindex(batch):
            for i in range(n):
                row = a2[index + (i,)].tolist()
                for j in range(m):
                    col = b2[index + (slice(None), j)].tolist()
                    pairs = []
                    for u, v in zip(row, col):
                        if u != u or v != v or {u, v} == {np.inf, -np.inf}:
                            pairs.append(float("nan"))
                        elif np.inf in (u, v):
                            pairs.append(np.inf)
                        elif -np.inf in (u, v):
                            pairs.append(-np.inf)
                        else:
                            pairs.append(mp.mpf(u) + mp.mpf(v))
                    out[index + (i, j)] = _exact_lse_of(pairs, mp)
    if b.ndim == 1:
        out = out[..., 0]
    if a.ndim == 1:
        out = out[..., 0] if b.ndim == 1 else out[..., 0, :]
    return out
