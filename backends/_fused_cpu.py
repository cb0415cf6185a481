"""``numpy.fused`` and ``torch.fused``: the compiled CPU kernels, as catalogue entries.

The compiled code is :mod:`._numba_kernels` (numba, the optional extra
``fast``), imported the first time one of these kernels runs: importing
``lse_dispatch`` never imports numba, and without numba both kernels decline
every call (``numba is not installed``) and everything runs as before.

torch CPU tensors go through the same code as zero-copy NumPy views
(``tensor.numpy()``), and the results come back through ``torch.from_numpy``.

Thread count
------------
:func:`set_num_threads` (or the environment variable
``LSE_DISPATCH_NUM_THREADS``, read once) fixes the threads of every fused call;
by default NumPy calls use numba's (all cores, ``NUMBA_NUM_THREADS``) and torch
calls follow ``torch.get_num_threads()``.  Inputs below ``PARALLEL_ELEMENTS``
run on the calling thread: a parallel region costs tens of microseconds, and
milliseconds when the cores are busy.

Compile latency
---------------
The kernels are compiled per signature (layout, dtype, ``where`` or not,
logsumexp or normalised output, serial or parallel) and cached on disk
(``cache=True``; when the package folder is read-only numba falls back to its
user-wide cache folder, ``NUMBA_CACHE_DIR`` overrides both).  A signature not
yet used in this process is only taken for an input of at least
``FIRST_CALL_ELEMENTS`` entries, where the one-off cost (import of numba and
loading from the cache: about half a second here; compiling cold: seconds per
signature, see docs/fused_cpu.md) is small next to what the call itself saves
when repeated; smaller calls decline (``not compiled yet``) and run
``numpy.blocked`` / the generic path.  :func:`warm_up` loads or compiles
every signature at once, after which calls of any size are taken.
"""

from __future__ import annotations

import functools
import math
import os

__all__ = [
    "FIRST_CALL_ELEMENTS",
    "PARALLEL_ELEMENTS",
    "available",
    "get_num_threads",
    "numpy_kernels",
    "set_num_threads",
    "softmax_backward",
    "torch_kernels",
    "warm_up",
]

#: Inputs below this many entries take a signature only once it is compiled.
FIRST_CALL_ELEMENTS = 1 << 20
#: Inputs below this many entries run on the calling thread.
PARALLEL_ELEMENTS = 1 << 18
#: A reduction over all of at most this many entries is left to the blocked
#: kernels' Python-float path (a few microseconds) when they take it.
TINY_ELEMENTS = 16

ENV_THREADS = "LSE_DISPATCH_NUM_THREADS"

_THREADS: list = [None]  # the user's setting, or None (follow the library)
_SIGNATURES_SEEN: set = set()
_STATUS: dict = {}


def set_num_threads(threads: int | None) -> None:
    """Threads of every fused call (``None``: numba's default for NumPy input,
    ``torch.get_num_threads()`` for torch tensors)."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"argument 'threads' must be a positive int or None, got {threads!r}")
    _THREADS[0] = threads


def get_num_threads(library: str = "numpy") -> int:
    """Threads a fused call on ``library``'s arrays would use now."""
    chosen = _THREADS[0]
    if chosen is None:
        env = os.environ.get(ENV_THREADS, "").strip()
        if env:
            try:
                chosen = int(env)
            except ValueError:
                raise ValueError(f"environment variable {ENV_THREADS}: expected an int, got {env!r}") from None
    if chosen is None and library == "torch":
        import torch

        chosen = torch.get_num_threads()
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    return max(1, min(chosen or limit, limit))


def available() -> bool:
    """Whether numba can be imported (checked once, without importing it)."""
    found = _STATUS.get("available")
    if found is None:
        import importlib.util
        import sys

        try:
            found = sys.modules.get("numba", 0) is not None and importlib.util.find_spec("numba") is not None
        except (ImportError, ValueError):
            found = False
        _STATUS["available"] = found
    return found


def _kernels():
    """The compiled module (imports numba the first time)."""
    from . import _numba_kernels

    return _numba_kernels


# --------------------------------------------------------------------------
# Layout and declines, shared by NumPy and torch (on the NumPy view).


def _reduced_axis(axes, ndim) -> int | None:
    """1 if the reduced axes are the trailing ones, 0 if the leading ones."""
    if axes == tuple(range(ndim - len(axes), ndim)):
        return 1
    if axes == tuple(range(len(axes))):
        return 0
    return None


def _signature(call, axis, dtype, parallel) -> tuple:
    return (call.op == "logsumexp", axis, str(dtype), call.where is not None, parallel)


def _size_declines(call, axis, dtype, size, library) -> str | None:
    """Reasons of size: tiny calls the blocked kernels do faster, first calls too small to compile for."""
    tiny = size <= TINY_ELEMENTS and len(call.axes) == len(call.shape) and call.where is None
    if tiny and (call.op == "logsumexp" or str(dtype) == "float32"):
        return f"tiny input ({size} entries): the blocked kernel's Python-float path is faster"
    if size < FIRST_CALL_ELEMENTS and (
        not _SIGNATURES_SEEN or _signature(call, axis, dtype, _threads_for(size, library) > 1) not in _SIGNATURES_SEEN
    ):
        return (f"not compiled yet: {size} entries are below the {FIRST_CALL_ELEMENTS} at which loading "
                "or compiling pays off (lse_dispatch.backends._fused_cpu.warm_up() loads it)")
    return None


def _common_declines(call, shape, dtype_name, contiguous) -> str | None:
    if call.b is not None:
        return "b given"
    if call.plan.is_complex:
        return "complex input"
    if dtype_name not in ("float32", "float64"):
        return f"dtype {dtype_name} (kernel takes float32, float64)"
    if shape != call.shape:
        return "input needs a broadcast"
    if not call.axes:
        return "nothing reduced"
    if math.prod(shape) == 0:
        return "empty input"
    if not contiguous or _reduced_axis(call.axes, len(shape)) is None:
        return "layout: reduced axes are not the leading or trailing axes of a C-contiguous array"
    if not available():
        return "numba is not installed (pip install 'lse-dispatch[fast]')"
    return None


def _numpy_declines(call) -> str | None:
    import numpy as np

    a = call.a
    if type(a) is not np.ndarray:  # the API hands kernels masked arrays and matrices as plain arrays
        return f"{type(a).__name__} is not a NumPy array"
    if not a.dtype.isnative:
        return "non-native byte order"
    if call.plan.compute != a.dtype:
        return "input needs a cast"
    reason = _common_declines(call, a.shape, a.dtype.name, a.flags.c_contiguous)
    if reason is None:
        axis = _reduced_axis(call.axes, a.ndim)
        reason = _size_declines(call, axis, a.dtype, a.size, "numpy")
    return reason


def _torch_declines(call) -> str | None:
    import torch

    a = call.a
    if a.device.type != "cpu":
        return f"device {a.device.type} (kernel is CPU-only)"
    if torch.is_grad_enabled() and a.requires_grad:
        return "autograd active (input requires grad)"
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace the functorch checks
        return "inside torch.compile tracing"
    if torch._C._functorch.is_functorch_wrapped_tensor(a) or torch._C._are_functorch_transforms_active():
        return "inside a torch.func transform"
    if a.is_conj() or a.is_neg():
        return "lazily conjugated or negated view"
    if call.plan.compute != a.dtype:
        return "input needs a cast"
    dtype_name = str(a.dtype).removeprefix("torch.")
    reason = _common_declines(call, tuple(a.shape), dtype_name, a.is_contiguous())
    if reason is None and call.where is not None and call.where.device.type != "cpu":
        reason = f"where on device {call.where.device.type}"
    if reason is None:
        axis = _reduced_axis(call.axes, a.ndim)
        reason = _size_declines(call, axis, dtype_name, a.numel(), "torch")
    return reason


# --------------------------------------------------------------------------
# Running a call on NumPy arrays (torch tensors come as views).


def _views(a, axes, where):
    """``(view, axis, mask)``: 2-D views of the input and of ``where`` (or ``None``)."""
    import numpy as np

    axis = _reduced_axis(axes, a.ndim)
    n = math.prod(a.shape[ax] for ax in axes)
    shape2 = (-1, n) if axis == 1 else (n, -1)
    view = a.reshape(shape2)
    mask = None
    if where is not None:
        # A broadcast mask is made contiguous (one byte per entry).
        mask = np.ascontiguousarray(np.broadcast_to(where, a.shape)).reshape(view.shape)
    return view, axis, mask


def _threads_for(size, library) -> int:
    return get_num_threads(library) if size >= PARALLEL_ELEMENTS else 1


def _fix_lines(xp, view, axis, mask, bad, op, dtype, sink):
    """Flagged lines (max not finite, or a NaN) through the shared functions of ``_state``.

    ``sink(lines, values)`` stores the results of the line indices ``lines``.
    """
    import numpy as np

    from lse_dispatch._state import finalize, log_softmax_from_state, softmax_from_state, state_from_exponents

    lines = np.flatnonzero(bad)
    take = (lambda arr: arr[lines]) if axis == 1 else (lambda arr: arr[:, lines])
    sub = take(view)
    included = None if mask is None else take(mask)
    accumulator = np.float64
    with np.errstate(all="ignore"):
        state = state_from_exponents(xp, sub, (axis,), accumulator, included=included)
        if op == "logsumexp":
            value, sign = finalize(xp, state, dtype)
            sink(lines, (value.reshape(-1), sign.reshape(-1)))
        elif op == "log_softmax":
            sink(lines, log_softmax_from_state(xp, sub, state, included).astype(dtype))
        else:
            sink(lines, softmax_from_state(xp, sub, state, included).astype(dtype))


def _run_numpy(call, a, where, library):
    """``(value, sign)`` or the array, as NumPy arrays, for the NumPy array ``a``."""
    import numba
    import numpy as np

    import array_api_compat.numpy as xp

    kernels = _kernels()
    view, axis, mask = _views(a, call.axes, where)
    lines = view.shape[1 - axis]
    dtype = a.dtype
    threads = _threads_for(a.size, library)
    parallel = threads > 1
    bad = np.zeros(lines, np.uint8)
    keep_shape = tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape))
    previous = numba.get_num_threads() if parallel else None
    try:
        if parallel:
            numba.set_num_threads(threads)
        if call.op == "logsumexp":
            values = np.empty(lines)
            kernels.logsumexp_lines(view, axis, mask, values, bad, parallel)
        else:
            out = np.empty(a.shape, dtype)
            out_view = out.reshape(view.shape)
            kernels.normalised_lines(view, axis, mask, out_view, call.op == "log_softmax", bad, parallel)
    finally:
        if previous is not None:
            numba.set_num_threads(previous)
    _SIGNATURES_SEEN.add(_signature(call, axis, dtype, parallel))
    if call.op == "logsumexp":
        value = values.astype(dtype)
        sign = np.ones(lines, dtype)
        if bad.any():
            def sink(rows, result):
                value[rows], sign[rows] = result

            _fix_lines(xp, view, axis, mask, bad, call.op, dtype, sink)
        return value.reshape(keep_shape), sign.reshape(keep_shape)
    if bad.any():
        def sink(rows, result):
            if axis == 1:
                out_view[rows] = result
            else:
                out_view[:, rows] = result

        _fix_lines(xp, view, axis, mask, bad, call.op, dtype, sink)
    return out


def _numpy_run(call):
    return _run_numpy(call, call.a, call.where, "numpy")


def _torch_run(call):
    import torch

    a = call.a.detach().numpy()
    where = None if call.where is None else call.where.detach().numpy()
    result = _run_numpy(call, a, where, "torch")
    if call.op == "logsumexp":
        return tuple(torch.from_numpy(part) for part in result)
    return torch.from_numpy(result)


def _entries(name, run, declines):
    from lse_dispatch._kernel import Kernel, Priority
    from lse_dispatch._ops import Op

    return tuple(Kernel(op, name, run, declines, Priority.COMPILED) for op in (Op.LOGSUMEXP, Op.SOFTMAX, Op.LOG_SOFTMAX))


@functools.cache
def numpy_kernels() -> tuple:
    """The three ``numpy.fused`` entries of ``SPEC.kernels``."""
    return _entries("numpy.fused", _numpy_run, _numpy_declines)


@functools.cache
def torch_kernels() -> tuple:
    """The three ``torch.fused`` entries of ``SPEC.kernels``."""
    return _entries("torch.fused", _torch_run, _torch_declines)


# --------------------------------------------------------------------------
# Warming up, and the fused softmax / log_softmax backward for torch.


def warm_up(dtypes=("float32", "float64"), *, masks: bool = False) -> None:
    """Load (or compile, when no cache exists) the kernels of every op and layout.

    After it, calls of any size are taken.  ``masks``: the ``where`` variants too.
    """
    import numpy as np

    from lse_dispatch._call import prepare

    if not available():
        raise ImportError("numba is not installed: pip install 'lse-dispatch[fast]'")
    for dtype in dtypes:
        for shape, axis in (((4, 32), -1), ((32, 4), 0)):
            x = np.zeros(shape, dtype)
            for where in ((None, np.ones(shape, bool)) if masks else (None,)):
                for op in ("logsumexp", "softmax", "log_softmax"):
                    for parallel in (False, True):
                        call = prepare(op, x, axis=axis, where=where)
                        view, kaxis, _ = _views(x, call.axes, where)
                        lines = view.shape[1 - kaxis]
                        bad = np.zeros(lines, np.uint8)
                        mask = None if where is None else where.reshape(view.shape)
                        if op == "logsumexp":
                            _kernels().logsumexp_lines(view, kaxis, mask, np.empty(lines), bad, parallel)
                        else:
                            _kernels().normalised_lines(view, kaxis, mask, np.empty_like(view), op == "log_softmax",
                                                        bad, parallel)
                        _SIGNATURES_SEEN.add(_signature(call, kaxis, x.dtype, parallel))


def softmax_backward(op, out, where, g, axes):
    """The fused backward of softmax / log_softmax on CPU tensors, or ``None``.

    ``None`` (the caller then takes the op form) unless numba is loaded and
    the tensors are plain contiguous float32/float64 CPU tensors of one
    dtype, with the reduced axes leading or trailing.  softmax: ``y (g - sum
    y g)``; log_softmax: ``g - exp(z) sum g`` over included entries, 0 on
    excluded ones; the sums in float64, one pass to sum and one to write.
    Entries where ``y`` (or ``exp(z)``) is 0 get exactly the op form's value.
    """
    import numba  # noqa: F401  (only reached when the forward ran fused)
    import numpy as np
    import torch

    if (out.device.type != "cpu" or g.device.type != "cpu" or out.dtype != g.dtype
            or out.dtype not in (torch.float32, torch.float64) or not out.is_contiguous()
            or _reduced_axis(tuple(axes), out.ndim) is None or tuple(g.shape) != tuple(out.shape)):
        return None
    y = out.detach().numpy()
    grad = g.detach().contiguous().numpy()
    view, axis, mask = _views(y, tuple(axes), None if where is None else where.detach().numpy())
    result = np.empty_like(y)
    threads = _threads_for(y.size, "torch")
    _kernels().normalised_backward(view, grad.reshape(view.shape), mask, axis, op == "log_softmax",
                                   result.reshape(view.shape), threads > 1)
    return torch.from_numpy(result)
