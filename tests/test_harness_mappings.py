"""The suite's guard against XLA exhausting the process's memory mappings
(``tests/conftest.py``: a worker that compiled about 15,000 executables crashed
in XLA's compiler at Linux's vm.max_map_count)."""

from __future__ import annotations

import pytest

from .conftest import mapped_regions, release_jax_executables


def test_release_drops_compiled_executables_only_past_half_the_limit():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    if mapped_regions() is None:
        pytest.skip("no /proc/self/maps here")
    before = mapped_regions()
    for n in range(2, 42):  # 40 executables, each mapped apart
        jax.jit(lambda v: v * 2.0 + 1.0)(jnp.ones(n))
    grown = mapped_regions()
    added = grown - before
    assert added >= 40
    # Other mappings come and go meanwhile (a few at a time: threads, malloc
    # arenas), so "kept" and "dropped" are told apart by half of what was added.
    assert not release_jax_executables(limit=4 * grown)  # under half the limit: kept
    assert mapped_regions() > grown - added // 2
    assert release_jax_executables(limit=grown)  # past half: dropped
    assert mapped_regions() <= grown - added // 2
