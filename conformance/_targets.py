"""Where checks run: one target per backend and device (plus NumPy read-only).

A target (:class:`lse_dispatch.backends._target.Target`, the type the report
and the test suite use too) makes arrays of one library on one device from
NumPy float64 data, and copies results back.  JAX targets run with x64 on,
so that float64 is checked; nothing here knows a library's array type.
"""

from __future__ import annotations

import fnmatch
import os

from .. import backends as _backends
from ..backends._target import Target

__all__ = ["Target", "discover", "select"]

#: Environment variables that narrow the targets (comma-separated patterns).
ENV_BACKENDS = "LSE_CONFORMANCE_BACKENDS"
ENV_DEVICE = "LSE_CONFORMANCE_DEVICE"


def discover() -> list[Target]:
    """Every installed backend on each of its devices, NumPy read-only included."""
    found: list[Target] = []
    for spec in _backends.installed():
        try:
            devices = spec.devices()
        except Exception:  # a library that imports but cannot list devices
            continue
        for device in devices:
            found.append(Target(spec, device, x64=True if spec.name == "jax" else None))
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
