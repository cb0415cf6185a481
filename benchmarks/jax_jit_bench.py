"""lse_dispatch inside the user's ``jax.jit`` against ``jax.nn``: issue 16's targets.

    python benchmarks/jax_jit_bench.py [--repeats N] [--only forward,grad]
        [--shapes 32x4096,1024x128] [--save FILE] [--previous FILE] [--device gpu]

Float32 without x64, CPU, one intra-op thread on each side: the process pins
itself to one CPU before JAX is imported (XLA sizes its intra-op thread pool
from the CPUs the process may run on) and sets
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``.  Both sides run in this one
process, compiled once, and are timed interleaved: each round times ours and
jax.nn's (the order alternates between rounds), each sample the mean of a few
back-to-back calls; a case's figure is the ratio of the two medians over all
rounds.  Times are process CPU time (``time.process_time``; ``--clock wall``
for wall time): with one intra-op thread pinned to one CPU that is the
work done, and it does not count the time slices lost to other processes on
a shared machine.

Cases (reduced axis -1): (32, 4096), (4096, 4096), (8, 128, 128), (1024, 128);
for each op:

* ``forward``: ``jax.jit(lambda x: f(x, axis=-1))``;
* ``grad``: ``jax.jit(jax.value_and_grad(lambda x, c: sum(f(x, axis=-1) * c)))``
  with a fixed random ``c`` of the output's shape, passed as an argument (a
  closed-over constant lets XLA fold parts of the backward pass);
* ``residuals``: the bytes ``jax.ad_checkpoint.saved_residuals`` lists for that
  function, the input ``x`` included (a saved input keeps it alive), ``c``
  excluded (the user's, saved alike on both sides), ours against jax.nn's.

``--device gpu`` runs the same cases on JAX's GPU backend (the issue asks for
GPU figures when a device is lent): no pinning, wall time, each sample a loop
of asynchronous calls closed by one ``block_until_ready``.

Targets: time ratio <= 1.25 and residual bytes <= jax.nn's.  ``--save``
writes the ratios as JSON; ``--previous`` prints a saved run's ratio beside
each new one (run the same command on the previous code first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

TARGET = 1.25
SHAPES = ((32, 4096), (4096, 4096), (8, 128, 128), (1024, 128))
OPS = ("logsumexp", "softmax", "log_softmax")


def _pin_one_thread() -> str:
    """Restrict this process (and so XLA's thread pools) to one CPU, before JAX loads."""
    if "jax" in sys.modules:
        raise RuntimeError("pin before importing jax")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}; XLA_FLAGS={os.environ['XLA_FLAGS']}"


def _functions(op, shape):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import lse_dispatch

    ours_f = getattr(lse_dispatch, op)
    theirs_f = {"logsumexp": jax.nn.logsumexp, "softmax": jax.nn.softmax, "log_softmax": jax.nn.log_softmax}[op]
    out_shape = shape[:-1] if op == "logsumexp" else shape
    c = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape), dtype=jnp.float32)

    def forward(f):
        return jax.jit(lambda x: f(x, axis=-1))

    def loss(f):
        return lambda x, c: jnp.sum(f(x, axis=-1) * c)

    def grad(f):
        fn = jax.jit(jax.value_and_grad(loss(f)))
        return lambda x: fn(x, c)

    return {
        "forward": (forward(ours_f), forward(theirs_f)),
        "grad": (grad(ours_f), grad(theirs_f)),
        "loss": (loss(ours_f), loss(theirs_f)),
        "c": c,
    }


def residual_bytes(loss, x, c) -> int:
    """Bytes of the residuals ``jax.grad(loss)`` saves, the cotangent weights ``c`` excluded."""
    try:
        from jax.ad_checkpoint import saved_residuals
    except ImportError:  # jax 0.10 exports only print_saved_residuals
        from jax._src.ad_checkpoint import saved_residuals

    total = 0
    for aval, why in saved_residuals(loss, x, c):
        if why in ("from the argument c", "from a constant"):  # the loss's own c
            continue
        total += aval.size * aval.dtype.itemsize
    return total


_CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock = _CLOCK["cpu"]


def _sample(fn, x, calls):
    import jax

    start = clock()
    for _ in range(calls):
        out = fn(x)
    jax.block_until_ready(out)
    return (clock() - start) / calls


def _time_pair(ours, theirs, x, repeats):
    import jax

    jax.block_until_ready(ours(x))
    jax.block_until_ready(theirs(x))
    # Calls per sample: about 20 ms of jax.nn's work, at least 1.
    once = _sample(theirs, x, 1)
    calls = max(1, min(200, int(0.02 / max(once, 1e-7))))
    samples = {"ours": [], "theirs": []}
    for round_ in range(repeats):
        order = (("ours", ours), ("theirs", theirs)) if round_ % 2 == 0 else (("theirs", theirs), ("ours", ours))
        for name, fn in order:
            samples[name].append(_sample(fn, x, calls))
    return statistics.median(samples["ours"]), statistics.median(samples["theirs"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds per case (default 9)")
    parser.add_argument("--only", default="forward,grad,residuals", help="modes to run (comma-separated)")
    parser.add_argument("--shapes", default=None, help="e.g. 32x4096,1024x128 (default: the four target shapes)")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--save", default=None, help="write the ratios to this JSON file")
    parser.add_argument("--previous", default=None, help="a --save file of an earlier run, printed beside")
    parser.add_argument("--clock", choices=sorted(_CLOCK), default="cpu", help="process CPU time (default) or wall time")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="JAX backend to run on (gpu: wall time)")
    args = parser.parse_args(argv)
    global clock
    if args.device == "gpu":
        args.clock = "wall"
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    clock = _CLOCK[args.clock]

    pinned = _pin_one_thread() if args.device == "cpu" else "not pinned (GPU)"
    import jax
    import jax.numpy as jnp
    import numpy as np

    if jax.config.jax_enable_x64:
        raise SystemExit("run without x64: the targets are for float32 without a float64 accumulator")
    if jax.default_backend() != args.device:
        raise SystemExit(f"asked for {args.device}, JAX's default backend is {jax.default_backend()}")
    pinned += f"; device {jax.devices()[0].device_kind}"
    shapes = SHAPES if args.shapes is None else tuple(tuple(map(int, s.split("x"))) for s in args.shapes.split(","))
    modes = args.only.split(",")
    previous = {}
    if args.previous:
        with open(args.previous) as f:
            previous = json.load(f)["results"]
    print(f"# jax {jax.__version__}, {pinned}; load: {os.getloadavg()}")
    print(f"# ratio = ours / jax.nn ({args.clock} time, medians of {args.repeats} interleaved rounds); target <= {TARGET}")
    print(f"{'case':<40} {'ours':>10} {'jax.nn':>10} {'ratio':>8}  {'target':<8} previous")
    results = {}
    met = total = 0
    rng = np.random.default_rng(0)
    for shape in shapes:
        x = jnp.asarray(rng.standard_normal(shape) * 3, dtype=jnp.float32)
        for op in args.ops.split(","):
            fns = _functions(op, shape)
            for mode in modes:
                key = f"{op} {'x'.join(map(str, shape))} {mode}"
                if mode == "residuals":
                    ours_v, theirs_v = (residual_bytes(f, x, fns["c"]) for f in fns["loss"])
                    ok = ours_v <= theirs_v
                    ratio = ours_v / theirs_v if theirs_v else float("inf") if ours_v else 1.0
                    shown = f"{ours_v:>10d} {theirs_v:>10d} {ratio:>8.2f}"
                else:
                    ours_t, theirs_t = _time_pair(*fns[mode], x, args.repeats)
                    ratio = ours_t / theirs_t
                    ok = ratio <= TARGET
                    shown = f"{ours_t * 1e3:>8.3f}ms {theirs_t * 1e3:>8.3f}ms {ratio:>8.2f}"
                met += ok
                total += 1
                before = previous.get(key)
                beside = "" if before is None else f"(was {before:.2f})"
                print(f"{key:<40} {shown}  {'met' if ok else 'MISSED':<8} {beside}", flush=True)
                results[key] = ratio
    print(f"# {met} of {total} targets met; load after: {os.getloadavg()}")
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"jax": jax.__version__, "pinned": pinned, "clock": args.clock, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
