"""Accuracy side by side: lse_dispatch against SciPy, PyTorch and JAX.

Prints the README's comparison table (Markdown): the first entry's value and
the worst error over all entries, in ulps of the case's dtype.  Every figure is measured
here, against the mpmath oracle, on the cases the core issue names.

    .venv/bin/python benchmarks/compare_accuracy.py
"""

from __future__ import annotations

import math

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import scipy.special  # noqa: E402
import torch  # noqa: E402

import lse_dispatch  # noqa: E402
from lse_dispatch import oracle  # noqa: E402


def _lse_cases():
    zeros16 = np.zeros(70_000, dtype=np.float16)
    strided = np.random.default_rng(10).normal(size=(2**20, 2)).astype(np.float32)
    return [
        ("logsumexp([0, -40]), float64", np.array([0.0, -40.0]), None, None, np.float64),
        ("logsumexp([0, -800], b=[1e-300, 1e300]), float64",
         np.array([0.0, -800.0]), np.array([1e-300, 1e300]), None, np.float64),
        ("logsumexp of 70,000 zeros, float16", zeros16, None, None, np.float16),
        ("logsumexp down axis 0 of a (2**20, 2) array, float32", strided, None, 0, np.float32),
        ("logsumexp([0, -1] + [-37] * 100000), float64", np.concatenate([[0.0, -1.0], np.full(100_000, -37.0)]),
         None, None, np.float64),
    ]


def _ours(a, b, axis):
    return np.asarray(lse_dispatch.logsumexp(a, b=b, axis=axis), dtype=np.float64)


def _scipy(a, b, axis):
    with np.errstate(over="ignore"):  # its float16 sum overflows: that is the finding
        return np.asarray(scipy.special.logsumexp(a, b=b, axis=axis), dtype=np.float64)


def _torch(a, b, axis):
    t = torch.from_numpy(a)
    dim = tuple(range(a.ndim)) if axis is None else axis
    if b is not None:  # torch.logsumexp has no weights: the documented idiom
        t = t + torch.log(torch.from_numpy(b))
    return np.asarray(torch.logsumexp(t, dim=dim).numpy(), dtype=np.float64)


def _jax(a, b, axis):
    return np.asarray(jax.nn.logsumexp(jnp.asarray(a), axis=axis, b=None if b is None else jnp.asarray(b)), dtype=np.float64)


def _cell(got, exact, dtype) -> str:
    errors = oracle.ulp_error(got, exact, dtype)
    worst = float(np.max(errors))
    shown = float(np.ravel(got)[0])
    if worst <= 4:
        return f"{shown:.6g} ({worst:.2g} ulp)"
    return f"**{shown:.6g}** ({worst:.2g} ulp)" if math.isfinite(worst) else f"**{shown:.6g}** (wrong)"


def main() -> None:
    impls = [("lse_dispatch", _ours), ("scipy.special", _scipy), ("torch", _torch), ("jax.nn", _jax)]
    print("| case | exact | " + " | ".join(name for name, _ in impls) + " |")
    print("|---|---|" + "---|" * len(impls))
    for label, a, b, axis, dtype in _lse_cases():
        exact = oracle.exact_logsumexp(a, axis=axis, b=b)
        shown_exact = float(np.ravel(exact)[0])
        cells = [_cell(fn(a, b, axis), exact, dtype) for _, fn in impls]
        print(f"| {label} | {shown_exact:.6g} | " + " | ".join(cells) + " |")
    x = np.array([0.0, -40.0])
    exact = oracle.exact_log_softmax(x)[:1]
    got = {
        "lse_dispatch": lse_dispatch.log_softmax(x)[:1],
        "scipy.special": scipy.special.log_softmax(x)[:1],
        "torch": torch.log_softmax(torch.from_numpy(x), 0).numpy()[:1],
        "jax.nn": np.asarray(jax.nn.log_softmax(jnp.asarray(x)))[:1],
    }
    cells = [_cell(np.asarray(got[name], dtype=np.float64), exact, np.float64) for name, _ in impls]
    print(f"| log_softmax([0, -40])[0], float64 | {float(exact[0]):.6g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
