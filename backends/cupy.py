"""CuPy: NVIDIA GPUs through CUDA, with a fused one-pass logsumexp kernel."""

from __future__ import annotations

import math

from array_api_compat import is_cupy_array

from lse_dispatch._numerics import Numerics

from ._spec import BackendSpec, Device


class CupyNumerics(Numerics):
    """CuPy compiles its kernels with ``-ftz=true``: float32 subnormal operands
    (and float32 to float64 conversions of them) are flushed to zero, so
    weights are read from their bits (measured on an H200, CuPy 14.2:
    ``logsumexp([16.5], b=[1e-40])`` in float32 gave ``-inf``)."""

    def bitcast(self, x, dtype):
        return x.view(dtype)


def _namespace():
    import array_api_compat.cupy as xp

    return xp


def _devices():
    import cupy

    return [Device("cuda", cupy.cuda.Device(0))] if cupy.cuda.runtime.getDeviceCount() else []


def _to_numpy(x):
    return x.get()


def _fused_declines(call) -> str | None:
    """Why the fused kernels cannot take ``call`` (None: they can)."""
    import cupy

    if call.b is not None or call.where is not None:
        return "weights or where given"
    if call.a.dtype != cupy.float32:
        return f"dtype {call.a.dtype} (the kernels read float32)"
    if not call.axes or call.axes != tuple(range(call.a.ndim - len(call.axes), call.a.ndim)):
        return "reduced axes are not the trailing axes"
    if not call.a.flags.c_contiguous:
        return "input is not C-contiguous"
    if call.a.size == 0:
        return "empty input"
    return None


def _rows(call):
    kept = call.shape[: call.a.ndim - len(call.axes)]
    return kept, call.a.reshape(math.prod(kept), -1)


def _fused_logsumexp(call):
    """One read of the input: per-row states, merged and finalised on the GPU."""
    from ._cupy_fused import lse_rows

    kept, x2d = _rows(call)
    out = lse_rows(x2d)  # (2, rows): value, sign
    keep_shape = tuple(kept) + (1,) * len(call.axes)
    # No weights: the sum is never negative, so no NaN for a negative sum.
    return out[0].reshape(keep_shape), out[1].reshape(keep_shape)


def _fused_normalize(op):
    def run(call):
        from ._cupy_fused import normalize_rows

        _, x2d = _rows(call)
        return normalize_rows(x2d, op).reshape(call.a.shape)

    return run


def _kernels():
    from lse_dispatch._kernel import Kernel, Priority
    from lse_dispatch._ops import Op


    fused = Priority.COMPILED
    # log_softmax too: its terms are float64 exp of the exact x - m, so the
    # max's -log1p(rest) is as accurate as on the generic path.
    return tuple(
        Kernel(op, "cupy-fused", _fused_logsumexp if op == Op.LOGSUMEXP else _fused_normalize(op), _fused_declines, fused)
        for op in (Op.LOGSUMEXP, Op.SOFTMAX, Op.LOG_SOFTMAX)
    )


SPEC = BackendSpec(
    name="cupy",
    module="cupy",
    is_array=is_cupy_array,
    namespace=_namespace,
    devices=_devices,
    dtypes=("float16", "float32", "float64"),
    to_numpy=_to_numpy,
    kernels=_kernels(),
    numerics=CupyNumerics(),
)
