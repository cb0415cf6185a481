"""A place to run a check: one backend on one device, in one calling regime.

:class:`Target` is what ``lse-dispatch report``, the conformance suite and the
test suite's ``backend`` fixture all mean by "numpy", "torch:cuda" or
"jax:x64:jit": a :class:`~lse_dispatch.backends.BackendSpec` on one
:class:`~lse_dispatch.backends.Device`, plus how calls are made there:

* ``readonly`` (NumPy): every array handed out has ``writeable=False``;
* ``jit`` (JAX): calls are traced under ``jax.jit`` (array arguments traced,
  everything else static);
* ``x64`` (JAX): ``jax.enable_x64`` is entered by :meth:`Target.scope`;
* ``guard_compute`` (Dask): a call runs under a scheduler that raises, so a
  function that computes the graph before returning fails.

It makes arrays from NumPy data, copies results back, and says what is wrong
with a result's namespace, device, dtype or shape.  Nothing here imports an
array library until a method needs it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ._spec import BackendSpec, Device

__all__ = ["ComputedTooEarly", "Target", "refuse_to_compute"]


class ComputedTooEarly(AssertionError):
    """A Dask graph was computed inside the call under test."""


def refuse_to_compute(dsk, keys, **kwargs):
    """A Dask scheduler that raises :class:`ComputedTooEarly`."""
    raise ComputedTooEarly("the Dask graph was computed before the caller computed it")


@functools.cache
def _jitted(fn, static_kw: tuple):
    """One ``jax.jit`` per function and static arguments, so that traces are reused."""
    import jax

    static = dict(static_kw)
    return jax.jit(lambda args, kwargs: fn(*args, **kwargs, **static))


@dataclass(frozen=True)
class Target:
    """One backend on one device, in one calling regime (see the module docstring)."""

    spec: BackendSpec
    device: Device
    readonly: bool = False
    jit: bool = False
    x64: bool | None = None  # JAX only; None leaves the process's setting alone
    guard_compute: bool = False
    variant: str | None = None  # a name of its own, e.g. the test fixture's "jax:x64:jit"

    # -- names ----------------------------------------------------------------

    @property
    def name(self) -> str:
        """The backend's name: ``numpy``, ``torch``, ..."""
        return self.spec.name

    @property
    def label(self) -> str:
        """``backend:device``, or ``numpy:readonly``: what reports print and
        what ``--backends`` patterns match."""
        if self.readonly:
            return f"{self.spec.name}:readonly"
        return f"{self.spec.name}:{self.device.label}"

    @property
    def id(self) -> str:
        """The variant's own name where it has one, else :attr:`label`."""
        return self.variant or self.label

    def __str__(self) -> str:
        return self.id

    # -- what it offers ---------------------------------------------------------

    @property
    def xp(self):
        return self.spec.namespace()

    @property
    def lazy(self) -> bool:
        return self.spec.name == "dask"

    @property
    def dtypes(self) -> tuple[str, ...]:
        """Float dtypes, widest first; JAX without x64 has no float64."""
        order = ("float64", "float32", "float16", "bfloat16")
        found = tuple(d for d in order if d in self.spec.dtypes)
        if self.spec.name == "jax" and self.x64 is False:
            found = tuple(d for d in found if d != "float64")
        return found

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

    @contextlib.contextmanager
    def scope(self) -> Iterator[Target]:
        """The library settings this target needs, for the duration of a block
        (JAX's x64 flag); restored afterwards."""
        if self.spec.name != "jax" or self.x64 is None:
            yield self
            return
        import jax

        with jax.enable_x64(self.x64):
            yield self

    # -- arrays in, results out ---------------------------------------------------

    def asarray(self, values, dtype: str | None = None):
        """``values`` (NumPy or nested lists) as this target's array.

        ``dtype`` is a dtype name; ``None`` keeps NumPy's (bool stays bool).
        Float values are taken as float64 and must be exactly representable
        in ``dtype`` where that matters (see ``oracle.round_to``).
        """
        values = np.asarray(values)
        dtype = dtype or values.dtype.name
        if self.readonly:
            out = np.array(values, dtype=dtype)
            out.setflags(write=False)
            return out
        if dtype == "bool" or dtype.startswith(("int", "uint", "complex")):
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
        """A NumPy copy of a result (computes Dask graphs; bfloat16 comes back
        as float32, which holds it exactly)."""
        return np.asarray(self.spec.to_numpy(x))

    def owns(self, x) -> bool:
        """Whether ``x`` is an array of this target's library."""
        return bool(self.spec.is_array(x))

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` under this target's regime (jit, guarded compute)."""
        if self.jit:
            import jax

            is_traced = lambda v: isinstance(v, jax.Array)  # noqa: E731
            traced_args = tuple(a for a in args if is_traced(a))
            if len(traced_args) != len(args):
                return fn(*args, **kwargs)  # Python inputs: nothing to trace
            traced_kw = {k: v for k, v in kwargs.items() if is_traced(v)}
            static_kw = tuple(sorted((k, v) for k, v in kwargs.items() if not is_traced(v)))
            return _jitted(fn, static_kw)(traced_args, traced_kw)
        if self.guard_compute and self.lazy:
            import dask

            with dask.config.set(scheduler=refuse_to_compute):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    def mismatch(self, out, dtype, shape: tuple | None = None) -> str | None:
        """What is wrong with result ``out``: not an array of this library, on
        another device, of another dtype or shape; ``None`` if nothing."""
        import array_api_compat

        if not self.owns(out):
            return f"result is a {type(out).__module__}.{type(out).__name__}, not an array of {self.spec.name}"
        if array_api_compat.array_namespace(out) is not self.xp:
            return f"result's namespace is {array_api_compat.array_namespace(out).__name__}, not {self.xp.__name__}"
        device = array_api_compat.device(out)
        if device != self.device.device:
            return f"result on device {device!r}, expected {self.device.device!r}"
        want = self.dtype(dtype) if isinstance(dtype, str) else dtype
        if out.dtype != want:
            return f"result dtype {out.dtype}, expected {want}"
        if shape is not None and tuple(out.shape) != tuple(shape):
            return f"result shape {tuple(out.shape)}, expected {tuple(shape)}"
        return None

    def check_array(self, out, dtype, shape: tuple | None = None) -> None:
        """Raise ``AssertionError`` with :meth:`mismatch`'s message, if any."""
        problem = self.mismatch(out, dtype, shape)
        assert problem is None, f"{self.id}: {problem}"
