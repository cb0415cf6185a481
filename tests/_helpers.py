"""Shared test helpers: the public functions by name, a tolerance unit, dtypes by name.

Running a catalogue case is ``lse_dispatch.cases.run_case`` (the runner that
``lse-dispatch report`` and the conformance suite use); ulps are
``lse_dispatch.oracle.ulp``.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import oracle

FUNCTIONS = {
    "logsumexp": lse_dispatch.logsumexp,
    "softmax": lse_dispatch.softmax,
    "log_softmax": lse_dispatch.log_softmax,
}


def ulp(value, dtype: str) -> np.ndarray:
    """One ulp of ``dtype`` at ``|value|``, the larger one at a binade edge.

    A result within k ulps of an exact value just above a power of two may
    itself sit just below it, where the spacing is half as large; taking the
    unit (``oracle.ulp``) a few ulps further out covers both sides.
    """
    eps = 2.0 ** (1 - oracle.FORMATS[oracle.dtype_name(dtype)][0])
    return oracle.ulp(np.abs(np.asarray(value, dtype=np.float64)) * (1 + 8 * eps), dtype)


def np_dtype(dtype: str):
    """The NumPy dtype of a dtype name (bfloat16 through ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def need_dtype(backend, dtype: str) -> None:
    """Skip unless ``backend`` (a test target) has ``dtype``."""
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.id} has no {dtype}")


INF, NAN = math.inf, math.nan
#: (input, logsumexp, softmax, log_softmax) of one line, exact: the contract's
#: limits, which every kernel is held to (padded with -inf by the callers).
LIMIT_ROWS = [
    ([INF, 1.0, INF], INF, [0.5, 0.0, 0.5], [-math.log(2), -INF, -math.log(2)]),
    ([-INF, -INF, -INF], -INF, [0.0, 0.0, 0.0], [-INF, -INF, -INF]),
    ([-INF, 0.0, -INF], 0.0, [0.0, 1.0, 0.0], [-INF, 0.0, -INF]),
    ([NAN, 0.0, 1.0], NAN, [NAN, NAN, NAN], [NAN, NAN, NAN]),
    ([INF, NAN, 0.0], NAN, [NAN, NAN, NAN], [NAN, NAN, NAN]),
    ([0.0, NAN, 1.0], NAN, [NAN, NAN, NAN], [NAN, NAN, NAN]),
    ([1.0e30, 1.0e30, -1.0e30], 1.0e30 + math.log(2), [0.5, 0.5, 0.0], [-math.log(2), -math.log(2), -2.0e30]),
]


class Adapter:
    """Gradients of a scalar function of arrays, in torch or JAX, as NumPy.

    Used by tests/test_autodiff.py and tests/test_semiring.py.
    """

    def __init__(self, name):
        self.name = name
        if name == "torch":
            self.torch = pytest.importorskip("torch")
        else:
            self.jax = pytest.importorskip("jax")
            self.jnp = pytest.importorskip("jax.numpy")

    def array(self, values, dtype="float64"):
        if self.name == "torch":
            return self.torch.tensor(values, dtype=getattr(self.torch, dtype))
        return self.jnp.asarray(values, dtype=getattr(self.jnp, dtype))

    def mask(self, values):
        return self.torch.tensor(values) if self.name == "torch" else self.jnp.asarray(values)

    def grad(self, fn, *arrays, argnums=(0,)):
        """``d fn / d arrays[i]`` for i in argnums, as NumPy arrays."""
        if self.name == "torch":
            leaves = [x.clone().requires_grad_(i in argnums) for i, x in enumerate(arrays)]
            out = fn(*leaves)
            grads = self.torch.autograd.grad(out, [leaves[i] for i in argnums])
            self.dtypes = [str(g.dtype).removeprefix("torch.") for g in grads]
            # NumPy has no bfloat16: widen it (exactly) for the comparisons.
            return [(g.float() if g.dtype == self.torch.bfloat16 else g).detach().numpy() for g in grads]
        # Under jit: one compilation instead of one per eager operation.
        grads = self.jax.jit(self.jax.grad(fn, argnums=argnums))(*arrays)
        self.dtypes = [str(g.dtype) for g in grads]
        return [np.asarray(g) for g in grads]

    def where(self, cond, x, y):
        return self.torch.where(cond, x, y) if self.name == "torch" else self.jnp.where(cond, x, y)

    def sum(self, x):
        return x.sum()


@contextlib.contextmanager
def fused_kernels_loaded():
    """The fused CPU kernels loaded where numba is (they then take small calls), and
    forgotten afterwards, so that other modules see the default of a fresh process;
    the dispatcher's reused decisions are dropped when the loaded dtypes go back."""
    from lse_dispatch import _kernel
    from lse_dispatch.backends import _fused_cpu

    seen = set(_fused_cpu._SIGNATURES_SEEN)
    if _fused_cpu.available():
        _fused_cpu.warm_up()
    try:
        yield
    finally:
        _fused_cpu._SIGNATURES_SEEN.clear()
        _fused_cpu._SIGNATURES_SEEN.update(seen)
        _kernel.catalogue_changed()


def in_threads(work, args) -> None:
    """``work(arg)`` for each of ``args``, each on a thread of its own, all at once;
    the first exception any of them raised is raised here, in the test's thread."""
    failures = []

    def run(arg):
        try:
            work(arg)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(arg,)) for arg in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
