"""JAX: CPU, and GPU when one is present; float64 only with x64 enabled."""

from array_api_compat import is_jax_array

from . import _jax_grad
from ._spec import BackendSpec, Device


def _namespace():
    import jax.numpy as jnp

    return jnp


def _devices():
    import jax

    found = [Device("cpu", jax.devices("cpu")[0])]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU platform
        gpus = []
    found.extend(Device("gpu", d) for d in gpus[:1])
    return found


def _to_numpy(x):
    import numpy as np

    return np.asarray(x.astype("float32") if x.dtype.name == "bfloat16" else x)


SPEC = BackendSpec(
    name="jax",
    module="jax",
    is_array=is_jax_array,
    namespace=_namespace,
    devices=_devices,
    dtypes=("float16", "bfloat16", "float32", "float64"),
    to_numpy=_to_numpy,
    # Derivative rules first: they take every traced call (free under jit).
    kernels=(*_jax_grad.KERNELS,),
)
