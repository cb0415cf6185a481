"""Differential fuzzing of weighted logsumexp against the mpmath oracle.

For every installed backend (JAX with x64 on and off) and each dtype it has,
draws random inputs of the families the outside findings came from and
prints the worst error in ulps of the result dtype:

* ``near-zero``: ``a + log|b|`` close to ``-log k``, so the result is near 0,
  where every rounding of an exponent shows (float32: 1.9e7 ulps before the
  float64 exponents);
* ``signed``: one weight negated, condition numbers up to about 1e5;
* ``wide``: weights from 1e-300 (1e-38 for float32) to 1e300, a from -50 to 50;
* ``subnormal``: some weights below the smallest normal number.

Usage: ``python benchmarks/fuzz_weights.py [--draws 300] [--seed 0] [--backend numpy]``.
The compiled CPU kernels are loaded first (when numba is installed), so that
NumPy's small weighted calls run ``numpy.fused`` as they do in a warm
process; the last column names the implementations that ran.
The worst error is reported with the condition number of that input
(``sum |p_i| (|a_i| + 1) / |lse|``): the contract's 4 ulps hold for
well-conditioned input, and for float32 wherever float64 exists.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

import lse_dispatch
from lse_dispatch import backends, oracle
from lse_dispatch.cases import round_to


def _draw(rng, family: str, dtype: str):
    k = int(rng.integers(1, 7))
    finfo = np.finfo(np.float32 if dtype != "float64" else np.float64)
    if family in ("near-zero", "signed"):
        a = rng.uniform(-3, 3, k)
        b = np.exp(-math.log(k) - a) * rng.uniform(0.999, 1.001, k)
        if family == "signed":
            b[0] = -b[0] * rng.uniform(0.5, 1.0)
    elif family == "wide":
        a = rng.uniform(-50, 50, k)
        low = math.log10(float(finfo.tiny)) + 1
        b = 10.0 ** rng.uniform(low, -low, k)
    else:  # subnormal
        a = rng.uniform(0, 40, k)
        b = np.where(rng.random(k) < 0.5, float(finfo.tiny) * rng.uniform(1e-6, 0.5, k), rng.uniform(0.1, 2, k))
    return round_to(a, dtype), round_to(b, dtype)


def _condition(a, b) -> float:
    """Condition number of ``log|sum b e^a|`` for relative perturbations of ``a`` and ``b``.

    ``sum |p_i| (|a_i| + 1) / |lse|`` with ``p_i = b_i e^{a_i} / sum``: large
    where the result cancels to near 0 or the signed sum cancels.
    """
    import mpmath

    with mpmath.workprec(200):
        terms = [mpmath.mpf(float(w)) * mpmath.exp(mpmath.mpf(float(x))) for x, w in zip(a, b)]
        total = mpmath.fsum(terms)
        if total == 0:
            return math.inf
        lse = mpmath.log(abs(total))
        if lse == 0:
            return math.inf
        weighted = mpmath.fsum(abs(t / total) * (abs(mpmath.mpf(float(x))) + 1) for t, x in zip(terms, a))
        return float(weighted / abs(lse))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=300, help="inputs per family, backend and dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="only this backend (numpy, torch, jax, ...)")
    args = parser.parse_args(argv)
    try:
        from lse_dispatch.backends import _fused_cpu

        _fused_cpu.warm_up()
    except ImportError:
        pass
    targets = []
    for spec in backends.installed():
        if args.backend is not None and spec.name != args.backend:
            continue
        if spec.name == "jax":
            targets += [(spec, False), (spec, True)]
        elif spec.name != "cupy":
            targets.append((spec, None))
    print("| backend | dtype | family | draws | worst ulps | condition number there | ran |")
    print("|---|---|---|---:|---:|---:|---|")
    for spec, x64 in targets:
        label = spec.name + ("" if x64 is None else (" (x64)" if x64 else " (no x64)"))
        context = _x64(x64)
        with context:
            device = spec.devices()[0]
            for dtype in ("float32", "float64"):
                if dtype not in spec.dtypes or (x64 is False and dtype == "float64"):
                    continue
                for family in ("near-zero", "signed", "wide", "subnormal"):
                    rng = np.random.default_rng(args.seed)
                    worst, worst_condition = 0.0, 1.0
                    ran = set()
                    for _ in range(args.draws):
                        a, b = _draw(rng, family, dtype)
                        with lse_dispatch.trace() as seen:
                            value, _ = lse_dispatch.logsumexp(spec.from_numpy(a, dtype, device),
                                                              b=spec.from_numpy(b, dtype, device), return_sign=True)
                        ran.update(seen.implementations)
                        got = np.asarray(spec.to_numpy(value), dtype=np.float64)
                        err = float(oracle.ulp_error(got, oracle.exact_logsumexp(a, b=b), dtype).max())
                        if err > worst:
                            worst, worst_condition = err, _condition(a, b)
                    print(f"| {label} | {dtype} | {family} | {args.draws} | {worst:.2f} | {worst_condition:.3g} "
                          f"| {', '.join(sorted(ran))} |")
    return 0


class _x64:
    def __init__(self, flag):
        self.flag = flag

    def __enter__(self):
        if self.flag is not None:
            import jax

            self.context = jax.enable_x64(self.flag)
            self.context.__enter__()

    def __exit__(self, *exc):
        if self.flag is not None:
            self.context.__exit__(*exc)
        return False


if __name__ == "__main__":
    raise SystemExit(main())
