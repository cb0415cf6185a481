"""Speed and memory of logmatmulexp and logcumsumexp against what people use today (issue 12).

One process, interleaved rounds (each candidate runs once per round, in
turn), medians; ratios are of medians measured in the same rounds.  Prints a
Markdown table with the thread counts and the load average before and after.

    python benchmarks/semiring_bench.py [--repeats 7] [--quick] [--json out.json]

Targets (issue 12):

* logmatmulexp (1024, 1024) @ (1024, 1024) float32: peak extra memory a few
  times the output; at least 10x faster than the broadcast-sum idiom
  ``logsumexp(a[:, :, None] + b[None], axis=1)`` on (512, 512) @ (512, 512);
  within 5x of a plain float32 ``a @ b``.  The floor: the float64 product of
  the rescaled operands (float32 input is summed in float64), so a float64
  ``a @ b`` is also timed.
* logcumsumexp (4096, 4096) float32 along either axis: within 2x of
  ``np.logaddexp.accumulate`` and ``torch.logcumsumexp``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc

import numpy as np

from lse_dispatch import logcumsumexp, logmatmulexp


def _rounds(candidates: dict, repeats: int) -> dict:
    """Median seconds of each candidate over ``repeats`` interleaved rounds (after one warm-up)."""
    for fn in candidates.values():
        fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _ratio_row(what: str, shape: str, med: dict, numpy: tuple, torch: tuple, seconds: bool = True) -> dict:
    """A row of ratios ``med[top] / med[bottom]``, one ``(top, bottom)`` pair per library;
    torch's is ``None`` when its candidates were not timed (torch not installed)."""
    row = {
        "what": what,
        "shape": shape,
        "numpy": med[numpy[0]] / med[numpy[1]],
        "torch": med[torch[0]] / med[torch[1]] if torch[0] in med else None,
    }
    if seconds:
        row["seconds"] = med
    return row


def _peak_extra(fn, output_bytes: int) -> float:
    """Peak traced NumPy memory of ``fn()`` beyond its own output, in multiples of the output."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    result = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    return (peak - output_bytes) / output_bytes


def product_rows(repeats: int, quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    n = 512 if quick else 1024
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    candidates = {
        "ours (numpy)": lambda: logmatmulexp(a, b),
        "a @ b float32 (numpy)": lambda: a @ b,
        "a @ b float64 (numpy)": lambda: a64 @ b64,
    }
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ta64, tb64 = ta.double(), tb.double()
        candidates.update(
            {
                "ours (torch)": lambda: logmatmulexp(ta, tb),
                "a @ b float32 (torch)": lambda: ta @ tb,
                "a @ b float64 (torch)": lambda: ta64 @ tb64,
            }
        )
    except ImportError:
        torch = None
    med = _rounds(candidates, repeats)
    shape = f"({n}, {n}) @ ({n}, {n}) float32"
    rows.append(_ratio_row("logmatmulexp / float32 a @ b (target <= 5)", shape, med,
                           ("ours (numpy)", "a @ b float32 (numpy)"), ("ours (torch)", "a @ b float32 (torch)")))
    rows.append(_ratio_row("floor: float64 a @ b / float32 a @ b", shape, med,
                           ("a @ b float64 (numpy)", "a @ b float32 (numpy)"),
                           ("a @ b float64 (torch)", "a @ b float32 (torch)"), seconds=False))
    extra = _peak_extra(lambda: logmatmulexp(a, b), n * n * 4)
    what = "logmatmulexp peak extra memory / output (numpy, tracemalloc)"
    rows.append({"what": what, "shape": shape, "numpy": extra, "torch": None})

    # The broadcast-sum idiom at (512, 512) @ (512, 512): n * k * m temporaries.
    m = 256 if quick else 512
    a = rng.standard_normal((m, m)).astype(np.float32)
    b = rng.standard_normal((m, m)).astype(np.float32)
    from scipy.special import logsumexp as scipy_logsumexp

    candidates = {
        "ours (numpy)": lambda: logmatmulexp(a, b),
        "idiom (scipy)": lambda: scipy_logsumexp(a[:, :, None] + b[None, :, :], axis=1),
    }
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        candidates.update(
            {
                "ours (torch)": lambda: logmatmulexp(ta, tb),
                "idiom (torch)": lambda: torch.logsumexp(ta[:, :, None] + tb[None, :, :], dim=1),
            }
        )
    med = _rounds(candidates, max(3, repeats // 2))
    rows.append(_ratio_row("broadcast-sum idiom / logmatmulexp (target >= 10)", f"({m}, {m}) @ ({m}, {m}) float32",
                           med, ("idiom (scipy)", "ours (numpy)"), ("idiom (torch)", "ours (torch)")))
    return rows


#: The scan rows' ratios: ours over the library's own cumulative log-sum-exp.
_SCAN_PAIRS = (("ours (numpy)", "np.logaddexp.accumulate"), ("ours (torch)", "torch.logcumsumexp"))


def scan_rows(repeats: int, quick: bool, dtype: str = "float32") -> list[dict]:
    rng = np.random.default_rng(1)
    n = 1024 if quick else 4096
    x = rng.standard_normal((n, n)).astype(dtype)
    rows = []
    try:
        import torch

        tx = torch.from_numpy(x)
    except ImportError:
        torch = None
    for axis in (0, 1):
        candidates = {
            "ours (numpy)": lambda: logcumsumexp(x, axis=axis),
            "np.logaddexp.accumulate": lambda: np.logaddexp.accumulate(x, axis=axis),
        }
        if torch is not None:
            candidates.update(
                {
                    "ours (torch)": lambda: logcumsumexp(tx, axis=axis),
                    "torch.logcumsumexp": lambda: torch.logcumsumexp(tx, dim=axis),
                }
            )
        med = _rounds(candidates, repeats)
        rows.append(_ratio_row("logcumsumexp / native (target <= 2)", f"({n}, {n}) {dtype}, axis {axis}", med,
                               *_SCAN_PAIRS))
    # The worst case of the blocked scan: every block gets a new maximum.
    increasing = np.sort(x, axis=1)
    candidates = {
        "ours (numpy)": lambda: logcumsumexp(increasing, axis=1),
        "np.logaddexp.accumulate": lambda: np.logaddexp.accumulate(increasing, axis=1),
    }
    if torch is not None:
        t_increasing = torch.from_numpy(increasing)
        candidates.update(
            {
                "ours (torch)": lambda: logcumsumexp(t_increasing, axis=1),
                "torch.logcumsumexp": lambda: torch.logcumsumexp(t_increasing, dim=1),
            }
        )
    med = _rounds(candidates, max(3, repeats // 2))
    rows.append(_ratio_row("logcumsumexp / native, rows sorted increasing (every block redone)",
                           f"({n}, {n}) {dtype}, axis 1", med, *_SCAN_PAIRS))
    return rows


def environment() -> dict:
    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "threads_env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [(p.get("internal_api"), p.get("num_threads")) for p in threadpool_info()]
    except ImportError:
        pass
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="half-size inputs (not the targets' shapes)")
    parser.add_argument("--only", choices=("product", "scan"), default=None, help="run one half")
    parser.add_argument("--scan-dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of the scan rows (the targets are float32)")
    parser.add_argument("--json", default=None, help="also write the rows and the environment here")
    args = parser.parse_args(argv)
    env = environment()
    print(f"python {env['python']}, numpy {env['numpy']}, torch {env.get('torch', '-')} "
          f"({env.get('torch_threads', '-')} threads), {env['cpus']} CPUs, BLAS {env.get('blas', '?')}, "
          f"load average before {env['load_before'][0]:.2f}; medians of {args.repeats} interleaved rounds", flush=True)
    print()
    print("| measure | shape | numpy | torch |")
    print("|---|---|---:|---:|", flush=True)
    rows = []
    sections = [("product", product_rows), ("scan", lambda repeats, quick: scan_rows(repeats, quick, args.scan_dtype))]
    for name, section in sections:
        if args.only not in (None, name):
            continue
        for row in section(args.repeats, args.quick):
            rows.append(row)
            cell = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"| {row['what']} | {row['shape']} | {cell(row['numpy'])} | {cell(row['torch'])} |", flush=True)
    env["load_after"] = os.getloadavg()
    print(f"\nload average after {env['load_after'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": env, "rows": rows}, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
