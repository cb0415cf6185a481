"""JAX: CPU, and GPU when one is present; float64 only with x64 enabled.

Native kernel ``jax.jit``: the generic implementation itself, compiled once
per (operation, axes, dtypes, arguments given) with ``jax.jit``, so that XLA
fuses its passes into a few loops.  Being the generic code, it has exactly the
generic path's accuracy and limit semantics, ``b`` and ``where`` included.

It declines traced inputs (calls made inside ``jax.jit``, ``jax.grad``,
``vmap``...): there the generic code is already traced into the caller's
computation, and gradients belong to the custom-derivative kernels
(``autodiff``, :mod:`._jax_grad`, at a higher priority).  XLA's numerics
are the spec's ``numerics`` (:mod:`._jax_numerics`).
"""

import functools

from array_api_compat import is_jax_array

from lse_dispatch._kernel import Kernel, Priority
from lse_dispatch._ops import Op

from . import _jax_fused, _jax_grad
from ._jax_numerics import JaxNumerics
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


def _declines(call):
    import jax

    for name, value in (("a", call.a), ("b", call.b), ("where", call.where)):
        if isinstance(value, jax.core.Tracer):
            return f"traced input '{name}' (inside a jax transform: the generic code is traced there)"
    return None


@functools.lru_cache(maxsize=256)
def _compiled(op):
    """The generic implementation of ``op`` under ``jax.jit``, the call's non-array parts static."""
    import dataclasses

    import jax

    from lse_dispatch._generic import IMPLEMENTATIONS

    generic = IMPLEMENTATIONS[op]

    def run(call, a, b, where):
        return generic(dataclasses.replace(call, a=a, b=b, where=where))

    # The Call itself is static: only its arrays are traced.
    return jax.jit(run, static_argnums=0)


def _static(call):
    """The call without its arrays: hashable, the jit cache's static key."""
    import dataclasses

    return dataclasses.replace(call, a=None, b=None, where=None)


def _run(call):
    # jax.jit keys its own cache on the static call (op, axes, plan, return_sign)
    # and on which of b and where are given.
    return _compiled(call.op)(_static(call), call.a, call.b, call.where)


def _kernels():
    return tuple(Kernel(op, "jax.jit", _run, _declines, Priority.NATIVE) for op in Op)


SPEC = BackendSpec(
    name="jax",
    module="jax",
    is_array=is_jax_array,
    namespace=_namespace,
    devices=_devices,
    dtypes=("float16", "bfloat16", "float32", "float64"),
    to_numpy=_to_numpy,
    # By priority: the fused float32 kernel (plain calls without x64, traced
    # or not, with its own derivative rules); the derivative rules over the
    # generic code for every other traced call (free under jit); the compiled
    # generic code for every other concrete call.
    kernels=(*_jax_fused.KERNELS, *_jax_grad.KERNELS, *_kernels()),
    numerics=JaxNumerics(),
)
