"""What a backend module declares."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AUTODIFF", "FLOAT64_LOG_SOFTMAX", "FLOAT64_SOFTMAX", "LOG_SOFTMAX", "BackendSpec", "Device", "declines_also"]

#: The name of the derivative-rule kernels (torch and JAX), which other
#: kernels' forwards are run without (``_dispatch.run_without``).
AUTODIFF = "autodiff"


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
        Native implementations the dispatcher may choose
        (:class:`~lse_dispatch._kernel.Kernel`, each with its priority).
    numerics
        The library's :class:`~lse_dispatch._numerics.Numerics`, where the
        shared math needs care on it (JAX, Dask); ``None`` for the defaults.
    decision_key
        Optional.  For a call without ``b`` and ``where``, a hashable
        holding everything about the input that the ``declines`` of this
        backend's kernels read besides its type, dtype, shape and reduced
        axes (layout, autograd state, ...), or ``None`` when the call's
        decision must not be reused.  With it the dispatcher decides once per
        such signature and reuses the kernel it chose until the catalogue
        changes (:func:`lse_dispatch._kernel.catalogue_changed`); without it
        (the default, and every plugin that does not declare one) every
        ``declines`` runs on every call.
    warm_up
        Optional.  Loads (or compiles) the backend's compiled kernels now,
        so that calls of every size take them, and returns the names of the
        kernels it loaded (none where they cannot load here: their compiler
        is not installed).  :func:`lse_dispatch.warm_up` calls it.
    """

    name: str
    module: str
    is_array: Callable[[Any], bool]
    namespace: Callable[[], Any]
    devices: Callable[[], list[Device]]
    dtypes: tuple[str, ...]
    to_numpy: Callable[[Any], Any]
    kernels: tuple = field(default=())
    numerics: Any = None
    decision_key: Callable[[Any], Any] | None = None
    warm_up: Callable[[], tuple[str, ...]] | None = None

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


#: Why a native softmax leaves float64 to the generic path: float64 softmax
#: needs the TwoSum-compensated exponent of the shared ``softmax_from_state``;
#: a plain ``exp((x - m) - log_norm)`` is about ``|log softmax| / 2`` ulps off.
FLOAT64_SOFTMAX = "float64 softmax: the compensated exponent is the generic path's"

#: Why a native log_softmax whose state terms are ``exp`` of a rounded
#: ``x - m`` leaves it to the generic path: the entry at a dominant max gets
#: ``-log1p(rest)``, as accurate as the rest's terms, and ``exp`` of a rounded
#: difference ``d`` is ``|d| / 2`` ulps off (measured 8.6 float32 ulps on
#: normal(0, 30) rows; 30 float64 ulps).  The shared state forms them exactly.
LOG_SOFTMAX = "log_softmax: the max's -log1p(rest) needs exp of the exact x - m (the shared state's)"

#: The same for a kernel that forms float32 terms in float64 but float64
#: terms without TwoSum.
FLOAT64_LOG_SOFTMAX = "float64 log_softmax: the max's -log1p(rest) needs the shared state's compensated terms"


def declines_also(
    declines: Callable[[Any], str | None], reason: str, *, dtype: str | None = None
) -> Callable[[Any], str | None]:
    """``declines``, plus ``reason`` for every call it takes (computing in ``dtype``, if given)."""

    def combined(call) -> str | None:
        first = declines(call)
        if first is None and (dtype is None or call.plan.compute == getattr(call.xp, dtype)):
            return reason
        return first

    return combined
