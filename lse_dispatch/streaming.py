"""Streaming and out-of-core log-sum-exp on the mergeable state.

The state is :class:`~lse_dispatch._state.LSEState` -- ``(max, count, rest)``,
the same one the eager path finalises -- so a result assembled from pieces
keeps the eager path's accuracy: the sum excluding the entries at the max is
carried separately and finalised with ``log1p``.  The merge rule extends the
online normaliser of Milakov & Gimelshein ("Online normalizer calculation for
softmax", 2018) with the exact count of entries at the max.

* :func:`lse_state`, :func:`lse_merge`, :func:`lse_finalize`: pure functions on
  arrays of any backend (they run under ``jax.jit``; ``LSEState`` is a
  NamedTuple, hence a JAX pytree).
* :class:`OnlineLogSumExp`: a running state for batches that arrive one by one.
* :func:`logsumexp_blocked`: one pass over an array too large for memory
  (a ``numpy.memmap``), a bounded block at a time.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from . import _dispatch
from ._call import prepare
from ._namespace import plan_dtypes
from ._numerics import numerics_for
from ._ops import Op
from ._state import (
    LSEState,
    finalize,
    log_softmax_from_state,
    merge,
    merge_compensated,
    softmax_from_state,
    undefined_where,
)
from ._validate import broadcast_shapes, normalize_axis

__all__ = [
    "LSEState",
    "OnlineLogSumExp",
    "logsumexp_blocked",
    "lse_finalize",
    "lse_merge",
    "lse_state",
]

Array = Any


def _state_of_call(call) -> LSEState:
    """The keepdims state of a prepared ``STATE`` call, by the kernel the dispatcher picks.

    Dask arrays get one tree reduction (``dask-single-pass-tree``), NumPy
    and torch arrays their native kernels; empty reductions give
    ``(-inf, 0, 0)`` and complex input a ``TypeError`` (``_generic.state``).
    """
    return _dispatch.run(call)


def _squeeze_state(xp, state: LSEState, axes: tuple[int, ...]) -> LSEState:
    if not axes:
        return state
    return LSEState(*(xp.squeeze(field, axis=axes) for field in state))


def lse_state(a, axis=None, b=None, *, where=None, keepdims=False) -> LSEState:
    """The mergeable log-sum-exp state of ``a`` (optionally weighted by ``b``).

    Parameters
    ----------
    a, axis, b, where
        As for :func:`lse_dispatch.logsumexp`; real input only.
    keepdims : bool, optional
        Keep the reduced axes with length one.  Without it (the default) the
        fields have the shape of the logsumexp result, so states of pieces of
        an array split along the reduced axes merge elementwise.  Keep them to
        broadcast a state against the input (as :class:`OnlineLogSumExp` does).
        For a Dask array the state comes from one tree reduction (see
        ``lse_dispatch.backends.dask``), lazily.

    Returns
    -------
    LSEState
        ``(max, count, rest)``: the largest included exponent ``m`` (in the
        compute dtype, float32 for float16 input), the signed number of
        entries at ``m`` and the sum of ``sign * exp(e - m)`` over the others
        (both in the accumulator dtype, float64 for float32 input where the
        namespace has it).  An empty or fully excluded reduction gives
        ``(-inf, 0, 0)``.

    Examples
    --------
    >>> import numpy as np
    >>> from lse_dispatch import lse_state, lse_merge, lse_finalize
    >>> left, right = lse_state(np.array([0.0])), lse_state(np.array([-40.0]))
    >>> float(lse_finalize(lse_merge(left, right)))
    4.248354255291589e-18
    """
    call = prepare(Op.STATE, a, axis=axis, b=b, where=where)
    state = _state_of_call(call)
    return state if keepdims else _squeeze_state(call.xp, state, call.axes)


def lse_merge(first: LSEState, second: LSEState) -> LSEState:
    """The state of the union of two disjoint sets of entries.

    Associative and commutative up to rounding (2 ulps after
    :func:`lse_finalize`); ``-inf`` states merge to ``-inf`` and NaN
    propagates.  The fields of the two states broadcast together.
    """
    first, second = _as_state(first, "first"), _as_state(second, "second")
    xp = _namespace_of({"first": first, "second": second})
    broadcast_shapes([tuple(first.max.shape), tuple(second.max.shape)], ["first", "second"])
    return merge(xp, first, second)


def _as_state(value, name: str) -> LSEState:
    """``value`` as an :class:`LSEState` of arrays, or a ``TypeError`` naming the argument."""
    fields = tuple(value) if isinstance(value, tuple) else None
    if fields is None or len(fields) != 3 or not all(map(array_api_compat.is_array_api_obj, fields)):
        got = type(value).__name__ if fields is None else f"{type(value).__name__} of " + ", ".join(
            type(field).__name__ for field in fields
        )
        raise TypeError(f"argument '{name}' must be an LSEState (max, count, rest) of arrays, as lse_state returns; got {got}")
    return LSEState(*fields)


def _namespace_of(states: dict[str, LSEState]):
    """The one namespace of the named states' fields; a ``TypeError`` naming them if they mix libraries."""
    try:
        return array_api_compat.array_namespace(*(field for state in states.values() for field in state))
    except TypeError:
        libraries = ", ".join(f"'{name}' holds {type(state.max).__module__}.{type(state.max).__name__}"
                              for name, state in states.items())
        raise TypeError(f"the states come from different array libraries ({libraries}); merge states of one library") from None


def lse_finalize(state: LSEState, *, return_sign=False, dtype=None):
    """``logsumexp`` of the entries a state stands for.

    Parameters
    ----------
    state : LSEState
    return_sign : bool, optional
        Return ``(log|sum|, sign)``, as :func:`lse_dispatch.logsumexp` does;
        without it a negative sum gives NaN.
    dtype : dtype, optional
        Result dtype; the dtype of ``state.max`` by default (pass float16 to
        get back the dtype of float16 input).
    """
    state = _as_state(state, "state")
    xp = _namespace_of({"state": state})
    value, sign = finalize(xp, state, state.max.dtype if dtype is None else dtype)
    if return_sign:
        return value, sign
    return value + undefined_where(xp, sign < 0, value)


def _merge_fields(xp, *fields):
    state, low = merge_compensated(xp, LSEState(*fields[:3]), fields[3], LSEState(*fields[4:7]), fields[7])
    return (*state, low)


def _merged(xp, first: LSEState, first_low, second: LSEState, second_low) -> tuple[LSEState, Any]:
    """:func:`merge_compensated` of two streamed states, entry by entry (one task per block on Dask)."""
    fields = numerics_for(xp).elementwise(xp, _merge_fields, (*first, first_low, *second, second_low), 4)
    return LSEState(*fields[:3]), fields[3]


class OnlineLogSumExp:
    """Log-sum-exp over a stream of chunks, in one pass and constant memory.

    Every chunk is reduced over ``axis`` to a state and merged into the
    running one, so the chunks must agree in the extents of the kept axes
    (for ``axis=0``: chunks of shape ``(n_i, d)`` give a result of shape
    ``(d,)``).  ``axis=None`` reduces every axis of every chunk.

    Examples
    --------
    >>> import numpy as np
    >>> from lse_dispatch import OnlineLogSumExp
    >>> running = OnlineLogSumExp(axis=0)
    >>> running.update(np.array([[0.0, 10.0]])).update(np.array([[0.0, 10.0]]))
    OnlineLogSumExp(axis=0, chunks=2)
    >>> running.result()
    array([ 0.69314718, 10.69314718])
    >>> running.softmax(np.array([[0.0, 10.0]]))
    array([[0.5, 0.5]])
    """

    def __init__(self, axis=None):
        self.axis = axis
        # The chunks' states merged as a binary counter, as (chunks, state, low):
        # at most log2(chunks) of them, each a balanced tree of merges (a lazy
        # graph log2(chunks) merges deep), the rests' roundings kept in low.
        self._levels: list[tuple[int, LSEState, Any]] = []
        self.chunks = 0
        # (reduced axes, shape) of the chunks, set with the first state.
        self._axes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._result_dtype = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(axis={self.axis!r}, chunks={self.chunks})"

    def update(self, chunk, b=None, *, where=None) -> OnlineLogSumExp:
        """Fold one chunk (with optional weights ``b`` and mask ``where``) in."""
        call = prepare(Op.STATE, chunk, axis=self.axis, b=b, where=where)
        if self._axes is not None and len(call.shape) != len(self._axes[1]):
            raise ValueError(
                f"argument 'chunk' has {len(call.shape)} dimensions; earlier chunks had {len(self._axes[1])}"
            )
        state = _state_of_call(call)
        if self._levels:
            earlier = self._levels[0][1].max
            try:
                array_api_compat.array_namespace(earlier, state.max)
            except TypeError:
                raise TypeError(
                    f"argument 'chunk' is a {type(call.a).__module__}.{type(call.a).__name__}, but the stream's "
                    f"earlier chunks were {type(earlier).__module__}.{type(earlier).__name__}: "
                    "one OnlineLogSumExp takes chunks of one array library"
                ) from None
        size, low = 1, call.xp.zeros_like(state.rest)
        while self._levels and self._levels[-1][0] == size:
            _, earlier_state, earlier_low = self._levels.pop()
            state, low = _merged(call.xp, earlier_state, earlier_low, state, low)
            size *= 2
        self._levels.append((size, state, low))
        self._axes = (call.axes, call.shape)
        self._result_dtype = call.plan.result
        self.chunks += 1
        return self

    @property
    def state(self) -> LSEState | None:
        """The running state (``None`` before the first chunk), its rest with the carried roundings added."""
        if not self._levels:
            return None
        _, state, low = self._levels[0]
        xp = array_api_compat.array_namespace(state.rest)
        for _, other, other_low in self._levels[1:]:
            state, low = _merged(xp, state, low, other, other_low)
        m, count, rest = state
        return LSEState(m, count, rest + low)

    def _require_state(self) -> LSEState:
        state = self.state
        if state is None:
            raise ValueError("OnlineLogSumExp has seen no chunk yet; call update() first")
        return state

    def result(self, *, return_sign=False):
        """The logsumexp of every chunk so far (reduced axes removed)."""
        state = self._require_state()
        xp = array_api_compat.array_namespace(*state)
        value = lse_finalize(state, return_sign=return_sign, dtype=self._result_dtype)
        assert self._axes is not None  # set with the state
        axes = self._axes[0]
        if not axes:
            return value
        if return_sign:
            return tuple(xp.squeeze(part, axis=axes) for part in value)
        return xp.squeeze(value, axis=axes)

    def _prepared_chunk(self, chunk):
        state = self._require_state()
        call = prepare(Op.LOG_SOFTMAX, chunk, axis=self.axis)
        if call.plan.is_complex:
            raise TypeError(f"argument 'chunk' must be real, got dtype {call.a.dtype}")
        assert self._axes is not None  # set with the state
        if len(call.shape) != len(self._axes[1]):
            raise ValueError(
                f"argument 'chunk' has {len(call.shape)} dimensions; the stream's chunks have {len(self._axes[1])}"
            )
        return call, state, call.xp.astype(call.a, call.plan.compute)

    def log_softmax(self, chunk):
        """``chunk - logsumexp(stream so far)``, exact at the max entry."""
        call, state, x = self._prepared_chunk(chunk)
        return call.xp.astype(log_softmax_from_state(call.xp, x, state, None), call.plan.result)

    def softmax(self, chunk):
        """``exp(chunk - logsumexp(stream so far))``: the chunk's share of the total."""
        call, state, x = self._prepared_chunk(chunk)
        return call.xp.astype(softmax_from_state(call.xp, x, state, None), call.plan.result)


def _row_bytes(array) -> int:
    return math.prod(array.shape[1:]) * array.dtype.itemsize


def _page_releaser(array):
    """A function that unmaps the file pages under a block of ``array``, or None.

    Only for a read-only ``numpy.memmap`` that owns its mapping: its pages can
    always be read again from the file, so dropping them after each block
    keeps the process's resident memory bounded by the block, not the file.
    """
    import mmap

    import numpy as np

    mapping = getattr(array, "base", None)
    if not (isinstance(array, np.memmap) and isinstance(mapping, mmap.mmap) and array.mode == "r"):
        return None
    if not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    # np.memmap maps from the offset rounded down to the allocation granularity.
    mapping_start = array.__array_interface__["data"][0] - array.offset % mmap.ALLOCATIONGRANULARITY

    def release(block):
        if not block.flags.c_contiguous or block.nbytes == 0:
            return
        position = block.__array_interface__["data"][0] - mapping_start
        aligned = position - position % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, aligned, block.nbytes + position - aligned)

    return release


def _blocked_state(array, axes: tuple[int, ...], block_bytes: int, release=None) -> LSEState:
    """Keepdims state of a NumPy-like ``array`` read at most ``block_bytes`` at a time."""
    import numpy as np

    if array.nbytes <= block_bytes or array.ndim == 0:
        # np.asarray of a memmap slice reads its pages; the temporaries of the
        # state (a few arrays of the block's size) are the extra memory.
        state = _state_of_call(prepare(Op.STATE, np.asarray(array), axis=axes))
        if release is not None:
            release(array)
        return state
    xp = array_api_compat.array_namespace(np.empty(0))
    if _row_bytes(array) > block_bytes:
        # One leading index is already too big: recurse into each row.
        inner = tuple(ax - 1 for ax in axes if ax > 0)
        pieces = [
            LSEState(*(xp.expand_dims(field, axis=0) for field in _blocked_state(array[i], inner, block_bytes, release)))
            for i in range(array.shape[0])
        ]
    else:
        rows = max(1, block_bytes // max(1, _row_bytes(array)))
        pieces = [
            _blocked_state(array[i : i + rows], axes, block_bytes, release) for i in range(0, array.shape[0], rows)
        ]
    if 0 in axes:
        total, low = pieces[0], xp.zeros_like(pieces[0].rest)
        for piece in pieces[1:]:
            total, low = merge_compensated(xp, total, low, piece, xp.zeros_like(piece.rest))
        return LSEState(total.max, total.count, total.rest + low)
    return LSEState(*(xp.concat([piece[k] for piece in pieces], axis=0) for k in range(3)))


def logsumexp_blocked(array, axis=None, *, block_bytes: int = 32 * 2**20, keepdims=False):
    """logsumexp of a NumPy-like array (e.g. ``numpy.memmap``) one block at a time.

    The array is cut along its leading axes into blocks of at most
    ``block_bytes`` input bytes; each block is read, reduced to a state and
    merged, so one pass reads every byte once and the extra memory is a small
    multiple of ``block_bytes`` (the block and the temporaries of its state),
    whatever the array's size.  For a read-only ``numpy.memmap`` the file's
    pages are unmapped after each block (``madvise(MADV_DONTNEED)``; they stay
    in the kernel's page cache), so the resident memory stays bounded too.
    The result equals :func:`logsumexp` within the 4-ulp contract.

    Parameters
    ----------
    array : numpy.ndarray or numpy.memmap
        Real input.
    axis : None or int or tuple of ints, optional
        Axes to reduce.
    block_bytes : int, optional
        Input bytes per block (default 32 MiB).
    keepdims : bool, optional
        Keep the reduced axes with length one.

    Examples
    --------
    >>> import numpy as np
    >>> from lse_dispatch import logsumexp_blocked
    >>> float(logsumexp_blocked(np.zeros(10**6), block_bytes=2**16))
    13.815510557964274
    """
    import numpy as np

    if not isinstance(array, np.ndarray):
        raise TypeError(f"argument 'array' must be a numpy.ndarray or numpy.memmap, got {type(array).__name__}")
    if int(block_bytes) < array.dtype.itemsize:
        raise ValueError(f"argument 'block_bytes' must hold at least one entry ({array.dtype.itemsize} bytes), got {block_bytes}")
    axes = normalize_axis(axis, array.ndim)
    state = _blocked_state(array, axes, int(block_bytes), _page_releaser(array))
    xp = array_api_compat.array_namespace(np.empty(0))
    if not keepdims:
        state = _squeeze_state(xp, state, axes)
    return lse_finalize(state, dtype=plan_dtypes(xp, np.empty(0, dtype=array.dtype)).result)
