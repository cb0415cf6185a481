"""CuPy: NVIDIA GPUs through CUDA."""

from array_api_compat import is_cupy_array

from ._spec import BackendSpec, Device


def _namespace():
    import array_api_compat.cupy as xp

    return xp


def _devices():
    import cupy

    return [Device("cuda", cupy.cuda.Device(0))] if cupy.cuda.runtime.getDeviceCount() else []


def _to_numpy(x):
    return x.get()


SPEC = BackendSpec(
    name="cupy",
    module="cupy",
    is_array=is_cupy_array,
    namespace=_namespace,
    devices=_devices,
    dtypes=("float16", "float32", "float64"),
    to_numpy=_to_numpy,
)
