"""Backend catalogue: one small declarative module per array library.

Installed as ``lse_dispatch.backends``.  Importing it imports no array library.
"""

from __future__ import annotations

import importlib

from ._spec import BackendSpec, Device

__all__ = ["BUILTIN", "BackendSpec", "Device", "get", "installed"]

#: Built-in backends, in the order reports list them.
BUILTIN: tuple[str, ...] = ("numpy", "array_api_strict", "torch", "jax", "cupy", "dask")


def get(name: str) -> BackendSpec:
    """The spec of the built-in backend ``name``."""
    if name not in BUILTIN:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BUILTIN)}")
    return importlib.import_module(f"{__name__}.{name}").SPEC


def installed() -> list[BackendSpec]:
    """Specs of the built-in backends whose library imports here."""
    return [spec for spec in map(get, BUILTIN) if spec.installed()]
