"""``lse_dispatch._env.getenv``: ``os.environ.get`` without its cost on a missing variable."""

from __future__ import annotations

import os

from lse_dispatch import _env


def test_getenv_follows_every_change_made_through_os_environ(monkeypatch):
    name = "LSE_DISPATCH_TEST_VARIABLE"
    monkeypatch.delenv(name, raising=False)
    assert _env.getenv(name) is None and _env.getenv(name, "d") == "d"
    monkeypatch.setenv(name, "numpy.fused")
    assert _env.getenv(name) == "numpy.fused"
    os.environ[name] = "caf\u00e9"
    assert _env.getenv(name) == os.environ.get(name) == "caf\u00e9"
    del os.environ[name]
    assert _env.getenv(name, "gone") == "gone"


def test_getenv_reads_a_replaced_environ(monkeypatch):
    """An ``os.environ`` replaced by a plain mapping (no ``_data``) is read as it is
    (replaced for ``_env`` alone, not for the whole test process)."""
    import types

    fake = types.SimpleNamespace(name="posix", environ={"LSE_DISPATCH_TEST_VARIABLE": "x"},
                                 fsencode=os.fsencode, fsdecode=os.fsdecode)
    monkeypatch.setattr(_env, "os", fake)
    assert _env.getenv("LSE_DISPATCH_TEST_VARIABLE") == "x"
    assert _env.getenv("LSE_DISPATCH_MISSING", "y") == "y"


def test_the_dispatcher_sees_the_environment_variable(monkeypatch):
    import numpy as np

    import lse_dispatch

    monkeypatch.setenv("LSE_DISPATCH_BACKEND", "generic")
    with lse_dispatch.trace() as seen:
        lse_dispatch.softmax(np.arange(3.0))
    assert seen.records[0].implementation == "generic"
    assert seen.records[0].source == "LSE_DISPATCH_BACKEND"
