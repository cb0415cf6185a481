"""Choosing the implementation that runs a prepared call.

Each backend module declares native :class:`Kernel` s with the conditions
under which they apply; the first one that does not decline runs, otherwise
the generic array-API implementation does.  The backend of an array type is
looked up once and cached.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _generic
from ._call import Call

__all__ = ["GENERIC", "Kernel", "backend_for", "run"]


@dataclass(frozen=True)
class Kernel:
    """A native implementation of one operation.

    ``run`` takes a :class:`Call` and returns what the generic implementation
    returns (``(value, sign)`` with kept dims for logsumexp, the array for
    softmax and log_softmax).  ``declines`` returns ``None`` when the kernel
    can take the call, or a short reason why not; a kernel that does not meet
    the accuracy contract for a call must decline it.
    """

    op: str
    name: str
    run: Callable[[Call], Any]
    declines: Callable[[Call], str | None] = lambda call: None


GENERIC: dict[str, Callable[[Call], Any]] = {
    "logsumexp": _generic.logsumexp,
    "softmax": _generic.softmax,
    "log_softmax": _generic.log_softmax,
}

_BACKEND_OF_TYPE: dict[type, Any] = {}


def backend_for(array) -> Any:
    """The backend spec whose arrays ``array`` is, or ``None`` (generic only)."""
    kind = type(array)
    if kind in _BACKEND_OF_TYPE:
        return _BACKEND_OF_TYPE[kind]
    from . import backends

    found = None
    for name in backends.BUILTIN:
        spec = backends.get(name)
        if spec.module in sys.modules and spec.is_array(array):
            found = spec
            break
    _BACKEND_OF_TYPE[kind] = found
    return found


def run(call: Call) -> Any:
    """Run ``call`` with the first native kernel that takes it, else generically."""
    spec = backend_for(call.a)
    for kernel in () if spec is None else spec.kernels:
        if kernel.op == call.op and kernel.declines(call) is None:
            return kernel.run(call)
    return GENERIC[call.op](call)
