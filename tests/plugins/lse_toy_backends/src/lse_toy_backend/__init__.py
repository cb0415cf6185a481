"""A third-party backend: a kernel for NumPy arrays that counts its calls.

Its kernel runs lse_dispatch's generic implementation (so it meets the
accuracy contract) and declines inputs with fewer than ``MIN_SIZE`` entries,
so that tests can see both outcomes in a trace.
"""

from array_api_compat import is_numpy_array

from lse_dispatch.backends import GENERIC, BackendSpec, Device, Kernel

MIN_SIZE = 4
CALLS = []


def _declines(call):
    if call.a.size < MIN_SIZE:
        return f"fewer than {MIN_SIZE} entries"
    return None


def _make(op):
    def run(call):
        CALLS.append(op)
        return GENERIC[op](call)

    return run


def _namespace():
    import array_api_compat.numpy as xp

    return xp


SPEC = BackendSpec(
    name="toy",
    module="numpy",
    is_array=is_numpy_array,
    namespace=_namespace,
    devices=lambda: [Device("cpu", "cpu")],
    dtypes=("float64",),
    to_numpy=lambda x: x,
    kernels=tuple(Kernel(op, "toy.counting", _make(op), _declines) for op in ("logsumexp", "softmax", "log_softmax")),
)
