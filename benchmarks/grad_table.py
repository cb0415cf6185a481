"""The differentiation table: the same cases side by side, measured here.

Columns: the analytic value, lse_dispatch under torch autograd and under
jax.grad, torch's and JAX's own functions, and SciPy's.  SciPy has no
autodiff of its own; its column is ``scipy.special`` run on JAX arrays in
array-API mode (``SCIPY_ARRAY_API=1``) and differentiated by ``jax.grad``,
which is how SciPy's functions get differentiated in practice (on torch
tensors its ``logsumexp`` backward fails with an in-place-modification
error).  Float64 everywhere.  Writes Markdown to stdout:

    python benchmarks/grad_table.py > /tmp/table.md
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("SCIPY_ARRAY_API", "1")  # before SciPy is imported

import numpy as np

inf = math.inf


def _cases():
    import jax
    import jax.numpy as jnp
    import scipy.special as sps
    import torch
    import torch.func

    import lse_dispatch as ld

    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    j = lambda v: jnp.asarray(v, dtype=jnp.float64)  # noqa: E731

    def tgrad(fn, *args, argnum=0):
        leaves = [t(a).requires_grad_(i == argnum) for i, a in enumerate(args)]
        (g,) = torch.autograd.grad(fn(*leaves), [leaves[argnum]])
        return g.numpy()

    def jgrad(fn, *args, argnum=0):
        return np.asarray(jax.grad(fn, argnums=argnum)(*[j(a) for a in args]))

    def softmax_of(x):
        e = np.exp(np.asarray(x) - max(x))
        return e / e.sum()

    cases = []

    def lse_case(label, x, expected):
        cases.append((label, expected, {
            "ld-torch": lambda: tgrad(lambda a: ld.logsumexp(a), x),
            "ld-jax": lambda: jgrad(lambda a: ld.logsumexp(a), x),
            "torch": lambda: tgrad(lambda a: torch.logsumexp(a, 0), x),
            "jax": lambda: jgrad(lambda a: jax.nn.logsumexp(a), x),
            "scipy": lambda: jgrad(lambda a: sps.logsumexp(a), x),
        }))

    lse_case("d lse/dx, x = [1, 2, 3]", [1.0, 2.0, 3.0], softmax_of([1.0, 2.0, 3.0]))
    lse_case("d lse/dx, x = [1e4, 1e4 - 1]", [1e4, 1e4 - 1], softmax_of([1.0, 0.0]))
    lse_case("d lse/dx, x = [-inf, -inf]", [-inf, -inf], [0.0, 0.0])
    lse_case("d lse/dx, x = [inf, 0]", [inf, 0.0], [1.0, 0.0])
    lse_case("d lse/dx, x = [inf, inf, 0]", [inf, inf, 0.0], [0.5, 0.5, 0.0])
    lse_case("d lse/dx, x = [0, -inf]", [0.0, -inf], [1.0, 0.0])

    def masked_case(label, x, mask, expected):
        m_t, m_j = torch.tensor(mask), jnp.asarray(mask)
        weights = np.asarray(mask, dtype=float)
        cases.append((label, expected, {
            "ld-torch": lambda: tgrad(lambda a: ld.logsumexp(a, where=m_t), x),
            "ld-jax": lambda: jgrad(lambda a: ld.logsumexp(a, where=m_j), x),
            # torch has no where/b: the usual idiom fills masked entries with -inf.
            "torch": lambda: tgrad(lambda a: torch.logsumexp(a.masked_fill(~m_t, -inf), 0), x),
            "jax": lambda: jgrad(lambda a: jax.nn.logsumexp(a, where=m_j), x),
            # SciPy has no where: masking is b = 0.
            "scipy": lambda: jgrad(lambda a: sps.logsumexp(a, b=j(weights)), x),
        }))

    masked_case("d lse/dx, x = [0, 1e308, 1], where = [T, F, T]", [0.0, 1e308, 1.0], [True, False, True],
                [softmax_of([0.0, 1.0])[0], 0.0, softmax_of([0.0, 1.0])[1]])
    masked_case("d lse/dx, x = [1, 2], where = [F, F]", [1.0, 2.0], [False, False], [0.0, 0.0])

    ab, bb = [0.0, 1.0], [1.0, 0.0]
    cases.append(("d lse/db, x = [0, 1], b = [1, 0]", [1.0, math.e], {
        "ld-torch": lambda: tgrad(lambda x, y: ld.logsumexp(x, b=y), ab, bb, argnum=1),
        "ld-jax": lambda: jgrad(lambda x, y: ld.logsumexp(x, b=y), ab, bb, argnum=1),
        "torch": None,
        "jax": lambda: jgrad(lambda x, y: jax.nn.logsumexp(x, b=y), ab, bb, argnum=1),
        "scipy": lambda: jgrad(lambda x, y: sps.logsumexp(x, b=y), ab, bb, argnum=1),
    }))

    # Each case gets its own names: the lambdas run later, after all cases are built.
    xs, c, mask = [0.0, 1.0, 0.0], [1.0, 2.0, 3.0], [True, True, False]
    y = np.append(softmax_of([0.0, 1.0]), 0.0)
    m_t, m_j = torch.tensor(mask), jnp.asarray(mask)
    cases.append(("d sum(c softmax(x))/dx, x = [0, 1, 0], c = [1, 2, 3], where = [T, T, F]",
                  y * (np.array(c) - (np.array(c) * y).sum()), {
        "ld-torch": lambda: tgrad(lambda a: (ld.softmax(a, where=m_t) * t(c)).sum(), xs),
        "ld-jax": lambda: jgrad(lambda a: (ld.softmax(a, where=m_j) * j(c)).sum(), xs),
        "torch": lambda: tgrad(lambda a: (torch.softmax(a.masked_fill(~m_t, -inf), 0) * t(c)).sum(), xs),
        "jax": lambda: jgrad(lambda a: (jax.nn.softmax(a, where=m_j) * j(c)).sum(), xs),
        "scipy": None,
    }))

    # log of a softmax, summed over the included entries: the where hands log a
    # zero cotangent at the masked entry, whose backward (0 / 0) is NaN.
    xm, keep = [0.0, 5.0, 1.0], [True, False, True]
    k_t, k_j = torch.tensor(keep), jnp.asarray(keep)
    pm = softmax_of([0.0, 1.0])
    cases.append(("d sum(where(m, log softmax(x, where=m), 0))/dx, x = [0, 5, 1], m = [T, F, T]",
                  [1 - 2 * pm[0], 0.0, 1 - 2 * pm[1]], {
        "ld-torch": lambda: tgrad(lambda a: torch.where(k_t, torch.log(ld.softmax(a, where=k_t)), 0.0).sum(), xm),
        "ld-jax": lambda: jgrad(lambda a: jnp.where(k_j, jnp.log(ld.softmax(a, where=k_j)), 0.0).sum(), xm),
        "torch": lambda: tgrad(
            lambda a: torch.where(k_t, torch.log(torch.softmax(a.masked_fill(~k_t, -inf), 0)), 0.0).sum(), xm),
        "jax": lambda: jgrad(lambda a: jnp.where(k_j, jnp.log(jax.nn.softmax(a, where=k_j)), 0.0).sum(), xm),
        "scipy": None,
    }))

    xl = [0.0, -inf, 1.0]
    p = np.array([softmax_of([0.0, 1.0])[0], 0.0, softmax_of([0.0, 1.0])[1]])
    cases.append(("d log_softmax(x)[0]/dx, x = [0, -inf, 1]", np.array([1.0, 0.0, 0.0]) - p, {
        "ld-torch": lambda: tgrad(lambda a: ld.log_softmax(a)[0], xl),
        "ld-jax": lambda: jgrad(lambda a: ld.log_softmax(a)[0], xl),
        "torch": lambda: tgrad(lambda a: torch.log_softmax(a, 0)[0], xl),
        "jax": lambda: jgrad(lambda a: jax.nn.log_softmax(a)[0], xl),
        "scipy": lambda: jgrad(lambda a: sps.log_softmax(a)[0], xl),
    }))

    xh = [inf, inf, 0.0]
    cases.append(("diag of Hessian of lse, x = [inf, inf, 0]", [0.25, 0.25, 0.0], {
        "ld-torch": lambda: np.diag(torch.func.hessian(lambda a: ld.logsumexp(a))(t(xh)).numpy()),
        "ld-jax": lambda: np.diag(np.asarray(jax.hessian(lambda a: ld.logsumexp(a))(j(xh)))),
        "torch": lambda: np.diag(torch.func.hessian(lambda a: torch.logsumexp(a, 0))(t(xh)).numpy()),
        "jax": lambda: np.diag(np.asarray(jax.hessian(lambda a: jax.nn.logsumexp(a))(j(xh)))),
        "scipy": lambda: np.diag(np.asarray(jax.hessian(lambda a: sps.logsumexp(a))(j(xh)))),
    }))
    return cases


COLUMNS = [
    ("ld-torch", "lse_dispatch (torch)"),
    ("ld-jax", "lse_dispatch (jax)"),
    ("torch", "torch"),
    ("jax", "jax"),
    ("scipy", "scipy (on JAX arrays, jax.grad)"),
]


def _format(values, expected) -> str:
    values = np.asarray(values, dtype=float)
    text = "[" + ", ".join("nan" if math.isnan(v) else f"{v:.4g}" for v in values) + "]"
    ok = values.shape == np.shape(expected) and np.allclose(values, expected, rtol=1e-9, atol=0.0)
    return text if ok else f"**{text}** ✗"


def main() -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    import warnings

    warnings.simplefilter("ignore")  # the frameworks warn about the very NaNs shown
    print("| case | expected | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for label, expected, runs in _cases():
        cells = []
        for key, _ in COLUMNS:
            fn = runs[key]
            if fn is None:
                cells.append("n/a")
                continue
            try:
                cells.append(_format(fn(), expected))
            except Exception as exc:  # a failure is a result too
                cells.append(f"error: {type(exc).__name__}")
        exp = "[" + ", ".join(f"{v:.4g}" for v in np.asarray(expected, dtype=float)) + "]"
        print(f"| {label} | {exp} | " + " | ".join(cells) + " |")
    print()
    print("Bold with ✗: differs from the analytic value (rtol 1e-9) or is NaN; n/a: no such argument.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
