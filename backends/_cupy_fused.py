"""A fused one-pass CUDA kernel for the log-sum-exp state, for CuPy.

The generic path reads the input twice (the max, then the shifted sum).  This
kernel reads it once: every thread folds its entries into an online state
``(max, count at the max, rest)`` -- the state of :mod:`lse_dispatch._state`
-- and the states are merged by the same rule across the warp, the block and
finally the blocks of a row.  Finalisation is the shared
:func:`lse_dispatch._state.finalize`, so the limits (``-inf``, ``+inf``, NaN)
come out exactly as on every other path.

Only the update and merge steps are written again here, in CUDA C, because a
fused kernel cannot call array functions; they follow ``_state.merge``
line by line.  Sums are carried in float64, and each term is float64
``exp`` of the exact float64 difference: ``expf`` of a rounded float32
difference puts an absolute error of a float32 ulp on ``log1p(rest)``,
which a logsumexp that cancels to near 0 turns into 1.4e8 ulps (catalogue
case ``accuracy/cancels-to-near-zero``; measured on the CPU kernels, whose
float32 terms did that).  Changed without a GPU at hand: the figures in
docs/gpu/ were measured with the former ``expf`` terms.
"""

from __future__ import annotations

import functools
import math

__all__ = ["SOURCE", "lse_rows", "lse_state_rows", "normalize_rows"]

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

// One-dimensional grid of n_rows * blocks_per_row blocks. Each block folds a
// strided share of one contiguous row, then writes one partial state.
extern "C" __global__ void lse_state_rows(
    const float* __restrict__ x, long long n_cols, int blocks_per_row,
    float* __restrict__ out_max, double* __restrict__ out_count, double* __restrict__ out_rest)
{
    const long long row = blockIdx.x / blocks_per_row;
    const long long part = blockIdx.x % blocks_per_row;
    const float* base = x + row * n_cols;
    LseState s; s.max = -LSE_INF; s.count = 0.0; s.rest = 0.0;
    const long long stride = (long long)blockDim.x * blocks_per_row;
    const long long i = part * blockDim.x + threadIdx.x;
    lse_fold(s, base, n_cols, i, stride);
    s = warp_merge(s);
    __shared__ float smax[32];
    __shared__ double scount[32];
    __shared__ double srest[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { smax[warp] = s.max; scount[warp] = s.count; srest[warp] = s.rest; }
    __syncthreads();
    if (warp == 0) {
        const int n_warps = (blockDim.x + 31) >> 5;
        if (lane < n_warps) { s.max = smax[lane]; s.count = scount[lane]; s.rest = srest[lane]; }
        else { s.max = -LSE_INF; s.count = 0.0; s.rest = 0.0; }
        s = warp_merge(s);
        if (lane == 0) {
            const long long k = blockIdx.x;
            out_max[k] = s.max; out_count[k] = s.count; out_rest[k] = s.rest;
        }
    }
}

// Short rows: one warp per row, so no block-wide merge and no idle threads.
extern "C" __global__ void lse_state_short_rows(
    const float* __restrict__ x, long long n_cols, long long n_rows,
    float* __restrict__ out_max, double* __restrict__ out_count, double* __restrict__ out_rest)
{
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= n_rows) return;  // whole warps leave together
    LseState s; s.max = -LSE_INF; s.count = 0.0; s.rest = 0.0;
    lse_fold(s, x + row * n_cols, n_cols, threadIdx.x & 31, 32);
    s = warp_merge(s);
    if ((threadIdx.x & 31) == 0) { out_max[row] = s.max; out_count[row] = s.count; out_rest[row] = s.rest; }
}

__device__ __forceinline__ LseState load_state(const float* m, const double* c, const double* r, long long k) {
    LseState s; s.max = m[k]; s.count = c[k]; s.rest = r[k]; return s;
}

// One warp per row: merge the row's partial states, then finalise as
// lse_dispatch._state.finalize does (no weights, so the sign is 1, 0 for an
// empty sum, NaN for NaN). Also writes log_norm = log1p(count - 1 + rest),
// the per-row term that softmax and log_softmax subtract.
extern "C" __global__ void lse_merge_rows(
    const float* __restrict__ part_max, const double* __restrict__ part_count,
    const double* __restrict__ part_rest, int parts_per_row, long long n_rows,
    float* __restrict__ row_max, double* __restrict__ row_count, double* __restrict__ log_norm,
    float* __restrict__ value, float* __restrict__ sign)
{
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;  // whole warps leave together
    LseState s; s.max = -LSE_INF; s.count = 0.0; s.rest = 0.0;
    for (int j = lane; j < parts_per_row; j += 32)
        s = lse_merge(s, load_state(part_max, part_count, part_rest, row * parts_per_row + j));
    s = warp_merge(s);
    if (lane != 0) return;
    // count is 0 only when nothing is included; those rows are -inf anyway.
    const double norm = log1p(fmax(s.count, 1.0) - 1.0 + s.rest);
    row_max[row] = s.max; row_count[row] = s.count; log_norm[row] = norm;
    if (isnan(s.max)) { value[row] = LSE_NAN; sign[row] = LSE_NAN; }
    else if (s.max == -LSE_INF) { value[row] = -LSE_INF; sign[row] = 0.0f; }
    else if (s.max == LSE_INF) { value[row] = LSE_INF; sign[row] = 1.0f; }
    else { value[row] = (float)((double)s.max + norm); sign[row] = 1.0f; }
}
"""

# Elementwise passes over x against its row's (max, count, log_norm), with
# the limits of lse_dispatch._state.log_softmax_from_state: NaN rows NaN;
# k entries at +inf share 1/k (log: -log k); nothing included: 0 (-inf).
# The exponent is formed in float64, exact for float32 x.
LOG_SOFTMAX = r"""
    if (isnan(m)) out = m;
    else if (m == __int_as_float(0x7f800000))
        out = (x == m) ? (float)(-log(count)) : -__int_as_float(0x7f800000);
    else if (m == -__int_as_float(0x7f800000)) out = -__int_as_float(0x7f800000);
    else out = (float)(((double)x - (double)m) - norm);
"""
SOFTMAX = r"""
    if (isnan(m)) out = m;
    else if (m == __int_as_float(0x7f800000)) out = (x == m) ? (float)(1.0 / count) : 0.0f;
    else if (m == -__int_as_float(0x7f800000)) out = 0.0f;
    else {
        // The exponent in double, split into float hi + lo: expf(hi) is one
        // float32 rounding, and fmaf(e, lo, e) applies exp(lo) ~ 1 + lo.
        const double t = ((double)x - (double)m) - norm;
        const float hi = (float)t;
        const float e = expf(hi);
        // hi = -inf (a -inf entry, or t below -FLT_MAX): exp is 0, and t - hi
        // would be NaN or inf.
        const float lo = isinf(hi) ? 0.0f : (float)(t - (double)hi);
        out = fmaf(e, lo, e);
    }
"""

THREADS = 256
#: Rows up to this many entries get one warp each instead of whole blocks.
SHORT_ROW = 8192


@functools.lru_cache(maxsize=None)
def _module():
    import cupy

    return cupy.RawModule(code=SOURCE, options=("-std=c++17",))


@functools.lru_cache(maxsize=None)
def _elementwise(name: str):
    import cupy

    body = LOG_SOFTMAX if name == "log_softmax" else SOFTMAX
    return cupy.ElementwiseKernel(
        "float32 x, float32 m, float64 count, float64 norm", "float32 out", body, f"lse_dispatch_{name}"
    )


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_id: int) -> int:
    import cupy

    return cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device_id)


def _blocks_per_row(n_rows: int, n_cols: int) -> int:
    """Enough blocks to fill the GPU: about 16 blocks per multiprocessor."""
    import cupy

    sms = _multiprocessors(cupy.cuda.Device().id)
    wanted = max(1, (sms * 16) // max(n_rows, 1))
    per_thread = 16  # entries per thread at the least, to amortise the merge
    return int(max(1, min(wanted, math.ceil(n_cols / (THREADS * per_thread)))))


def lse_state_rows(x2d):
    """Partial states of each row of a C-contiguous float32 ``(rows, cols)``.

    Returns ``(max, count, rest)`` arrays of shape ``(rows, blocks_per_row)``
    (with ``_state.merge`` semantics); used by tests to check the kernel's
    update step against the generic state.
    """
    import cupy

    n_rows, n_cols = x2d.shape
    short = n_cols <= SHORT_ROW
    per_row = 1 if short else _blocks_per_row(n_rows, n_cols)
    out_max = cupy.empty((n_rows, per_row), dtype=cupy.float32)
    out_count = cupy.empty((n_rows, per_row), dtype=cupy.float64)
    out_rest = cupy.empty((n_rows, per_row), dtype=cupy.float64)
    if short:
        blocks = (n_rows * 32 + THREADS - 1) // THREADS
        _module().get_function("lse_state_short_rows")(
            (blocks,), (THREADS,), (x2d, cupy.int64(n_cols), cupy.int64(n_rows), out_max, out_count, out_rest)
        )
        return out_max, out_count, out_rest
    _module().get_function("lse_state_rows")(
        (per_row * n_rows,),
        (THREADS,),
        (x2d, cupy.int64(n_cols), cupy.int32(per_row), out_max, out_count, out_rest),
    )
    return out_max, out_count, out_rest


def lse_rows(x2d):
    """Logsumexp of each row in two launches: one read of ``x``, then a merge.

    Returns ``(value, sign, row_max, row_count, log_norm)``, each of shape
    ``(rows,)``; the last three feed :func:`normalize_rows`.
    """
    import cupy

    part_max, part_count, part_rest = lse_state_rows(x2d)
    n_rows, per_row = part_max.shape
    row_max = cupy.empty(n_rows, dtype=cupy.float32)
    row_count = cupy.empty(n_rows, dtype=cupy.float64)
    log_norm = cupy.empty(n_rows, dtype=cupy.float64)
    value = cupy.empty(n_rows, dtype=cupy.float32)
    sign = cupy.empty(n_rows, dtype=cupy.float32)
    warps_per_block = THREADS // 32
    blocks = (n_rows + warps_per_block - 1) // warps_per_block
    _module().get_function("lse_merge_rows")(
        (blocks,),
        (THREADS,),
        (part_max, part_count, part_rest, cupy.int32(per_row), cupy.int64(n_rows),
         row_max, row_count, log_norm, value, sign),
    )
    return value, sign, row_max, row_count, log_norm


def normalize_rows(x2d, row_max, row_count, log_norm, op: str):
    """``softmax`` or ``log_softmax`` of each row, one elementwise pass."""
    return _elementwise(op)(x2d, row_max[:, None], row_count[:, None], log_norm[:, None])
