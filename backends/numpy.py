"""NumPy: the reference CPU backend."""

from array_api_compat import is_numpy_array

from ._spec import BackendSpec, Device


def _namespace():
    import array_api_compat.numpy as xp

    return xp


def _to_numpy(x):
    import numpy as np

    return np.asarray(x)


SPEC = BackendSpec(
    name="numpy",
    module="numpy",
    is_array=is_numpy_array,
    namespace=_namespace,
    devices=lambda: [Device("cpu", "cpu")],
    dtypes=("float16", "float32", "float64"),
    to_numpy=_to_numpy,
)
