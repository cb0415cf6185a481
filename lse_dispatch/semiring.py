"""The log semiring: cumulative log-sum-exp and the log-space matrix product.

Log-sum-exp is the "addition" of the log semiring and ``+`` its
"multiplication"; this module adds the two operations built from them:

* :func:`logcumsumexp` -- ``log(cumsum(exp(x)))``: the *scan* of the
  ``(max, count, rest)`` merge of :mod:`lse_dispatch._state`;
* :func:`logmatmulexp` -- ``log(exp(a) @ exp(b))``: each entry is a
  log-sum-exp over ``k`` of ``a_ik + b_kj``, finalised from a state.

Both take every array-API library (NumPy, torch, JAX, Dask, CuPy,
array-api-strict), keep namespace, device and dtype, and follow the
contract's limits.  The design, the error analysis and the measured figures
are in ``docs/semiring.md``; in short:

**logcumsumexp.**  Every prefix ``i`` is the state ``(m_i, T_i)`` with
``m_i`` the running max and ``T_i = sum_{j <= i, j != d(i)} exp(x_j - m_i)``,
the sum of every term but one at the max (``d(i)``, its first occurrence), so
that ``lse_i = m_i + log1p(T_i)`` keeps the tiny ``T_i`` of ``[0, -40]``.
``T_i`` is a sum of non-negative terms, so no step cancels.

* *Lazy-safe path* (JAX, torch under ``torch.func``, namespaces without a
  native running max): the blocked path below with one entry per block
  (:func:`recurrence_states`), which reads no value on the host: the
  running max fixes every reference, the rest is a log-step linear
  recurrence; finalised by :func:`~lse_dispatch._state.finalize`.  (A
  log-step scan of :func:`~lse_dispatch._state.merge` is kept as the
  method ``"scan"``; it needs no running max but carries three arrays
  through every level.)
* *Blocked path* (eager NumPy and torch, and each Dask chunk): the running
  max ``m`` (a native ``cummax``) fixes every reference in advance.  Blocks
  of ``B`` entries take the block's last running max ``R_b`` as reference; a
  native cumulative sum of ``exp(x_j - R_b)`` (the block's designated max
  term left out) plus the carry gives ``T_i`` for every position whose
  running max has already reached ``R_b``.  The carries solve the linear
  recurrence ``E_b = alpha_b E_{b-1} + beta_b`` with
  ``alpha_b = exp(R_{b-1} - R_b)`` (log-step over the ``n / B`` blocks).  The
  blocks with positions before a new maximum (about ``1 + ln(n / B)`` per
  line on random data, all of them on increasing data) are redone as lines
  of one-entry blocks, where every position is its own block's end and the
  carries alone give ``T``.  Positions whose running max is not finite go
  to ``finalize``.

**logmatmulexp.**  With ``ma_i = max_k a_ik``, ``mb_j = max_k b_kj`` and
``A = exp(a - ma)``, ``B = exp(b - mb)`` (entries in [0, 1], differences
exact), ``P = A @ B`` is the sum scaled by ``exp(-(ma_i + mb_j))``.  One
designated max entry per row of ``A`` (``ka(i)``, the first argmax) and per
column of ``B`` (``kb(j)``) is zeroed before the product, ``Q = A'' @ B''``,
and put back exactly:

    ``P_ij = Q_ij + A''[i, kb(j)] + B''[ka(i), j] + [ka(i) == kb(j)]``,

so ``T = P - 1`` (what ``log1p`` needs) is again formed without cancelling
the 1 (``expm1`` of the exact difference where the designated entries
differ).  Entries where ``P`` is below ``tau`` (about
``2**(p + 2) k`` smallest normals; underflow would cost relative accuracy),
or whose row or column max is not finite, are recomputed from their own
``k`` pairs ``a_ik + b_kj`` (sums taken exactly) by
``state_from_exponents`` and ``finalize``: the dominant pairs away from the
row and column maxima (``[[0, -2000], [-2000, 0]] @ [[-2000, 0], [0, -2000]]``)
land there.  Where the accumulator is wider than the input (float32 in
float64) one matrix product is exact enough; otherwise (float64, and float32
on JAX without x64) the product is split into slices whose products sum
exactly (``_accurate_product``; float64), and entries whose remaining error
could cost an ulp go to the fallback; float32 without x64 adds chunks of 32
by TwoSum instead.

Neither function takes ``where`` or weights: ``where`` is exactly
``xp.where(mask, x, -inf)`` for both, and positive weights are ``x + log(w)``.
Signed weights are left out: a cumulative sum of signed terms has a sign that
changes along the axis and cancels without bound.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import array_api_compat

from ._namespace import DtypePlan, plan_dtypes, resolve_namespace, scalar
from ._numerics import numerics_for
from ._state import (
    LSEState,
    exp_difference,
    finalize,
    flush_ratio,
    flushed_terms_rescued,
    merge,
    merge_compensated,
    precision_bits,
    reduce_max,
    state_from_exponents,
    two_sum,
)
from ._validate import AxisError

__all__ = ["logcumsumexp", "logmatmulexp"]

Array = Any

# Entries per block of the blocked scan: each block's cumulative sum runs
# sequentially (error (B - 1) u relative); the float64 value keeps that small
# where there is no wider accumulator.
_BLOCK_WIDE = 64
_BLOCK_NARROW = 16
# Elements per tile of the blocked scan: its float64 temporaries stay in cache.
_SCAN_TILE = 1 << 17
# Elements of the (entries x k) exponents of one fallback batch.
_FALLBACK_BATCH = 1 << 20
# Output elements per row tile of the eager matrix product (bounds the
# temporaries to a few times the output's own tile).
_MATMUL_TILE = 1 << 15


# ---------------------------------------------------------------------------
# argument handling


def _real_plan(xp, name: str, *arrays) -> DtypePlan:
    plan = plan_dtypes(xp, *arrays)
    if plan.is_complex:
        dtypes = ", ".join(str(x.dtype) for x in arrays)
        raise TypeError(f"argument '{name}' must be real (the log semiring has no complex form), got dtype {dtypes}")
    return plan


def _scan_axis(x, axis) -> int:
    if x.ndim == 0:
        raise ValueError("argument 'x' must have at least one dimension, got a 0-d array")
    if axis is None:
        if x.ndim != 1:
            raise ValueError(
                f"argument 'axis' must be given for an array of dimension {x.ndim} "
                "(axis=None is only allowed for 1-D input, as in cumulative_sum)"
            )
        return 0
    if isinstance(axis, bool):
        raise TypeError(f"argument 'axis' must be None or an int, got {axis!r}")
    try:
        index = operator.index(axis)
    except TypeError:
        raise TypeError(f"argument 'axis' must be None or an int, got {axis!r}") from None
    if not -x.ndim <= index < x.ndim:
        raise AxisError(f"axis {index} is out of range for an array of dimension {x.ndim}")
    return index % x.ndim


def _quiet(xp):
    """A context in which overflow to ``inf`` is a correct result (a sum beyond the range), not a warning."""
    return numerics_for(xp).quiet()


# ---------------------------------------------------------------------------
# logcumsumexp


def logcumsumexp(x, /, *, axis=None, include_initial=False, reverse=False):
    """Cumulative log-sum-exp, ``log(cumsum(exp(x)))``, accurately.

    Parameters
    ----------
    x : array
        Real input of any array-API library (Python scalars and sequences are
        treated as NumPy); integer and boolean input is computed in the
        namespace's default floating dtype, float16/bfloat16 in float32.
    axis : int, optional
        Axis of the scan.  ``None`` is only allowed for 1-D input (the
        array API's ``cumulative_sum`` convention).
    include_initial : bool, optional
        Prepend the empty sum's value, ``-inf``, so that the axis grows by
        one (appended instead with ``reverse``).
    reverse : bool, optional
        Scan from the end: entry ``i`` is the log-sum-exp of ``x[i:]``.

    Returns
    -------
    array
        Same namespace, device and dtype (the floating result dtype) as `x`.
        Entry ``i`` is ``logsumexp(x[..., :i+1])`` along `axis`: ``-inf``
        while every entry so far is ``-inf``, ``+inf`` from the first
        ``+inf`` on, NaN from the first NaN on.

    Notes
    -----
    There is no ``where`` or weight argument: masking is
    ``xp.where(mask, x, -inf)``, which excludes entries exactly (NaN and
    ``inf`` included) and gives them a zero gradient; positive weights are
    ``x + log(w)``.  Accuracy: 4 ulps against the mpmath oracle in float32 and
    float64, 1 ulp in float16/bfloat16 (``docs/semiring.md``).

    Examples
    --------
    >>> import numpy as np
    >>> from lse_dispatch import logcumsumexp
    >>> [float(v) for v in logcumsumexp(np.array([0.0, -40.0, 0.0]))]
    [0.0, 4.248354255291589e-18, 0.6931471805599453]
    >>> [float(v) for v in logcumsumexp(np.array([0.0, 1.0]), include_initial=True, reverse=True)]
    [1.3132616875182228, 1.0, -inf]
    """
    xp, arrays = resolve_namespace({"x": x})
    x = arrays["x"]
    axis = _scan_axis(x, axis)
    plan = _real_plan(xp, "x", x)
    kernels = numerics_for(xp).semiring()
    if kernels is not None and kernels.takes(x):
        return kernels.logcumsumexp(x, axis, bool(include_initial), bool(reverse), plan)
    return cumulative(xp, x, axis, plan, include_initial=include_initial, reverse=reverse)


def cumulative(xp, x: Array, axis: int, plan: DtypePlan, *, include_initial=False, reverse=False, method=None):
    """``logcumsumexp`` of a real array of namespace ``xp`` (result dtype ``plan.result``).

    ``method`` is ``"blocked"`` (eager namespaces), ``"recurrence"`` (the
    running max and a log-step linear recurrence, lazy-safe: the default of
    lazy namespaces), ``"scan"`` (the log-step merge scan, lazy-safe) or
    ``None`` for the namespace's default.
    Shared by the public function, the derivative wrappers and the tests,
    which force each method.
    """
    if method is None:
        numerics = numerics_for(xp)
        method = "recurrence" if numerics.lazy or numerics.cummax is None else "blocked"
    x = xp.astype(x, plan.compute)
    if reverse:
        x = xp.flip(x, axis=axis)
    n = x.shape[axis]
    if n == 0:
        out = xp.astype(x, plan.result)
    else:
        moved = _move(xp, x, axis, -1)
        with _quiet(xp):
            if method == "blocked":
                if axis != x.ndim - 1:
                    # One transposing copy (flattening lays the lines out one
                    # after another) rather than strided reads in every tile
                    # (torch, (4096, 4096) float32 along axis 0, one thread:
                    # 1.35 s before, 0.96 s after).
                    moved = xp.reshape(xp.reshape(moved, (-1,)), moved.shape)
                out = _blocked_lines(xp, moved, plan)
            else:
                scan = recurrence_states if method == "recurrence" else _merge_scan
                state = scan(xp, moved, plan.accumulator)
                out, _ = finalize(xp, state, plan.result)
        out = _move(xp, out, -1, axis)
    if include_initial:
        shape = tuple(1 if ax == axis else extent for ax, extent in enumerate(out.shape))
        initial = xp.full(shape, -math.inf, dtype=plan.result, device=array_api_compat.device(out))
        out = xp.concat([initial, out], axis=axis)
    if reverse:
        out = xp.flip(out, axis=axis)
    return out


def recurrence_states(xp, x: Array, accumulator) -> LSEState:
    """Inclusive prefix states along the last axis, with no value read on the host.

    The running max ``m_i`` (a native ``cummax`` where the library has one)
    is every prefix's reference, so the rest obeys the linear recurrence
    ``T_i = alpha_i T_{i-1} + beta_i`` with ``alpha_i = exp(m_{i-1} - m_i)``
    (exact difference; 1 while the max stands) and ``beta_i`` the new term
    ``exp(x_i - m_i)`` or, at a new max (whose entry becomes the designated
    one), the former designated term ``alpha_i``.  Solved log-step by
    :func:`_linear_scan`: every quantity is non-negative, so no level
    cancels, and prefix ``i`` sees ``ceil(log2 n)`` levels of 3.5 roundings.
    This is the blocked scan with one entry per block; it is what lazy and
    traced namespaces run (a few operations per level, where the merge scan
    carries three arrays through every level: JAX compiles it several times
    faster).
    """
    shape = tuple(x.shape)
    n = shape[-1]
    if n == 0 or math.prod(shape) == 0:  # nothing to scan (and no -1 in a reshape of an empty array)
        return single_states(xp, x, accumulator)
    lines = xp.reshape(x, (-1, n))
    rows = lines.shape[0]
    device = array_api_compat.device(x)
    neg_inf = scalar(xp, -math.inf, x)
    xs = xp.where(xp.isfinite(lines), lines, neg_inf)
    m = cummax(xp, xs, axis=1)
    first = xp.full((rows, 1), -math.inf, dtype=x.dtype, device=device)
    before = xp.concat([first, m[:, : n - 1]], axis=1)
    shift = xp.where(m == -math.inf, scalar(xp, 0.0, m), m)
    nothing = xp.zeros((rows, 1), dtype=accumulator, device=device)

    def rest_from(reference):
        # Each position's rest relative to its (finite) reference; the
        # reference before it is the previous one's (-inf after an empty prefix).
        previous = xp.concat([first, xp.where(m == -math.inf, m, reference)[:, : n - 1]], axis=1)
        terms = exp_difference(xp, xs, reference, accumulator)  # exp(x_i - m_i) <= 1; 0 for -inf
        alpha = exp_difference(xp, previous, reference, accumulator)  # 0 after an empty prefix
        # At a new max the former designated term joins the rest: exp(m_{i-1} - reference_i),
        # which is alpha where the references are the maxima themselves.
        designated = alpha if reference is shift else exp_difference(xp, before, reference, accumulator)
        beta = xp.where(m > before, designated, terms)
        return _linear_scan(xp, alpha, beta, nothing, previous, reference, accumulator)

    rest = rest_from(shift)
    if numerics_for(xp).bitcast is not None:
        # The terms a flushing library loses (XLA: below 2**-126 of the
        # reference), as in the logsumexp state: prefixes whose rest is tiny
        # are summed again with references e**offset lower.
        rest = flushed_terms_rescued(xp, m, shift, rest, n, rest_from)
    m, count = _non_finite_prefixes(xp, lines, m, first, xp.ones_like(rest), nothing)
    return LSEState(*(xp.reshape(field, shape) for field in (m, count, rest)))


def _move(xp, x: Array, source: int, destination: int) -> Array:
    """``moveaxis`` through ``permute_dims`` (which ``torch.func.vmap`` batches; its moveaxis is not)."""
    order = list(range(x.ndim))
    order.insert(destination % x.ndim, order.pop(source % x.ndim))
    return x if order == list(range(x.ndim)) else xp.permute_dims(x, tuple(order))


def single_states(xp, x: Array, accumulator) -> LSEState:
    """One state per entry: ``(x, 1, 0)``; ``merge`` and ``finalize`` take every limit from there."""
    one = xp.ones(x.shape, dtype=accumulator, device=array_api_compat.device(x))
    return LSEState(x, one, xp.zeros_like(one))


def _empty_state_like(xp, state: LSEState, shape) -> LSEState:
    device = array_api_compat.device(state.max)
    return LSEState(
        xp.full(shape, -math.inf, dtype=state.max.dtype, device=device),
        xp.zeros(shape, dtype=state.count.dtype, device=device),
        xp.zeros(shape, dtype=state.rest.dtype, device=device),
    )


def _shift_right(xp, state: LSEState, s: int) -> LSEState:
    """The states moved ``s`` places along the last axis, empty states entering."""
    lead = state.max.shape[:-1] + (s,)
    empty = _empty_state_like(xp, state, lead)
    return LSEState(*(xp.concat([e, f[..., :-s]], axis=-1) for e, f in zip(empty, state)))


def _merge_scan(xp, x: Array, accumulator) -> LSEState:
    """Inclusive prefix states along the last axis: a log-step scan of ``merge``.

    Level ``l`` merges each state with the one ``2**l`` places before it
    (Hillis--Steele), so prefix ``i`` is a merge tree of depth
    ``ceil(log2 n)``: the rest's relative error grows like ``log2 n``, not
    ``n``.  O(n log n) work in array operations that any namespace has.
    """
    state = single_states(xp, x, accumulator)
    n = x.shape[-1]
    s = 1
    while s < n:
        state = merge(xp, _shift_right(xp, state, s), state)
        s *= 2
    return state


# --- the blocked scan -------------------------------------------------------


def cummax(xp, x: Array, axis: int = -1) -> Array:
    """Running maximum along ``axis`` (NaN propagates), natively where the library has it."""
    axis = axis % x.ndim
    native = numerics_for(xp).cummax
    if native is not None:
        return native(xp, x, axis)
    moved = _move(xp, x, axis, -1)
    n = moved.shape[-1]
    s = 1
    while s < n:
        pad = xp.full(moved.shape[:-1] + (s,), -math.inf, dtype=moved.dtype, device=array_api_compat.device(moved))
        moved = xp.maximum(moved, xp.concat([pad, moved[..., :-s]], axis=-1))
        s *= 2
    return _move(xp, moved, -1, axis)


def _blocked_lines(xp, x: Array, plan: DtypePlan) -> Array:
    """The blocked scan along the last axis of ``x`` (compute dtype)."""
    out, _ = blocked_with_carry(xp, x, plan, None)
    return out


def blocked_with_carry(xp, x: Array, plan: DtypePlan, carry: LSEState | None) -> tuple[Array, LSEState]:
    """The blocked scan along the last axis of ``x``, continuing ``carry``; returns the values and the final state.

    ``carry`` (or the returned state) has the shape ``x.shape[:-1] + (1,)``
    (``None``: nothing before).  Lines are grouped so that a tile holds about
    ``_SCAN_TILE`` entries; a line longer than that is cut into segments
    that pass their final state on.  Dask chains its chunks along the axis
    through this carry.
    """
    acc = plan.accumulator
    block = _BLOCK_WIDE if acc != plan.compute else _BLOCK_NARROW
    lead = x.shape[:-1]
    n = x.shape[-1]
    lines = math.prod(lead)
    device = array_api_compat.device(x)
    flat = xp.reshape(x, (lines, n))
    if carry is None:
        carry = _empty_carry(xp, lines, x.dtype, acc, device)
    else:
        carry = LSEState(*(xp.reshape(field, (lines, 1)) for field in carry))
    segment = max(block, (_SCAN_TILE // block) * block)
    per_tile = max(1, _SCAN_TILE // n) if n <= segment else 1
    out = xp.empty((lines, n), dtype=plan.result, device=device)
    finals = []
    for start in range(0, lines, per_tile):
        stop = min(lines, start + per_tile)  # array-api-strict refuses slices past the end
        rows = flat[start:stop, ...]
        state = LSEState(*(field[start:stop, ...] for field in carry))
        for begin in range(0, n, segment):
            end = min(n, begin + segment)
            values, state = _scan_tile(xp, rows[:, begin:end], state, acc, block)
            out[start:stop, begin:end] = _finalize_scan(xp, values, plan.result)
        finals.append(state)
    final = LSEState(*(xp.concat([f[position] for f in finals], axis=0) for position in range(3)))
    return xp.reshape(out, lead + (n,)), LSEState(*(xp.reshape(field, lead + (1,)) for field in final))


def carried_state(xp, x: Array, carry: LSEState | None, low: Array | None, final: LSEState, plan: DtypePlan):
    """The state after a block ``x`` (scanned along its last axis) that continued ``carry``, and its ``low``.

    ``final`` is the scan's own final state.  Where the accumulator is the
    input dtype and ``carry`` is finite, the state is instead ``carry``
    (with its rounding ``low``) merged with the block's own state by
    :func:`merge_compensated`, so that a chain of blocks keeps its
    roundings apart; elsewhere ``final`` with a ``low`` of 0.
    """
    zero = xp.zeros_like(final.rest)
    if carry is None or plan.accumulator != plan.compute:
        return final, zero
    own = state_from_exponents(xp, x, (x.ndim - 1,), plan.accumulator)
    merged, merged_low = merge_compensated(xp, carry, low, own, xp.zeros_like(own.rest))
    # The rest as the rounded sum, low as what that rounding left: the next
    # block's values read the rest alone.
    rest, merged_low = two_sum(xp, merged.rest, merged_low)
    merged = LSEState(merged.max, merged.count, rest)
    ok = xp.isfinite(merged.max) & xp.isfinite(merged.rest) & xp.isfinite(merged_low)
    state = LSEState(*(xp.where(ok, new, old) for new, old in zip(merged, final)))
    return state, xp.where(ok, merged_low, zero)


def _empty_carry(xp, lines: int, dtype, acc, device) -> LSEState:
    return LSEState(
        xp.full((lines, 1), -math.inf, dtype=dtype, device=device),
        xp.zeros((lines, 1), dtype=acc, device=device),
        xp.zeros((lines, 1), dtype=acc, device=device),
    )


def _finalize_scan(xp, state: LSEState, dtype) -> Array:
    """``m + log1p(T)`` where the running max is finite; ``finalize`` for the other positions."""
    m, count, rest = state
    acc = rest.dtype
    finite = xp.isfinite(m)
    shifted = (count - 1) + rest
    if bool(xp.all(finite)):
        return xp.astype(xp.astype(m, acc) + xp.log1p(shifted), dtype)
    # Positions at +inf, NaN or after an empty prefix: the shared limit rules.
    limits, _ = finalize(xp, state, acc)
    value = xp.astype(m, acc) + xp.log1p(xp.where(finite, shifted, xp.zeros_like(shifted)))
    return xp.astype(xp.where(finite, value, limits), dtype)


def _scan_tile(xp, x: Array, carry: LSEState, acc, block: int) -> tuple[LSEState, LSEState]:
    """Prefix states of the lines of ``x`` (shape ``(L, n)``), continuing ``carry`` (shape ``(L, 1)``).

    Returns the states (``max`` NaN or ``+inf`` from a NaN or ``+inf`` entry
    on, ``count`` 1 and ``rest = T`` where the fast path applies) and the
    state after the last entry.  See the module docstring for the method.
    """
    lines, n = x.shape
    nb = -(-n // block)
    pad = nb * block - n
    device = array_api_compat.device(x)
    neg_inf = scalar(xp, -math.inf, x)
    zero_acc = xp.zeros((), dtype=acc, device=device)
    one_acc = xp.ones((), dtype=acc, device=device)
    finite = xp.isfinite(x)
    all_finite = bool(xp.all(finite)) and bool(xp.all(xp.isfinite(carry.max) | (carry.max == -math.inf)))
    xs = x if all_finite else xp.where(finite, x, neg_inf)
    if pad:
        xs = xp.concat([xs, xp.full((lines, pad), -math.inf, dtype=x.dtype, device=device)], axis=1)
    m0 = carry.max
    m0s = m0 if all_finite else xp.where(xp.isfinite(m0), m0, neg_inf)
    ms = xp.maximum(cummax(xp, xs, axis=1), m0s)
    xb = xp.reshape(xs, (lines, nb, block))
    mb = xp.reshape(ms, (lines, nb, block))
    top_max = mb[:, :, block - 1]  # R_b: the running max at the end of each block
    prev_max = xp.concat([m0s, top_max[:, : nb - 1]], axis=1)  # R_{b-1}
    shift = xp.where(top_max == -math.inf, scalar(xp, 0.0, top_max), top_max)
    terms = exp_difference(xp, xb, shift[:, :, None], acc)  # exp(x_j - R_b) <= 1
    before = xp.concat([prev_max[:, :, None], mb[:, :, : block - 1]], axis=2)
    settled = mb == top_max[:, :, None]
    designated = settled & (before < mb)
    sums = _prefix_sums(xp, xp.where(designated, zero_acc, terms), compensated=acc == x.dtype)
    alpha = exp_difference(xp, prev_max, shift, acc)  # exp(R_{b-1} - R_b); 0 after an empty prefix
    record = xp.astype(top_max > prev_max, acc)
    beta = alpha * record + sums[:, :, block - 1]
    carry_t = (carry.count - one_acc) + carry.rest
    ends = _linear_scan(xp, alpha, beta, carry_t, prev_max, shift, acc)  # E_b = alpha_b E_{b-1} + beta_b
    before_ends = xp.concat([carry_t, ends[:, : nb - 1]], axis=1)
    entering = alpha * (before_ends + record)
    rest = entering[:, :, None] + sums
    count = xp.ones_like(rest)

    # Positions whose running max is finite but below their block's final
    # max: their blocks are redone with one entry per block.
    unsettled = ~settled & (mb > -math.inf)
    redo = xp.any(unsettled, axis=2)
    if bool(xp.any(redo)):
        count, rest = _redo_blocks(xp, xb, redo, prev_max, before_ends, count, rest, acc)

    count = xp.reshape(count, (lines, nb * block))[:, :n]
    rest = xp.reshape(rest, (lines, nb * block))[:, :n]
    m = ms[:, :n]
    if not all_finite:
        m, count = _non_finite_prefixes(xp, x, m, m0, count, carry.count)
    last = LSEState(m[:, n - 1 :], count[:, n - 1 :], rest[:, n - 1 :])
    return LSEState(m, count, rest), last


def _prefix_sums(xp, terms: Array, *, compensated: bool) -> Array:
    """Inclusive sums of the non-negative ``terms`` along the last axis.

    A native cumulative sum rounds once per entry, and with equal terms
    (``[-700, 0] + [-709.5] * 200`` in float64) every rounding goes the same
    way: ``B - 1`` half-ulps in a block of ``B``, which ``log1p(T)`` passes on
    whole where the running max is 0 (7.3 ulps at ``B = 16``).  Where the
    accumulator is the input dtype (``compensated``), the error is put back:
    with ``c`` the native sums, ``c_{j-1} + t_j = s_j + e_j`` exactly
    (:func:`two_sum`), so ``P_j - c_j = sum_{i <= j} ((s_i - c_i) + e_i)``,
    ``s_i - c_i`` exact (both within an ulp or so of ``P_i``, Sterbenz), whatever
    order the library's cumulative sum adds in.  What is left is the rounding
    of that small correction and of ``c + d``: about one rounding.  A wider
    accumulator's roundings are far below the result's ulp already.
    """
    sums = xp.cumulative_sum(terms, axis=-1)
    if not compensated:
        return sums
    width = terms.shape[-1]
    previous = xp.concat([xp.zeros_like(sums[..., :1]), sums[..., : width - 1]], axis=-1)
    total, error = two_sum(xp, previous, terms)
    return sums + xp.cumulative_sum((total - sums) + error, axis=-1)


def _linear_scan(xp, alpha: Array, beta: Array, initial: Array, before: Array, reference: Array, acc) -> Array:
    """Inclusive ``E_b = alpha_b E_{b-1} + beta_b`` along the last axis, ``E_{-1} = initial``,
    where ``alpha_b = exp(before_b - reference_b)`` (``before_b`` the reference of ``b - 1``).

    Log-step: composing ``(alpha1, beta1)`` then ``(alpha2, beta2)`` gives
    ``(alpha1 alpha2, alpha2 beta1 + beta2)``.  The composed ``alpha`` of a
    span telescopes to ``exp(before_first - reference_last)``, and is formed
    so, one ``exp`` of an exact difference (``_state.exp_difference``, about
    1.5 roundings), not as the product of the span's ``alpha``: that product
    kept every factor's rounding, one per rise of the running max (41.7 ulps
    on a float64 line of 10000 entries rising by 1e-4 each, found by
    ``benchmarks/fuzz_semiring.py``).  Every quantity is non-negative, so
    each level adds at most 3.5 roundings relative (that ``exp``, the
    product and the sum).
    """
    nb = alpha.shape[-1]
    s = 1
    start = before  # the reference before each position's span
    while s < nb:
        # Positions before s have nothing s places back: they keep their pair.
        beta = xp.concat([beta[..., :s], beta[..., s:] + alpha[..., s:] * beta[..., : nb - s]], axis=-1)
        start = xp.concat([start[..., :s], start[..., : nb - s]], axis=-1)
        alpha = xp.concat([alpha[..., :s], exp_difference(xp, start[..., s:], reference[..., s:], acc)], axis=-1)
        s *= 2
    return alpha * initial + beta


def _redo_blocks(xp, xb, redo, prev_max, before_ends, count, rest, acc):
    """Recompute the blocks flagged in ``redo`` as lines of blocks of one entry, from the block's carry.

    With one entry per block every position is its own block's end, so
    every position is settled: the carries alone (the log-step linear
    scan over the block's ``B`` entries) give every ``T``.
    """
    lines, nb, block = xb.shape
    flat_redo = xp.reshape(redo, (-1,))
    (index,) = xp.nonzero(flat_redo)
    blocks = xp.take(xp.reshape(xb, (lines * nb, block)), index, axis=0)
    start_max = xp.take(xp.reshape(prev_max, (-1,)), index)[:, None]
    nonempty = start_max > -math.inf
    zero = xp.zeros((), dtype=acc, device=array_api_compat.device(xb))
    carry = LSEState(
        start_max,
        xp.astype(nonempty, acc),
        xp.where(nonempty, xp.take(xp.reshape(before_ends, (-1,)), index)[:, None], zero),
    )
    state, _ = _scan_tile(xp, blocks, carry, acc, 1)
    count = _replace_rows(xp, xp.reshape(count, (lines * nb, block)), state.count, flat_redo)
    rest = _replace_rows(xp, xp.reshape(rest, (lines * nb, block)), state.rest, flat_redo)
    return xp.reshape(count, (lines, nb, block)), xp.reshape(rest, (lines, nb, block))


def _replace_rows(xp, full: Array, replacement: Array, mask: Array) -> Array:
    """``full`` with the rows where ``mask`` is True replaced, in order, by those of ``replacement``.

    A gather from the concatenation instead of an indexed assignment, which
    not every namespace allows.
    """
    rows = full.shape[0]
    device = array_api_compat.device(full)
    positions = xp.cumulative_sum(xp.astype(mask, xp.int64)) - 1
    index = xp.where(mask, positions + rows, xp.arange(rows, dtype=xp.int64, device=device))
    return xp.take(xp.concat([full, replacement], axis=0), index, axis=0)


def _non_finite_prefixes(xp, x, m, carry_max, count, carry_count):
    """The running max with ``+inf`` and NaN put back, and the count of ``+inf`` entries there.

    A NaN entry makes every later prefix NaN, a ``+inf`` entry every later
    prefix ``+inf`` (NaN if a NaN comes too); ``finalize`` takes those
    states.  The carried state may already be ``+inf`` or NaN.
    """
    acc = count.dtype
    nan_seen = xp.astype(xp.isnan(x), acc)
    inf_seen = xp.astype(x == math.inf, acc)
    nan_before = xp.astype(xp.isnan(carry_max), acc)
    inf_before = xp.where(carry_max == math.inf, carry_count, xp.zeros_like(carry_count))
    nans = xp.cumulative_sum(nan_seen, axis=1) + nan_before
    infs = xp.cumulative_sum(inf_seen, axis=1) + inf_before
    m = xp.where(infs > 0, scalar(xp, math.inf, m), m)
    m = xp.where(nans > 0, scalar(xp, math.nan, m), m)
    count = xp.where(infs > 0, infs, count)
    return m, count


# ---------------------------------------------------------------------------
# logmatmulexp


def logmatmulexp(a, b, /):
    """Log-space matrix product, ``log(exp(a) @ exp(b))``, accurately.

    Entry ``(i, j)`` is ``log(sum_k exp(a[..., i, k] + b[..., k, j]))`` with
    each ``a_ik + b_kj`` taken exactly.

    Parameters
    ----------
    a, b : array
        Real arrays of one array-API library (Python sequences are treated
        as NumPy), following ``matmul``'s rules: the last two axes are the
        matrices, the leading axes broadcast; a 1-D `a` is a row ``(1, k)``
        and a 1-D `b` a column ``(k, 1)``, the added axis removed from the
        result (two 1-D arrays give a 0-d result, ``logsumexp(a + b)``).

    Returns
    -------
    array
        Shape ``broadcast(a.shape[:-2], b.shape[:-2]) + (n, m)``, in the
        floating result dtype of `a` and `b`, on their device.  A product over
        ``k = 0`` is ``-inf``.

    Notes
    -----
    Limits, entry by entry (the contract of ``logsumexp`` applied to the
    pairs ``a_ik + b_kj``): pairs with a ``-inf`` are excluded, so an entry
    with no finite pair is ``-inf``; a ``+inf`` pair makes it ``+inf``; NaN
    propagates, and so does ``-inf + inf`` (``0 * inf`` in linear space).

    There is no ``where`` or weight argument: excluding ``a_ik`` is setting
    it to ``-inf``, and a positive weight is ``a + log(w)``.

    Cost: one or a few matrix products of the backend on rescaled
    exponentials (see ``docs/semiring.md``), plus ``O(k)`` work for each
    entry whose dominant pairs lie far below both its row's and its column's
    maxima.

    Examples
    --------
    >>> import numpy as np
    >>> from lse_dispatch import logmatmulexp
    >>> a = np.array([[0.0, -2000.0], [-2000.0, 0.0]])
    >>> b = np.array([[-2000.0, 0.0], [0.0, -2000.0]])
    >>> logmatmulexp(a, b)  # diagonal: log(2 e^-2000); off it, the pair 0 + 0 dominates
    array([[-1999.30685282,     0.        ],
           [    0.        , -1999.30685282]])
    >>> float(logmatmulexp(np.array([0.0, -40.0]), np.array([0.0, 0.0])))
    4.248354255291589e-18
    """
    xp, arrays = resolve_namespace({"a": a, "b": b})
    a, b = arrays["a"], arrays["b"]
    matmul_shape(a.shape, b.shape)
    plan = _real_plan(xp, "a and b", a, b)
    kernels = numerics_for(xp).semiring()
    if kernels is not None and kernels.takes(a, b):
        return kernels.logmatmulexp(a, b, plan)
    return product(xp, a, b, plan)


def matmul_shape(a_shape: tuple, b_shape: tuple) -> tuple:
    """The result shape of ``matmul`` for these shapes; errors name the argument."""
    if len(a_shape) == 0 or len(b_shape) == 0:
        name = "a" if len(a_shape) == 0 else "b"
        raise ValueError(f"argument '{name}' must have at least one dimension for a matrix product, got a 0-d array")
    k_a = a_shape[-1]
    k_b = b_shape[0] if len(b_shape) == 1 else b_shape[-2]
    if k_a != k_b and k_a == k_a and k_b == k_b:  # unknown (NaN) extents of lazy arrays pass
        raise ValueError(
            f"arguments 'a' with shape {tuple(a_shape)} and 'b' with shape {tuple(b_shape)} do not match "
            f"in the contracted dimension ({k_a} != {k_b})"
        )
    from ._validate import broadcast_shapes

    batch = broadcast_shapes([tuple(a_shape[:-2]), tuple(b_shape[:-2])], ["a", "b"])
    rows = () if len(a_shape) == 1 else (a_shape[-2],)
    cols = () if len(b_shape) == 1 else (b_shape[-1],)
    return tuple(batch) + rows + cols


def as_matrices(xp, a: Array, b: Array) -> tuple[Array, Array, tuple[int, ...]]:
    """``a`` and ``b`` as stacks of matrices (1-D promoted) and the axes to drop from the result."""
    drop = []
    if a.ndim == 1:
        a = xp.reshape(a, (1, a.shape[0]))
        drop.append(-2)
    if b.ndim == 1:
        b = xp.reshape(b, (b.shape[0], 1))
        drop.append(-1)
    return a, b, tuple(drop)


def product(xp, a: Array, b: Array, plan: DtypePlan) -> Array:
    """``logmatmulexp`` of two real arrays of an eager namespace, in ``plan.result``."""
    a, b, drop = as_matrices(xp, a, b)
    a = xp.astype(a, plan.compute, copy=False)
    b = xp.astype(b, plan.compute, copy=False)
    from ._validate import broadcast_shapes

    batch = tuple(broadcast_shapes([tuple(a.shape[:-2]), tuple(b.shape[:-2])], ["a", "b"]))
    n, k = a.shape[-2], a.shape[-1]
    m = b.shape[-1]
    device = array_api_compat.device(a)
    if n == 0 or m == 0 or k == 0:
        out = xp.full(batch + (n, m), -math.inf, dtype=plan.result, device=device)
    else:
        a = xp.broadcast_to(a, batch + (n, k))
        b = xp.broadcast_to(b, batch + (k, m))
        with _quiet(xp):
            out = _eager_product(xp, a, b, plan)
    for axis in drop:
        out = xp.squeeze(out, axis=axis)
    return out


def _eager_product(xp, a: Array, b: Array, plan: DtypePlan) -> Array:
    """The product in row tiles: large ones for the matrix product, smaller ones for the entries.

    A matrix product of a few rows runs several times slower per entry
    (measured: 64 of 1024 rows at a time, 3.5x), while the per-entry work
    keeps about fifteen temporaries of its tile alive; so the product takes
    tiles of about ``8 * _MATMUL_TILE`` entries of ``a`` and the entries
    ``_MATMUL_TILE`` of the output (256 and 32 rows of 1024).  The entries
    ``A''[i, kb(j)]`` and ``B''[ka(i), j]`` are read back from the product's
    own operands.  The result is
    written into one preallocated array (every eager namespace allows
    assigning to a slice).
    """
    batches = max(1, math.prod(a.shape[:-2]))
    n, k = a.shape[-2], a.shape[-1]
    m = b.shape[-1]
    acc = plan.accumulator
    columns = column_side(xp, b, acc)
    big = max(1, (8 * _MATMUL_TILE) // (batches * k))
    small = max(1, _MATMUL_TILE // (batches * m))
    out = xp.empty(a.shape[:-2] + (n, m), dtype=plan.result, device=array_api_compat.device(a))
    for start in range(0, n, big):
        block = a[..., start : min(n, start + big), :]
        rows = row_side(xp, block, acc)
        q, slack = _accurate_product(xp, rows[4], columns[4], acc != plan.compute)
        ma, ka, row_ok, sa, a2 = rows
        del rows
        for sub in range(0, block.shape[-2], small):
            part = slice(sub, min(block.shape[-2], sub + small))
            sub_rows = (ma[..., part, :], ka[..., part], row_ok[..., part, :], sa[..., part, :], a2[..., part, :])
            sub_a = block[..., part, :]
            sub_slack = None if slack is None else slack[..., part, :]
            state, fallback, value = entry_states(
                xp, sub_a, b, sub_rows, columns, (q[..., part, :], sub_slack), plan, eager=True
            )
            if fallback is not None and bool(xp.any(fallback)):
                state = _fill_fallback(xp, sub_a, b, state, fallback, plan)
                value = xp.where(fallback, finalize(xp, state, plan.accumulator)[0], value)
            out[..., start + sub : start + sub + value.shape[-2], :] = xp.astype(value, plan.result)
        del q, slack
    return out


def eager_state(xp, a: Array, b: Array, plan: DtypePlan) -> LSEState:
    """The states of every entry of ``a @ b`` (matrices with equal batch axes, compute dtype), eager namespaces."""
    columns = column_side(xp, b, plan.accumulator)
    state, fallback = product_states(xp, a, b, columns, plan)
    if bool(xp.any(fallback)):
        state = _fill_fallback(xp, a, b, state, fallback, plan)
    return state


def _matmul(xp, x: Array, y: Array) -> Array:
    return numerics_for(xp).matmul(xp, x, y)


def _split_chunk(precision: int) -> int:
    """Entries of ``k`` per chunk of the split product: ``2**(p - 41)`` (4096 in float64: slices of 20 bits)."""
    return 2 ** (precision - 41)


# Entries of k per matrix product where float32 has no wider accumulator (JAX
# without x64): the chunks' products are added by TwoSum.
_NARROW_CHUNK = 32


def _narrow_product(xp, x: Array, y: Array) -> Array:
    """``x @ y`` in float32 without a wider accumulator: chunks of 32, their products added by TwoSum.

    Each chunk is within ``31 u`` of itself in whatever order the library
    adds; the chunks add without further error.  Not split as float64 is:
    slices of 9 bits (all that float32 leaves for chunks of 32) left a rest
    too large for the ulp test on wide inputs, and 22 % of the entries of
    N(0, 9) operands of (64, 4096) @ (4096, 64) went to the pairs (30x the
    time).  So this bound, like the former one, is not below 4 ulps of
    every result; the tests measure it.
    """
    if x.shape[-1] <= _NARROW_CHUNK:
        return _matmul(xp, x, y)
    zero = xp.zeros(tuple(x.shape[:-1]) + (y.shape[-1],), dtype=x.dtype, device=array_api_compat.device(x))

    def step(carry, pieces):
        high, low = carry
        high, error = two_sum(xp, high, _matmul(xp, *pieces))
        return high, low + error

    high, low = numerics_for(xp).fold_chunks(xp, step, (zero, zero), (x, y), (-1, -2), _NARROW_CHUNK)
    return high + low


def _truncated(xp, x: Array, bits: int) -> Array:
    """``x`` (entries in [0, 1]) truncated to the grid ``2**-bits``: exact, and ``x - result`` is exact too."""
    scale = float(2**bits)
    return xp.floor(x * scale) / scale


def _accurate_product(xp, x: Array, y: Array, widened: bool) -> tuple[Array, Array | None]:
    """``x @ y`` of matrices with entries in [0, 1], and a bound on its absolute error (``None``: negligible).

    Widened (float32 input in float64): one product; its relative error
    ``k u_64`` is far below a float32 ulp.  float32 without a wider
    accumulator: :func:`_narrow_product`, without a bound.  Otherwise
    (float64) the product is split
    after Ozaki, Ogita and Oishi into slices ``x = x1 + x2 + x3``: ``x1`` is
    ``x`` truncated to the grid ``2**-s``, ``x1 + x2`` to ``2**-2s`` (and so for
    ``y``), with ``2 s + log2(C) + 1 <= p`` for a chunk of ``C`` entries of
    ``k``.  Every product ``x1_ik y1_kj`` is then a multiple of ``2**-2s``
    at most 1, every ``x1 y2`` and ``x2 y1`` a multiple of ``2**-3s`` at
    most ``2**-s``, and so is every partial sum of ``C`` (``2 C``) of them:
    ``x1 @ y1`` and ``x1 @ y2 + x2 @ y1`` are exact in whatever order,
    blocking or FMA the library uses.  The rest,
    ``x1 @ y3 + x2 @ (y2 + y3) + x3 @ y`` (non-negative, below ``2**-2s`` of
    the scale of the terms), rounds by at most ``(C + 2) u`` of itself; the
    exact parts are added by TwoSum.  So the error is a small multiple of
    ``u`` times the rest alone, returned as ``slack`` for the caller to test
    per entry.  Before (chunks of 32 added pairwise, one product each) it
    was up to ``37 u`` of the whole sum, and one-way roundings reached it:
    float64 ``[0, -700] + [-709.5] * 200`` against zeros was 14.1 ulps off
    on torch, ``[0, -20] + [-25] * 30`` against two columns of zeros 5.2 on
    NumPy.  Six matrix products per chunk instead of one.
    """
    k = x.shape[-1]
    if widened:
        return _matmul(xp, x, y), None
    eps = float(xp.finfo(x.dtype).eps)
    precision = precision_bits(eps)
    if precision <= 41:
        return _narrow_product(xp, x, y), None
    chunk = min(k, _split_chunk(precision))
    bits = (precision - 1 - max(0, math.ceil(math.log2(chunk)))) // 2
    x1, y1 = _truncated(xp, x, bits), _truncated(xp, y, bits)
    x12, y12 = _truncated(xp, x, 2 * bits), _truncated(xp, y, 2 * bits)
    x2, x3, y2, y3, y23 = x12 - x1, x - x12, y12 - y1, y - y12, y - y1
    slices, axes = (x1, x2, x3, y1, y2, y3, y23, y), (-1,) * 3 + (-2,) * 5
    if k <= chunk:
        high, error, small = _split_parts(xp, slices)
        low, rest = small + error, small + xp.abs(error)
    else:
        zero = xp.zeros(tuple(x.shape[:-1]) + (y.shape[-1],), dtype=x.dtype, device=array_api_compat.device(x))

        def step(carry, pieces):
            high, low, rest = carry
            part, error, small = _split_parts(xp, pieces)
            high, more = two_sum(xp, high, part)
            error = error + more
            return high, low + (small + error), rest + (small + xp.abs(error))

        high, low, rest = numerics_for(xp).fold_chunks(xp, step, (zero, zero, zero), slices, axes, chunk)
    # Each chunk's rest within (C + 2) u of itself; the additions of ``low``
    # within 2 u per chunk of their terms, TwoSum's errors included.
    slack = ((chunk + 2 * -(-k // chunk) + 3) * (eps / 2) * (1 + 1e-3)) * rest
    return high + low, slack


def _split_parts(xp, slices: tuple) -> tuple[Array, Array, Array]:
    """One chunk's ``(high, error, small)``: the exact products summed by TwoSum, and the rest."""
    x1, x2, x3, y1, y2, y3, y23, y = slices
    first = _matmul(xp, x1, y1)
    second = _matmul(xp, x1, y2) + _matmul(xp, x2, y1)
    small = _matmul(xp, x1, y3) + _matmul(xp, x2, y23)
    high, error = two_sum(xp, first, second)
    return high, error, small + _matmul(xp, x3, y)


def _expm1_difference(xp, x: Array, shift: Array, acc) -> Array:
    """``exp(x - shift) - 1`` without the rounding of ``x - shift`` (``shift`` finite)."""
    if x.dtype != acc:
        return xp.expm1(xp.astype(x, acc) - xp.astype(shift, acc))
    zero = scalar(xp, 0.0, x)
    diff, error = two_sum(xp, xp.where(xp.isfinite(x), x, zero), -shift)
    diff = xp.where(xp.isfinite(x), diff, x - shift)
    error = xp.where(xp.isfinite(error), error, zero)
    # expm1(d + e) = expm1(d) + e exp(d) to first order; |e| <= ulp(d) / 2.
    return xp.expm1(diff) + error * xp.exp(diff)


def _scaled_exp(xp, x: Array, shift: Array, ok: Array, index: Array, axis: int, acc) -> Array:
    """``exp(x - shift)`` in ``acc`` (difference exact), 0 where not ``ok`` and at the designated ``index``.

    ``index`` holds one position along ``axis`` (-1 or -2) per line.  NumPy
    and torch build it in one buffer of the result's size (this is the
    float64 copy of an operand that the matrix product reads, the largest
    temporary of the product); other namespaces go through ``where``.
    """
    k = x.shape[axis]
    lines = xp.reshape(xp.arange(k, device=array_api_compat.device(x)), (k,) if axis == -1 else (k, 1))
    chosen = lines == (index[..., None] if axis == -1 else index[..., None, :])
    numerics = numerics_for(xp)
    all_ok = False if numerics.lazy else bool(xp.all(ok))
    if x.dtype != acc and all_ok:
        out = numerics.scaled_exp(x, shift, chosen, acc)
        if out is not None:
            return out
    if not all_ok:
        x = xp.where(ok, x, scalar(xp, -math.inf, x))
    values = exp_difference(xp, x, shift, acc)
    return xp.where(chosen, xp.zeros_like(values), values)


def column_side(xp, b: Array, acc) -> tuple:
    """What the product needs of ``b`` (shape ``(..., k, m)``), made once for every row tile.

    ``(mb, kb, col_ok, sb, b2)``: column maxima (keepdims), their first
    argmax, whether they are finite, the finite shift, and
    ``B'' = exp(b - mb)`` with the designated entry ``kb(j)`` of each column
    set to 0.
    """
    mb = reduce_max(xp, b, (b.ndim - 2,))
    kb = xp.argmax(b, axis=-2)
    col_ok = xp.isfinite(mb)
    sb = xp.where(col_ok, mb, xp.zeros_like(mb))
    return mb, kb, col_ok, sb, _scaled_exp(xp, b, sb, col_ok, kb, -2, acc)


def row_side(xp, a: Array, acc) -> tuple:
    """``(ma, ka, row_ok, sa, a2)`` of ``a`` (shape ``(..., r, k)``): as :func:`column_side`, by rows."""
    ma = reduce_max(xp, a, (a.ndim - 1,))
    ka = xp.argmax(a, axis=-1)
    row_ok = xp.isfinite(ma)
    sa = xp.where(row_ok, ma, xp.zeros_like(ma))
    return ma, ka, row_ok, sa, _scaled_exp(xp, a, sa, row_ok, ka, -1, acc)


def _tau(xp, acc, k: int) -> float:
    """Smallest ``P`` whose underflowed terms cost under ``2**-50`` ulps: ``2**(p+2) k`` smallest normals."""
    info = xp.finfo(acc)
    return float(info.smallest_normal) * 8.0 / float(info.eps) * k


def product_states(xp, a: Array, b: Array, columns: tuple, plan: DtypePlan) -> tuple[LSEState, Array]:
    """States of the entries of ``a @ b`` by rescaled matrix products, and where that needs a fallback.

    ``a`` is ``(..., r, k)``, ``b`` ``(..., k, m)`` (compute dtype, batch
    axes equal), ``columns`` is ``column_side(b)``.  Returns an
    :class:`LSEState` in the accumulator dtype (``max`` included) and a
    boolean ``(..., r, m)`` array of the entries the scaled product cannot
    give (non-finite row or column max, or ``P < tau``), whose states are
    left arbitrary.
    """
    rows = row_side(xp, a, plan.accumulator)
    product = _accurate_product(xp, rows[4], columns[4], plan.accumulator != plan.compute)
    state, fallback, _ = entry_states(xp, a, b, rows, columns, product, plan)
    return state, fallback


def _gather_pairs(xp, a: Array, b: Array, ka: Array, kb: Array, full: tuple) -> tuple[Array, Array]:
    """``a[i, kb(j)]`` and ``b[ka(i), j]`` on the ``(..., r, m)`` grid."""
    if a.ndim == 2:
        return xp.take(a, kb, axis=1), xp.take(b, ka, axis=0)
    a_at = xp.take_along_axis(a, xp.broadcast_to(kb[..., None, :], full), axis=-1)
    b_at = xp.take_along_axis(b, xp.broadcast_to(ka[..., :, None], full), axis=-2)
    return a_at, b_at


def _shifted(xp, x: Array, shift: Array, acc) -> tuple[Array, Array | None]:
    """``x - shift`` in ``acc`` as ``(d, e)``: exact when widened (``e`` is None), TwoSum otherwise."""
    if x.dtype != acc:
        return xp.astype(x, acc) - xp.astype(shift, acc), None
    zero = scalar(xp, 0.0, x)
    finite = xp.isfinite(x)
    diff, error = two_sum(xp, xp.where(finite, x, zero), -shift)
    return xp.where(finite, diff, x - shift), xp.where(finite & xp.isfinite(error), error, zero)


def _common_values(xp, t: Array, sa: Array, sb: Array, slack: Array | None, plan: DtypePlan) -> Array | None:
    """The values of a tile in the common case, or ``None`` where the general path must decide.

    If every ``T >= -1/2`` (every ``P >= 1/2``: none below ``tau``, every
    state ``(M, 1, T)``), the value is ``M + log1p(T)``; and if no entry can
    cancel (``min |value| * g >= max |M| + max |log1p T|``, with reductions
    instead of a mask), no entry needs the fallback.  Eager namespaces only.
    """
    acc = plan.accumulator
    if not bool(xp.min(t) >= -0.5):
        return None
    sa_acc, sb_acc = xp.astype(sa, acc), xp.astype(sb, acc)
    if acc != plan.compute:
        log_part = xp.log1p(t)
        value = sa_acc + (sb_acc + log_part)
    else:
        top = sa_acc + sb_acc
        finite = xp.isfinite(top)
        zero = xp.zeros((), dtype=acc, device=array_api_compat.device(t))
        _, correction = two_sum(xp, xp.where(finite, sa_acc, zero), xp.where(finite, sb_acc, zero))
        log_part = xp.log1p(t + _carried(xp, correction) * (1 + t))
        value = top + log_part
    low, high = float(xp.min(value)), float(xp.max(value))
    smallest = 0.0 if low <= 0.0 <= high else min(abs(low), abs(high))
    largest = max(abs(float(xp.min(log_part))), abs(float(xp.max(log_part))))
    if acc != plan.compute:
        largest += float(xp.max(xp.abs(sa_acc))) + float(xp.max(xp.abs(sb_acc)))
    if smallest * _cancel_factor(xp, plan) < largest:
        return None
    if slack is not None and bool(xp.any(_imprecise(xp, slack, value, 1 + t))):
        return None
    return value


def _imprecise(xp, slack: Array, value: Array, p: Array) -> Array:
    """Where the product's error bound ``slack`` may cost more than an ulp of the value ``M + log P``.

    An error ``d`` of ``P`` moves the value by ``d / P``; ``u |value|`` is
    at least half an ulp of it.  Such entries (small results whose rest is
    not small: float64 ``[0, -20] + [-30] * 200`` against zeros) go to the
    fallback, which sums their pairs exactly.
    """
    u = float(xp.finfo(value.dtype).eps) / 2
    return slack > u * xp.abs(value) * p


def _carried(xp, correction: Array) -> Array:
    """The rounding ``e`` of ``M = ma + mb`` as the rest carries it, ``(1 + T) e``: where ``|e| <= 1/2``.

    ``(1 + T)(1 + e)`` stands for ``(1 + T) exp(e)`` to ``e**2 / 2``, at most
    an eighth of ``ulp(M)`` since ``|e| <= ulp(M) / 2``.  A larger ``e``
    (``|M| >= 2**53`` in float64, ``2**24`` in float32) made ``1 + e`` zero or
    negative: ``logmatmulexp([[-1.]], [[2.**54]])`` gave ``-inf`` and
    ``[-1e30] @ [-700]`` NaN (found by ``benchmarks/fuzz_semiring.py``).
    There ``e`` is left out: at most half an ulp of ``M``, so the value
    ``M + log P`` stays within an ulp.
    """
    return xp.where(xp.abs(correction) <= 0.5, correction, xp.zeros_like(correction))


def _cancel_factor(xp, plan: DtypePlan) -> float:
    """``g`` of the cancellation test ``|result| g >= size`` (see :func:`entry_states`)."""
    if plan.accumulator == plan.compute:
        return 1.0
    return float(xp.finfo(plan.result).eps) / float(xp.finfo(plan.accumulator).eps) / 16


def entry_states(xp, a, b, rows: tuple, columns: tuple, product: tuple, plan: DtypePlan, *, eager: bool = False):
    """:func:`product_states` given the two sides and ``product = (q, slack)``; also the values.

    ``q = A'' @ B''`` and ``slack`` its error bound, from :func:`_accurate_product`.

    Returns ``(state, fallback, value)``: ``value`` (accumulator dtype) is
    ``finalize`` of ``state`` wherever ``fallback`` is False, formed
    directly (``M + log1p(T)``, or the state's own max); ``eager`` lets
    eager namespaces skip the masks that no entry needs.

    Long because its steps share a dozen arrays of the output's size (the
    gathered pairs, their exact shifts, the masks): split, each part would
    take and return most of them.
    """
    acc = plan.accumulator
    widened = acc != plan.compute
    q, slack = product
    ma, ka, row_ok, sa, _ = rows
    mb, kb, col_ok, sb, _ = columns
    k = a.shape[-1]
    device = array_api_compat.device(a)
    neg_inf = scalar(xp, -math.inf, a)
    full = tuple(q.shape)
    zero = xp.zeros((), dtype=acc, device=device)
    one = xp.ones((), dtype=acc, device=device)
    eq = ka[..., :, None] == kb[..., None, :]
    any_eq = bool(xp.any(eq)) if eager else True
    ok = row_ok & col_ok
    all_ok = bool(xp.all(ok)) if eager else False
    a_at, b_at = _gather_pairs(xp, a, b, ka, kb, full)
    if not all_ok:
        a_at = xp.where(ok, a_at, neg_inf)
        b_at = xp.where(ok, b_at, neg_inf)
    diff_a, err_a = _shifted(xp, a_at, sa, acc)  # a[i, kb(j)] - ma_i
    diff_b, err_b = _shifted(xp, b_at, sb, acc)  # b[ka(i), j] - mb_j
    if rows[4] is not None and all_ok:
        # The very entries of A'' and B'' that the product read (0 where ka(i) == kb(j)).
        g2, g1 = _gather_pairs(xp, rows[4], columns[4], ka, kb, full)
        exp_a = exp_b = None
    else:
        exp_a, exp_b = xp.exp(diff_a), xp.exp(diff_b)
        g2 = exp_a if err_a is None else exp_a * (one + err_a)  # A[i, kb(j)]
        g1 = exp_b if err_b is None else exp_b * (one + err_b)  # B[ka(i), j]
        if any_eq:
            g2 = xp.where(eq, zero, g2)  # A''[i, kb(j)]
            g1 = xp.where(eq, zero, g1)  # B''[ka(i), j]
    # T = P - 1 without cancelling the 1: it goes with the larger designated
    # entry, as expm1 of its exact difference (expm1(d + e) = expm1(d) + e exp(d)).
    a_larger = g2 >= g1
    larger_diff = xp.where(a_larger, diff_a, diff_b)
    larger_minus_one = xp.expm1(larger_diff)
    if err_a is not None:
        larger_err = xp.where(a_larger, err_a, err_b)
        larger_minus_one = larger_minus_one + larger_err * (one + larger_minus_one)
    smaller = xp.where(a_larger, g1, g2)
    t = q + (smaller + larger_minus_one)
    if eager and all_ok:
        fast = _common_values(xp, t, sa, sb, slack, plan)
        if fast is not None:
            return None, None, fast
    p = q + g1 + g2
    if any_eq:
        p = p + xp.astype(eq, acc)

    top = xp.astype(sa, acc) + xp.astype(sb, acc)
    if widened:
        correction = None
    else:
        finite_top = xp.isfinite(top)
        _, correction = two_sum(
            xp, xp.where(finite_top, xp.astype(sa, acc), zero), xp.where(finite_top, xp.astype(sb, acc), zero)
        )
    # Entries without a finite pair: a row of -inf meets a column free of +inf and NaN, or vice versa.
    if all_ok:
        empty = None
        fallback = p < _tau(xp, acc, k)
    else:
        a_empty = (ma == -math.inf) & ~xp.isnan(mb) & (mb != math.inf)
        b_empty = (mb == -math.inf) & ~xp.isnan(ma) & (ma != math.inf)
        empty = a_empty | b_empty
        fallback = (~ok & ~empty) | (ok & (p < _tau(xp, acc, k)))
    big = p >= 0.5
    good_big = big if all_ok else (ok & big)
    # P >= 1/2: (M, 1, T), T carrying the rounding e of M = ma + mb as (1 + T) e.
    rest_big = t if correction is None else t + _carried(xp, correction) * (one + t)
    # P < 1/2: log P is not small, so the state is the rounded value itself.
    all_big = bool(xp.all(good_big)) if eager else False
    if all_big:  # the common case: no entry needs log P
        log_part = xp.log1p(rest_big)
    else:
        small_ok = ~big & ~fallback if all_ok else ok & ~big & ~fallback
        log_part = xp.where(good_big, xp.log1p(xp.where(good_big, rest_big, zero)), xp.log(xp.where(small_ok, p, one)))
    value_small = top + log_part if correction is None else top + (correction + log_part)
    value_big = top + log_part
    # Where the designated entries differ, the shift M = ma + mb is no pair's
    # value, and M + log P cancels when the result is small next to the
    # terms: its absolute error is the rounding of log P, about u |log P|
    # (M is exact: TwoSum), plus, with a wider accumulator, that of M,
    # u_acc |M|.  Such entries go to the fallback unless |result| * g is at
    # least |log P| (g = 1: within an ulp and a half of the result), or
    # |M| + |log P| with a wider accumulator (g = eps_result / eps_acc / 16:
    # within 1/8 ulp).  Where the designated entries coincide, M is a pair's
    # value, and M + log1p(T) cancels only for ill-conditioned entries.
    value = value_big if all_big else xp.where(good_big, value_big, value_small)
    size = xp.abs(log_part) if correction is not None else xp.abs(top) + xp.abs(log_part)
    cancels = xp.abs(value) * _cancel_factor(xp, plan) < size
    if any_eq:
        cancels = cancels & ~eq
    if slack is not None:
        cancels = cancels | _imprecise(xp, slack, value, p)
    if numerics_for(xp).bitcast is not None:
        # A library that flushes subnormal results lost every term below the
        # smallest normal from q and g: where the rest is that small, the
        # pairs are summed again, with the logsumexp state's rescue (JAX
        # float32: [0] + [-88] * 200 against zeros gave 0.0 for 1.2109203e-36).
        flushed = good_big & (xp.abs(rest_big) < k * flush_ratio(xp, acc))
        cancels = cancels | flushed
    fallback = fallback | (cancels if all_ok else ok & cancels)
    if eager and empty is None and not bool(xp.any(fallback)):
        return None, fallback, value  # nothing will read the states
    maximum = xp.where(good_big, top, value_small)
    rest = xp.where(good_big, rest_big, zero)
    count = xp.ones_like(rest)
    if empty is not None:
        maximum = xp.where(empty, scalar(xp, -math.inf, maximum), maximum)
        count = xp.where(empty, zero, count)
        value = xp.where(empty, scalar(xp, -math.inf, value), value)
    return LSEState(maximum, count, rest), fallback, value


def pair_states(xp, x: Array, y: Array, axis: int, plan: DtypePlan) -> LSEState:
    """The state over ``axis`` of the exact sums ``x + y`` (broadcast together), every limit included.

    The sums are formed in the accumulator: exactly where it is wider than
    the input up to a relative ``2**-53``; otherwise as ``s + e`` by TwoSum,
    with ``e`` carried into ``rest`` (``exp(s + e - m) = exp(s - m)(1 + e)``).
    ``-inf + inf`` is NaN, as ``0 * inf`` is in linear space.
    """
    acc = plan.accumulator
    x = xp.astype(x, acc)
    y = xp.astype(y, acc)
    x, y = xp.broadcast_arrays(x, y)
    zero = xp.zeros((), dtype=acc, device=array_api_compat.device(x))
    undefined = ((x == -math.inf) & (y == math.inf)) | ((x == math.inf) & (y == -math.inf))
    x = xp.where(undefined, zero, x)
    y = xp.where(undefined, zero, y)
    total = x + y
    total = xp.where(undefined, scalar(xp, math.nan, total), total)
    state = state_from_exponents(xp, total, (axis % total.ndim,), acc)
    if acc != plan.compute:
        return state
    finite = xp.isfinite(total)
    _, error = two_sum(xp, xp.where(finite, x, zero), xp.where(finite, y, zero))
    # An error above 1/2 (a sum beyond 2**53) is left out, as in ``_carried``:
    # ``1 + e`` would be zero or negative (JAX float64 ``[[-1.]] @ [[2.**54]]``,
    # whose rest looked flushed and went to the pairs, gave -inf).
    error = _carried(xp, xp.where(finite, error, zero))
    shift = xp.where(xp.isfinite(state.max), state.max, zero)
    terms = exp_difference(xp, xp.where(finite, total, scalar(xp, -math.inf, total)), shift, acc)
    correction = xp.sum(error * terms, axis=axis, keepdims=True)
    return LSEState(state.max, state.count, state.rest + correction)


def _fill_fallback(xp, a: Array, b: Array, state: LSEState, fallback: Array, plan: DtypePlan) -> LSEState:
    """``state`` with the flagged entries recomputed from their pairs, a batch of entries at a time."""
    full = tuple(fallback.shape)
    r, k = a.shape[-2], a.shape[-1]
    m = b.shape[-1]
    batches = math.prod(full[:-2])
    a_rows = xp.reshape(a, (batches * r, k))
    b_cols = xp.reshape(xp.matrix_transpose(b), (batches * m, k))
    flat = xp.reshape(fallback, (-1,))
    (index,) = xp.nonzero(flat)
    batch_index = index // (r * m)
    row = batch_index * r + (index // m) % r
    col = batch_index * m + index % m
    per = max(1, _FALLBACK_BATCH // k)
    parts = []
    for start in range(0, index.shape[0], per):
        stop = min(index.shape[0], start + per)
        rows = xp.take(a_rows, row[start:stop], axis=0)
        cols = xp.take(b_cols, col[start:stop], axis=0)
        parts.append(pair_states(xp, rows, cols, 1, plan))
    fields = []
    for position, field in enumerate(state):
        new = xp.concat([xp.reshape(part[position], (-1,)) for part in parts], axis=0)
        new = xp.astype(new, field.dtype)
        fields.append(xp.reshape(_replace_rows(xp, xp.reshape(field, (-1,)), new, flat), full))
    return LSEState(*fields)


# ---------------------------------------------------------------------------
# derivative rules, written once (the torch and JAX plumbing is in
# backends/_torch_semiring.py and backends/_jax_semiring.py)
#
# Both derivatives are the rule of logsumexp applied to each output: the
# weights are the softmax of the entries it sums, with the limits of
# lse_dispatch._autodiff (0 for -inf entries and empty sums, 1/K shared by
# the K entries at +inf, NaN for a NaN output), and products with an exactly
# zero weight are exactly zero whatever the other factor (``_times_weight``).


def _times(xp, weight: Array, other: Array) -> Array:
    from ._autodiff import _times_weight

    return _times_weight(xp, weight, other)


def cumulative_coefficients(xp, x: Array, y: Array) -> tuple[Array, Array]:
    """``(alpha, c)`` along the last axis: the tangent of ``y = logcumsumexp(x)`` is the recurrence

        ``dy_i = alpha_i dy_{i-1} + c_i dx_i``   (``dy_{-1} = 0``).

    With weights ``w_ij = d y_i / d x_j``: for finite ``y_i``,
    ``w_ij = exp(x_j - y_i)``, so ``c_i = exp(x_i - y_i)`` and
    ``alpha_i = exp(y_{i-1} - y_i)``; at ``y_i = +inf`` the ``k_i`` entries at
    ``+inf`` share ``1/k_i`` (``c_i = [x_i = inf] / k_i``,
    ``alpha_i = k_{i-1} / k_i`` while ``y_{i-1}`` is ``+inf``, 0 when it
    first becomes ``+inf``); an empty prefix (``y_i = -inf``) has no
    derivative; a NaN output gives NaN.  ``x`` and ``y`` share their shape.
    """
    dtype = y.dtype
    zero = scalar(xp, 0.0, y)
    one = scalar(xp, 1.0, y)
    neg_inf = scalar(xp, -math.inf, y)
    finite = xp.isfinite(y)
    device = array_api_compat.device(y)
    lead = y.shape[:-1] + (1,)
    y_prev = xp.concat([xp.full(lead, -math.inf, dtype=dtype, device=device), y[..., :-1]], axis=-1)
    y_safe = xp.where(finite, y, zero)
    c_finite = xp.exp(xp.where(finite, x, neg_inf) - y_safe)
    alpha_finite = xp.exp(xp.where(finite, y_prev, neg_inf) - y_safe)
    at_inf = xp.astype(x == math.inf, dtype)
    k = xp.cumulative_sum(at_inf, axis=-1)
    k_safe = xp.where(k == 0, one, k)
    c_inf = at_inf / k_safe
    alpha_inf = xp.where(y_prev == math.inf, (k - at_inf) / k_safe, zero)
    nan = scalar(xp, math.nan, y)
    c = xp.where(finite, c_finite, xp.where(y == math.inf, c_inf, zero))
    alpha = xp.where(finite, alpha_finite, xp.where(y == math.inf, alpha_inf, zero))
    undefined = xp.isnan(y)
    return xp.where(undefined, nan, alpha), xp.where(undefined, nan, c)


def recurrence(xp, alpha: Array, beta: Array) -> Array:
    """``E_i = alpha_i E_{i-1} + beta_i`` along the last axis (``E_{-1} = 0``), signed ``beta``.

    Log-step (Hillis--Steele), linear in ``beta``; a zero ``alpha`` stops
    whatever came before it, infinite tangents included.
    """
    n = alpha.shape[-1]
    lead = alpha.shape[:-1]
    device = array_api_compat.device(alpha)
    s = 1
    while s < n:
        ones = xp.ones(lead + (s,), dtype=alpha.dtype, device=device)
        zeros = xp.zeros(lead + (s,), dtype=beta.dtype, device=device)
        alpha_before = xp.concat([ones, alpha[..., : n - s]], axis=-1)
        beta_before = xp.concat([zeros, beta[..., : n - s]], axis=-1)
        beta = beta + _times(xp, alpha, beta_before)
        alpha = alpha * alpha_before
        s *= 2
    return beta


def cumulative_jvp(xp, x: Array, y: Array, dx: Array) -> Array:
    """Tangent of ``y = logcumsumexp(x)`` along the last axis."""
    alpha, c = cumulative_coefficients(xp, x, y)
    return recurrence(xp, alpha, _times(xp, c, dx))


def cumulative_vjp(xp, x: Array, y: Array, g: Array) -> Array:
    """Cotangent of ``x`` from that of ``y`` (last axis): the transposed recurrence, run backwards.

    ``G_i = g_i + alpha_{i+1} G_{i+1}``, ``gx_i = c_i G_i``: the reversed
    cumulative sum of the cotangents weighted by the softmax of each prefix.
    """
    alpha, c = cumulative_coefficients(xp, x, y)
    lead = alpha.shape[:-1] + (1,)
    following = xp.concat([alpha[..., 1:], xp.zeros(lead, dtype=alpha.dtype, device=array_api_compat.device(alpha))], axis=-1)
    backwards = recurrence(xp, xp.flip(following, axis=-1), xp.flip(g, axis=-1))
    return _times(xp, c, xp.flip(backwards, axis=-1))


# --- logmatmulexp ----------------------------------------------------------

# Scale factors S = exp(ma + mb - y) up to this power of two (of the compute
# dtype's exponent range / 4) keep the scaled products below overflow; the
# entries beyond go through their own weights.
def _scale_limit(xp, dtype) -> float:
    return math.log(float(xp.finfo(dtype).max)) / 4


def product_parts(xp, a: Array, b: Array, y: Array) -> tuple[Array, Array, Array, Array]:
    """``(A, B, S, slow)``: ``w_ikj = A_ik B_kj S_ij`` wherever ``slow`` is False.

    ``A = exp(a - ma)``, ``B = exp(b - mb)`` (0 in rows and columns whose max
    is not finite), ``S = exp(ma + mb - y)`` on the entries with a finite
    output and moderate ``S``, 0 elsewhere.  ``slow`` marks the entries whose
    weights need their own pairs: an output of ``+inf`` or NaN, or a large
    ``S`` (dominant pairs far below the row and column maxima).  Entries
    equal to ``-inf`` have zero weights and are in neither.
    """
    zero = scalar(xp, 0.0, y)
    neg_inf = scalar(xp, -math.inf, a)
    ma = xp.max(a, axis=-1, keepdims=True)
    mb = xp.max(b, axis=-2, keepdims=True)
    row_ok = xp.isfinite(ma)
    col_ok = xp.isfinite(mb)
    sa = xp.where(row_ok, ma, xp.zeros_like(ma))
    sb = xp.where(col_ok, mb, xp.zeros_like(mb))
    big_a = xp.exp(xp.where(row_ok, a, neg_inf) - sa)
    big_b = xp.exp(xp.where(col_ok, b, neg_inf) - sb)
    finite = xp.isfinite(y)
    exponent = xp.where(finite & row_ok & col_ok, (sa + sb) - xp.where(finite, y, zero), scalar(xp, math.inf, y))
    fast = exponent <= _scale_limit(xp, y.dtype)
    scale = xp.exp(xp.where(fast, exponent, scalar(xp, -math.inf, y)))
    slow = ~fast & (y != -math.inf)
    return big_a, big_b, scale, slow


def product_jvp_fast(xp, parts, da: Array | None, db: Array | None) -> Array:
    """``sum_k w_ikj (da_ik + db_kj)`` on the entries that are not slow (0 on those)."""
    big_a, big_b, scale, _ = parts
    total = None
    if da is not None:
        total = _matmul(xp, _times(xp, big_a, da), big_b)
    if db is not None:
        term = _matmul(xp, big_a, _times(xp, big_b, db))
        total = term if total is None else total + term
    return _times(xp, scale, total)


def product_vjp_fast(xp, parts, g: Array) -> tuple[Array, Array]:
    """``(ga, gb)`` from the entries that are not slow: ``A (gS @ B^T)`` and ``B (A^T @ gS)``."""
    big_a, big_b, scale, _ = parts
    weighted = _times(xp, scale, g)
    ga = _times(xp, big_a, _matmul(xp, weighted, xp.matrix_transpose(big_b)))
    gb = _times(xp, big_b, _matmul(xp, xp.matrix_transpose(big_a), weighted))
    return ga, gb


def pair_weights(xp, a_rows: Array, b: Array, y_rows: Array, plan: DtypePlan) -> Array:
    """``w[r, k, j] = d y[r, j] / d (a_rk + b_kj)`` from the pairs themselves, every limit included.

    ``a_rows`` is ``(R, k)``, ``b`` ``(R, k, m)`` (the matrix of each row's
    batch), ``y_rows`` ``(R, m)``.  The weights of logsumexp
    (``_autodiff.lse_weights``) over the exact pair sums, with the state
    of :func:`pair_states`.
    """
    from ._autodiff import lse_weights

    pairs_a = a_rows[:, :, None]
    state = pair_states(xp, pairs_a, b, 1, plan)
    acc = plan.accumulator
    x, y = xp.broadcast_arrays(xp.astype(pairs_a, acc), xp.astype(b, acc))
    undefined = ((x == -math.inf) & (y == math.inf)) | ((x == math.inf) & (y == -math.inf))
    zero = xp.zeros((), dtype=acc, device=array_api_compat.device(x))
    total = xp.where(undefined, zero, x) + xp.where(undefined, zero, y)
    total = xp.where(undefined, scalar(xp, math.nan, total), total)
    value = xp.astype(y_rows[:, None, :], acc)
    sign = xp.ones_like(value)
    weights, _ = lse_weights(xp, total, None, None, (1,), value, sign, state)
    return weights


def _rows_with(xp, slow: Array) -> tuple[Array, Array, int, int]:
    """Flattened ``(batch * n)`` rows holding a slow entry: ``(mask, index, n, batches)``."""
    n, m = slow.shape[-2], slow.shape[-1]
    batches = math.prod(slow.shape[:-2])
    mask = xp.any(xp.reshape(slow, (batches * n, m)), axis=1)
    (index,) = xp.nonzero(mask)
    return mask, index, n, batches


def _slow_chunks(xp, a, b, y, slow, plan):
    """Per chunk of slow rows: ``(row_index, weights (R, k, m) masked to the slow entries, batch_index)``."""
    k, m = a.shape[-1], b.shape[-1]
    _, index, n, batches = _rows_with(xp, slow)
    a_flat = xp.reshape(a, (batches * n, k))
    b_flat = xp.reshape(b, (batches, k, m))
    y_flat = xp.reshape(y, (batches * n, m))
    slow_flat = xp.reshape(slow, (batches * n, m))
    per = max(1, _FALLBACK_BATCH // (k * m))
    for start in range(0, index.shape[0], per):
        rows = index[start : min(index.shape[0], start + per)]
        batch_index = rows // n
        weights = pair_weights(
            xp, xp.take(a_flat, rows, axis=0), xp.take(b_flat, batch_index, axis=0), xp.take(y_flat, rows, axis=0), plan
        )
        keep = xp.take(slow_flat, rows, axis=0)[:, None, :]
        weights = xp.where(keep, weights, xp.zeros_like(weights))
        yield rows, weights, batch_index


def product_vjp(xp, a: Array, b: Array, y: Array, g: Array, plan: DtypePlan) -> tuple[Array, Array]:
    """``(ga, gb)`` on the broadcast shapes (compute dtype), eager namespaces: fast entries by
    matrix products, slow ones (see :func:`product_parts`) from their own pairs."""
    if a.shape[-1] == 0:  # y is -inf, constant: no max of an empty row (torch raises)
        device = array_api_compat.device(a)
        return xp.zeros(a.shape, dtype=a.dtype, device=device), xp.zeros(b.shape, dtype=b.dtype, device=device)
    parts = product_parts(xp, a, b, y)
    ga, gb = product_vjp_fast(xp, parts, g)
    slow = parts[3]
    if not bool(xp.any(slow)):
        return ga, gb
    k, m = a.shape[-1], b.shape[-1]
    mask, _, n, batches = _rows_with(xp, slow)
    g_flat = xp.reshape(g, (batches * n, m))
    ga_rows, gb_parts = [], []
    device = array_api_compat.device(a)
    for rows, weights, batch_index in _slow_chunks(xp, a, b, y, slow, plan):
        gw = _times(xp, weights, xp.astype(xp.take(g_flat, rows, axis=0), weights.dtype)[:, None, :])
        ga_rows.append(xp.sum(gw, axis=2))
        owner = xp.astype(xp.arange(batches, device=device)[:, None] == batch_index[None, :], gw.dtype)
        gb_parts.append(xp.reshape(_matmul(xp, owner, xp.reshape(gw, (gw.shape[0], k * m))), (batches, k, m)))
    extra_a = _replace_rows(
        xp, xp.zeros((batches * n, k), dtype=ga_rows[0].dtype, device=device), xp.concat(ga_rows, axis=0), mask
    )
    ga = ga + xp.astype(xp.reshape(extra_a, ga.shape), ga.dtype)
    extra_b = gb_parts[0]
    for part in gb_parts[1:]:
        extra_b = extra_b + part
    gb = gb + xp.astype(xp.reshape(extra_b, gb.shape), gb.dtype)
    return ga, gb


def product_jvp(xp, a: Array, b: Array, y: Array, da, db, plan: DtypePlan) -> Array:
    """Tangent of ``y = logmatmulexp(a, b)`` (matrices, broadcast shapes), eager namespaces."""
    if a.shape[-1] == 0:  # y is -inf, constant (see product_vjp)
        return xp.zeros_like(y)
    parts = product_parts(xp, a, b, y)
    dy = product_jvp_fast(xp, parts, da, db)
    slow = parts[3]
    if not bool(xp.any(slow)):
        return dy
    k, m = a.shape[-1], b.shape[-1]
    mask, _, n, batches = _rows_with(xp, slow)
    device = array_api_compat.device(a)
    zero_a = xp.zeros(a.shape, dtype=dy.dtype, device=device) if da is None else da
    zero_b = xp.zeros(b.shape, dtype=dy.dtype, device=device) if db is None else db
    da_flat = xp.reshape(zero_a, (batches * n, k))
    db_flat = xp.reshape(zero_b, (batches, k, m))
    rows_out = []
    for rows, weights, batch_index in _slow_chunks(xp, a, b, y, slow, plan):
        tangent = xp.take(da_flat, rows, axis=0)[:, :, None] + xp.take(db_flat, batch_index, axis=0)
        rows_out.append(xp.sum(_times(xp, weights, xp.astype(tangent, weights.dtype)), axis=1))
    extra = _replace_rows(
        xp, xp.zeros((batches * n, m), dtype=rows_out[0].dtype, device=device), xp.concat(rows_out, axis=0), mask
    )
    return dy + xp.astype(xp.reshape(extra, dy.shape), dy.dtype)
