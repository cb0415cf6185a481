"""Backend catalogue: one small declarative module per array library.

Installed as ``lse_dispatch.backends``.  Importing it imports no array library.

What a backend (built-in or third-party) declares, and what it may use:
``BackendSpec`` and ``Device``; ``Kernel`` with its ``Op`` and ``Priority``;
``state_kernels`` (the four kernels of an implementation that computes
states, finished by the shared finalisation); ``GENERIC``, the generic
implementation of each operation.
"""

from __future__ import annotations

import importlib

from lse_dispatch._generic import IMPLEMENTATIONS as GENERIC
from lse_dispatch._kernel import Kernel, Priority, state_kernels
from lse_dispatch._ops import Op

from ._spec import BackendSpec, Device

__all__ = [
    "BUILTIN",
    "GENERIC",
    "BackendSpec",
    "Device",
    "Kernel",
    "Op",
    "Priority",
    "get",
    "installed",
    "state_kernels",
]

#: Built-in backends, in the order reports list them.
BUILTIN: tuple[str, ...] = ("numpy", "array_api_strict", "torch", "jax", "cupy", "dask")


def get(name: str) -> BackendSpec:
    """The spec of the built-in backend ``name``."""
    if name not in BUILTIN:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BUILTIN)}")
    return _SPECS[name]


def installed() -> list[BackendSpec]:
    """Specs of the built-in backends whose library imports here."""
    return [spec for spec in map(get, BUILTIN) if spec.installed()]


# Spec modules are declarative and import no array library, so all of them are
# loaded here: a lookup is then a dict access, which torch.compile can trace
# (it cannot trace importlib on the first call inside a compiled function).
_SPECS: dict[str, BackendSpec] = {name: importlib.import_module(f"{__name__}.{name}").SPEC for name in BUILTIN}
