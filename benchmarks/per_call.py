"""Where the time of one small call goes: the public function, the lane that
takes it once its signature is decided (``Kernel.lane``), and the full path:
its dispatch, the key under which the dispatcher reuses its decision, each
kernel's ``declines`` and the ``run`` of every kernel that takes the call.

    python benchmarks/per_call.py [--library numpy|torch] [--shape 10] [--dtype float32]
                                  [--axis -1] [--number 20000] [--repeats 7]

Each figure is the best of ``--repeats`` timings of ``--number`` calls
(``timeit``), in microseconds, with the library's own function beside the
public one.  The fused kernels are loaded first (``warm_up``), so that small
calls are not declined as "not compiled yet".  torch runs one intra-op
thread.  Maintainer tooling: it reaches into ``lse_dispatch``'s private
modules, which may change without notice.
"""

from __future__ import annotations

import argparse
import os
import timeit

import numpy as np

import lse_dispatch
from lse_dispatch import _api, _dispatch
from lse_dispatch._ops import Op

OPS = ("logsumexp", "softmax", "log_softmax")


def _best(fn, number: int, repeats: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeats)) / number * 1e6


def _input(library: str, shape: tuple, dtype: str):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    if library == "torch":
        import torch

        return torch.from_numpy(x), (lambda op: lambda t, axis: getattr(torch, op)(t, axis))
    import scipy.special

    return x, (lambda op: lambda a, axis: getattr(scipy.special, op)(a, axis=axis))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", choices=("numpy", "torch"), default="numpy")
    parser.add_argument("--shape", default="10", help="comma-separated extents, e.g. 100,3")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--axis", type=int, default=-1)
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split(","))
    x, native = _input(args.library, shape, args.dtype)
    if args.library == "torch":
        import torch

        torch.set_num_threads(1)
    try:
        from lse_dispatch.backends import _fused_cpu

        _fused_cpu.warm_up((args.dtype,))
    except ImportError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.library} {args.dtype} {shape} axis {args.axis}; microseconds a call, best of "
          f"{args.repeats} x {args.number}; load average {load:.2f}")
    timed = lambda fn: _best(fn, args.number, args.repeats)  # noqa: E731
    for op in OPS:
        public = getattr(lse_dispatch, op)
        theirs = native(op)
        print(f"{op}: lse_dispatch {timed(lambda: public(x, axis=args.axis)):.2f}, "
              f"{'torch' if args.library == 'torch' else 'scipy.special'} {timed(lambda: theirs(x, args.axis)):.2f}")
        found = _dispatch._LANES.get((Op(op), type(x), x.dtype, x.shape, args.axis, False))
        if found is not None and found[3] is not None:
            lane = found[3]
            print(f"  the lane takes the call: through_lane "
                  f"{timed(lambda: _dispatch.through_lane(Op(op), x, args.axis)):.2f}, of which the "
                  f"kernel's lane {timed(lambda: lane(x)):.2f}; the full path:")
        call, _ = _api._prepare(Op(op), x, args.axis, None, None)
        print(f"  prepare {timed(lambda: _api._prepare(Op(op), x, args.axis, None, None)):.2f}, "
              f"dispatch.run {timed(lambda: _dispatch.run(call)):.2f}")
        if _dispatch._decision_key(call) is None:
            print("  no decision key: every call runs the declines below")
        else:
            print(f"  decision key {timed(lambda: _dispatch._decision_key(call)):.2f} "
                  "(the declines below run once per signature)")
        for _, kernel in _dispatch.kernels_for(call.a, call.op):
            reason = kernel.declines(call)
            line = f"  {kernel.name:14s} declines {timed(lambda: kernel.declines(call)):.2f}"
            if reason is None:
                line += f", run {timed(lambda: kernel.run(call)):.2f}"
            else:
                line += f" ({reason})"
            print(line)


if __name__ == "__main__":
    main()
