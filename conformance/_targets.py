"""Where checks run: one target per backend and device (plus NumPy read-only).

A target makes arrays of one library on one device from NumPy float64 data,
and copies results back.  Creation goes through the backend specs of
``lse_dispatch.backends``; nothing here knows a library's array type.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import backends as _backends

__all__ = ["Target", "discover", "select"]

#: Environment variables that narrow the targets (comma-separated patterns).
ENV_BACKENDS = "LSE_CONFORMANCE_BACKENDS"
ENV_DEVICE = "LSE_CONFORMANCE_DEVICE"


@dataclass(frozen=True)
class Target:
    """One backend on one device, e.g. ``torch:cpu`` or ``array_api_strict:device1``.

    ``readonly`` targets (NumPy only) hand out arrays whose ``writeable`` flag
    is off, so that every check also proves read-only input is accepted.
    """

    spec: Any
    device: Any
    readonly: bool = False

    @property
    def backend(self) -> str:
        return self.spec.name + (":readonly" if self.readonly else "")

    @property
    def label(self) -> str:
        if self.readonly:
            return f"{self.spec.name}:readonly"
        return f"{self.spec.name}:{self.device.label}"

    @property
    def xp(self):
        return self.spec.namespace()

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(d for d in ("float64", "float32", "float16", "bfloat16") if d in self.spec.dtypes)

    def prepare(self) -> None:
        """Library settings the suite needs: JAX computes float64 only with x64 on."""
        if self.spec.name == "jax":
            import jax

            jax.config.update("jax_enable_x64", True)

    def array(self, values, dtype: str):
        """``values`` (NumPy) as a ``dtype`` array of this target."""
        values = np.asarray(values, dtype=np.float64)
        if dtype == "bfloat16" and self.spec.name in ("numpy", "dask"):
            raise ValueError("bfloat16 is not a NumPy dtype")
        out = self.spec.from_numpy(values, dtype, self.device)
        if self.readonly:
            out.flags.writeable = False
        return out

    def bool_array(self, values):
        """A boolean array of this target (for ``where``)."""
        values = np.asarray(values, dtype=bool)
        if self.spec.name == "dask":
            return self.spec.from_numpy(values, "bool", self.device)
        xp = self.xp
        out = xp.asarray(values, device=self.device.device)
        if self.readonly:
            out.flags.writeable = False
        return out

    def to_numpy(self, x) -> np.ndarray:
        """Result ``x`` as NumPy float64 (bfloat16 goes through float32 exactly)."""
        return np.asarray(self.spec.to_numpy(x)).astype(np.float64)

    def owns(self, x) -> bool:
        """Whether ``x`` is an array of this target's library."""
        return bool(self.spec.is_array(x))


def discover() -> list[Target]:
    """Every installed backend on each of its devices, NumPy read-only included."""
    found: list[Target] = []
    for spec in _backends.installed():
        try:
            devices = spec.devices()
        except Exception:  # a library that imports but cannot list devices
            continue
        for device in devices:
            found.append(Target(spec, device))
            if spec.name == "numpy":
                found.append(Target(spec, device, readonly=True))
    return found


def _patterns(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _matches(target: Target, pattern: str) -> bool:
    """``numpy`` matches a backend on all its devices (read-only included);
    ``torch:cpu``, ``array_api_strict:device1`` or ``numpy:readonly`` one target."""
    if ":" in pattern:
        return fnmatch.fnmatchcase(target.label, pattern)
    return fnmatch.fnmatchcase(target.spec.name, pattern)


def select(backends: str | list[str] | None = None, device: str | None = None) -> list[Target]:
    """The discovered targets, narrowed by ``backends`` and ``device`` patterns.

    When an argument is ``None`` the environment variables
    ``LSE_CONFORMANCE_BACKENDS`` / ``LSE_CONFORMANCE_DEVICE`` apply.
    """
    if backends is None:
        backends = os.environ.get(ENV_BACKENDS)
    if device is None:
        device = os.environ.get(ENV_DEVICE)
    wanted = _patterns(backends) if isinstance(backends, str) or backends is None else list(backends)
    devices = _patterns(device)
    targets = discover()
    if wanted:
        unknown = [p for p in wanted if not any(_matches(t, p) for t in targets)]
        if unknown:
            known = ", ".join(t.label for t in targets)
            raise ValueError(f"backend pattern(s) {', '.join(unknown)} match no installed target; installed: {known}")
        targets = [t for t in targets if any(_matches(t, p) for p in wanted)]
    if devices:
        targets = [t for t in targets if any(fnmatch.fnmatchcase(t.device.label, d) for d in devices)]
    return targets
