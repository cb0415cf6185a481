"""What a backend module declares."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BackendSpec", "Device", "float64_log_softmax_declined", "float64_softmax_declined", "log_softmax_declined"]


@dataclass(frozen=True)
class Device:
    """One place a backend can hold arrays: a label and the device object."""

    label: str
    device: Any


@dataclass(frozen=True)
class BackendSpec:
    """A declarative description of one array library.

    Attributes
    ----------
    name
        Short name, as users pass it to ``use()`` and the CLIs.
    module
        Top-level import name; arrays are recognised only once it is in
        ``sys.modules``, so detection never imports the library.
    is_array
        Recognises this library's arrays (array-api-compat's checks).
    namespace
        Imports the library and returns its array-API namespace.
    devices
        The devices arrays can live on, in preference order; the first is the
        library's default.
    dtypes
        Names of the floating dtypes it offers.
    to_numpy
        Copies an array of this library to NumPy (host), for checking.
    kernels
        Native implementations the dispatcher may choose (dispatch issue).
    """

    name: str
    module: str
    is_array: Callable[[Any], bool]
    namespace: Callable[[], Any]
    devices: Callable[[], list[Device]]
    dtypes: tuple[str, ...]
    to_numpy: Callable[[Any], Any]
    kernels: tuple = field(default=())

    def installed(self) -> bool:
        """Whether the library imports here (this imports it)."""
        try:
            importlib.import_module(self.module)
        except Exception:  # a broken install is as good as none
            return False
        return True

    def from_numpy(self, array, dtype: str, device: Device):
        """``array`` (NumPy) as this library's array of ``dtype`` on ``device``."""
        xp = self.namespace()
        return xp.asarray(array, dtype=getattr(xp, dtype), device=device.device)


def float64_softmax_declined(declines: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """``declines`` for a native softmax that leaves float64 to the generic path.

    float64 softmax needs the TwoSum-compensated exponent of the shared
    ``softmax_from_state``; a plain ``exp((x - m) - log_norm)`` is about
    ``|log softmax| / 2`` ulps off, outside the 4-ulp contract.
    """

    def softmax_declines(call) -> str | None:
        reason = declines(call)
        if reason is None and call.plan.compute == call.xp.float64:
            return "float64 softmax: the compensated exponent is the generic path's"
        return reason

    return softmax_declines


def log_softmax_declined(declines: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """``declines`` for a native log_softmax whose state terms are ``exp`` of a rounded ``x - m``.

    The entry at a dominant max gets ``-log1p(rest)``, as accurate as the
    rest's terms; ``exp`` of a rounded difference ``d`` is ``|d| / 2`` ulps
    off (in the difference's dtype), so float32 terms formed in float32 and
    float64 terms formed without TwoSum miss the 4-ulp contract (measured 8.6
    float32 ulps on normal(0, 30) rows; 30 float64 ulps).  The shared state
    forms them exactly; such kernels leave log_softmax to the generic path.
    """

    def log_softmax_declines(call) -> str | None:
        reason = declines(call)
        if reason is None:
            return "log_softmax: the max's -log1p(rest) needs exp of the exact x - m (the shared state's)"
        return reason

    return log_softmax_declines


def float64_log_softmax_declined(declines: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """:func:`log_softmax_declined` for float64 only: the kernel forms float32 terms in float64."""

    def float64_log_softmax_declines(call) -> str | None:
        reason = declines(call)
        if reason is None and call.plan.compute == call.xp.float64:
            return "float64 log_softmax: the max's -log1p(rest) needs the shared state's compensated terms"
        return reason

    return float64_log_softmax_declines
