"""Forward cost of the derivative rules: the same calls with and without them.

"Without" swaps the backend's spec for one with no kernels, so the call runs
exactly what it ran before the rules existed (the generic implementation,
differentiated by the framework op by op).  Both variants are timed in one
run, interleaved, and the median of each is reported with their ratio.

    python benchmarks/grad_forward_cost.py [--repeat 31]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np

from lse_dispatch import _dispatch, logsumexp, softmax


def _median_pair(run_with, run_without, repeat: int, number: int) -> tuple[float, float]:
    """Median seconds per call of two callables, timed alternately."""
    times = ([], [])
    for _ in range(repeat):
        for index, fn in enumerate((run_with, run_without)):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times[index].append((time.perf_counter() - start) / number)
    return statistics.median(times[0]), statistics.median(times[1])


def _without_rules(array_type, without=True):
    """A context swapping the cached backend spec for one without kernels.

    With ``without=False`` it swaps in the same spec: the same bookkeeping
    cost, so that the two timings differ only by the rules.
    """

    class Swap:
        def __enter__(self):
            self.saved = _dispatch._BACKEND_OF_TYPE[array_type]
            swapped = dataclasses.replace(self.saved, kernels=()) if without else self.saved
            _dispatch._BACKEND_OF_TYPE[array_type] = swapped

        def __exit__(self, *exc):
            _dispatch._BACKEND_OF_TYPE[array_type] = self.saved

    return Swap()


def torch_rows(repeat: int):
    import torch

    rows = []
    for shape in [(1000,), (256, 1024)]:
        x = torch.randn(*shape, dtype=torch.float32)
        logsumexp(x, axis=-1)  # fill the dispatch cache
        kind = type(x)
        xg = x.clone().requires_grad_(True)
        cases = {
            "logsumexp, no grad": (lambda: logsumexp(x, axis=-1)),
            "logsumexp, requires_grad": (lambda: logsumexp(xg, axis=-1)),
            "softmax, requires_grad": (lambda: softmax(xg, axis=-1)),
            "logsumexp fwd+bwd": (lambda: logsumexp(xg, axis=-1).sum().backward()),
        }
        for name, fn in cases.items():
            def without(fn=fn):
                with _without_rules(kind):
                    return fn()

            def with_rules(fn=fn):
                with _without_rules(kind, without=False):
                    return fn()

            number = 50 if shape == (1000,) else 3
            t_with, t_without = _median_pair(with_rules, without, repeat, number)
            rows.append(("torch", name, shape, t_with, t_without))
    return rows


def jax_rows(repeat: int):
    import jax
    import jax.numpy as jnp

    rows = []
    for shape in [(1000,), (256, 1024)]:
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype=jnp.float32)
        logsumexp(x, axis=-1)
        kind = type(x)
        eager = lambda: logsumexp(x, axis=-1).block_until_ready()  # noqa: E731
        with_jit = jax.jit(lambda a: logsumexp(a, axis=-1))
        with_jit(x).block_until_ready()
        with _without_rules(kind):
            without_jit = jax.jit(lambda a: logsumexp(a, axis=-1))
            without_jit(x).block_until_ready()
            grad_without = jax.jit(jax.grad(lambda a: logsumexp(a, axis=-1).sum()))
            grad_without(x).block_until_ready()
        grad_with = jax.jit(jax.grad(lambda a: logsumexp(a, axis=-1).sum()))
        grad_with(x).block_until_ready()

        def eager_without():
            with _without_rules(kind):
                return eager()

        def eager_with():
            with _without_rules(kind, without=False):
                return eager()

        number = 20 if shape == (1000,) else 5
        for name, fw, fwo in [
            ("logsumexp, eager", eager_with, eager_without),
            ("logsumexp, jit", lambda: with_jit(x).block_until_ready(), lambda: without_jit(x).block_until_ready()),
            ("grad of logsumexp, jit", lambda: grad_with(x).block_until_ready(),
             lambda: grad_without(x).block_until_ready()),
        ]:
            t_with, t_without = _median_pair(fw, fwo, repeat, number)
            rows.append(("jax", name, shape, t_with, t_without))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=31)
    args = parser.parse_args(argv)
    rows = torch_rows(args.repeat) + jax_rows(args.repeat)
    print("| backend | call (float32) | shape | with rules | without | ratio |")
    print("|---|---|---|---:|---:|---:|")
    for backend, name, shape, t_with, t_without in rows:
        print(f"| {backend} | {name} | {shape} | {t_with * 1e6:.0f} us | {t_without * 1e6:.0f} us | "
              f"{t_with / t_without:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
