"""PyTorch: CPU, and CUDA when a GPU is present.

Native kernel ``torch.blocked`` (CPU, float32/float64, no ``b``/``where``, no
autograd): the tiled engine of :mod:`._tiled`, with torch's table of
operations (:class:`TorchOps`).  float32 terms are ``COMPENSATED``:
``expf(d) * (1 + lo)``, ``lo`` the rounding of ``d = fl(x - m)`` recovered
by TwoSum, which costs less than float64 ``exp`` (four times torch's float32
one here) and keeps the exponent exact; float32 logsumexp lines whose result
may cancel, and lines whose rest is tiny, are redone with float64 terms.
float64 input takes ``COMPENSATED`` terms in the exact mode.  Error bounds
(Sleef's ``expf``: documented at most 1.0 ulp, measured at most 0.57 over
8.4e7 points of [-104, 0]) are in docs/dispatch.md: log_softmax at most
``1.5 + 2u`` ulps; softmax ``2.5 + 4u`` (4.8 with the measured ``u``, 6.5 with
the documented one; the largest error measured against the oracle is 2.7
ulps, and tests/test_torch_blocked.py holds every path to 4).

The derivative kernels (``autodiff``, :mod:`._torch_grad`) take every call
being differentiated, at a higher priority; ``torch.blocked`` declines calls
that autograd records, ``torch.compile`` traces or a ``torch.func``
transform wraps, so the two never compete.
"""

from __future__ import annotations

import contextlib
import sys

from lse_dispatch._numerics import Numerics

from . import _fused_cpu, _torch_eager, _torch_grad, _torch_triton
from ._spec import BackendSpec, Device
from ._tiled import COMPENSATED, TiledKernel

__all__ = ["SPEC", "TILE_ELEMENTS"]


def _namespace():
    import array_api_compat.torch as xp

    return xp


def _is_array(x) -> bool:
    """A torch tensor (a plain isinstance: torch.compile traces it without array-api-compat's cached checks)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _devices():
    import torch

    found = [Device("cpu", torch.device("cpu"))]
    if torch.cuda.is_available():
        found.append(Device("cuda", torch.device("cuda", 0)))
    return found


def _to_numpy(x):
    import torch

    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.detach().cpu().numpy()


# Elements per tile.  A tile and its buffers stay in the caches between the ops
# that make its terms, so that only the first read of a tile goes to memory;
# and torch's reductions with ``dtype=float64`` copy their input to float64
# internally, into fresh (page-faulting) memory when the piece is large.
# Measured on the 2-core machine, quiet, the logsumexp state of (4096, 4096)
# along axis -1: tiles of 2**24 elements 52 ms, 2**22 84 ms, 2**20 19 ms,
# 2**18 28 ms, 2**16 42 ms (torch.logsumexp 34 ms); softmax, whose tiles have
# three buffers: 2**22 108 ms, 2**20 55 ms, 2**18 49 ms (torch.softmax 22 ms).
# Every op on a tile ends in a barrier of torch's thread pool, which costs
# milliseconds when other processes hold the cores (softmax with 2**20 took
# 285 ms, with 2**18 361 ms, under a load average of 6), so 2**20 for both.
TILE_ELEMENTS = 1 << 20
# Inputs up to SERIAL_INPUT_ELEMENTS go in tiles of SERIAL_TILE_ELEMENTS: torch
# runs an op on at most 32768 elements (its grain size) on the calling thread,
# without a parallel region, which costs milliseconds whenever a thread of the
# pool has to wait for a core on a busy machine.
SERIAL_INPUT_ELEMENTS = 1 << 17
SERIAL_TILE_ELEMENTS = 1 << 15
# Inputs up to this many elements take the direct path (a few whole-tensor ops).
SMALL_ELEMENTS = 4096
# A reduction over all of at most this many elements runs in Python floats.
TINY_ELEMENTS = 16


class TorchOps:
    """torch's table of operations for the tiled engine (``out=`` and in-place ops)."""

    name = "torch"
    float32_terms = COMPENSATED
    float64_terms = COMPENSATED

    # Plain properties, not functools.cached_property: torch.compile cannot
    # trace the lock that guards a cached property's first access.
    @property
    def torch(self):
        import torch

        return torch

    @property
    def xp(self):
        return _namespace()

    @property
    def float32(self):
        return self.torch.float32

    @property
    def float64(self):
        return self.torch.float64

    def tile_elements(self, view) -> int:
        return SERIAL_TILE_ELEMENTS if view.numel() <= SERIAL_INPUT_ELEMENTS else TILE_ELEMENTS

    def small_elements(self) -> int:
        return SMALL_ELEMENTS

    def tiny_elements(self) -> int:
        return TINY_ELEMENTS

    def declines(self, call) -> str | None:
        return _torch_eager.declines(call.a, "kernel is CPU-only: its exact recheck reads back to the host")

    def is_contiguous(self, a) -> bool:
        return a.is_contiguous()

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=dtype)

    def maximum(self, x, axis, out=None):
        if out is None:
            return self.torch.amax(x, dim=axis)
        return self.torch.amax(x, dim=axis, out=out)

    def subtract(self, x, y, out):
        if out.dtype != x.dtype:
            # Widen first: torch.sub(..., out=) would subtract in x's dtype.
            return out.copy_(x).sub_(y)
        return self.torch.sub(x, y, out=out)

    def add(self, x, y, out):
        return self.torch.add(x, y, out=out)

    def multiply(self, x, y, out):
        return self.torch.mul(x, y, out=out)

    def exp(self, x, out):
        if out is x:
            return out.exp_()
        if out.dtype != x.dtype:
            return out.copy_(x).exp_()
        return self.torch.exp(x, out=out)

    def sum(self, x, axis, dtype, work):
        return self.torch.sum(x, dim=axis, dtype=dtype)

    def equal(self, x, y, out):
        return self.torch.eq(x, y, out=out)

    def count(self, mask, axis):
        return mask.sum(dim=axis, dtype=self.torch.float64)

    def zero_where(self, x, mask) -> None:
        x.masked_fill_(mask, 0.0)

    def zero_nan(self, x) -> None:
        x.nan_to_num_(nan=0.0)

    def copy(self, dst, src) -> None:
        dst.copy_(src)

    def contiguous(self, x):
        return x.contiguous()

    def from_floats(self, values, dtype, shape):
        import numpy as np

        # Through NumPy: a third of torch.tensor's cost on ten floats.
        numpy_dtype = np.float32 if dtype == self.torch.float32 else np.float64
        return self.torch.from_numpy(np.array(values, numpy_dtype)).reshape(shape)

    def quiet(self):
        return contextlib.nullcontext()


_KERNEL = TiledKernel("torch.blocked", TorchOps())


class TorchNumerics(Numerics):
    """torch's hook: autograd rules for the log semiring, a native running max, in-place exponentials."""

    def semiring(self):
        from . import _torch_semiring

        return _torch_semiring

    def cummax(self, xp, x, axis):
        import torch

        return torch.cummax(x, dim=axis).values

    def scaled_exp(self, x, shift, chosen, acc):
        out = x.to(acc)
        out.sub_(shift.to(acc)).exp_()
        return out.masked_fill_(chosen, 0)


#: torch's functions and module that the decision key reads, bound on its first
#: call (this module does not import torch): the attribute chains cost 0.2 us of
#: the key's 1.0 on every call of a lane (docs/dispatch.md, "Lanes").
_CHECKS: list = []


def _checks() -> list:
    if not _CHECKS:
        torch = sys.modules["torch"]  # loaded: the call holds a tensor
        _CHECKS[:] = [torch.compiler.is_compiling, torch._C._functorch.is_functorch_wrapped_tensor,
                      torch._C._are_functorch_transforms_active, torch.is_grad_enabled, torch.autograd.forward_ad]
    return _CHECKS


def _decision_key(call):
    """What the torch kernels' ``declines`` read of a CPU tensor besides its type, dtype,
    shape and reduced axes (``BackendSpec.decision_key``).

    ``None`` (decide on every call) off the CPU (CUDA's kernels read stream
    capture and more), under torch.compile tracing and inside torch.func
    transforms.
    """
    compiling, wrapped, transforms_active, grad_enabled, forward_ad = _CHECKS or _checks()
    a = call.a
    if not a.is_cpu or compiling():  # first: Dynamo cannot trace the functorch checks
        return None
    if wrapped(a) or transforms_active():
        return None
    return (grad_enabled() and a.requires_grad, forward_ad._current_level >= 0,
            a.is_contiguous(), a.is_conj() or a.is_neg())


SPEC = BackendSpec(
    numerics=TorchNumerics(),
    name="torch",
    module="torch",
    is_array=_is_array,
    namespace=_namespace,
    devices=_devices,
    dtypes=("float16", "bfloat16", "float32", "float64"),
    to_numpy=_to_numpy,
    kernels=(*_torch_triton.KERNELS, *_torch_grad.KERNELS, *_fused_cpu.torch_kernels(), *_KERNEL.kernels()),
    decision_key=_decision_key,
    warm_up=_fused_cpu.warm_up_hook("torch.fused", "torch"),
)
