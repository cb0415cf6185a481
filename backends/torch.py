"""PyTorch: CPU, and CUDA when a GPU is present."""

from array_api_compat import is_torch_array

from . import _torch_grad
from ._spec import BackendSpec, Device


def _namespace():
    import array_api_compat.torch as xp

    return xp


def _devices():
    import torch

    found = [Device("cpu", torch.device("cpu"))]
    if torch.cuda.is_available():
        found.append(Device("cuda", torch.device("cuda", 0)))
    return found


def _to_numpy(x):
    import torch

    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.detach().cpu().numpy()


SPEC = BackendSpec(
    name="torch",
    module="torch",
    is_array=is_torch_array,
    namespace=_namespace,
    devices=_devices,
    dtypes=("float16", "bfloat16", "float32", "float64"),
    to_numpy=_to_numpy,
    # Derivative rules first: they take a call only while it is differentiated.
    kernels=(*_torch_grad.KERNELS,),
)
