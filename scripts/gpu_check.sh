#!/usr/bin/env bash
# The one prepared GPU check (issues 13 and 16), for a session that is lent a GPU.
#
#   bash scripts/gpu_check.sh --fetch-wheels   # here, before: puts the wheels the GPU image lacks in .gpu-wheels/
#   bash scripts/gpu_check.sh                  # there, from the repository root (at most about 9 minutes)
#   STEPS="bench report" bash scripts/gpu_check.sh   # only those steps (a rerun)
#   bash scripts/gpu_check.sh --dry-run        # on a CPU machine: every step on CPU tensors, tiny sizes
#
# On the GPU machine (no network; its python3 holds torch, triton, jax, cupy,
# pytest, mpmath, hypothesis; not array-api-compat), carry .gpu-wheels, e.g.
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=600)
# Steps, each under its own time limit (75 + 100 + 120 + 70 + 90 + 45 s on the
# GPU; about 5 minutes on the H200, so that a second call fits in a session's
# 15 minutes of device time) so that one slow step cannot eat the others' time:
# environment, install, a smoke test of torch.triton and cupy-fused, the GPU
# tests, the benchmark (torch and CuPy), JAX inside jit against jax.nn (issue
# 16's cases), `lse-dispatch report` and the conformance suite on the GPU
# backends.  Everything goes to docs/gpu/<device>-<date>/, and after every step
# into $OUT/gpu_check.tgz when $OUT is set (the device tool brings it back,
# also when the call is cut off).  A step that fails is recorded and the next
# one runs.
set -uo pipefail
# Several processes share the GPU (pytest's workers, JAX beside torch): no process takes 75% of it up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mode="${1:-run}"
wheels="$root/.gpu-wheels"

if [ "$mode" = "--fetch-wheels" ]; then
    # Pure-Python wheels the GPU image lacks (pinned as in requirements/constraints.txt).
    python3 -m pip download --quiet --no-deps --dest "$wheels" "array-api-compat==1.16.0"
    ls -la "$wheels"
    exit 0
fi

python=python3
dry=0
if [ "$mode" = "--dry-run" ]; then
    dry=1
    python="${PYTHON:-$root/.venv/bin/python}"
    out_dir="$(mktemp -d /tmp/gpu_check_dry.XXXXXX)"
else
    device="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_-')"
    out_dir="$root/docs/gpu/${device:-gpu}-$(date -u +%Y-%m-%d)"
fi
mkdir -p "$out_dir"
log="$out_dir/gpu_check.log"
: > "$log"
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$log"; }
want() {  # the steps to run: all, or those named in $STEPS (for a rerun of the missing ones)
    [[ " ${STEPS:-smoke pytest bench jax report conformance} " == *" $1 "* ]]
}
ship() {  # everything so far into $OUT (one file: the device tool brings back at most 8)
    [ -n "${OUT:-}" ] && tar -czf "$OUT/gpu_check.tgz" -C "$(dirname "$out_dir")" "$(basename "$out_dir")" 2>/dev/null
    return 0
}
step() {  # step NAME SECONDS OUTFILE COMMAND...
    local name="$1" seconds="$2" outfile="$3"
    shift 3
    say "step $name (limit ${seconds}s) -> ${outfile#$root/}"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$seconds" "$@" > "$outfile" 2>&1
    local rc=$?
    say "step $name: exit $rc after $((SECONDS - start))s$([ $rc -eq 124 ] && echo ' (time limit)')"
    tail -n 3 "$outfile" | sed 's/^/    /' | tee -a "$log"
    ship
}

# 1. Environment.
{
    date -u
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    "$python" -c "import sys; print('python', sys.version)"
    for m in torch triton jax cupy numpy array_api_compat mpmath hypothesis pytest; do
        "$python" -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>&1 | tail -1
    done
    "$python" -c "import torch; print('cuda available', torch.cuda.is_available(), torch.version.cuda)"
    uptime
} > "$out_dir/env.txt" 2>&1
say "environment written"

# 2. Install: array-api-compat from the carried wheels, then this checkout.
if [ "$dry" = 0 ]; then
    if ! "$python" -c "import array_api_compat" 2>/dev/null; then
        "$python" -m pip install --quiet --no-index --no-deps --find-links "$wheels" array-api-compat >> "$log" 2>&1 \
            || say "array-api-compat: no wheel in .gpu-wheels (run --fetch-wheels here and carry it)"
    fi
    if ! "$python" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . >> "$log" 2>&1; then
        # No usable setuptools there: lay the package out by links instead.
        say "pip install -e . failed; using a linked package on PYTHONPATH"
        shim="$(mktemp -d)"
        mkdir -p "$shim/lse_dispatch"
        ln -s "$root"/lse_dispatch/* "$shim/lse_dispatch/"
        ln -s "$root/backends" "$shim/lse_dispatch/backends"
        ln -s "$root/conformance" "$shim/lse_dispatch/conformance"
        export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
cli=("$python" -m lse_dispatch)
ship

# 3. Smoke test: the kernels run and agree with the generic path (fails fast if not).
cat > "$out_dir/smoke.py" <<'EOF'
import os, sys
import numpy as np
import torch
import lse_dispatch
dry = os.environ.get("TRITON_INTERPRET") == "1"
device = "cpu" if dry else "cuda"
rng = np.random.default_rng(0)
failures = 0
for shape in [(7, 1000), (3, 5000), (2, 70_000), (100_000,)]:
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.tensor(rng.normal(size=shape) * 5, dtype=dtype, device=device)
        for op in ("logsumexp", "softmax", "log_softmax"):
            with lse_dispatch.use("torch.triton"), lse_dispatch.trace() as t:
                got = getattr(lse_dispatch, op)(x, axis=-1)
            with lse_dispatch.use("generic"):
                want = getattr(lse_dispatch, op)(x, axis=-1)
            err = float(((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-30)).max())
            bad = t.implementations != ["torch.triton"] or err > 8 * torch.finfo(dtype).eps
            failures += bad
            print(f"{op:11s} {str(shape):12s} {str(dtype):15s} ran {t.implementations} rel.err {err:.2e}{'  BAD' if bad else ''}")
if not dry:
    try:
        import cupy
        xc = cupy.asarray(rng.normal(size=(3, 3000)).astype(np.float32))
        for op in ("logsumexp", "softmax", "log_softmax"):
            with lse_dispatch.trace() as t:
                got = getattr(lse_dispatch, op)(xc, axis=-1)
            want = getattr(lse_dispatch, op)(cupy.asnumpy(xc), axis=-1)
            err = float(np.max(np.abs(cupy.asnumpy(got) - want) / np.maximum(np.abs(want), 1e-30)))
            bad = t.implementations != ["cupy-fused"] or err > 8 * 2**-23
            failures += bad
            print(f"cupy {op:11s} ran {t.implementations} rel.err {err:.2e}{'  BAD' if bad else ''}")
    except ImportError as exc:
        print("cupy:", exc)
print("smoke failures:", failures)
sys.exit(1 if failures else 0)
EOF
if [ "$dry" = 1 ]; then export TRITON_INTERPRET=1; fi
want smoke && step smoke "$([ $dry = 1 ] && echo 300 || echo 75)" "$out_dir/smoke.txt" "$python" "$out_dir/smoke.py"
rm -f "$out_dir/smoke.py"

# 4. GPU tests: torch:cuda and cupy variants, the CuPy kernel's tests, the Triton kernels compiled.
if [ "$dry" = 1 ]; then
    want pytest && step pytest 300 "$out_dir/pytest.txt" "$python" -m pytest -p no:cacheprovider -q -n 2 tests/test_triton_kernels.py \
        -k "declines or fully_masked" -ra
else
    want pytest && step pytest 100 "$out_dir/pytest.txt" "$python" -m pytest -p no:cacheprovider -p no:benchmark -q -n 12 tests \
        -k "(cuda and not jax) or cupy or triton_kernels" -ra
fi

# 5. Benchmark (the issue's targets, met or missed, are its last lines).
if [ "$dry" = 1 ]; then
    want bench && step bench 300 "$out_dir/bench.txt" "$python" benchmarks/gpu_bench.py --dry-run --max-exp 10 --json "$out_dir/bench.json"
else
    want bench && step bench 120 "$out_dir/bench.txt" "$python" benchmarks/gpu_bench.py --without jax --repeats 15 --json "$out_dir/bench.json"
fi

# 6. JAX inside the user's jit against jax.nn, issue 16's cases (forward and value_and_grad).
if [ "$dry" = 1 ]; then
    say "step jax: not in a dry run (needs JAX's GPU backend)"
else
    want jax && step jax 70 "$out_dir/jax_jit.txt" "$python" benchmarks/jax_jit_bench.py --device gpu --only forward,grad \
        --repeats 7 --save "$out_dir/jax_jit.json"
fi

# 7. The catalogue against the oracle on the GPU backends.
if [ "$dry" = 1 ]; then
    want report && step report 900 "$out_dir/report.md" "${cli[@]}" report --backends torch --devices cpu --quick
else
    want report && step report 90 "$out_dir/report.md" "${cli[@]}" report --backends torch,cupy,jax --devices cuda,gpu --quick
fi

# 8. The conformance suite on them.
if [ "$dry" = 1 ]; then
    want conformance && step conformance 450 "$out_dir/conformance.txt" "${cli[@]}" conformance --backends torch:cpu --quick -q \
        --family special-values --json "$out_dir/conformance.json" --markdown "$out_dir/conformance.md"
else
    want conformance && step conformance 45 "$out_dir/conformance.txt" "${cli[@]}" conformance --backends torch,cupy --device cuda --quick -q \
        --json "$out_dir/conformance.json" --markdown "$out_dir/conformance.md"
fi

say "done: ${out_dir#$root/}"
ship
