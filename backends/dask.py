"""Dask: lazy, chunked NumPy arrays."""

from array_api_compat import is_dask_array

from ._spec import BackendSpec, Device


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


class _DaskSpec(BackendSpec):
    def from_numpy(self, array, dtype, device):
        return _from_numpy_chunked(array, dtype, device)


SPEC = _DaskSpec(
    name="dask",
    module="dask",
    is_array=is_dask_array,
    namespace=_namespace,
    devices=lambda: [Device("cpu", "cpu")],
    dtypes=("float16", "float32", "float64"),
    to_numpy=_to_numpy,
)
