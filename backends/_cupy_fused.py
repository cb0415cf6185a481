"""Fused CUDA kernels of the log-sum-exp state, for CuPy.

The generic path reads the input twice (the max, then the shifted sum).
These kernels read it once: every thread folds its entries into an online
state ``(max, count at the max, rest)`` -- the state of
:mod:`lse_dispatch._state` -- and the states are merged by the same rule
across the warp, the block and the blocks of a row.

* logsumexp of rows up to ``SHORT_ROW`` entries: one warp per row, state and
  finalisation in one launch, one allocation (value and sign share it).
* softmax and log_softmax of rows up to ``ONE_PASS_ROW`` entries: one block
  per row holds the row in registers (``ONE_PASS_ITEMS`` per thread), merges
  the state across the block and writes the output: one read, one write.
* Longer rows: ``lse_state_rows`` writes one partial state per block of a
  row, ``lse_merge_rows`` merges and finalises them per row (and, for
  softmax/log_softmax, writes the row's ``(max, count, log_norm)`` for one
  elementwise pass).

Only the update and merge steps are written again here, in CUDA C, because
a fused kernel cannot call array functions; they follow ``_state.merge``
line by line, and the limits follow ``_state.finalize`` and
``_state.log_softmax_from_state`` (NaN rows NaN; ``k`` entries at ``+inf``
share ``1/k``; nothing included gives ``-inf`` / 0).  Sums are float64 and
each term is float64 ``exp`` of the exact float64 difference: ``expf`` of a
rounded float32 difference puts an absolute error of a float32 ulp on
``log1p(rest)``, which a logsumexp that cancels to near 0 turns into 1.4e8
ulps (catalogue case ``accuracy/cancels-to-near-zero``; measured on the CPU
kernels, whose float32 terms did that).  Outputs are float64 values rounded
once: logsumexp ``m + log1p(count - 1 + rest)``, log_softmax
``(x - m) - log_norm`` (``x - m`` exact), softmax ``exp`` of that exponent.
log_softmax is therefore as accurate as on the generic path (the decline of
its former float32 terms no longer applies).

Host side: the launch configuration of a shape is computed once and cached
(``_launch``); a call allocates its output and, for rows longer than
``SHORT_ROW`` / ``ONE_PASS_ROW``, one float64 buffer of partial states (and
one of row statistics).  Written without a GPU at hand: docs/gpu/ says what
has been measured on one.
"""

from __future__ import annotations

import functools
import math

__all__ = ["ONE_PASS_ROW", "SHORT_ROW", "SOURCE", "lse_rows", "lse_state_rows", "normalize_rows"]

SOURCE = r"""
// NVRTC has no <math.h> macros: spell the special values out.
#define LSE_INF __int_as_float(0x7f800000)
#define LSE_NAN __int_as_float(0x7fffffff)

struct LseState { float max; double count; double rest; };

__device__ __forceinline__ LseState lse_merge(LseState a, LseState b) {
    // Mirrors lse_dispatch._state.merge: the part on the overall max keeps
    // its count and rest; the other contributes (count + rest) * exp(its max - max).
    float m = fmaxf(a.max, b.max);
    if (isnan(a.max) || isnan(b.max)) m = LSE_NAN;
    LseState out; out.max = m; out.count = 0.0; out.rest = 0.0;
    // Shift: m where finite; 0 where m == -inf (nothing included).
    double shift = isinf(m) ? 0.0 : (double)m;
    LseState parts[2] = {a, b};
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        LseState p = parts[i];
        if (p.max == m) { out.count += p.count; out.rest += p.rest; }
        else if (p.count + p.rest != 0.0) {
            // p.max < m here (or NaN around); exp(-inf) = 0 for empty parts.
            double w = (m == LSE_INF) ? 0.0 : exp((double)p.max - shift);
            out.rest += (p.count + p.rest) * w;
        }
    }
    return out;
}

__device__ __forceinline__ void lse_rescale(LseState &s, float new_max) {
    // A new max: the old state moves into the rest, scaled down (in double:
    // errors of the factor would compound over successive rescalings).
    double w = (s.max == -LSE_INF || new_max == LSE_INF) ? 0.0 : exp((double)s.max - (double)new_max);
    s.rest = (s.count + s.rest) * w;
    s.count = 0.0;
    s.max = new_max;
}

__device__ __forceinline__ void lse_add(LseState &s, float x) {
    // x <= s.max here, or NaN.
    if (x == s.max) s.count += 1.0;
    else if (isnan(x)) s.max = LSE_NAN;
    else if (!isnan(s.max) && s.max != LSE_INF) s.rest += exp((double)x - (double)s.max);
}

__device__ __forceinline__ void lse_update(LseState &s, float x) {
    if (x > s.max) lse_rescale(s, x);
    lse_add(s, x);
}

__device__ __forceinline__ void lse_update4(LseState &s, float4 v) {
    // One rescale per four entries at most: most batches leave the max alone.
    const float top = fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w));
    if (top > s.max) lse_rescale(s, top);
    lse_add(s, v.x); lse_add(s, v.y); lse_add(s, v.z); lse_add(s, v.w);
}

// Fold entries first, first + step, ... of a row into s: float4 loads where
// the row is 16-byte aligned, four of them in flight per iteration.
__device__ __forceinline__ void lse_fold(LseState &s, const float* base, long long n_cols,
                                          long long first, long long step) {
    if ((((unsigned long long)base) & 15) == 0 && (n_cols & 3) == 0) {
        const float4* base4 = reinterpret_cast<const float4*>(base);
        const long long n4 = n_cols >> 2;
        long long j = first;
        for (; j + 3 * step < n4; j += 4 * step) {
            float4 a = __ldg(base4 + j), b = __ldg(base4 + j + step);
            float4 c = __ldg(base4 + j + 2 * step), d = __ldg(base4 + j + 3 * step);
            lse_update4(s, a); lse_update4(s, b); lse_update4(s, c); lse_update4(s, d);
        }
        for (; j < n4; j += step) lse_update4(s, __ldg(base4 + j));
    } else {
        for (long long j = first; j < n_cols; j += step) lse_update(s, __ldg(base + j));
    }
}

__device__ __forceinline__ LseState warp_merge(LseState s) {
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        LseState o;
        o.max = __shfl_down_sync(0xffffffff, s.max, offset);
        o.count = __shfl_down_sync(0xffffffff, s.count, offset);
        o.rest = __shfl_down_sync(0xffffffff, s.rest, offset);
        s = lse_merge(s, o);
    }
    return s;
}

__device__ __forceinline__ LseState lse_empty() {
    LseState s; s.max = -LSE_INF; s.count = 0.0; s.rest = 0.0; return s;
}

// The block's merged state, in every thread (blockDim.x <= 1024).
__device__ __forceinline__ LseState block_merge(LseState s) {
    __shared__ float smax[32];
    __shared__ double scount[32];
    __shared__ double srest[32];
    __shared__ float fmax_;
    __shared__ double fcount, frest;
    s = warp_merge(s);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { smax[warp] = s.max; scount[warp] = s.count; srest[warp] = s.rest; }
    __syncthreads();
    if (warp == 0) {
        const int n_warps = (blockDim.x + 31) >> 5;
        if (lane < n_warps) { s.max = smax[lane]; s.count = scount[lane]; s.rest = srest[lane]; }
        else s = lse_empty();
        s = warp_merge(s);
        if (lane == 0) { fmax_ = s.max; fcount = s.count; frest = s.rest; }
    }
    __syncthreads();
    s.max = fmax_; s.count = fcount; s.rest = frest;
    return s;
}

// log1p(count - 1 + rest): the term softmax and log_softmax subtract.
// count is 0 only when nothing is included; those rows are -inf anyway.
__device__ __forceinline__ double lse_log_norm(LseState s) {
    return log1p(fmax(s.count, 1.0) - 1.0 + s.rest);
}

// As lse_dispatch._state.finalize without weights: sign 1, 0 for an empty
// sum, NaN for NaN.
__device__ __forceinline__ void lse_finalize(LseState s, float* value, float* sign) {
    if (isnan(s.max)) { *value = LSE_NAN; *sign = LSE_NAN; }
    else if (s.max == -LSE_INF) { *value = -LSE_INF; *sign = 0.0f; }
    else if (s.max == LSE_INF) { *value = LSE_INF; *sign = 1.0f; }
    else { *value = (float)((double)s.max + lse_log_norm(s)); *sign = 1.0f; }
}

// One entry of log_softmax / softmax against its row's (max, count,
// log_norm), with the limits of _state.log_softmax_from_state: NaN rows NaN;
// k entries at +inf share 1/k (log: -log k); nothing included 0 (-inf).
// The exponent is formed in float64, exact for float32 x, rounded once.
__device__ __forceinline__ float lse_log_softmax_entry(float x, float m, double count, double norm) {
    if (isnan(m)) return m;
    if (m == LSE_INF) return (x == m) ? (float)(-log(count)) : -LSE_INF;
    if (m == -LSE_INF) return -LSE_INF;
    return (float)(((double)x - (double)m) - norm);
}

__device__ __forceinline__ float lse_softmax_entry(float x, float m, double count, double norm) {
    if (isnan(m)) return m;
    if (m == LSE_INF) return (x == m) ? (float)(1.0 / count) : 0.0f;
    if (m == -LSE_INF) return 0.0f;
    return (float)exp(((double)x - (double)m) - norm);  // exp(-inf) = 0 for -inf entries
}

// One-dimensional grid of n_rows * blocks_per_row blocks. Each block folds a
// strided share of one contiguous row, then writes one partial state into
// parts = [max (as double) | count | rest], each n_rows * blocks_per_row long.
extern "C" __global__ void lse_state_rows(
    const float* __restrict__ x, long long n_cols, int blocks_per_row, double* __restrict__ parts)
{
    const long long row = blockIdx.x / blocks_per_row;
    const long long part = blockIdx.x % blocks_per_row;
    const float* base = x + row * n_cols;
    LseState s = lse_empty();
    const long long stride = (long long)blockDim.x * blocks_per_row;
    const long long i = part * blockDim.x + threadIdx.x;
    lse_fold(s, base, n_cols, i, stride);
    s = block_merge(s);
    if (threadIdx.x == 0) {
        const long long k = blockIdx.x, total = (long long)gridDim.x;
        parts[k] = (double)s.max; parts[total + k] = s.count; parts[2 * total + k] = s.rest;
    }
}

// Short rows, logsumexp: one warp per row, state and finalisation in one
// launch; out = [value | sign], each n_rows long.
extern "C" __global__ void lse_short_rows(
    const float* __restrict__ x, long long n_cols, long long n_rows, float* __restrict__ out)
{
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= n_rows) return;  // whole warps leave together
    LseState s = lse_empty();
    lse_fold(s, x + row * n_cols, n_cols, threadIdx.x & 31, 32);
    s = warp_merge(s);
    if ((threadIdx.x & 31) == 0) lse_finalize(s, out + row, out + n_rows + row);
}

// One warp per row: merge the row's partial states, then finalise into
// out = [value | sign]; with_stats: also write [max | count | log_norm]
// (each n_rows long) for the elementwise pass of softmax and log_softmax.
extern "C" __global__ void lse_merge_rows(
    const double* __restrict__ parts, int parts_per_row, long long n_rows,
    float* __restrict__ out, int with_stats, double* __restrict__ stats)
{
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;  // whole warps leave together
    const long long total = n_rows * parts_per_row;
    LseState s = lse_empty();
    for (int j = lane; j < parts_per_row; j += 32) {
        const long long k = row * parts_per_row + j;
        LseState p; p.max = (float)parts[k]; p.count = parts[total + k]; p.rest = parts[2 * total + k];
        s = lse_merge(s, p);
    }
    s = warp_merge(s);
    if (lane != 0) return;
    lse_finalize(s, out + row, out + n_rows + row);
    if (with_stats) {
        stats[row] = (double)s.max; stats[n_rows + row] = s.count; stats[2 * n_rows + row] = lse_log_norm(s);
    }
}

#define ONE_PASS_ITEMS 16

// softmax (take_log = 0) or log_softmax (take_log = 1) of rows of at most
// ONE_PASS_ITEMS * blockDim.x entries: one block per row keeps the row in
// registers, so x is read once and the output written once.
extern "C" __global__ void normalize_rows_one_pass(
    const float* __restrict__ x, long long n_cols, float* __restrict__ out, int take_log)
{
    const long long row = blockIdx.x;
    const float* base = x + row * n_cols;
    float v[ONE_PASS_ITEMS];
    LseState s = lse_empty();
    #pragma unroll
    for (int k = 0; k < ONE_PASS_ITEMS; ++k) {
        const long long j = threadIdx.x + (long long)k * blockDim.x;
        v[k] = (j < n_cols) ? __ldg(base + j) : -LSE_INF;
        if (j < n_cols) lse_update(s, v[k]);
    }
    s = block_merge(s);
    const double norm = lse_log_norm(s);
    float* target = out + row * n_cols;
    #pragma unroll
    for (int k = 0; k < ONE_PASS_ITEMS; ++k) {
        const long long j = threadIdx.x + (long long)k * blockDim.x;
        if (j < n_cols)
            target[j] = take_log ? lse_log_softmax_entry(v[k], s.max, s.count, norm)
                            : lse_softmax_entry(v[k], s.max, s.count, norm);
    }
}

// The elementwise pass of long rows, grid-stride over all entries, against
// the row statistics [max | count | log_norm] of lse_merge_rows.
extern "C" __global__ void normalize_rows_elementwise(
    const float* __restrict__ x, long long n_cols, long long n_rows, const double* __restrict__ stats,
    float* __restrict__ out, int take_log)
{
    const long long total = n_cols * n_rows;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / n_cols;
        const float m = (float)stats[row];
        const double count = stats[n_rows + row], norm = stats[2 * n_rows + row];
        out[i] = take_log ? lse_log_softmax_entry(__ldg(x + i), m, count, norm)
                     : lse_softmax_entry(__ldg(x + i), m, count, norm);
    }
}
"""

THREADS = 256
#: Rows up to this many entries get one warp each (logsumexp).
SHORT_ROW = 8192
#: Entries per thread of the one-pass softmax (ONE_PASS_ITEMS in SOURCE).
ONE_PASS_ITEMS = 16
#: Rows up to this many entries take the one-pass softmax / log_softmax.
ONE_PASS_ROW = ONE_PASS_ITEMS * THREADS


def _flag(value: bool):
    import numpy as np

    return np.int32(value)


_NO, _YES = _flag(False), _flag(True)


@functools.cache
def _module():
    import cupy

    return cupy.RawModule(code=SOURCE, options=("-std=c++17",))


@functools.cache
def _kernel(name: str):
    return _module().get_function(name)


@functools.cache
def _multiprocessors(device_id: int) -> int:
    import cupy

    return cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device_id)


def _blocks_per_row(n_rows: int, n_cols: int, device_id: int) -> int:
    """Enough blocks to fill the GPU: about 16 blocks per multiprocessor."""
    wanted = max(1, (_multiprocessors(device_id) * 16) // max(n_rows, 1))
    per_thread = 16  # entries per thread at the least, to amortise the merge
    return int(max(1, min(wanted, math.ceil(n_cols / (THREADS * per_thread)))))


@functools.lru_cache(maxsize=4096)
def _launch(n_rows: int, n_cols: int, device_id: int, op: str):
    """The launch configuration of one shape: computed once, then a cache lookup.

    ``("short", grid, block)``, ``("one-pass", grid, block)`` or
    ``("long", per_row, state_grid, merge_grid, elementwise_grid)``; the
    integer arguments come as NumPy scalars, made once here.
    """
    import numpy as np

    warps_per_block = THREADS // 32
    if op == "logsumexp" and n_cols <= SHORT_ROW:
        return ("short", ((n_rows + warps_per_block - 1) // warps_per_block,), (THREADS,),
                np.int64(n_cols), np.int64(n_rows))
    if op in ("softmax", "log_softmax") and n_cols <= ONE_PASS_ROW:
        # Threads: enough for ONE_PASS_ITEMS entries each, whole warps.
        threads = min(THREADS, max(32, 32 * math.ceil(n_cols / (32 * ONE_PASS_ITEMS))))
        return ("one-pass", (n_rows,), (threads,), np.int64(n_cols), np.int32(op == "log_softmax"))
    per_row = 1 if n_cols <= SHORT_ROW else _blocks_per_row(n_rows, n_cols, device_id)
    merge_grid = ((n_rows + warps_per_block - 1) // warps_per_block,)
    total = n_rows * n_cols
    elementwise_grid = (int(min(max(1, math.ceil(total / THREADS)), _multiprocessors(device_id) * 32)),)
    return ("long", per_row, (per_row * n_rows,), merge_grid, elementwise_grid, np.int64(n_cols), np.int64(n_rows),
            np.int32(per_row), np.int32(op == "log_softmax"))


def _device_id() -> int:
    import cupy

    return cupy.cuda.runtime.getDevice()


def _parts(x2d, config):
    """Partial states ``(3, rows * per_row)`` float64 (max, count, rest) of a long-row config."""
    import cupy

    _, _, state_grid, _, _, n_cols, _, per_row_arg, _ = config
    parts = cupy.empty((3, state_grid[0]), dtype=cupy.float64)
    _kernel("lse_state_rows")(state_grid, (THREADS,), (x2d, n_cols, per_row_arg, parts))
    return parts


def lse_state_rows(x2d):
    """Partial states of each row of a C-contiguous float32 ``(rows, cols)``.

    Returns ``(max, count, rest)`` arrays of shape ``(rows, blocks_per_row)``
    (with ``_state.merge`` semantics), for tests of the update step against
    the generic state.
    """
    import cupy

    n_rows, n_cols = x2d.shape
    config = _launch(n_rows, n_cols, _device_id(), "state")
    per_row = config[1]
    parts = _parts(x2d, config)
    return (parts[0].astype(cupy.float32).reshape(n_rows, per_row), parts[1].reshape(n_rows, per_row),
            parts[2].reshape(n_rows, per_row))


def lse_rows(x2d):
    """Logsumexp of each row: ``(2, rows)`` float32, value then sign.

    Short rows in one launch (one warp per row); longer ones read ``x`` once
    into per-block states, merged per row by a second launch.
    """
    import cupy

    n_rows, n_cols = x2d.shape
    config = _launch(n_rows, n_cols, _device_id(), "logsumexp")
    out = cupy.empty((2, n_rows), dtype=cupy.float32)
    if config[0] == "short":
        _, grid, block, n_cols_arg, n_rows_arg = config
        _kernel("lse_short_rows")(grid, block, (x2d, n_cols_arg, n_rows_arg, out))
        return out
    parts = _parts(x2d, config)
    _, _, _, merge_grid, _, _, n_rows_arg, per_row_arg, _ = config
    _kernel("lse_merge_rows")(merge_grid, (THREADS,), (parts, per_row_arg, n_rows_arg, out, _NO, parts))
    return out


def normalize_rows(x2d, op: str):
    """``softmax`` or ``log_softmax`` of each row of a C-contiguous float32 ``(rows, cols)``.

    Rows up to ``ONE_PASS_ROW`` entries: one launch, one read and one write.
    Longer rows: the state (one read), then one elementwise pass.
    """
    import cupy

    n_rows, n_cols = x2d.shape
    config = _launch(n_rows, n_cols, _device_id(), op)
    out = cupy.empty((n_rows, n_cols), dtype=cupy.float32)
    if config[0] == "one-pass":
        _, grid, block, n_cols_arg, log = config
        _kernel("normalize_rows_one_pass")(grid, block, (x2d, n_cols_arg, out, log))
        return out
    parts = _parts(x2d, config)
    _, _, _, merge_grid, elementwise_grid, n_cols_arg, n_rows_arg, per_row_arg, log = config
    value = cupy.empty((2, n_rows), dtype=cupy.float32)
    stats = cupy.empty((3, n_rows), dtype=cupy.float64)
    _kernel("lse_merge_rows")(merge_grid, (THREADS,), (parts, per_row_arg, n_rows_arg, value, _YES, stats))
    _kernel("normalize_rows_elementwise")(elementwise_grid, (THREADS,), (x2d, n_cols_arg, n_rows_arg, stats, out, log))
    return out
