"""NumPy: the reference CPU backend.

Native kernel ``numpy.blocked``: the tiled engine of :mod:`._tiled`, with
NumPy's table of operations (:class:`NumpyOps`).  float32 terms are ``WIDE``:
float64 ``exp`` of the float64 difference ``x - m`` (exact there), or of
``x`` itself on lines whose max lies in ``[-550, 600]``.  Not float32
``exp``: NumPy's float32 ``exp`` was measured (every float32 in
``[-87.34, 0]``, AVX-512 build) at most 2.54 ulps and ``3.57 * 2**-24``
relative off, and a float32 difference ``x - m`` adds ``|x - m| * 2**-24``.
The state carries such a relative error of its terms into the absolute
error of ``log1p(rest)``, and every result inherits that: ``logsumexp``
where ``m + log1p(rest)`` cancels to near 0 (``[-1, c, c]`` with
``1 + 2 exp(c + 1) = e``: float32 terms gave 1.4e8 ulps, float64 terms 0.4),
``log_softmax`` where ``x - m`` and ``log1p(rest)`` nearly cancel, and each
softmax entry (up to 3.57 ulps on top of its own rounding).  A float32
``exp(t_hi) * (1 + t_lo)`` of a compensated exponent would fit the output
pass of softmax alone (2.54 + 0.5 ulps), but on these 2^17-element tiles the
TwoSum passes it needs cost as much as the float64 ``exp`` they replace
(measured 171 us against 128 us per tile).  NumPy's float64 ``exp`` (under
an ulp of float64, 2**-29 of a float32 ulp) needs no accuracy check at
import on any CPU.  float64 input takes ``PLAIN`` terms in the exact mode
(logsumexp only: float64 softmax and log_softmax are declined).

Results, float32 (against the exact value; the contract allows 4 ulps):
``logsumexp`` half an ulp plus the float64 state's error; ``log_softmax`` at
most 1.5 ulps; ``softmax`` of lines that fit in a tile half an ulp (float64
``terms / sum`` rounded once, one ``exp`` per entry), of longer lines or the
leading axis at most 3 ulps (three float32 roundings).
"""

from __future__ import annotations

import numpy as np

from lse_dispatch._numerics import Numerics

from . import _fused_cpu
from ._spec import BackendSpec, Device
from ._tiled import PLAIN, WIDE, TiledKernel

__all__ = ["SPEC", "TILE_ELEMENTS"]


def _namespace():
    import array_api_compat.numpy as xp

    return xp


def _is_array(x) -> bool:
    """A NumPy array or scalar (a plain isinstance, as array-api-compat's check, without its cache)."""
    return isinstance(x, (np.ndarray, np.generic))


def _to_numpy(x):
    return np.asarray(x)


# Elements per tile: a float32 tile (512 KiB) stays inside a 1 MiB L2; larger
# tiles make the per-call overhead of NumPy negligible (measured: 2**15 -> 2**17
# took logsumexp of (4096, 4096) from 1.3x to 1.2x a bare np.exp).
TILE_ELEMENTS = 1 << 17
# Inputs up to this many elements take the direct path: a handful of whole-array
# NumPy calls, no tiles, so that a call on 10 entries costs microseconds.
SMALL_ELEMENTS = 4096
# A reduction over all of at most this many elements runs in Python floats.
TINY_ELEMENTS = 16


class NumpyOps:
    """NumPy's table of operations for the tiled engine (``ufunc`` s with ``out=``)."""

    name = "numpy"
    float32_terms = WIDE
    float64_terms = PLAIN
    float32, float64 = np.dtype(np.float32), np.dtype(np.float64)

    @property
    def xp(self):
        return _namespace()

    def tile_elements(self, view) -> int:
        return TILE_ELEMENTS

    def small_elements(self) -> int:
        return SMALL_ELEMENTS

    def tiny_elements(self) -> int:
        return TINY_ELEMENTS

    def declines(self, call) -> str | None:
        if type(call.a) is not np.ndarray:
            return f"{type(call.a).__name__} (the kernel takes plain ndarrays)"
        return None

    def is_contiguous(self, a) -> bool:
        return bool(a.flags.c_contiguous)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def maximum(self, x, axis, out=None):
        return np.maximum.reduce(x, axis=axis, out=out)

    def subtract(self, x, y, out):
        return np.subtract(x, y, out=out, dtype=out.dtype)

    def add(self, x, y, out):
        return np.add(x, y, out=out)

    def multiply(self, x, y, out):
        return np.multiply(x, y, out=out)

    def exp(self, x, out):
        return np.exp(x, out=out, dtype=out.dtype)

    def sum(self, x, axis, dtype, work):
        if axis == 0 and x.dtype == dtype:
            # NumPy adds the rows of a reduction over axis 0 one after another;
            # without a wider accumulator, sum the transposed piece along its
            # contiguous last axis, which NumPy does pairwise.
            transposed = work("transposed", x.T, x.dtype)
            np.copyto(transposed, x.T)
            return np.add.reduce(transposed, axis=1)
        return np.add.reduce(x, axis=axis, dtype=dtype)

    def equal(self, x, y, out):
        return np.equal(x, y, out=out)

    def count(self, mask, axis):
        return np.count_nonzero(mask, axis=axis).astype(self.float64)

    def zero_where(self, x, mask) -> None:
        np.copyto(x, 0, where=mask)

    def zero_nan(self, x) -> None:
        np.copyto(x, 0, where=np.isnan(x))

    def copy(self, dst, src) -> None:
        np.copyto(dst, src, casting="same_kind")

    def contiguous(self, x):
        return np.ascontiguousarray(x)

    def from_floats(self, values, dtype, shape):
        return np.array(values, dtype).reshape(shape)

    def quiet(self):
        return np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore")


_KERNEL = TiledKernel("numpy.blocked", NumpyOps())


class NumpyNumerics(Numerics):
    """NumPy's hook: a native running max, ``errstate`` and in-place exponentials for the log semiring."""

    def cummax(self, xp, x, axis):
        return np.maximum.accumulate(x, axis=axis)

    def quiet(self):
        return np.errstate(over="ignore", under="ignore")

    def scaled_exp(self, x, shift, chosen, acc):
        out = x.astype(acc)
        np.subtract(out, shift, out=out)
        np.exp(out, out=out)
        out[np.broadcast_to(chosen, out.shape)] = 0
        return out


def _decision_key(call):
    """What the NumPy kernels' ``declines`` read of an array besides its type, dtype
    (byte order included), shape and reduced axes (``BackendSpec.decision_key``)."""
    flags = call.a.flags
    return flags.c_contiguous, flags.aligned


SPEC = BackendSpec(
    numerics=NumpyNumerics(),
    name="numpy",
    module="numpy",
    is_array=_is_array,
    namespace=_namespace,
    devices=lambda: [Device("cpu", "cpu")],
    dtypes=("float16", "float32", "float64"),
    to_numpy=_to_numpy,
    kernels=(*_fused_cpu.numpy_kernels(), *_KERNEL.kernels()),
    decision_key=_decision_key,
    warm_up=_fused_cpu.warm_up_hook("numpy.fused", "numpy"),
)
