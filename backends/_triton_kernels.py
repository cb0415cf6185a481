"""Triton kernels for logsumexp, softmax and log_softmax over contiguous rows.

Imported only when a ``torch.triton`` kernel runs (importing lse_dispatch
never imports triton).  The same source runs on CUDA devices and, under
``TRITON_INTERPRET=1``, on CPU tensors through Triton's NumPy interpreter,
which is how the test suite checks it without a GPU.

Layout: the input is viewed as ``(rows, n)`` with the reduced axes last and
C-contiguous; ``where`` (if any) is a uint8 array of the same shape.

The state and its numerics
--------------------------
Every kernel computes the state of :mod:`lse_dispatch._state` for each row:
``m`` (the max of the included entries, in the compute dtype: float32 for
float16/bfloat16/float32 input, float64 for float64), ``count`` (included
entries equal to ``m``) and ``rest`` (the sum of ``exp(x - m)`` over the
other included entries), both float64.

* Terms are always formed and summed in float64.  For float32 compute the
  float64 difference ``x - m`` is exact and float64 ``exp`` is within an ulp
  of float64, so each term carries a relative error near ``2**-52``, and the
  state is the generic path's to float64 rounding.  ``exp`` of a float32
  difference is not enough: its rounding, ``|x - m| 2**-24``, becomes an
  absolute error of ``log1p(rest)`` that a logsumexp cancelling to near 0
  turns into 1.4e8 ulps (catalogue case ``accuracy/cancels-to-near-zero``;
  see ``numpy.blocked``), and Triton's float32 ``exp`` on NVIDIA GPUs is
  ``ex2.approx`` of ``x * log2(e)``, whose error grows with ``|x|``.
  Triton's float64 ``exp`` and ``log`` are libdevice's (``__nv_exp``,
  ``__nv_log``).
* float64 input has no wider type: the difference is recovered with
  TwoSum, ``d + e = x - m`` exactly, and the term is ``exp(d) * (1 + e)``,
  as in ``_state._exp_difference``.
* ``log1p`` (which Triton lacks) is Goldberg's ``log(u) * x / (u - 1)``
  with ``u = 1 + x``, exact where ``u == 1`` (``x`` itself); its relative
  error is a few float64 ulps (Goldberg, "What every computer scientist
  should know about floating-point arithmetic", Theorem 4).
* Rows of at most ``ONE_PASS_MAX`` entries (half that for float64 input)
  are read once, kept in registers and written once (softmax, log_softmax),
  several short rows per program.
  Longer rows are split into parts of ``PART_TILES`` tiles of
  ``PART_BLOCK`` entries; each part folds its tiles into an online state
  (per-lane float64 sums, rescaled once per tile whose max is new), the
  parts' states are merged per row by :func:`merge_rows` (the n-ary form of
  ``_state.merge``), and softmax/log_softmax make one more elementwise pass.

Limits: the kernels write the contract's limits themselves, as the shared
functions of :mod:`lse_dispatch._state` define them (``_finish`` and
``_normalized_value`` say which), so a forward call never waits for the GPU
(an H200 measured the earlier read-back of flagged rows at 44 us of a
174 us call).  Rows whose max is not finite (``+inf``, ``-inf``, or NaN for
an included NaN) are flagged in ``special``; the logsumexp backward hands
those to the shared rules.

Results (against the exact value), float32 input: logsumexp
``m + log1p(count - 1 + rest)`` in float64, rounded once (half an ulp plus
float64 noise); log_softmax ``(x - m) - log_norm`` in float64, rounded once;
softmax ``exp(x - m) / (count + rest)`` in float64, rounded once.  float16
and bfloat16 round the float64 result through float32: at most
``0.5 + 2**-13`` ulps of their own dtype.  float64: as the generic path's
(logsumexp and log_softmax two roundings plus ``log1p``'s error; softmax
``exp`` of the TwoSum-exact difference over ``count + rest``).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "ONE_PASS_MAX",
    "PART_BLOCK",
    "PART_TILES",
    "lse_backward",
    "merge_pairs",
    "merge_rows",
    "normalized_backward",
    "rows_forward",
]

#: Rows up to this many entries take the one-pass kernel (float64 input:
#: half as many, since each entry then holds float64 temporaries).
ONE_PASS_MAX = 8192
#: Entries per thread of the one-pass kernels (float64: half), so that the
#: row stays in registers: at 16 warps (the 128-register cap) float32 rows
#: of 8192 compile without spills for sm_90, float64 rows of 8192 spilled.
ENTRIES_PER_THREAD = 16
#: Entries per tile of the multi-part kernels.
PART_BLOCK = 2048
#: Tiles per part: a part is PART_BLOCK * PART_TILES entries.
PART_TILES = 16
#: Parts merged per step of merge_rows.
MERGE_BLOCK = 1024
#: Entries per program of the elementwise passes.
ELEMENTWISE_BLOCK = 2048

_INF = float("inf")

OP_LOGSUMEXP = 0
OP_SOFTMAX = 1
OP_LOG_SOFTMAX = 2


# --------------------------------------------------------------------------
# Device helpers.


@triton.jit
def _finite(v):
    # NaN compares false.
    return tl.abs(v) < float("inf")


@triton.jit
def _log1p(x):
    """log(1 + x) in float64 (Goldberg): exact where 1 + x rounds to 1."""
    u = 1.0 + x
    safe = tl.where(u == 1.0, 2.0, u)
    return tl.where(u == 1.0, x, tl.log(safe) * (x / (safe - 1.0)))


@triton.jit
def _two_sum(a, b):
    """``s = fl(a + b)`` and its exact rounding error (Knuth's TwoSum, as ``_state.two_sum``)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


@triton.jit
def _exp_difference(x, m, WIDE: tl.constexpr):
    """exp(x - m) in float64 without the rounding of x - m.

    WIDE: x and m are float32 (exact difference in float64).  Otherwise
    float64, and TwoSum recovers the rounding e of d = fl(x - m):
    exp(d + e) = exp(d) (1 + e).  A non-finite x gives exp(d) (e set to 0).
    """
    if WIDE:
        return tl.exp(x.to(tl.float64) - m.to(tl.float64))
    else:
        d, e = _two_sum(x, -m)
        e = tl.where(_finite(e), e, 0.0)
        return tl.exp(d) * (1.0 + e)


@triton.jit
def _order_free_sum(v, axis: tl.constexpr):
    """Sum of non-negative float64 ``v`` over ``axis``, within about one rounding in any reduction order.

    ``lse_dispatch._numerics.extracted_sum`` in a kernel: with ``S`` the
    plain sum and ``sigma = 4 S``, ``high = (sigma + v) - sigma`` sums
    exactly in any order, ``low = v - high`` is below ``ulp(sigma) / 2``.  A
    tree reduction's roundings can all go one way (equal terms after a
    larger one); float32 input's float64 sums need none of this.
    """
    total = tl.sum(v, axis=axis)
    ok = _finite(total * 4.0)
    sigma = tl.expand_dims(tl.where(ok, total * 4.0, 0.0), axis)
    high = (sigma + v) - sigma
    low = v - high
    return tl.where(ok, tl.sum(high, axis=axis) + tl.sum(low, axis=axis), total)


@triton.jit
def _merge(m1, c1, r1, m2, c2, r2, WIDE: tl.constexpr):
    """_state.merge for states whose merged max is finite (elementwise).

    The part on the overall max keeps its count and rest; the other adds
    (count + rest) * exp(its max - max), formed without the rounding of the
    difference.  Rows whose merged max is not finite are the Python side's.
    """
    m = tl.maximum(m1, m2)
    top1 = m1 == m
    top2 = m2 == m
    w1 = _exp_difference(tl.where(top1, float("-inf"), m1), m, WIDE)
    w2 = _exp_difference(tl.where(top2, float("-inf"), m2), m, WIDE)
    count = tl.where(top1, c1, 0.0) + tl.where(top2, c2, 0.0)
    rest = tl.where(top1, r1, (c1 + r1) * w1) + tl.where(top2, r2, (c2 + r2) * w2)
    return m, count, rest


@triton.jit
def _to_bfloat16(v):
    """float32 to bfloat16, rounded to nearest even on the bits (NaN kept).

    Written out because Triton's interpreter truncates this cast, while the
    GPU rounds it to nearest: this way both give the same, correctly rounded,
    result (checked by the tests at 0.5 ulp).
    """
    bits = v.to(tl.uint32, bitcast=True)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    bits = tl.where(v == v, rounded, bits)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _store_result(ptr, offs, value, mask, WIDE: tl.constexpr):
    """Store a float64 result in the output's dtype (through float32 when narrower)."""
    if WIDE:
        if ptr.dtype.element_ty == tl.bfloat16:
            tl.store(ptr + offs, _to_bfloat16(value.to(tl.float32)), mask=mask)
        else:
            tl.store(ptr + offs, value.to(tl.float32).to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + offs, value, mask=mask)


@triton.jit
def _load(x_ptr, w_ptr, offs, mask, HAS_WHERE: tl.constexpr, WIDE: tl.constexpr):
    """(x in the compute dtype, included, x with excluded and NaN entries at -inf)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if WIDE:
        x = x.to(tl.float32)
    included = mask
    if HAS_WHERE:
        included = included & (tl.load(w_ptr + offs, mask=mask, other=0) != 0)
    masked = tl.where(included & (x == x), x, float("-inf"))
    return x, included, masked


@triton.jit
def _finish(m, count, rest, rows, row_ok, m_ptr, count_ptr, rest_ptr, special_ptr, value_ptr, n_rows,
            OP: tl.constexpr, WIDE: tl.constexpr):
    """Write the row state and special flag; logsumexp also writes (value, sign).

    ``m`` is NaN on a row holding an included NaN (as ``_state``'s max is).
    The flag marks the rows whose max is not finite: the logsumexp backward
    hands those to the shared rules.
    """
    tl.store(special_ptr + rows, (~_finite(m)).to(tl.float64), mask=row_ok)
    tl.store(m_ptr + rows, m, mask=row_ok)
    tl.store(count_ptr + rows, count, mask=row_ok)
    tl.store(rest_ptr + rows, rest, mask=row_ok)
    if OP == 0:
        # _state.finalize without weights (the sum is positive): the max alone
        # decides at an infinite or NaN max, and nothing included is -inf with sign 0.
        m64 = m.to(tl.float64)
        value = tl.where(_finite(m64), m64 + _log1p((count - 1.0) + rest), m64)
        sign = tl.where(m64 == float("-inf"), 0.0, tl.where(m64 == m64, 1.0, float("nan")))
        _store_result(value_ptr, rows, value, row_ok, WIDE)
        _store_result(value_ptr, rows + n_rows, sign, row_ok, WIDE)


@triton.jit
def _normalized_value(x, masked, included, m, count, rest, OP: tl.constexpr, WIDE: tl.constexpr):
    """softmax (OP 1) or log_softmax (OP 2), float64, with the contract's limits.

    As ``_state.softmax_from_state`` / ``log_softmax_from_state``: ``k``
    included entries at ``+inf`` get ``1 / k`` (``-log k``) and the others 0
    (``-inf``); nothing included, or every entry ``-inf``, gives 0 (``-inf``);
    excluded entries 0 (``-inf``); a NaN max (an included NaN) makes the row NaN.
    """
    top = tl.maximum(count, 1.0)  # count is 0 only when nothing is included
    shift = tl.where(_finite(m), m, 0.0)
    at_inf = x == float("inf")
    if OP == 1:
        # exp(x - m) / (count + rest); excluded entries 0.
        y = _exp_difference(masked, shift, WIDE) / (top + rest)
        y = tl.where(m == float("inf"), tl.where(at_inf, 1.0 / top, 0.0), y)
        y = tl.where(included, y, 0.0)
    else:
        # (x - m) - log1p(count - 1 + rest); excluded entries -inf.
        y = (masked.to(tl.float64) - shift.to(tl.float64)) - _log1p((top - 1.0) + rest)
        y = tl.where(m == float("inf"), tl.where(at_inf, -tl.log(top), float("-inf")), y)
        y = tl.where(included, y, float("-inf"))
    return tl.where(m == m, y, float("nan"))


# --------------------------------------------------------------------------
# Forward kernels.


@triton.jit
def _one_pass_kernel(x_ptr, w_ptr, out_ptr, value_ptr, m_ptr, count_ptr, rest_ptr, special_ptr, n_rows, n_cols,
                     OP: tl.constexpr, HAS_WHERE: tl.constexpr, WIDE: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS whole rows per program: one read of x, one write of the output."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    x, included, masked = _load(x_ptr, w_ptr, offs, mask, HAS_WHERE, WIDE)
    has_nan = tl.max((included & (x != x)).to(tl.int32), axis=1) > 0
    m = tl.max(masked, axis=1)
    at_max = included & (masked == m[:, None])
    terms = _exp_difference(masked, m[:, None], WIDE)
    count = tl.sum(at_max.to(tl.float64), axis=1)
    if WIDE:
        rest = tl.sum(tl.where(included & (~at_max), terms, 0.0), axis=1)
    else:
        rest = _order_free_sum(tl.where(included & (~at_max), terms, 0.0), 1)
    m = tl.where(has_nan, float("nan"), m)
    _finish(m, count, rest, rows, row_ok, m_ptr, count_ptr, rest_ptr, special_ptr, value_ptr, n_rows, OP, WIDE)
    if OP != 0:
        y = _normalized_value(x, masked, included, m[:, None], count[:, None], rest[:, None], OP, WIDE)
        _store_result(out_ptr, offs, y, mask, WIDE)


@triton.jit
def _part_state_kernel(x_ptr, w_ptr, pm_ptr, pc_ptr, pr_ptr, n_cols, n_parts,
                       HAS_WHERE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """The state of one part (TILES tiles of BLOCK entries) of a long row.

    Online over the tiles: per-lane float64 count and rest, rescaled by
    exp(old max - new max) when a tile raises the max.  A part holding an
    included NaN writes a NaN max.
    """
    pid = tl.program_id(0)
    row = pid // n_parts
    part = pid % n_parts
    base = row.to(tl.int64) * n_cols
    cols = tl.arange(0, BLOCK)
    if WIDE:
        run_m = tl.full([], float("-inf"), tl.float32)
    else:
        run_m = tl.full([], float("-inf"), tl.float64)
    acc_count = tl.zeros([BLOCK], tl.float64)
    acc_rest = tl.zeros([BLOCK], tl.float64)
    acc_low = tl.zeros([BLOCK], tl.float64)  # float64 input: each lane's rounding errors (TwoSum)
    acc_nan = tl.zeros([BLOCK], tl.int32)
    start = part.to(tl.int64) * (BLOCK * TILES)
    for tile in range(TILES):
        index = start + tile * BLOCK + cols
        mask = index < n_cols
        x, included, masked = _load(x_ptr, w_ptr, base + index, mask, HAS_WHERE, WIDE)
        acc_nan = acc_nan | (included & (x != x)).to(tl.int32)
        new_m = tl.maximum(run_m, tl.max(masked, axis=0))
        grow = new_m > run_m
        # The old state moves into rest, scaled down (merge with the tile's).
        scale = _exp_difference(run_m, new_m, WIDE)
        acc_rest = tl.where(grow, (acc_count + acc_rest) * scale, acc_rest)
        acc_count = tl.where(grow, 0.0, acc_count)
        at_max = included & (masked == new_m)
        terms = tl.where(included & (~at_max), _exp_difference(masked, new_m, WIDE), 0.0)
        acc_count += at_max.to(tl.float64)
        if WIDE:
            acc_rest += terms
        else:
            acc_low = tl.where(grow, acc_low * scale, acc_low)
            acc_rest, error = _two_sum(acc_rest, terms)
            acc_low += error
        run_m = new_m
    has_nan = tl.max(acc_nan, axis=0) > 0
    tl.store(pm_ptr + pid, tl.where(has_nan, float("nan"), run_m))
    tl.store(pc_ptr + pid, tl.sum(acc_count, axis=0))
    if WIDE:
        tl.store(pr_ptr + pid, tl.sum(acc_rest, axis=0))
    else:
        tl.store(pr_ptr + pid, _order_free_sum(acc_rest, 0) + tl.sum(acc_low, axis=0))


@triton.jit
def _merge_rows_kernel(pm_ptr, pc_ptr, pr_ptr, n_parts, value_ptr, m_ptr, count_ptr, rest_ptr, special_ptr, n_rows,
                       OP: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """Merge the n_parts partial states of one row (merge_along), then finish it."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * n_parts
    lanes = tl.arange(0, BLOCK)
    if WIDE:
        m = tl.full([], float("-inf"), tl.float32)
    else:
        m = tl.full([], float("-inf"), tl.float64)
    nan = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n_parts, BLOCK):
        mask = start + lanes < n_parts
        part_max = tl.load(pm_ptr + base + start + lanes, mask=mask, other=float("-inf"))
        if WIDE:
            part_max = part_max.to(tl.float32)  # exact: float32 maxima kept in float64
        nan = nan | (part_max != part_max).to(tl.int32)
        m = tl.maximum(m, tl.max(tl.where(part_max == part_max, part_max, float("-inf")), axis=0))
    acc_count = tl.zeros([BLOCK], tl.float64)
    acc_rest = tl.zeros([BLOCK], tl.float64)
    for start in range(0, n_parts, BLOCK):
        mask = start + lanes < n_parts
        part_max = tl.load(pm_ptr + base + start + lanes, mask=mask, other=float("-inf"))
        if WIDE:
            part_max = part_max.to(tl.float32)
        part_count = tl.load(pc_ptr + base + start + lanes, mask=mask, other=0.0)
        part_rest = tl.load(pr_ptr + base + start + lanes, mask=mask, other=0.0)
        on_top = part_max == m
        weight = _exp_difference(tl.where(on_top, float("-inf"), part_max), m, WIDE)
        acc_count += tl.where(on_top, part_count, 0.0)
        acc_rest += tl.where(on_top, part_rest, (part_count + part_rest) * weight)
    has_nan = tl.max(nan, axis=0) > 0
    if WIDE:
        rest = tl.sum(acc_rest, axis=0)
    else:
        rest = _order_free_sum(acc_rest, 0)
    _finish(tl.where(has_nan, float("nan"), m), tl.sum(acc_count, axis=0), rest, row, True,
            m_ptr, count_ptr, rest_ptr, special_ptr, value_ptr, n_rows, OP, WIDE)


@triton.jit
def _normalize_kernel(x_ptr, w_ptr, out_ptr, m_ptr, count_ptr, rest_ptr, n_cols, n_blocks,
                      OP: tl.constexpr, HAS_WHERE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """softmax / log_softmax of one BLOCK of a row whose state is known."""
    pid = tl.program_id(0)
    row = pid // n_blocks
    index = (pid % n_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n_cols
    offs = row.to(tl.int64) * n_cols + index
    x, included, masked = _load(x_ptr, w_ptr, offs, mask, HAS_WHERE, WIDE)
    m = tl.load(m_ptr + row)
    count = tl.load(count_ptr + row)
    rest = tl.load(rest_ptr + row)
    y = _normalized_value(x, masked, included, m, count, rest, OP, WIDE)
    _store_result(out_ptr, offs, y, mask, WIDE)


@triton.jit
def _merge_pairs_kernel(m1_ptr, c1_ptr, r1_ptr, m2_ptr, c2_ptr, r2_ptr, m_ptr, c_ptr, r_ptr, n,
                        WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """Elementwise _merge of two arrays of states (for the tests against _state.merge)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    m, c, r = _merge(tl.load(m1_ptr + offs, mask=mask), tl.load(c1_ptr + offs, mask=mask),
                     tl.load(r1_ptr + offs, mask=mask), tl.load(m2_ptr + offs, mask=mask),
                     tl.load(c2_ptr + offs, mask=mask), tl.load(r2_ptr + offs, mask=mask), WIDE)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(c_ptr + offs, c, mask=mask)
    tl.store(r_ptr + offs, r, mask=mask)


# --------------------------------------------------------------------------
# Backward kernels.


@triton.jit
def _lse_backward_kernel(x_ptr, w_ptr, m_ptr, count_ptr, rest_ptr, g_ptr, out_ptr, n_cols, n_blocks,
                         HAS_WHERE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """d lse / d x * g = exp((x - m) - log_norm) * g, 0 where excluded (lse_weights, lse_vjp)."""
    pid = tl.program_id(0)
    row = pid // n_blocks
    index = (pid % n_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n_cols
    offs = row.to(tl.int64) * n_cols + index
    _, included, masked = _load(x_ptr, w_ptr, offs, mask, HAS_WHERE, WIDE)
    m = tl.load(m_ptr + row).to(tl.float64)
    log_norm = _log1p((tl.load(count_ptr + row) - 1.0) + tl.load(rest_ptr + row))
    g = tl.load(g_ptr + row).to(tl.float64)
    weight = tl.where(included, tl.exp((masked.to(tl.float64) - m) - log_norm), 0.0)
    # _times_weight: exactly 0 where the weight is, whatever g is.
    grad = weight * tl.where(weight == 0.0, 0.0, g)
    _store_result(out_ptr, offs, grad, mask, WIDE)


@triton.jit
def _row_sum_term(y, g, included, LOG: tl.constexpr):
    """The summand of the row sum of softmax_vjp (y * g) or log_softmax_vjp (g)."""
    if LOG:
        return tl.where(included, g, 0.0)
    else:
        return y * tl.where(y == 0.0, 0.0, g)


@triton.jit
def _apply_vjp(y, g, total, included, LOG: tl.constexpr):
    if LOG:
        # log_softmax_vjp: g - exp(z) * sum g, 0 on excluded entries.
        p = tl.exp(y)
        return tl.where(included, g - p * tl.where(p == 0.0, 0.0, total), 0.0)
    else:
        # softmax_vjp: y * (g - sum y g), exactly 0 where y is.
        return y * tl.where(y == 0.0, 0.0, g - total)


@triton.jit
def _load_vjp(y_ptr, g_ptr, w_ptr, offs, mask, HAS_WHERE: tl.constexpr):
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    included = mask
    if HAS_WHERE:
        included = included & (tl.load(w_ptr + offs, mask=mask, other=0) != 0)
    return y, g, included


@triton.jit
def _vjp_one_pass_kernel(y_ptr, g_ptr, w_ptr, out_ptr, n_rows, n_cols,
                         LOG: tl.constexpr, HAS_WHERE: tl.constexpr, WIDE: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """softmax / log_softmax backward of whole rows: one read of y and g, one write."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    y, g, included = _load_vjp(y_ptr, g_ptr, w_ptr, offs, mask, HAS_WHERE)
    total = tl.sum(_row_sum_term(y, g, included, LOG), axis=1)
    _store_result(out_ptr, offs, _apply_vjp(y, g, total[:, None], included, LOG), mask, WIDE)


@triton.jit
def _vjp_partial_kernel(y_ptr, g_ptr, w_ptr, partial_ptr, n_cols, n_blocks,
                        LOG: tl.constexpr, HAS_WHERE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // n_blocks
    index = (pid % n_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n_cols
    y, g, included = _load_vjp(y_ptr, g_ptr, w_ptr, row.to(tl.int64) * n_cols + index, mask, HAS_WHERE)
    tl.store(partial_ptr + pid, tl.sum(_row_sum_term(y, g, included, LOG), axis=0))


@triton.jit
def _vjp_apply_kernel(y_ptr, g_ptr, w_ptr, total_ptr, out_ptr, n_cols, n_blocks,
                      LOG: tl.constexpr, HAS_WHERE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // n_blocks
    index = (pid % n_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n_cols
    offs = row.to(tl.int64) * n_cols + index
    y, g, included = _load_vjp(y_ptr, g_ptr, w_ptr, offs, mask, HAS_WHERE)
    total = tl.load(total_ptr + row)
    _store_result(out_ptr, offs, _apply_vjp(y, g, total, included, LOG), mask, WIDE)


# --------------------------------------------------------------------------
# Host side: launch configuration (cached) and launches.

_CONFIGS: dict = {}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _warps(elements: int, per_thread: int = 8) -> int:
    """Warps for a program over ``elements`` entries, ``per_thread`` each (1 to 16)."""
    return max(1, min(16, elements // (32 * per_thread)))


def config(n_rows: int, n_cols: int, wide: bool = True, sms: int | None = None):
    """``("one", ROWS, BLOCK, warps, grid)`` or ``("parts", n_parts, n_blocks, warps, warps, tiles)``.

    ``wide``: float32-computed input (float64 input gets half the one-pass
    length and entries per thread).  ``sms``: the device's multiprocessors;
    parts get as many tiles (up to ``PART_TILES``, a power of two) as keep
    at least four programs per multiprocessor (``None``: ``PART_TILES``).
    Cached per shape and tuning constants, so a repeated call pays a dict
    lookup.
    """
    key = (n_rows, n_cols, wide, sms, ONE_PASS_MAX, ENTRIES_PER_THREAD, PART_BLOCK, PART_TILES, MERGE_BLOCK,
           ELEMENTWISE_BLOCK)
    found = _CONFIGS.get(key)
    if found is not None:
        return found
    per_thread = ENTRIES_PER_THREAD if wide else max(1, ENTRIES_PER_THREAD // 2)
    if n_cols <= (ONE_PASS_MAX if wide else max(1, ONE_PASS_MAX // 2)):
        block = _next_pow2(n_cols)
        # Short rows: several per program, about 2048 entries in all.
        rows = max(1, min(_next_pow2(n_rows), max(1, 2048 // block)))
        found = ("one", rows, block, _warps(rows * block, per_thread), (triton.cdiv(n_rows, rows),))
    else:
        tiles = PART_TILES
        if sms is not None:
            while tiles > 1 and n_rows * triton.cdiv(n_cols, PART_BLOCK * tiles) < 4 * sms:
                tiles //= 2
        n_parts = triton.cdiv(n_cols, PART_BLOCK * tiles)
        n_blocks = triton.cdiv(n_cols, ELEMENTWISE_BLOCK)
        found = ("parts", n_parts, n_blocks, _warps(PART_BLOCK), _warps(ELEMENTWISE_BLOCK), tiles)
    if len(_CONFIGS) > 4096:
        _CONFIGS.clear()
    _CONFIGS[key] = found
    return found


_SMS: dict = {}


def _multiprocessors(device) -> int | None:
    """Multiprocessors of a CUDA device (cached), None elsewhere."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else 0
    found = _SMS.get(index)
    if found is None:
        import torch

        found = _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return found


def _interpreting() -> bool:
    from lse_dispatch._env import getenv

    return getenv("TRITON_INTERPRET") == "1"


class _Quiet:
    """NumPy floating-point warnings off while the interpreter runs a kernel.

    GPUs do not trap on ``inf - inf`` or overflow; the interpreter evaluates
    with NumPy, which would warn where the device silently yields NaN or inf
    (in lanes that ``where`` then discards).
    """

    def __enter__(self):
        if _interpreting():
            import numpy as np

            self._state = np.seterr(all="ignore")
        return self

    def __exit__(self, *exc):
        if _interpreting():
            import numpy as np

            np.seterr(**self._state)
        return False


def rows_forward(x2d, where2d, op: int, out=None, value=None):
    """Run ``op`` over the rows of a contiguous ``(rows, n)`` tensor.

    Returns ``(m, count, rest, special)`` per row, float64 views of one
    ``(4, rows)`` allocation: the state, and a flag (1.0) on rows to hand to
    the shared rules.  ``out`` (softmax, log_softmax: like ``x2d``) or
    ``value`` (logsumexp: ``(2, rows)``, value then sign) receive the results
    for unflagged rows.
    """
    import torch

    n_rows, n_cols = x2d.shape
    wide = x2d.dtype != torch.float64
    device = x2d.device
    m, count, rest, special = torch.empty((4, n_rows), dtype=torch.float64, device=device)
    has_where = where2d is not None
    w = where2d if has_where else x2d
    out = x2d if out is None else out
    value = m if value is None else value
    cfg = config(n_rows, n_cols, wide, _multiprocessors(device))
    with _Quiet():
        if cfg[0] == "one":
            _, rows, block, warps, grid = cfg
            _one_pass_kernel[grid](x2d, w, out, value, m, count, rest, special, n_rows, n_cols,
                                   OP=op, HAS_WHERE=has_where, WIDE=wide, ROWS=rows, BLOCK=block, num_warps=warps)
            return m, count, rest, special
        _, n_parts, n_blocks, part_warps, elementwise_warps, tiles = cfg
        # Partial (max, count, rest), float64, in one allocation.
        pm, pc, pr = torch.empty((3, n_rows * n_parts), dtype=torch.float64, device=device)
        _part_state_kernel[(n_rows * n_parts,)](x2d, w, pm, pc, pr, n_cols, n_parts, HAS_WHERE=has_where, WIDE=wide,
                                                BLOCK=PART_BLOCK, TILES=tiles, num_warps=part_warps)
        _merge_rows_kernel[(n_rows,)](pm, pc, pr, n_parts, value, m, count, rest, special, n_rows,
                                      OP=op, WIDE=wide, BLOCK=MERGE_BLOCK, num_warps=_warps(MERGE_BLOCK))
        if op != OP_LOGSUMEXP:
            _normalize_kernel[(n_rows * n_blocks,)](x2d, w, out, m, count, rest, n_cols, n_blocks, OP=op,
                                                    HAS_WHERE=has_where, WIDE=wide, BLOCK=ELEMENTWISE_BLOCK,
                                                    num_warps=elementwise_warps)
    return m, count, rest, special


def merge_rows(pm, pc, pr, op: int = OP_LOGSUMEXP, value=None):
    """Merge ``(rows, parts)`` partial states per row with the kernel's n-ary merge.

    Returns ``(m, count, rest, special)``; ``value`` (``(2, rows)``) gets the
    finalised logsumexp of unflagged rows.  For the tests against
    ``_state.merge`` / ``_state.finalize``.
    """
    import torch

    n_rows, n_parts = pm.shape
    wide = pm.dtype != torch.float64
    device = pm.device
    m, count, rest, special = torch.empty((4, n_rows), dtype=torch.float64, device=device)
    value = m if value is None else value
    with _Quiet():
        _merge_rows_kernel[(n_rows,)](pm.contiguous(), pc.contiguous(), pr.contiguous(), n_parts, value, m, count,
                                      rest, special, n_rows, OP=op, WIDE=wide, BLOCK=min(MERGE_BLOCK, _next_pow2(n_parts)))
    return m, count, rest, special


def merge_pairs(first, second):
    """Elementwise ``_merge`` of two states given as ``(max, count, rest)`` 1-D tensors."""
    import torch

    n = first[0].numel()
    wide = first[0].dtype != torch.float64
    outs = [torch.empty_like(part) for part in first]
    block = 256
    with _Quiet():
        _merge_pairs_kernel[(triton.cdiv(n, block),)](*first, *second, *outs, n, WIDE=wide, BLOCK=block)
    return tuple(outs)


def lse_backward(x2d, where2d, m, count, rest, g, out):
    """``out = d logsumexp / d x * g`` for unflagged rows (``g``: one value per row)."""
    import torch

    n_rows, n_cols = x2d.shape
    block = min(ELEMENTWISE_BLOCK, _next_pow2(n_cols))
    n_blocks = triton.cdiv(n_cols, block)
    has_where = where2d is not None
    with _Quiet():
        _lse_backward_kernel[(n_rows * n_blocks,)](x2d, where2d if has_where else x2d, m, count, rest, g, out,
                                                   n_cols, n_blocks, HAS_WHERE=has_where,
                                                   WIDE=x2d.dtype != torch.float64, BLOCK=block, num_warps=_warps(block))
    return out


def normalized_backward(y2d, g2d, where2d, log: bool, out):
    """softmax (``log=False``) or log_softmax backward of rows: ``out`` from output ``y2d`` and cotangent ``g2d``."""
    import torch

    n_rows, n_cols = y2d.shape
    has_where = where2d is not None
    w = where2d if has_where else y2d
    wide = y2d.dtype != torch.float64
    cfg = config(n_rows, n_cols, wide, _multiprocessors(y2d.device))
    with _Quiet():
        if cfg[0] == "one":
            _, rows, block, warps, grid = cfg
            _vjp_one_pass_kernel[grid](y2d, g2d, w, out, n_rows, n_cols, LOG=log, HAS_WHERE=has_where, WIDE=wide,
                                       ROWS=rows, BLOCK=block, num_warps=warps)
            return out
        block = ELEMENTWISE_BLOCK
        n_blocks = triton.cdiv(n_cols, block)
        partial = torch.empty((n_rows, n_blocks), dtype=torch.float64, device=y2d.device)
        _vjp_partial_kernel[(n_rows * n_blocks,)](y2d, g2d, w, partial, n_cols, n_blocks, LOG=log,
                                                  HAS_WHERE=has_where, BLOCK=block, num_warps=_warps(block))
        total = partial.sum(dim=1)
        _vjp_apply_kernel[(n_rows * n_blocks,)](y2d, g2d, w, total, out, n_cols, n_blocks, LOG=log,
                                                HAS_WHERE=has_where, WIDE=wide, BLOCK=block, num_warps=_warps(block))
    return out
