"""Accuracy of logcumsumexp and logmatmulexp against what people use today, on the issue's hard cases.

Worst error over all entries in ulps of the dtype, against the mpmath oracle
(``lse_dispatch.oracle``); ``-inf``/NaN where a result is non-finite and
the exact value is not (or the other way round) show as ``inf``.  Prints a
Markdown table.

    python benchmarks/semiring_accuracy.py

Compared: ``np.logaddexp.accumulate``, ``torch.logcumsumexp``,
``jax.lax.cumlogsumexp`` (JAX with x64); for the product, the "scaled exp
then matmul" idiom (row max of ``a`` and column max of ``b`` subtracted,
exponentials multiplied, log taken, maxima added back) in torch.
"""

from __future__ import annotations

import math

import numpy as np

from lse_dispatch import logcumsumexp, logmatmulexp, oracle
from lse_dispatch.cases import round_to

inf = math.inf


def scan_cases():
    rng = np.random.default_rng(0)
    yield "[0, -40, -80] (tiny tail)", np.array([0.0, -40.0, -80.0])
    yield "2**16 entries, 3 + N(0, 1)", 3 + rng.standard_normal(2**16)
    yield "1e4 + N(0, 1), 200 entries", 1e4 + rng.standard_normal(200)
    yield "-inf entries and prefix", np.concatenate([[-inf, -inf], 3 * rng.random(50), [-inf], 3 * rng.random(50)])
    yield "increasing 0.5..40, 500 entries", np.linspace(0.5, 40.0, 500)


def product_cases():
    rng = np.random.default_rng(1)
    yield "issue example", np.array([[0.0, -2000.0], [-2000.0, 0.0]]), np.array([[-2000.0, 0.0], [0.0, -2000.0]])
    a = np.full((4, 40), -30.0)
    a[:, 3] = 0.0
    b = np.full((40, 5), -30.0)
    b[3] = 0.0
    yield "one dominant pair (result 1.7e-25)", a, b
    yield "wide range, 300 N(0, 1)", 300 * rng.standard_normal((6, 40)), 300 * rng.standard_normal((40, 5))
    yield "1e4 + N(0, 1)", 1e4 + rng.standard_normal((6, 30)), 1e4 + rng.standard_normal((30, 5))
    yield "k = 4096, U(2, 3)", 2 + rng.random((3, 4096)), 2 + rng.random((4096, 2))


def _worst(got, exact, dtype) -> float:
    errors = oracle.ulp_error(np.asarray(got, dtype=np.float64), exact, dtype)
    return float(np.max(errors))


def _scan_natives():
    found = {"np.logaddexp.accumulate": lambda x: np.logaddexp.accumulate(x)}
    try:
        import torch

        found["torch.logcumsumexp"] = lambda x: (
            torch.logcumsumexp(torch.from_numpy(x), 0).numpy() if x.dtype != np.float16 else None
        )
    except ImportError:
        pass
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        found["jax.lax.cumlogsumexp"] = lambda x: np.asarray(jax.lax.cumlogsumexp(jnp.asarray(x)))
    except ImportError:
        pass
    return found


def main() -> int:
    natives = _scan_natives()
    print("| logcumsumexp case | dtype | lse_dispatch | " + " | ".join(natives) + " |")
    print("|---|---|---:|" + "---:|" * len(natives))
    for name, values in scan_cases():
        for dtype in (np.float64, np.float32, np.float16):
            x = round_to(values, np.dtype(dtype).name).astype(dtype)
            exact = oracle.exact_logcumsumexp(x.astype(np.float64))
            cells = [f"{_worst(logcumsumexp(x), exact, dtype):.3g}"]
            for fn in natives.values():
                got = fn(x)
                cells.append("n/a" if got is None else f"{_worst(got, exact, dtype):.3g}")
            print(f"| {name} | {np.dtype(dtype).name} | " + " | ".join(cells) + " |")
    print()
    try:
        import torch
    except ImportError:
        torch = None
    header = "| logmatmulexp case | dtype | lse_dispatch |" + (" scaled idiom (torch) |" if torch else "")
    print(header)
    print("|---|---|---:|" + ("---:|" if torch else ""))
    for name, a, b in product_cases():
        for dtype in (np.float64, np.float32):
            a_d = round_to(a, np.dtype(dtype).name).astype(dtype)
            b_d = round_to(b, np.dtype(dtype).name).astype(dtype)
            exact = oracle.exact_logmatmulexp(a_d.astype(np.float64), b_d.astype(np.float64))
            cells = [f"{_worst(logmatmulexp(a_d, b_d), exact, dtype):.3g}"]
            if torch is not None:
                ta, tb = torch.from_numpy(a_d), torch.from_numpy(b_d)
                scaled_a = torch.exp(ta - ta.max(-1, keepdim=True).values)
                idiom = torch.log(scaled_a @ torch.exp(tb - tb.max(-2, keepdim=True).values))
                idiom = idiom + ta.max(-1, keepdim=True).values + tb.max(-2, keepdim=True).values
                cells.append(f"{_worst(idiom.numpy(), exact, dtype):.3g}")
            print(f"| {name} | {np.dtype(dtype).name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
