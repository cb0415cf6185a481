"""PyTorch derivative kernels: when the autograd Functions take a call.

The Functions themselves live in :mod:`._torch_autograd` and the formulas in
:mod:`lse_dispatch._autodiff`.

The kernels apply only while a derivative can be taken (autograd recording,
a forward-AD level, or a ``torch.func`` transform); plain forward calls are
declined and go to the fastest forward implementation, unchanged.

Importing this module imports no array library; torch is imported the first
time a kernel sees a torch tensor (so torch is already loaded).
"""

from __future__ import annotations

from lse_dispatch._call import Call
from lse_dispatch._kernel import Kernel, Priority
from lse_dispatch._ops import Op

from ._spec import AUTODIFF

__all__ = ["KERNELS"]


def _differentiating(call: Call) -> bool:
    """Whether autograd or a torch.func transform could differentiate ``call``."""
    import torch

    a, b = call.a, call.b
    if torch.is_grad_enabled() and (a.requires_grad or (b is not None and b.requires_grad)):
        return True
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the functorch check; inside a compiled graph
        # derivatives come from autograd, which requires_grad already covers.
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return wrapped(a) or (b is not None and wrapped(b))


def _declines(call: Call) -> str | None:
    if call.plan.is_complex:
        return "complex input: the generic operations' own derivatives apply"
    if 0 in call.shape:  # the reduced axes are among them
        return "empty input: nothing to differentiate"
    if not _differentiating(call):
        return "no derivative is being taken"
    return None


def _logsumexp(call: Call):
    from . import _torch_autograd

    return _torch_autograd.logsumexp(call)


def _normalised(call: Call):
    from . import _torch_autograd

    return _torch_autograd.normalised(call)


def _normalised_lane(call: Call, shape: tuple):
    from . import _torch_autograd

    return _torch_autograd.normalised_lane(call, shape)


#: Kernels for backends/torch.py: they take a call only while it is differentiated.
KERNELS = (
    Kernel(Op.LOGSUMEXP, AUTODIFF, _logsumexp, _declines, Priority.DERIVATIVE),
    Kernel(Op.SOFTMAX, AUTODIFF, _normalised, _declines, Priority.DERIVATIVE, _normalised_lane),
    Kernel(Op.LOG_SOFTMAX, AUTODIFF, _normalised, _declines, Priority.DERIVATIVE, _normalised_lane),
)
