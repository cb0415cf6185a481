"""The ``backend`` fixture: every test runs on every array library and device.

Each parameter is a :class:`Backend`: the library's namespace, the device the
test's arrays live on, the dtypes it offers, and :meth:`Backend.call`, which
runs a function the way that variant demands:

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
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from lse_dispatch import backends

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


@functools.lru_cache(maxsize=None)
def _jitted(fn, static_kw: tuple):
    """One ``jax.jit`` per function and static arguments, so that traces are reused."""
    import jax

    static = dict(static_kw)
    return jax.jit(lambda args, kwargs: fn(*args, **kwargs, **static))


class ComputedTooEarly(AssertionError):
    """A Dask graph was computed inside the call under test."""


def _refuse_to_compute(dsk, keys, **kwargs):
    raise ComputedTooEarly("the Dask graph was computed before the test computed it")


@dataclass
class Backend:
    """One array library on one device, as a test sees it."""

    id: str
    spec: Any
    xp: Any
    device: Any  # backends.Device
    dtypes: tuple[str, ...]
    readonly: bool = False
    jit: bool = False
    x64: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def lazy(self) -> bool:
        return self.spec.name == "dask"

    @property
    def complex_dtypes(self) -> tuple[str, ...]:
        return ("complex64", "complex128") if "float64" in self.dtypes else ("complex64",)

    def dtype(self, name: str):
        """The library's dtype object called ``name``."""
        found = getattr(self.xp, name, None)
        if found is None and self.lazy:
            # Dask's array-API namespace omits float16, which its arrays hold.
            found = np.dtype(name)
        if found is None:
            raise AttributeError(f"{self.id} has no dtype {name}")
        return found

    def default_float(self):
        info = self.xp.__array_namespace_info__()
        try:
            return info.default_dtypes(device=self.device.device)["real floating"]
        except TypeError:
            return info.default_dtypes()["real floating"]

    def asarray(self, values, dtype: str | None = None):
        """``values`` (NumPy or nested lists) as this backend's array on its device.

        ``dtype`` is a dtype name; ``None`` keeps NumPy's (bool stays bool).
        """
        values = np.asarray(values)
        dtype = dtype or values.dtype.name
        if self.readonly:
            out = np.array(values, dtype=dtype if dtype != "bfloat16" else None)
            out.setflags(write=False)
            return out
        if dtype in ("bool",) or dtype.startswith(("int", "uint", "complex")):
            if self.lazy:
                import dask.array as da

                return da.from_array(values.astype(dtype), chunks=tuple(max(1, -(-n // 3)) for n in values.shape))
            return self.xp.asarray(values.astype(dtype), dtype=self.dtype(dtype), device=self.device.device)
        if dtype == "bfloat16":
            # NumPy has no bfloat16; go through float32, which holds every bfloat16.
            wide = self.spec.from_numpy(values.astype(np.float32), "float32", self.device)
            return self.xp.astype(wide, self.dtype("bfloat16"))
        return self.spec.from_numpy(values.astype(np.float64), dtype, self.device)

    def to_numpy(self, x) -> np.ndarray:
        """A NumPy copy of a result (computes Dask graphs)."""
        return np.asarray(self.spec.to_numpy(x))

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` under this variant's regime (jit, lazy)."""
        if self.jit:
            import jax

            is_traced = lambda v: isinstance(v, jax.Array)  # noqa: E731
            traced_args = tuple(a for a in args if is_traced(a))
            if len(traced_args) != len(args):
                return fn(*args, **kwargs)  # Python inputs: nothing to trace
            traced_kw = {k: v for k, v in kwargs.items() if is_traced(v)}
            static_kw = tuple(sorted((k, v) for k, v in kwargs.items() if not is_traced(v)))
            return _jitted(fn, static_kw)(traced_args, traced_kw)
        if self.lazy:
            import dask

            with dask.config.set(scheduler=_refuse_to_compute):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    def check_array(self, out, dtype, shape=None) -> None:
        """``out`` is in this backend's namespace, on its device, of ``dtype``."""
        import array_api_compat

        assert array_api_compat.array_namespace(out) is self.xp, type(out)
        assert array_api_compat.device(out) == self.device.device, (array_api_compat.device(out), self.device)
        want = self.dtype(dtype) if isinstance(dtype, str) else dtype
        assert out.dtype == want, (out.dtype, want)
        if shape is not None:
            assert tuple(out.shape) == tuple(shape)


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


def make_backend(variant_id: str, stack: contextlib.ExitStack) -> Backend:
    """Build the :class:`Backend` ``variant_id``; skips when it is unavailable here."""
    _, name, options = next(v for v in VARIANTS if v[0] == variant_id)
    pytest.importorskip(backends.get(name).module)
    if name == "jax":
        import jax

        # x64 is a scoped flag: entered for this test only, restored after it.
        stack.enter_context(jax.enable_x64(options.get("x64", False)))
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
    dtypes = spec.dtypes
    if name == "jax" and not options.get("x64"):
        dtypes = tuple(d for d in dtypes if d != "float64")
    return Backend(
        id=variant_id,
        spec=spec,
        xp=spec.namespace(),
        device=device,
        dtypes=tuple(dtypes),
        readonly=options.get("readonly", False),
        jit=options.get("jit", False),
        x64=options.get("x64", False),
    )


@pytest.fixture(params=BACKEND_IDS)
def backend(request):
    with contextlib.ExitStack() as stack:
        yield make_backend(request.param, stack)


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
