"""Differential fuzzing of complex logsumexp with weights against mpmath.

    python benchmarks/fuzz_complex.py [--library numpy|torch|jax] [--draws 3000] [--seed 0] [--show 3]

Draws 1 to 5 entries of complex128 or complex64: ``a`` real or complex
(real parts up to the dtype's ``exp`` range, some scaled toward 0), ``b``
complex with magnitudes from the subnormal range to near the largest float
and random phases.  Prints the worst errors: the real part's in units of
``eps * max(1, |log|S||)``, the phase's in ``eps`` (radians), whichever is
larger, with the input.  A result that is not finite where ``log|S|`` is
counts as infinitely wrong.  JAX runs with x64 (both dtypes), eagerly.

It found the complex weights fixed on 2026-11-30 (NaN on NumPy for subnormal
weights, flushed terms on JAX, ``|b|`` overflowing) and the rounding of
``Re a - m`` in the complex terms (86 eps at seed 3, fixed the same day with
TwoSum); what remains on JAX is the rounding of ``log|b|`` in the form its
flushing of subnormals needs for huge weights (15 eps at seed 3).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np


def _library(name: str):
    """``(to_library, from_library)`` converters for ``name``."""
    if name == "torch":
        import torch

        return (lambda x: torch.from_numpy(np.ascontiguousarray(x))), (lambda t: t.numpy())
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return jnp.asarray, np.asarray
    return (lambda x: x), np.asarray


def _draw(rng):
    n = int(rng.integers(1, 6))
    dtype = rng.choice([np.complex128, np.complex64])
    wide = dtype == np.complex128
    big = 700 if wide else 85
    a = rng.uniform(-big, big, n) * rng.choice([0, 1, 1e-3], n)
    if rng.random() < 0.5:
        a = a + 1j * rng.uniform(-10, 10, n)
    magnitude = 10.0 ** rng.uniform(-322 if wide else -44, 300 if wide else 37, n)
    b = (magnitude * np.exp(1j * rng.uniform(-np.pi, np.pi, n))).astype(dtype)
    real = np.float64 if wide else np.float32
    return a.astype(dtype if np.iscomplexobj(a) else real), b, real


def _exact(a, b):
    """``(log|S|, arg S)`` of ``S = sum b e^a`` (mpmath, 60 digits), or ``None`` for ``S = 0``."""
    import mpmath

    mpmath.mp.dps = 60
    total = mpmath.fsum(mpmath.mpc(complex(w)) * mpmath.exp(mpmath.mpc(complex(x))) for x, w in zip(a, b))
    if total == 0:
        return None
    return float(mpmath.log(abs(total))), float(mpmath.arg(total))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=("numpy", "torch", "jax"), default="numpy")
    parser.add_argument("--draws", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=3, help="how many of the worst inputs to print")
    args = parser.parse_args(argv)
    from lse_dispatch import logsumexp

    to_library, from_library = _library(args.library)
    rng = np.random.default_rng(args.seed)
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(args.draws):
            a, b, real = _draw(rng)
            exact = _exact(a, b)
            if exact is None:
                continue
            log_abs, angle = exact
            got = complex(from_library(logsumexp(to_library(a), b=to_library(b))))
            eps = float(np.finfo(real).eps)
            if not (np.isfinite(got.real) and np.isfinite(got.imag)):
                found.append((np.inf, a, b, got, complex(log_abs, angle)))
                continue
            phase = abs(got.imag - angle)
            phase = min(phase, abs(phase - 2 * np.pi))
            error = max(abs(got.real - log_abs) / (eps * max(1.0, abs(log_abs))), phase / eps)
            found.append((error, a, b, got, complex(log_abs, angle)))
    found.sort(key=lambda item: -item[0])
    print(f"{args.library}, seed {args.seed}, {args.draws} draws: worst {found[0][0]:.3g} eps")
    for error, a, b, got, exact in found[: args.show]:
        print(f"  {error:.3g} eps: a={a.tolist()} b={b.tolist()} got={got} exact={exact}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
