"""The ``backend`` fixture: every test runs on every array library and device.

Each parameter is a :class:`~lse_dispatch.backends._target.Target` (the type
``lse-dispatch report`` and the conformance suite use too): the library's
namespace, the device the test's arrays live on, the dtypes it offers, and
``call``, which runs a function the way that variant demands:

* ``jax:jit`` / ``jax:x64:jit`` / ``jax:gpu`` trace it under ``jax.jit`` (array
  arguments traced, everything else static);
* ``dask`` runs it under a scheduler that raises, so a graph computed before
  the test itself computes fails the test (array-api-extra does the same);
* ``numpy:readonly`` hands out arrays with ``writeable=False``;
* ``array_api_strict:device1`` puts every array on a non-default device.

GPU variants (``torch:cuda``, ``jax:gpu``, ``cupy``) skip cleanly where the
library or the device is missing.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

from lse_dispatch import backends
from lse_dispatch.backends._target import ComputedTooEarly, Target, refuse_to_compute

__all__ = ["Backend", "ComputedTooEarly", "make_backend"]

# Reproducible property tests: the same examples on every run and machine.
# The backend fixture is function-scoped but stateless between examples
# (jax:x64's flag is entered once around the whole test).
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# The fixture's arrays and calls: one backend on one device in one regime.
# ``Backend`` is the name the tests use for the shared target type.
Backend = Target
_refuse_to_compute = refuse_to_compute


def _jax_gpu_device():
    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        pytest.skip("JAX sees no GPU")
    return backends.Device("gpu", gpus[0])


# (fixture id, backend name, variant)
VARIANTS = [
    ("numpy", "numpy", {}),
    ("numpy:readonly", "numpy", {"readonly": True}),
    ("array_api_strict", "array_api_strict", {}),
    ("array_api_strict:device1", "array_api_strict", {"device": "device1"}),
    ("torch", "torch", {}),
    ("torch:cuda", "torch", {"device": "cuda"}),
    ("jax", "jax", {}),
    ("jax:jit", "jax", {"jit": True}),
    ("jax:x64", "jax", {"x64": True}),
    ("jax:x64:jit", "jax", {"x64": True, "jit": True}),
    ("jax:gpu", "jax", {"device": "gpu", "x64": True, "jit": True}),
    ("dask", "dask", {}),
    ("cupy", "cupy", {"device": "cuda"}),
]

# jax:jit (float32 without x64, under jit) doubles the JAX compile time of the
# suite; it runs when LSE_TEST_ALL_VARIANTS=1.  jax:x64:jit covers jit in
# every dtype (float16, bfloat16, float32 and float64) by default.
_OPT_IN = {"jax:jit"}
BACKEND_IDS = [
    variant[0] for variant in VARIANTS if variant[0] not in _OPT_IN or os.environ.get("LSE_TEST_ALL_VARIANTS") == "1"
]


def make_backend(variant_id: str, stack: contextlib.ExitStack) -> Target:
    """Build the target ``variant_id``; skips when it is unavailable here."""
    _, name, options = next(v for v in VARIANTS if v[0] == variant_id)
    pytest.importorskip(backends.get(name).module)
    spec = backends.get(name)
    wanted = options.get("device")
    if name == "jax" and wanted == "gpu":
        device = _jax_gpu_device()
    else:
        try:
            devices = spec.devices()
        except Exception as exc:  # e.g. CuPy without a driver
            pytest.skip(f"{name}: no devices ({exc})")
        matching = [d for d in devices if wanted is None or d.label == wanted]
        if not matching:
            pytest.skip(f"{name} has no device {wanted!r} here")
        device = matching[0]
    target = Target(
        spec,
        device,
        readonly=options.get("readonly", False),
        jit=options.get("jit", False),
        # x64 is a scoped flag: entered for this test only, restored after it.
        x64=options.get("x64", False) if name == "jax" else None,
        guard_compute=name == "dask",
        variant=variant_id,
    )
    stack.enter_context(target.scope())
    return target


@pytest.fixture(params=BACKEND_IDS)
def backend(request):
    with contextlib.ExitStack() as stack:
        yield make_backend(request.param, stack)


@pytest.fixture(autouse=True)
def _no_declined_work():
    """Each test starts where a fresh process does: the small calls that earlier
    tests made do not add up to loading the fused kernels in this one
    (``_fused_cpu.CUMULATIVE_ELEMENTS``)."""
    from lse_dispatch.backends import _fused_cpu

    _fused_cpu._DECLINED_WORK.clear()
    _fused_cpu._DECLINED_SECONDS.clear()
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "long: the 2**20-entry accuracy cases (slowest oracle and graphs)")


# Known failures of the core, by test name: each is marked xfail(strict=True)
# with its reason, so that a fix shows up as an XPASS failure.  Empty since
# the JAX accuracy fixes (log1p under jit, optimization barriers) landed.
KNOWN_FAILURES: dict[str, str] = {}


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = KNOWN_FAILURES.get(item.name)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))


# XLA maps every executable it compiles into regions of its own (code,
# read-only data, data: three mappings) and JAX keeps them for the life of the
# process.  One pytest worker compiles about 15,000 over the suite (the eager
# JAX path compiles each primitive for each shape and dtype), and at Linux's
# default vm.max_map_count of 65530 the next mapping fails and XLA's compiler
# crashes the worker with a segfault in backend_compile_and_load.  So every
# CHECK_EVERY tests the worker counts its mappings and drops JAX's caches once
# they pass half of the limit.  Nothing a test measures crosses a test's end.
CHECK_EVERY = 50
_tests_since_check = 0


def mapped_regions() -> int | None:
    """This process's memory mappings (None where /proc does not say)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


@functools.cache
def mapping_limit() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return None


def release_jax_executables(limit: int | None) -> bool:
    """Drop JAX's compiled executables if the mappings pass half of ``limit``."""
    jax = sys.modules.get("jax")
    if jax is None or limit is None:
        return False
    count = mapped_regions()
    if count is None or count < limit // 2:
        return False
    jax.clear_caches()
    gc.collect()
    return True


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    global _tests_since_check
    _tests_since_check += 1
    if _tests_since_check >= CHECK_EVERY:
        _tests_since_check = 0
        release_jax_executables(mapping_limit())


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Skips counted by reason on one line (``-rs`` would list each one):
    most are a backend, device or dtype this machine does not have."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped or "s" in (config.option.reportchars or "").replace("a", "s"):
        return
    counts: dict[str, int] = {}
    for report in skipped:
        reason = _skip_reason(report)
        counts[reason] = counts.get(reason, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    shown = "; ".join(f"{n} {reason}" for reason, n in ranked[:8])
    rest = f"; {len(ranked) - 8} more reasons (pytest -rs lists every skip)" if len(ranked) > 8 else ""
    terminalreporter.write_line(f"skipped by reason: {shown}{rest}")
