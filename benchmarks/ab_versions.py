"""Two builds of lse-dispatch side by side: the blocked CPU kernels, old against new.

Usage (two non-editable installs, e.g. of an older commit and of the checkout):

    pip install --no-deps --target /tmp/pkg_old <old checkout>
    pip install --no-deps --target /tmp/pkg_new .
    python benchmarks/ab_versions.py --old /tmp/pkg_old --new /tmp/pkg_new --rounds 5 [--dtype float64]

Each round starts one process per build, alternating; a process times every
case with the kernel forced by name (``numpy.blocked`` / ``torch.blocked``,
one intra-op thread, best of five batches) and prints JSON.  With ``--dtype
float64`` the softmax and log_softmax cases run the generic path, which
float64 softmax takes where the compiled kernels are not loaded (the
blocked kernels decline it).  The ratio
new/old per case is the median over the rounds, with every round's ratio
beside it and the load average of the run.  ``--family product`` times
``logmatmulexp`` instead (NumPy and torch, N(0, 9) entries and rows of
log-probabilities, ``--dtype`` as above).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = [
    ("numpy", "logsumexp", (4096, 4096), -1), ("numpy", "logsumexp", (4096, 4096), 0), ("numpy", "logsumexp", (10**7,), -1),
    ("numpy", "softmax", (4096, 4096), -1), ("numpy", "softmax", (4096, 4096), 0), ("numpy", "softmax", (10**7,), -1),
    ("numpy", "log_softmax", (4096, 4096), -1), ("numpy", "log_softmax", (4096, 4096), 0),
    ("numpy", "logsumexp", (64, 1000), -1), ("numpy", "softmax", (64, 1000), -1), ("numpy", "logsumexp", (10,), -1),
    ("torch", "logsumexp", (4096, 4096), -1), ("torch", "logsumexp", (4096, 4096), 0), ("torch", "softmax", (4096, 4096), -1),
    ("torch", "softmax", (4096, 4096), 0), ("torch", "log_softmax", (4096, 4096), -1), ("torch", "log_softmax", (10**7,), -1),
    ("torch", "logsumexp", (64, 1000), -1), ("torch", "softmax", (64, 1000), -1), ("torch", "softmax", (10,), -1),
]
PRODUCT_CASES = [
    (lib, "logmatmulexp", shape, dist)
    for lib in ("numpy", "torch")
    for shape in ((1024, 1024, 1024), (256, 256, 256), (512, 64, 512), (64, 4096, 64), (32, 32, 32))
    for dist in ("normal", "logprob")
]
WORKER = r'''
import json, sys, time, statistics
import numpy as np, torch
torch.set_num_threads(1)
import lse_dispatch
cases = json.loads(sys.argv[1]); dtype = sys.argv[2]; out = {}
rng = np.random.default_rng(0)
for lib, op, shape, axis in cases:
    if op == "logmatmulexp":
        n, k, m = shape
        if axis == "normal":
            a, b = rng.standard_normal((n, k)) * 3, rng.standard_normal((k, m)) * 3
        else:
            a, b = np.log(rng.dirichlet(np.ones(k), size=n)), np.log(rng.dirichlet(np.ones(m), size=k))
        a, b = a.astype(dtype), b.astype(dtype)
        if lib == "torch": a, b = torch.from_numpy(a), torch.from_numpy(b)
        lse_dispatch.logmatmulexp(a, b)
        n = 3 if n * k * m > 10**7 else 30
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n): lse_dispatch.logmatmulexp(a, b)
            times.append((time.perf_counter() - t) / n)
        out[f"{lib} {op} {tuple(shape)} {axis}"] = min(times)
        continue
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if lib == "torch": x = torch.from_numpy(x)
    fn = getattr(lse_dispatch, op)
    kernel = lib + ".blocked" if op == "logsumexp" or dtype == "float32" else "generic"
    with lse_dispatch.use(kernel):
        fn(x, axis=axis)
        size = x.numel() if lib == "torch" else x.size
        n = 3 if size > 10**6 else (200 if size > 100 else 2000)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n): fn(x, axis=axis)
            times.append((time.perf_counter() - t) / n)
    out[f"{lib} {op} {tuple(shape)} {axis}"] = min(times)
out["_file"] = lse_dispatch.__file__
print(json.dumps(out))
'''
def run(path: str, dtype: str, cases: list) -> dict:
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    # cwd: the build's folder, so that ``-c`` does not import a checkout found in the caller's folder first.
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(cases), dtype], capture_output=True, text=True, env=env,
                          cwd=path)
    if done.returncode:
        print(done.stderr[-3000:])
        raise SystemExit(1)
    return json.loads(done.stdout.strip().splitlines()[-1])
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="folder of the old build (pip install --target)")
    parser.add_argument("--new", required=True, help="folder of the new build")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--family", choices=("kernels", "product"), default="kernels")
    args = parser.parse_args()
    cases = PRODUCT_CASES if args.family == "product" else CASES
    ratios: dict = {}
    print("load average at the start:", os.getloadavg())
    for _ in range(args.rounds):
        old, new = run(args.old, args.dtype, cases), run(args.new, args.dtype, cases)
        if not ratios:
            print("old:", old["_file"], " new:", new["_file"])
        for key in old:
            if not key.startswith("_"):
                ratios.setdefault(key, []).append(new[key] / old[key])
    print("load average at the end:", os.getloadavg())
    for key, values in ratios.items():
        print(f"{key:45s} new/old median {statistics.median(values):.2f}  ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
