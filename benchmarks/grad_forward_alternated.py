"""One call, alternated 400 times with and without the derivative rules, in one process.

    python benchmarks/grad_forward_alternated.py

A finer check than grad_forward_cost.py of the torch forward with
``requires_grad`` on a small input, where a fixed per-call cost would show.
"""

import dataclasses
import statistics
import time

import torch

from lse_dispatch import _dispatch, logsumexp


def main() -> int:
    x = torch.randn(1000).requires_grad_(True)
    logsumexp(x)
    kind = type(x)
    spec = _dispatch._BACKEND_OF_TYPE[kind]
    bare = dataclasses.replace(spec, kernels=())
    times = {True: [], False: []}
    try:
        for _ in range(400):
            for with_rules in (True, False):
                _dispatch._BACKEND_OF_TYPE[kind] = spec if with_rules else bare
                start = time.perf_counter()
                logsumexp(x)
                times[with_rules].append(time.perf_counter() - start)
    finally:
        _dispatch._BACKEND_OF_TYPE[kind] = spec
    with_rules, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"torch logsumexp (1000,) float32, requires_grad: with rules {with_rules * 1e6:.0f} us, "
          f"without {without * 1e6:.0f} us, ratio {with_rules / without:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
