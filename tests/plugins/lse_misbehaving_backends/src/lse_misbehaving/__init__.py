"""Backends for NumPy arrays whose kernels misbehave, one way each.

Every kernel takes only calls with a ``where`` argument (which
``numpy.blocked`` declines), so under ``auto`` they are offered exactly
those calls.
"""

import numpy as np
from array_api_compat import is_numpy_array

from lse_dispatch.backends import BackendSpec, Device, Kernel

OPS = ("logsumexp", "softmax", "log_softmax")


def _needs_where(call):
    return None if call.where is not None else "only calls with where"


def _explodes(call):
    raise RuntimeError("kernel exploded mid-call")


def _raising_declines(call):
    raise ValueError("declines exploded")


def _wrong_shape(call):
    flat = np.zeros(call.shape[-1:], dtype=call.plan.result)
    return (flat, flat) if call.op == "logsumexp" else flat


def _wrong_dtype(call):
    shape = tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape)) if call.op == "logsumexp" else call.shape
    out = np.zeros(shape, dtype=np.float16)
    return (out, out) if call.op == "logsumexp" else out


def _wrong_library(call):
    shape = tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape)) if call.op == "logsumexp" else call.shape
    out = np.zeros(shape, dtype=call.plan.result).tolist()
    return (out, out) if call.op == "logsumexp" else out


def _spec(name, run, declines=_needs_where, kernels=None):
    return BackendSpec(
        name=name,
        module="numpy",
        is_array=is_numpy_array,
        namespace=lambda: __import__("array_api_compat.numpy").numpy,
        devices=lambda: [Device("cpu", "cpu")],
        dtypes=("float64",),
        to_numpy=lambda x: x,
        kernels=tuple(Kernel(op, f"{name}.kernel", run, declines) for op in OPS) if kernels is None else kernels,
    )


EXPLODES = _spec("explodes", _explodes)
DECLINES_RAISES = _spec("declines_raises", _explodes, declines=_raising_declines)
WRONG_SHAPE = _spec("wrong_shape", _wrong_shape)
WRONG_DTYPE = _spec("wrong_dtype", _wrong_dtype)
WRONG_LIBRARY = _spec("wrong_library", _wrong_library)
NO_KERNELS = _spec("no_kernels", _explodes, kernels=(None,))
