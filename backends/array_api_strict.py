"""array-api-strict: the standard and nothing more, with several devices."""

from array_api_compat import is_array_api_strict_namespace

from ._spec import BackendSpec, Device


def _namespace():
    import array_api_strict

    return array_api_strict


def _is_array(x) -> bool:
    import sys

    if "array_api_strict" not in sys.modules:
        return False
    return isinstance(x, sys.modules["array_api_strict"]._array_object.Array)


def _devices():
    import array_api_strict as xp

    # device1 is a second, non-default device that has every dtype.
    return [Device(label, xp.Device(label)) for label in ("CPU_DEVICE", "device1")]


def _to_numpy(x):
    import array_api_strict as xp
    import numpy as np

    cpu = xp.__array_namespace_info__().default_device()
    return np.asarray(x.to_device(cpu))


SPEC = BackendSpec(
    name="array_api_strict",
    module="array_api_strict",
    is_array=_is_array,
    namespace=_namespace,
    devices=_devices,
    dtypes=("float32", "float64"),
    to_numpy=_to_numpy,
)

__all__ = ["SPEC", "is_array_api_strict_namespace"]
