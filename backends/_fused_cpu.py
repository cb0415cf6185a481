"""``numpy.fused`` and ``torch.fused``: the compiled CPU kernels, as catalogue entries.

The compiled code is :mod:`._numba_kernels` (numba, the optional extra
``fast``), imported the first time one of these kernels runs: importing
``lse_dispatch`` never imports numba, and without numba both kernels decline
every call (``numba is not installed``) and everything runs as before.

Each is an implementation that computes states (:func:`state_kernels`,
``Priority.COMPILED``): the ``STATE`` operation (so ``lse_state``,
``OnlineLogSumExp``, ``logsumexp_blocked`` and the blocks of a Dask array run
compiled), and logsumexp, softmax and log_softmax fused with it.  Lines the
compiled code flags (a max that is not finite, a NaN) are finished on the
flagged lines alone by the shared functions: ``_generic.state``,
``logsumexp_from_state`` and ``normalised_from_state``.

torch CPU tensors go through the same code as zero-copy NumPy views
(``tensor.numpy()``), and the results come back through ``torch.from_numpy``.

Weighted NumPy calls (logsumexp and ``STATE`` with ``b``) take a row kernel
of their own (:func:`_weighted_run`): input, weights and mask are broadcast
and laid out as rows (copied where they are not rows already), each row's
state is formed in float64 with the terms of the shared weighted state, and
the logsumexp is the shared finalisation.

Threads
-------
The compiled entry points release the GIL; a call runs disjoint ranges of
its items on a pool of Python threads (no numba threading layer: a parallel
region of numba's costs a compile of its own for every driver).
:func:`set_num_threads` (or the environment variable
``LSE_DISPATCH_NUM_THREADS``) fixes the threads of every fused call; by
default NumPy calls use every CPU the process may run on and torch calls
follow ``torch.get_num_threads()``.  Inputs below ``PARALLEL_ELEMENTS`` run
on the calling thread.

Compile latency
---------------
Each dtype has two compiled entry points (forward and backward, see
:func:`lse_dispatch.backends._numba_kernels.compiled`), compiled on first use
and cached on disk (``cache=True``; when the package folder is read-only numba
falls back to its user-wide cache folder, ``NUMBA_CACHE_DIR`` overrides both).
A dtype not yet loaded in this process is only taken for an input of at least
``FIRST_CALL_ELEMENTS`` entries, where the one-off cost (importing numba and
loading from the cache, or compiling cold; docs/fused_cpu.md has the
figures) is small next to what the call itself saves when repeated; smaller
calls decline (``not compiled yet``) and run ``numpy.blocked`` / the generic
path, until the calls declined so far add up to ``CUMULATIVE_ELEMENTS``
entries (a loop of small calls then loads it).  :func:`warm_up` loads or
compiles them at once, after which calls of any size are taken.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading

from lse_dispatch._kernel import Provisional, catalogue_changed

from . import _torch_eager

__all__ = [
    "CALL_ELEMENTS",
    "CUMULATIVE_ELEMENTS",
    "CUMULATIVE_SECONDS",
    "FIRST_CALL_ELEMENTS",
    "PARALLEL_ELEMENTS",
    "available",
    "get_num_threads",
    "numpy_kernels",
    "set_num_threads",
    "softmax_backward",
    "torch_kernels",
    "warm_up",
    "warm_up_hook",
]

#: Lanes (``Kernel.lane``) of at most this many lines keep their scratch arrays
#: (about 33 bytes a line) between calls.
LANE_SCRATCH_LINES = 256

#: Inputs below this many entries take a dtype only once it is compiled...
FIRST_CALL_ELEMENTS = 1 << 20
#: ... or once the calls it declined for that reason add up to this many
#: entries (each counted as at least ``CALL_ELEMENTS``): about a second of
#: work on the paths that ran them instead for calls of thousands of entries,
#: more than loading the code from the disk cache costs ...
CUMULATIVE_ELEMENTS = 1 << 27
#: What one declined call counts for at least: its fixed cost, in entries.
CALL_ELEMENTS = 2048
#: ... or once they have taken this many seconds on the paths that ran them
#: instead (the dispatcher times them: ``Provisional.charge``), about what
#: importing numba and loading a dtype's code from the disk cache take, so
#: that tiny calls on a slow path (the generic one: 140 us for a (100, 3)
#: float64 softmax) load it as soon as their entries would have
#: (docs/fused_cpu.md, "Compile latency").
CUMULATIVE_SECONDS = 0.5
#: Inputs below this many entries run on the calling thread.
PARALLEL_ELEMENTS = 1 << 18

ENV_THREADS = "LSE_DISPATCH_NUM_THREADS"

_THREADS: list = [None]  # the user's setting, or None (follow the library)
#: The dtypes whose compiled code is loaded in this process.
_SIGNATURES_SEEN: set = set()
#: dtype (or ``"<dtype>:weighted"``) -> entries of the calls declined as not compiled yet ...
_DECLINED_WORK: dict = {}
#: ... and the seconds those calls took.
_DECLINED_SECONDS: dict = {}
_STATUS: dict = {}


def set_num_threads(threads: int | None) -> None:
    """Threads of every fused call (``None``: every available CPU for NumPy input,
    ``torch.get_num_threads()`` for torch tensors)."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"argument 'threads' must be a positive int or None, got {threads!r}")
    _THREADS[0] = threads


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


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
    return max(1, chosen or _cpus())


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


_KERNELS: list = [None]
#: dtype -> name without NumPy's ``dtype.name`` (microseconds a call) on the per-call path.
_NAMES: dict = {}
_MODES: dict = {}
_MODULES: list = []  # numpy, _generic, Op, LSEState: imported once, not on every call


def _kernels():
    """The compiled module (imports numba the first time)."""
    if _KERNELS[0] is None:
        import numpy as np

        from lse_dispatch import _generic
        from lse_dispatch._ops import Op
        from lse_dispatch._state import LSEState

        from . import _numba_kernels as kernels

        _MODULES[:] = [np, _generic, Op, LSEState]
        _NAMES.update({np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"})
        _MODES.update({Op.STATE: kernels.STATE, Op.LOGSUMEXP: kernels.LOGSUMEXP, Op.SOFTMAX: kernels.SOFTMAX,
                       Op.LOG_SOFTMAX: kernels.LOG_SOFTMAX})
        _KERNELS[0] = kernels
    return _KERNELS[0]


_ENTRIES: dict = {}


def _compiled(dtype_name: str, kind: str = "forward"):
    """The entry point ``kind`` of ``dtype_name`` (compiled, or loaded from the cache, once)."""
    entry = _ENTRIES.get((dtype_name, kind))
    if entry is None:
        entry = _ENTRIES[dtype_name, kind] = _kernels().compiled(dtype_name, kind)
    # The weighted entry point is loaded on its own (the others come together).
    seen = f"{dtype_name}:weighted" if kind == "weighted" else dtype_name
    if seen not in _SIGNATURES_SEEN:
        _SIGNATURES_SEEN.add(seen)
        catalogue_changed()  # small calls of this dtype are taken from now on
    return entry


# --------------------------------------------------------------------------
# Layout and declines, shared by NumPy and torch (on the NumPy view).

_FLOAT_NAMES = {"f": "float32", "d": "float64"}


@functools.lru_cache(maxsize=256)
def _reduced_axis(axes, ndim) -> int | None:
    """1 if the reduced axes are the trailing ones, 0 if the leading ones."""
    if axes == tuple(range(ndim - len(axes), ndim)):
        return 1
    if axes == tuple(range(len(axes))):
        return 0
    return None


def _size_declines(call, dtype_name, size) -> str | None:
    """First calls too small to load or compile the dtype's code for.

    A call of at least ``FIRST_CALL_ELEMENTS`` entries loads it; smaller ones
    decline, provisionally, and add up: once the declined calls of a dtype
    total ``CUMULATIVE_ELEMENTS`` entries (each at least ``CALL_ELEMENTS``),
    or have taken ``CUMULATIVE_SECONDS`` on the paths that ran them, the next
    one is taken and loads the code, so that a loop of small calls stops
    paying the slower path.  Once loaded, calls of every size are taken:
    with the call's layout worked out once per signature (``_Geometry``) the
    kernel runs ten entries faster than the blocked kernels' Python-float
    paths (docs/fused_cpu.md has the figures).
    """
    if size < FIRST_CALL_ELEMENTS and dtype_name not in _SIGNATURES_SEEN:
        # (Threads may race on the count: it only decides when to load.)
        work = _DECLINED_WORK.get(dtype_name, 0) + max(size, CALL_ELEMENTS)
        if work < CUMULATIVE_ELEMENTS and _DECLINED_SECONDS.get(dtype_name, 0.0) < CUMULATIVE_SECONDS:
            _DECLINED_WORK[dtype_name] = work
            reason = _NOT_YET.get(dtype_name)
            if reason is None:
                reason = _NOT_YET[dtype_name] = Provisional(_NOT_YET_REASON, functools.partial(_charge, dtype_name))
            return reason
    return None


def _charge(dtype_name, seconds) -> None:
    """``Provisional.charge`` of a dtype's declines: the seconds a declined call took."""
    _DECLINED_SECONDS[dtype_name] = _DECLINED_SECONDS.get(dtype_name, 0.0) + seconds


#: (One reason a dtype, not formatted on every call: the calls it answers are small.)
_NOT_YET: dict = {}
_NOT_YET_REASON = (
    f"not compiled yet: below the {FIRST_CALL_ELEMENTS} entries at which loading or compiling pays off, "
    f"and the calls declined so far add up to less than {CUMULATIVE_ELEMENTS} entries and "
    f"{CUMULATIVE_SECONDS} s (lse_dispatch.backends._fused_cpu.warm_up() loads it)")


_LAYOUT_REASON = "layout: reduced axes are not the leading or trailing axes of a C-contiguous array"


@functools.lru_cache(maxsize=256)
def _shape_declines(shape, axes) -> str | None:
    """What the shape and the reduced axes alone decline (once per signature)."""
    if not axes:
        return "nothing reduced"
    if math.prod(shape) == 0:
        return "empty input"
    if _reduced_axis(axes, len(shape)) is None:
        return _LAYOUT_REASON
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
    reason = _shape_declines(shape, call.axes)
    if reason is not None:
        return reason
    if not contiguous:
        return _LAYOUT_REASON
    if not available():
        return "numba is not installed (pip install 'lse-dispatch[fast]')"
    return None


def _numpy_declines(call) -> str | None:
    import numpy as np

    a = call.a
    if type(a) is not np.ndarray:  # the API hands kernels masked arrays and matrices as plain arrays
        return f"{type(a).__name__} is not a NumPy array"
    dtype = a.dtype
    if not dtype.isnative:
        return "non-native byte order"
    flags = a.flags
    if not flags.aligned:
        return "unaligned data"
    if call.plan.compute != dtype:
        return "input needs a cast"
    name = _FLOAT_NAMES.get(dtype.char) or dtype.name
    if call.b is not None:
        return _weighted_declines(call, name)
    reason = _common_declines(call, a.shape, name, flags.c_contiguous)
    if reason is None:
        reason = _size_declines(call, name, a.size)
    return reason


def _weighted_declines(call, name) -> str | None:
    """Weighted NumPy calls (logsumexp and its state): any layout and broadcast, copied
    to rows where they are not rows already; real weights of a kind that casts to
    the input's dtype."""
    import numpy as np

    b = call.b
    if type(b) is not np.ndarray:
        return f"b is a {type(b).__name__}, not a NumPy array"
    if b.dtype.kind not in "biuf":
        return f"b of dtype {b.dtype}"
    if call.where is not None and type(call.where) is not np.ndarray:
        return f"where is a {type(call.where).__name__}, not a NumPy array"
    return _weighted_shape_declines(call, name)


def _weighted_shape_declines(call, name) -> str | None:
    if call.plan.is_complex:
        return "complex input"
    if name not in ("float32", "float64"):
        return f"dtype {name} (kernel takes float32, float64)"
    size = math.prod(call.shape)
    if not call.axes:
        return "nothing reduced"
    if size == 0:
        return "empty input"
    if not available():
        return "numba is not installed (pip install 'lse-dispatch[fast]')"
    return _size_declines(call, f"{name}:weighted", size)


#: torch dtype -> its name (``str(dtype)`` without the prefix), as it is met.
_TORCH_NAMES: dict = {}


def _torch_name(dtype) -> str:
    name = _TORCH_NAMES.get(dtype)
    if name is None:
        name = _TORCH_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def _torch_weighted_declines(call, name) -> str | None:
    """Weighted CPU tensors: the NumPy weighted kernel on their zero-copy views."""
    import torch

    b, where = call.b, call.where
    if not isinstance(b, torch.Tensor) or not b.is_cpu:
        return "b is not a CPU tensor"
    if b.is_complex() or b.is_conj() or b.is_neg():
        return "b is complex or a lazily conjugated or negated view"
    if torch.is_grad_enabled() and b.requires_grad:
        return "autograd active (b requires grad)"
    if where is not None and not where.is_cpu:
        return f"where on device {where.device.type}"
    return _weighted_shape_declines(call, name)


def _torch_declines(call) -> str | None:
    a = call.a
    reason = _torch_eager.declines(a, "kernel is CPU-only")
    if reason is not None:
        return reason
    if a.is_conj() or a.is_neg():
        return "lazily conjugated or negated view"
    if call.plan.compute != a.dtype:
        return "input needs a cast"
    dtype_name = _torch_name(a.dtype)
    if call.b is not None:
        return _torch_weighted_declines(call, dtype_name)
    reason = _common_declines(call, tuple(a.shape), dtype_name, a.is_contiguous())
    if reason is None and call.where is not None and not call.where.is_cpu:
        reason = f"where on device {call.where.device.type}"
    if reason is None:
        reason = _size_declines(call, dtype_name, a.numel())
    return reason


# --------------------------------------------------------------------------
# Threads: the compiled entry points release the GIL.

_POOL: dict = {}


def _reset_pool() -> None:
    _POOL.clear()  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool)


def _pool(workers: int):
    from concurrent.futures import ThreadPoolExecutor

    with _POOL.setdefault("lock", threading.Lock()):
        pool = _POOL.get("pool")
        if pool is None or pool._max_workers < workers:
            if pool is not None:
                pool.shutdown(wait=False)
            pool = _POOL["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="lse-dispatch-fused")
        return pool


def _launch(entry, args, items: int, threads: int):
    """``entry(*args, start, stop)`` over ``range(items)``, in ``threads`` contiguous ranges;
    the sum of what the calls return."""
    parts = min(threads, items)
    if parts <= 1:
        return entry(*args, 0, items)
    bounds = [items * k // parts for k in range(parts + 1)]
    pool = _pool(parts - 1)
    futures = [pool.submit(entry, *args, bounds[k], bounds[k + 1]) for k in range(1, parts)]
    total = entry(*args, bounds[0], bounds[1])
    return total + sum(future.result() for future in futures)


def _threads_for(size, library) -> int:
    return get_num_threads(library) if size >= PARALLEL_ELEMENTS else 1


# --------------------------------------------------------------------------
# Running a call on NumPy arrays (torch tensors come as views).


#: (shape, axes, itemsize, mode) -> :class:`_Geometry`, first in first out.
_GEOMETRIES: dict = {}
_GEOMETRIES_SIZE = 256


class _Geometry:
    """What a call's shape, reduced axes, itemsize and mode fix: worked out once per
    signature (layout, view shape, :func:`plan`, the keepdims shape), since most
    calls repeat the last one's."""

    __slots__ = ("axis", "forward", "keep", "lines", "normalised", "phases", "plan", "view_shape")

    def __init__(self, shape, axes, itemsize, mode):
        kernels = _KERNELS[0]
        axis = _reduced_axis(axes, len(shape))
        n = math.prod(shape[ax] for ax in axes)
        rest = math.prod(shape) // n
        self.axis = axis
        self.view_shape = (rest, n) if axis == 1 else (n, rest)
        self.lines = rest
        self.keep = tuple(1 if ax in axes else extent for ax, extent in enumerate(shape))
        self.normalised = mode >= kernels.LOG_SOFTMAX
        exact = itemsize == 8 or mode == kernels.STATE
        span, width, parts, blocks, phases = kernels.plan(self.view_shape, axis, itemsize, exact, self.normalised)
        self.plan = (axis, span, width, parts, blocks)
        self.phases = phases
        #: (entry point, no mask, no output) of the forward, set by the first run
        #: (the itemsize fixes the dtype: the kernels take float32 and float64).
        self.forward = None

    def entry(self, dtype) -> tuple:
        """``(entry point, no mask, no output)`` of the forward for ``dtype``, found once."""
        forward = self.forward
        if forward is None:
            forward = self.forward = (_compiled(_NAMES[dtype]), *_nothing(dtype))
        return forward


def _geometry(shape, axes, itemsize, mode) -> _Geometry:
    key = (shape, axes, itemsize, mode)
    found = _GEOMETRIES.get(key)
    if found is None:
        found = _Geometry(shape, axes, itemsize, mode)
        if len(_GEOMETRIES) >= _GEOMETRIES_SIZE:
            try:  # first in, first out; another thread may be evicting the same entry
                _GEOMETRIES.pop(next(iter(_GEOMETRIES)), None)
            except (RuntimeError, StopIteration):
                pass
        _GEOMETRIES[key] = found
    return found


def _mask_view(where, shape, view_shape):
    """``where`` as a contiguous uint8 array of the 2-D view's shape (a broadcast one is copied)."""
    import numpy as np

    return np.ascontiguousarray(np.broadcast_to(where, shape)).reshape(view_shape).view(np.uint8)


@functools.cache
def _nothing(dtype):
    """The empty arrays that stand for "no mask" and "no output"."""
    import numpy as np

    return np.empty((0, 0), np.uint8), np.empty((0, 0), dtype)


def _scratch(lines, parts, axis):
    """``(pieces, per_line, bad)``: the arrays a forward run writes besides its output."""
    np = _MODULES[0]
    bad = np.zeros(lines, np.uint8)
    if parts == 1:
        # One phase: the pieces are the lines (a fourth row is not read as a piece).
        pieces = np.empty((4, 1, lines))
        return pieces, pieces.reshape(4, lines), bad
    return np.empty((3, lines, parts) if axis == 1 else (3, parts, lines)), np.empty((4, lines)), bad


class _Lines:
    """The per-line results of the compiled forward (and the 2-D views they belong to).

    ``per_line``: each line's max, count, rest and value (float64 rows);
    ``bad``: the lines flagged for the shared functions.
    """

    __slots__ = ("axis", "bad", "flagged_lines", "mask", "out", "per_line", "view")

    def __init__(self, view, geometry, mask, mode, threads):
        np = _MODULES[0]
        dtype = view.dtype
        axis, span, width, parts, blocks = geometry.plan
        lines = geometry.lines
        entry, no_mask, no_output = geometry.entry(dtype)
        self.view, self.axis, self.mask = view, axis, mask
        self.out = np.empty(view.shape, dtype) if geometry.normalised else no_output
        pieces, self.per_line, self.bad = _scratch(lines, parts, axis)
        args = (view, no_mask if mask is None else mask, mask is not None, mode, 0, self.out, pieces, self.per_line,
                self.bad, axis, span, width, parts, blocks)
        if parts == 1 and threads == 1:  # the commonest call, without the launcher
            self.flagged_lines = entry(*args, 0, geometry.phases[0][1])
            return
        self.flagged_lines = 0  # counted by the phases that finish lines
        for phase, items in geometry.phases:
            if phase:
                args = args[:4] + (phase,) + args[5:]
            self.flagged_lines += _launch(entry, args, items, threads)

    def flagged(self, op, return_sign=False):
        """``(indices, sub-call)`` of the flagged lines (as a NumPy call of ``op``); some are."""
        import numpy as np

        from lse_dispatch._call import prepare

        lines = np.flatnonzero(self.bad)
        take = (lambda arr: arr[lines]) if self.axis == 1 else (lambda arr: arr[:, lines])
        where = None if self.mask is None else take(self.mask).view(bool)
        return lines, prepare(op, take(self.view), axis=self.axis, where=where, return_sign=return_sign)

    def put(self, target, lines, values) -> None:
        """Write the flagged lines' ``values`` (a 2-D result of the sub-call) into ``target``."""
        if self.axis == 1:
            target[lines] = values
        else:
            target[:, lines] = values


def _run(call, a, where, library):
    """The result of ``call`` on the NumPy array ``a`` (the state, ``(value, sign)`` or the array)."""
    if _KERNELS[0] is None:
        _kernels()
    np, _generic, Op, LSEState = _MODULES
    op = call.op
    mode = _MODES[op]
    geometry = _geometry(a.shape, call.axes, a.itemsize, mode)
    view = a.reshape(geometry.view_shape)
    mask = None if where is None else _mask_view(where, a.shape, geometry.view_shape)
    done = _Lines(view, geometry, mask, mode, _threads_for(a.size, library))
    per_line, keep, dtype = done.per_line, geometry.keep, a.dtype
    if not done.flagged_lines:
        if geometry.normalised:
            return done.out.reshape(a.shape)
        # No cast overflows on finite lines: a float32 max is exact in float32,
        # and m + L exceeds it by at most log(n) < 64, far below the 2**103 that
        # rounding m + L to float32 beyond its largest value would take.
        if op == Op.STATE:
            return LSEState(per_line[0].astype(dtype).reshape(keep), per_line[1].reshape(keep),
                            per_line[2].reshape(keep))
        return per_line[3].astype(dtype).reshape(keep), np.ones(keep, dtype)
    lines, sub = done.flagged(op, call.return_sign)
    # Flagged lines hold whatever the compiled code left (cast here without
    # warnings, overwritten below by the shared functions' results).
    with np.errstate(all="ignore"):
        sub_state = _generic.state(sub)
        if op == Op.STATE:
            fields, parts = [per_line[0].astype(dtype), per_line[1], per_line[2]], sub_state
        elif op == Op.LOGSUMEXP:
            fields = [per_line[3].astype(dtype), np.ones(geometry.lines, dtype)]
            parts = _generic.logsumexp_from_state(sub, sub_state)
        else:
            done.put(done.out, lines, _generic.normalised_from_state(sub, sub_state, op == Op.LOG_SOFTMAX))
            return done.out.reshape(a.shape)
    for field, part in zip(fields, parts):
        field[lines] = np.reshape(part, -1)
    fields = [field.reshape(keep) for field in fields]
    return LSEState(*fields) if op == Op.STATE else tuple(fields)


def _numpy_run(call):
    if call.b is not None:
        return _weighted_run(call, "numpy")
    return _run(call, call.a, call.where, "numpy")


def _rows(array, shape, axes, dtype=None):
    """``array`` broadcast to ``shape``, the reduced ``axes`` last, as a C-contiguous
    ``(lines, n)`` array (a copy only where it is not one already)."""
    np = _MODULES[0]
    n = math.prod([shape[ax] for ax in axes])
    if _reduced_axis(axes, len(shape)) != 1 or array.shape != shape:
        array = np.broadcast_to(array, shape)
        kept = tuple(ax for ax in range(len(shape)) if ax not in axes)
        array = np.transpose(array, kept + tuple(axes))
    array = np.ascontiguousarray(array, dtype=dtype)
    return array.reshape(array.size // n, n)


def _weighted_run(call, library):
    """The state of a weighted NumPy call, and its logsumexp by the shared finalisation.

    Rows that the compiled code flags (a non-finite entry or weight, nothing
    included) get the shared state of those rows alone; float32 input's
    float64 state has its max narrowed as the shared code narrows it.
    """
    if _KERNELS[0] is None:
        _kernels()
    np, _generic, Op, LSEState = _MODULES
    from lse_dispatch._call import prepare
    from lse_dispatch._state import narrow_max

    a, dtype, shape, axes = call.a, call.a.dtype, call.shape, call.axes
    x = _rows(a, shape, axes)
    lines = x.shape[0]
    w = _rows(call.b, shape, axes, dtype)
    mask = None if call.where is None else _rows(call.where, shape, axes, np.bool_).view(np.uint8)
    per_line = np.empty((3, lines))
    bad = np.empty(lines, np.uint8)
    no_mask, _ = _nothing(dtype)
    args = (x, w, no_mask if mask is None else mask, mask is not None, per_line, bad)
    flagged = _launch(_compiled(_NAMES[dtype], "weighted"), args, lines, _threads_for(x.size, library))
    keep = _generic.keepdims_shape(call)
    if call.op == Op.LOGSUMEXP and not flagged:
        # m + log_norm from the float64 state itself (its max not yet narrowed:
        # the same rule, one rounding fewer), when every sum is positive.
        found = _generic.logsumexp_of_finite_lines(call, LSEState(*(field.reshape(keep) for field in per_line)))
        if found is not None:
            return found
    state = LSEState(per_line[0], per_line[1], per_line[2])
    if dtype != per_line.dtype:
        with np.errstate(all="ignore"):  # flagged rows hold whatever the compiled code left
            state = narrow_max(np, state, dtype)
    if flagged:
        rows = np.flatnonzero(bad)
        where = None if mask is None else mask[rows].view(np.bool_)
        sub = prepare(Op.STATE, x[rows], axis=-1, b=w[rows], where=where)
        for field, part in zip(state, _generic.state(sub)):
            field[rows] = np.reshape(part, -1)
    state = LSEState(*(np.reshape(field, keep) for field in state))
    if call.op == Op.STATE:
        return state
    return _generic.logsumexp_from_state(call, state)


def _tensor_view(t):
    """The NumPy view of a CPU tensor (one that requires grad comes here only under no_grad)."""
    return (t.detach() if t.requires_grad else t).numpy()


def _torch_run(call):
    import torch

    a, where = call.a, call.where  # one that requires grad comes here only under no_grad
    if call.b is not None:
        # The weighted kernel finishes with the shared functions: on a NumPy call of the views.
        from lse_dispatch._call import prepare

        views = [None if t is None else t.detach().numpy() for t in (a, call.b, where)]
        # b in a's dtype (the call's compute dtype, which _torch_declines checked): a
        # Python scalar b arrives as a tensor of torch's default float dtype or wider,
        # and is weak, so it must not promote the views' call (float32 a with b=2.0
        # gave a float64 result).
        weights = views[1] if views[1].dtype == views[0].dtype else views[1].astype(views[0].dtype)
        result = _weighted_run(prepare(call.op, views[0], axis=call.axes, b=weights, where=views[2],
                                       return_sign=call.return_sign), "torch")
    else:
        result = _run(call, _tensor_view(a), None if where is None else where.detach().numpy(), "torch")
    if type(result) is tuple:  # (value, sign)
        return torch.from_numpy(result[0]), torch.from_numpy(result[1])
    if isinstance(result, tuple):  # an LSEState
        return type(result)(*(torch.from_numpy(part) for part in result))
    return torch.from_numpy(result)


def _lane(to_numpy, wrap):
    """The ``Kernel.lane`` of the fused kernels: ``to_numpy`` gives the input's NumPy view
    (``None``: it is one), ``wrap()`` the function that returns a result in the input's
    library (``None``: as is).

    A lane for calls of fewer than ``PARALLEL_ELEMENTS`` entries whose lines
    the compiled code finishes in one phase (the path ``_Lines`` takes without
    the launcher): it allocates the output and the scratch, runs the entry
    point and returns the output, or ``None`` where a line was flagged (a
    non-finite entry), which the full run finishes by the shared rules.
    """
    def lane(call, shape):
        a = call.a
        op = call.op
        view = a if to_numpy is None else to_numpy(a)
        if call.where is not None or call.b is not None or view.size >= PARALLEL_ELEMENTS:
            return None
        if _KERNELS[0] is None:
            _kernels()
        np = _MODULES[0]
        mode = _MODES[op]
        geometry = _geometry(view.shape, call.axes, view.itemsize, mode)
        axis, span, width, parts, blocks = geometry.plan
        if parts != 1 or mode == _KERNELS[0].STATE:
            return None
        to_library = None if wrap is None else wrap()
        dtype, lines, view_shape, normalised = view.dtype, geometry.lines, geometry.view_shape, geometry.normalised
        entry, no_mask, no_output = geometry.entry(dtype)
        phase, items = geometry.phases[0]
        # Scratch arrays of few lines are kept for the next call (a popped set is one
        # thread's alone); the flags are cleared where a line was flagged.
        spare = [] if lines <= LANE_SCRATCH_LINES else None

        def run(array):
            x = (array if to_numpy is None else to_numpy(array)).reshape(view_shape)
            out = np.empty(view_shape, dtype) if normalised else no_output
            scratch = spare.pop() if spare else _scratch(lines, 1, axis)
            pieces, per_line, bad = scratch
            flagged = entry(x, no_mask, False, mode, phase, out, pieces, per_line, bad, axis, span, width, 1, blocks,
                            0, items)
            result = None
            if flagged:
                bad.fill(0)
            else:
                result = out.reshape(shape) if normalised else per_line[3].astype(dtype).reshape(shape)
            if spare is not None:
                spare.append(scratch)
            return result if to_library is None or result is None else to_library(result)

        return run

    return lane


def _entries(name, run, declines, lane):
    from lse_dispatch._kernel import Priority, state_kernels

    return state_kernels(name, run, declines, priority=Priority.COMPILED, logsumexp=run,
                         normalised=lambda call, log: run(call), lane=lane)


@functools.cache
def numpy_kernels() -> tuple:
    """The four ``numpy.fused`` entries of ``SPEC.kernels`` (state, logsumexp, softmax, log_softmax)."""
    return _entries("numpy.fused", _numpy_run, _numpy_declines, _lane(None, None))


@functools.cache
def torch_kernels() -> tuple:
    """The four ``torch.fused`` entries of ``SPEC.kernels``."""
    return _entries("torch.fused", _torch_run, _torch_declines,
                    _lane(_tensor_view, lambda: sys.modules["torch"].from_numpy))


# --------------------------------------------------------------------------
# Warming up, and the fused softmax / log_softmax backward for torch.


def warm_up(dtypes=("float32", "float64"), *, masks: bool = True) -> None:
    """Load (or compile, when no cache exists) the compiled code of ``dtypes``.

    After it, calls of any size are taken.  ``masks`` is accepted for
    compatibility: the ``where`` variants are in the same compiled code.
    """
    if not available():
        raise ImportError("numba is not installed: pip install 'lse-dispatch[fast]'")
    for dtype in dtypes:
        for kind in ("forward", "backward", "weighted"):
            _compiled(str(dtype), kind)


def warm_up_hook(kernel: str, library: str):
    """``BackendSpec.warm_up`` of ``library`` (``kernel`` runs this code on its arrays, as
    NumPy views): loads both dtypes' code and returns ``(kernel,)``, if numba and the
    library are installed (the library itself is not imported)."""

    def hook() -> tuple[str, ...]:
        import importlib.util

        if not available() or importlib.util.find_spec(library) is None:
            return ()
        warm_up()
        return (kernel,)

    return hook


def softmax_backward(op, out, where, g, axes):
    """The fused backward of softmax / log_softmax on CPU tensors, or ``None``.

    ``None`` (the caller then takes the op form) under ``torch.compile``, and
    unless the dtype's compiled code is loaded and the tensors are plain
    contiguous float32/float64 CPU
    tensors of one dtype, with the reduced axes leading or trailing.
    softmax: ``y (g - sum y g)``; log_softmax: ``g - exp(z) sum g`` over
    included entries, 0 on excluded ones; the sums in float64, one pass to sum
    and one to write.  Entries where ``y`` (or ``exp(z)``) is 0 get exactly
    the op form's value.
    """
    import torch

    if torch.compiler.is_compiling():  # a traced backward keeps the op form
        return None
    name = _torch_name(out.dtype)
    if (name not in _SIGNATURES_SEEN or g.dtype != out.dtype or not out.is_cpu
            or not g.is_cpu or not out.is_contiguous() or g.shape != out.shape):
        return None
    shape = tuple(out.shape)
    axes = tuple(axes)
    if _reduced_axis(axes, len(shape)) is None or 0 in shape:
        return None
    geometry = _geometry(shape, axes, out.element_size(), _MODES[op])  # op: an Op or its name
    view_shape, axis = geometry.view_shape, geometry.axis
    np = _MODULES[0]
    y = out.detach().numpy().reshape(view_shape)
    grad = g.detach().contiguous().numpy().reshape(view_shape)
    mask = None if where is None else _mask_view(where.detach().numpy(), shape, view_shape)
    result = np.empty(view_shape, y.dtype)
    no_mask, _ = _nothing(y.dtype)
    entry = _compiled(name, "backward")
    args = (y, grad, no_mask if mask is None else mask, mask is not None, axis, op == "log_softmax", result)
    _launch(entry, args, _KERNELS[0].backward_items(view_shape, axis), _threads_for(y.size, "torch"))
    result = result.reshape(shape)
    return torch.from_numpy(result)
