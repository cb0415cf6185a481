"""Environment variables read on every call, without ``os.environ.get``'s cost.

``os.environ.get`` of a variable that is not set raises and catches a
``KeyError`` inside ``Mapping.get``: 0.7 us on this project's machine, paid by
every call that checks ``LSE_DISPATCH_BACKEND`` or ``TRITON_INTERPRET`` (a
tenth of a small call).  On POSIX ``os.environ`` keeps its variables in the
bytes-keyed dict ``os.environ._data``, which every change through
``os.environ`` (``monkeypatch.setenv`` included) updates and which a plain
``dict.get`` reads in 0.02 us.  Elsewhere, or if ``os.environ`` has been
replaced by an object without that dict, this is ``os.environ.get``.
"""

from __future__ import annotations

import os

__all__ = ["getenv"]

_KEYS: dict[str, bytes] = {}


def getenv(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``."""
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or type(data) is not dict:
        return os.environ.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.fsencode(name)
    value = data.get(key)
    return default if value is None else os.fsdecode(value)
