"""What our JAX kernel costs the user's ``jax.jit`` at compile time, beside ``jax.nn``.

For softmax, log_softmax and logsumexp of float32 ``(8, 128, 129)`` input
(last axis), the median of ``--repeats`` fresh programs (a new shape each
time, so nothing is cached) of:

* ``lower``: tracing and lowering (Python), ``compile``: XLA's compilation;
* for one call, and for a program of ``--layers`` calls on the same shape
  (a model whose every layer has a softmax).

``ours, flat`` traces the kernel into the caller's program at each call, as
before it became a nested jit (``_jax_fused._compiled`` replaced by one that
returns the un-jitted ``_in_place``):
the difference is what the nested jit saves.  Maintainer tooling: the flat
variant reaches into ``lse_dispatch.backends._jax_fused``.

Usage: ``python benchmarks/jax_compile_time.py [--layers 12] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import lse_dispatch
from lse_dispatch.backends import _jax_fused

OPS = ("softmax", "log_softmax", "logsumexp")


_nested = _jax_fused._compiled


def _flat():
    """What ``_run`` calls instead of the nested jit: the kernel traced in place."""
    return _jax_fused._in_place


def _program(f, layers: int, kernel):
    reduces = f in (lse_dispatch.logsumexp, jax.nn.logsumexp)

    def run(v):
        _jax_fused._compiled = kernel
        try:
            for _ in range(layers):
                v = v * 1.01 + f(v, axis=-1, keepdims=True) if reduces else f(v * 1.01, axis=-1)
            return v
        finally:
            _jax_fused._compiled = _nested

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    width = 129
    print(f"float32 (8, 128, n), last axis; median of {args.repeats} fresh programs; ms")
    for op in OPS:
        contenders = {"jax.nn": (getattr(jax.nn, op), _nested), "ours": (getattr(lse_dispatch, op), _nested),
                      "ours, flat": (getattr(lse_dispatch, op), _flat)}
        for layers in (1, args.layers):
            cells = []
            for name, (f, kernel) in contenders.items():
                lowered, compiled = [], []
                for _ in range(args.repeats):
                    width += 1  # a shape no cache has seen
                    x = jnp.ones((8, 128, width), jnp.float32)
                    start = time.perf_counter()
                    low = jax.jit(_program(f, layers, kernel)).lower(x)
                    middle = time.perf_counter()
                    low.compile()
                    lowered.append(middle - start)
                    compiled.append(time.perf_counter() - middle)
                cells.append(f"{name} {1e3 * statistics.median(lowered):.0f} + {1e3 * statistics.median(compiled):.0f}")
            print(f"{op}, {layers} call{'s' if layers > 1 else ''} (lower + compile): " + ";  ".join(cells))


if __name__ == "__main__":
    main()
