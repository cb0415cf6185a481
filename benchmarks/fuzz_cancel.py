"""float64 logsumexp of short rows whose result cancels toward 0: the compiled
kernel against the generic path and SciPy, by condition number.

``m + L`` cancels when the max ``m`` is negative and ``L = log(sum exp(x - m))``
is close to ``-m``; every rounding before that addition is then amplified by
the condition number ``sum |x_i| p_i / |lse|`` (``p`` the softmax), in any
implementation.  Rows of 2 to 8 entries drawn from ``N(0, s)`` with ``s`` in
``[0.5, 5]``; rows above condition 10 are dropped.  Prints, per condition
bound, the worst and mean error in float64 ulps against the mpmath oracle of
``numpy.fused`` (numba; compiled or loaded first), ``generic`` and
``scipy.special.logsumexp``.

Usage: ``python benchmarks/fuzz_cancel.py [--rows 30000] [--seed 0]``.
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.special

import lse_dispatch
from lse_dispatch import oracle
from lse_dispatch.backends import _fused_cpu


def _rows(rng, count: int) -> dict[int, np.ndarray]:
    """Rows grouped by length (one 2-D array per length)."""
    lengths = rng.integers(2, 9, count)
    scales = rng.uniform(0.5, 5.0, count)
    return {n: rng.standard_normal((int((lengths == n).sum()), n)) * scales[lengths == n, None] for n in range(2, 9)}


def _under(name: str):
    def run(a):
        with lse_dispatch.use(name):
            return lse_dispatch.logsumexp(a, axis=-1)

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not _fused_cpu.available():
        raise SystemExit("numba is not installed: pip install 'lse-dispatch[fast]'")
    _fused_cpu.warm_up(("float64",))
    contenders = {
        "numpy.fused": _under("numpy.fused"),
        "generic": _under("generic"),
        "scipy": lambda a: scipy.special.logsumexp(a, axis=-1),
    }
    errors: dict[str, list] = {name: [] for name in contenders}
    conditions = []
    for a in _rows(np.random.default_rng(args.seed), args.rows).values():
        exact = oracle.exact_logsumexp(a, axis=-1).reshape(-1)
        want = np.asarray(exact, np.float64)
        p = np.exp(a - want[:, None])
        with np.errstate(divide="ignore"):
            conditions.append(np.sum(np.abs(a) * p, axis=-1) / np.abs(want))
        for name, run in contenders.items():
            with lse_dispatch.trace() as seen:
                got = np.asarray(run(a), np.float64)
            if name == "numpy.fused" and "ran numpy.fused" not in str(seen):
                raise SystemExit(f"numpy.fused did not run: {seen}")
            errors[name].append(oracle.ulp_error(got, exact, np.dtype(np.float64)))
    condition = np.concatenate(conditions)
    kept = condition <= 10
    print(f"{int(kept.sum())} rows of 2 to 8 float64 entries at condition <= 10 (seed {args.seed})")
    print("condition  " + "  ".join(f"{name:>24}" for name in contenders))
    for bound in (2, 5, 10):
        chosen = condition <= bound
        cells = []
        for name in contenders:
            e = np.concatenate(errors[name])[chosen]
            cells.append(f"max {e.max():5.2f} mean {e.mean():.3f}".rjust(24))
        print(f"<= {bound:<7}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
