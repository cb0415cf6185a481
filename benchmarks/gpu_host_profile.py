"""Where the host time of a small ``torch.triton`` call goes, on a CUDA device.

    python benchmarks/gpu_host_profile.py [--n 1024] [--calls 300] [--profile 25]
    TRITON_INTERPRET=1 python benchmarks/gpu_host_profile.py --dry-run   # CPU: checks the script

``benchmarks/gpu_bench.py`` measured 160-270 us per call of lse_dispatch on a
2**10-entry CUDA tensor against 11-80 us for torch's own (an H200, 2026-11-30).
This splits one call into its layers, each timed alone as wall time per call
over a loop of ``calls`` calls with one synchronisation at the end (median of
five loops):

* torch's own function;
* the whole lse_dispatch call (``torch.triton``, checked by ``trace()``);
* the call's preparation alone (validation, namespace, plan: ``_call.prepare``)
  and the Triton kernel's decision alone (its ``declines``);
* the Triton launch alone (``rows_forward``: the state allocation, the
  configuration and the kernel launch), without and with the read-back of the
  flagged rows (``bool(special.any())``, a synchronisation per call);
* lse_dispatch on a 10-entry CPU tensor (the dispatcher's cost on this
  machine's processor, no GPU involved).

Then ``--profile N`` lines of cProfile over ``calls`` whole calls, by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys

from gpu_bench import wall_per_call  # the sibling script (its directory is on sys.path when run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile", type=int, default=25, help="cProfile lines per op (0: none)")
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors through the interpreter")
    args = parser.parse_args(argv)
    import torch

    import lse_dispatch
    from lse_dispatch._call import prepare
    from lse_dispatch.backends import _torch_triton, _triton_kernels

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --dry-run)", file=sys.stderr)
        return 2
    calls = 3 if args.dry_run else args.calls
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    choice = lse_dispatch.use("torch.triton") if args.dry_run else lse_dispatch.use("auto")
    x = torch.randn(args.n, device=device)
    x_cpu = torch.randn(10)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    print(f"# {name}; torch {torch.__version__}; n = {args.n}; wall us per call, loops of {calls}, median of 5")
    native = {"logsumexp": lambda: torch.logsumexp(x, -1), "softmax": lambda: torch.softmax(x, -1)}
    with choice:
        for op in ("logsumexp", "softmax"):
            ours = getattr(lse_dispatch, op)
            with lse_dispatch.trace() as seen:
                ours(x, axis=-1)
            ran = seen.implementations[-1] if seen.implementations else "?"
            kernel = next(k for k in _torch_triton.KERNELS if str(k.op) == op)
            call = prepare(op, x, axis=-1)
            code = _torch_triton._OPS[op]
            x2d = x.reshape(1, -1)
            value = torch.empty((2, 1), dtype=x.dtype, device=device)
            out = torch.empty_like(x2d)

            def launch(code=code, x2d=x2d, value=value, out=out):
                if code == 0:
                    return _triton_kernels.rows_forward(x2d, None, code, value=value)
                return _triton_kernels.rows_forward(x2d, None, code, out=out)

            def launch_and_read(launch=launch):
                return bool(launch()[3].any())

            rows = {
                f"torch.{op}": native[op],
                f"lse_dispatch.{op} (ran {ran})": lambda ours=ours: ours(x, axis=-1),
                "  call prepared (_call.prepare)": lambda op=op: prepare(op, x, axis=-1),
                "  kernel decision (its declines())": lambda call=call, kernel=kernel: kernel.declines(call),
                "  Triton launch (rows_forward)": launch,
                "  launch + read-back of flagged rows": launch_and_read,
                f"lse_dispatch.{op} on 10 CPU entries": lambda ours=ours: ours(x_cpu, axis=-1),
            }
            for label, fn in rows.items():
                print(f"{label:<48} {wall_per_call(fn, calls, sync) * 1e6:9.1f}", flush=True)
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(calls):
                    ours(x, axis=-1)
                sync()
                profiler.disable()
                stream = io.StringIO()
                pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(args.profile)
                print(f"## cProfile, {calls} calls of lse_dispatch.{op}, by own time")
                print("\n".join(line for line in stream.getvalue().splitlines() if line.strip())[:6000], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
