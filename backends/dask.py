"""Dask: lazy, chunked NumPy arrays.

Native kernels: logsumexp, softmax and log_softmax reduce the input in ONE
tree reduction (``dask.array.reduction``) over the mergeable state of
:mod:`lse_dispatch._state`:

* chunk     -- each input block becomes an ``LSEState`` (the eager math, on NumPy);
* combine   -- groups of at most ``split_every`` states are merged;
* aggregate -- the last merge, returning one field of the state.

So every input block is computed (read, generated) exactly once, and a worker
holds only states, never the blocks the max was found in.  The generic path
(and SciPy) takes the max first and the sum of ``exp(a - max)`` afterwards,
which keeps every block in memory, or recomputes it, until the max is known.
The tree's fan-in is Dask's own ``split_every`` setting:
``with dask.config.set(split_every=8): logsumexp(x)``.

softmax and log_softmax reuse the reduced state and then make one elementwise
(blockwise) pass over the input, so each input block is used twice in the
graph: once by the reduction and once by the elementwise pass.
"""

from __future__ import annotations

import math
from functools import partial

from array_api_compat import is_dask_array

from lse_dispatch._kernel import Kernel, Priority, state_kernels
from lse_dispatch._numerics import Numerics

from ._spec import BackendSpec, Device

# The three state fields are three reductions of the same graph: the chunk and
# combine layers have the same keys (same functions, arguments and dtype), so
# Dask computes them once; only the aggregate, which picks a field, differs.
_FIELDS = ("max", "count", "rest")


def _namespace():
    import array_api_compat.dask.array as xp

    return xp


def _to_numpy(x):
    import numpy as np

    return np.asarray(x.compute())


def _from_numpy_chunked(array, dtype, device):
    import dask.array as da

    # Several chunks per axis, so that reductions really combine partials.
    chunks = tuple(max(1, -(-n // 3)) for n in array.shape)
    return da.from_array(array.astype(dtype), chunks=chunks or ())


def _block_state(block, weights=None, *, axis, keepdims, kind):
    """``chunk`` of the tree: the keepdims state of one NumPy block.

    ``weights`` carries ``b`` (``kind="b"``), the ``where`` mask
    (``kind="where"``) or nothing.  Goes through the preparation and the
    dispatcher, so a block is reduced exactly as the eager path reduces a
    NumPy array, by the fastest NumPy kernel that takes it.
    """
    import numpy as np

    from lse_dispatch._call import prepare
    from lse_dispatch._kernel import dispatch
    from lse_dispatch._ops import Op

    b = weights if kind == "b" else None
    where = weights if kind == "where" else None
    if type(block) is np.ndarray and not block.flags.c_contiguous:
        # A block sliced from a larger array (da.from_array) is a strided view,
        # which the compiled and tiled kernels decline; a contiguous copy of
        # one block costs less than the generic path's temporaries.
        block = np.ascontiguousarray(block)
    return dispatch(prepare(Op.STATE, block, axis=axis, b=b, where=where))


def _flatten(parts):
    if isinstance(parts, list):
        return [state for part in parts for state in _flatten(part)]
    return [parts]


def _merge_blocks(parts, *, axis, keepdims):
    """``combine``: merge the (nested list of) states of neighbouring blocks."""
    import array_api_compat.numpy as xp

    from lse_dispatch._state import merge

    states = _flatten(parts)
    total = states[0]
    for state in states[1:]:
        total = merge(xp, total, state)
    return total


def _merged_field(parts, *, axis, keepdims, field):
    """``aggregate``: one field of the merged state, as a NumPy array."""
    import numpy as np

    state = _merge_blocks(parts, axis=axis, keepdims=keepdims)
    value = np.asarray(state[field])
    if not keepdims:
        value = np.squeeze(value, axis=axis)
    return value


def declines_tree(call) -> str | None:
    if call.plan.is_complex:
        return "complex input has no real (max, count, rest) state"
    if not call.axes:
        return "nothing to reduce"
    if any(isinstance(n, float) and math.isnan(n) for n in call.shape):
        return "unknown chunk sizes"
    if any(call.shape[ax] == 0 for ax in call.axes):
        return "empty reduction"
    return None


def state_of(call):
    """The keepdims :class:`LSEState` of a Dask call, by one tree reduction.

    The fields are lazy Dask arrays that share every chunk and combine task.
    """
    import dask.array as da

    from lse_dispatch._state import LSEState

    xp, plan = call.xp, call.plan
    a = call.a
    if call.b is not None:
        b = xp.astype(call.b, plan.compute)
        # b == 0 excludes an entry, so where=False is the same as a zero weight.
        weights, kind = (b if call.where is None else xp.where(call.where, b, xp.zeros_like(b))), "b"
    elif call.where is not None:
        weights, kind = call.where, "where"
    else:
        weights, kind = None, None
    if weights is not None:
        # Reduce over the broadcast shape of a, b and where.
        a, weights = xp.broadcast_arrays(a, weights)
    fields = []
    for index in range(len(_FIELDS)):
        reduced = da.reduction(
            a,
            partial(_block_state, kind=kind),
            partial(_merged_field, field=index),
            axis=call.axes,
            keepdims=True,
            # One dtype for every field, so the three reductions share keys.
            dtype=plan.accumulator,
            combine=_merge_blocks,
            concatenate=False,
            name="lse-state",
            weights=weights,
            meta=a._meta.astype(plan.accumulator),
        )
        fields.append(reduced)
    maximum, count, rest = fields
    return LSEState(xp.astype(maximum, plan.compute), count, rest)


class DaskNumerics(Numerics):
    """Dask's hook: its laziness and its semiring kernels (the default order-free sums stay per chunk,
    combined in a tree: no reshape to one trailing axis, which would rechunk)."""

    lazy = True  # values are computed when the graph runs

    def semiring(self):
        from . import _dask_semiring

        return _dask_semiring

    def elementwise(self, xp, fn, arrays, outputs):
        """One blockwise task per block running ``fn`` on the NumPy blocks, and a getitem
        layer per output: a compensated merge of streamed states is some 200
        operations, each a graph layer of its own otherwise (docs/streaming.md
        has the cost before and after)."""
        import operator

        import array_api_compat.numpy as npx
        import dask.array as da
        import numpy as np

        index = tuple(range(arrays[0].ndim))
        # The outputs' dtypes, from fn on one entry of each input's dtype.
        probe = fn(npx, *(np.ones((1,) * len(index), dtype=array.dtype) for array in arrays))

        def block(*blocks):
            return tuple(fn(npx, *blocks))

        pieces = da.blockwise(block, index, *(part for array in arrays for part in (array, index)),
                              dtype=object, meta=np.empty((0,) * len(index), dtype=object))
        return tuple(
            pieces.map_blocks(operator.getitem, k, dtype=part.dtype, meta=np.empty((0,) * len(index), dtype=part.dtype))
            for k, part in zip(range(outputs), probe)
        )


def _kernels():
    # The state by one tree reduction; logsumexp finalises it, softmax and
    # log_softmax make one elementwise pass over the input with it.
    tree = state_kernels("dask-single-pass-tree", state_of, declines_tree, priority=Priority.NATIVE)
    state, logsumexp, softmax, log_softmax = tree
    elementwise = "dask-state-then-elementwise"
    return (
        state,
        logsumexp,
        Kernel(softmax.op, elementwise, softmax.run, declines_tree, Priority.NATIVE),
        Kernel(log_softmax.op, elementwise, log_softmax.run, declines_tree, Priority.NATIVE),
    )


class _DaskSpec(BackendSpec):
    def from_numpy(self, array, dtype, device):
        return _from_numpy_chunked(array, dtype, device)


SPEC = _DaskSpec(
    numerics=DaskNumerics(),
    name="dask",
    module="dask",
    is_array=is_dask_array,
    namespace=_namespace,
    devices=lambda: [Device("cpu", "cpu")],
    dtypes=("float16", "float32", "float64"),
    to_numpy=_to_numpy,
    kernels=_kernels(),
)
