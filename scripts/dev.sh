#!/usr/bin/env bash
# Bootstrap a pinned .venv (python3 and pip are all it needs), then run a job.
#   bash scripts/dev.sh report   - the main job: check every installed backend against the oracle
#   bash scripts/dev.sh test     - the test suite
#   bash scripts/dev.sh bench    - the benchmark (lse-dispatch bench)
#   bash scripts/dev.sh conformance - the conformance suite on our implementation
#   bash scripts/dev.sh lint     - ruff and mypy (configured in pyproject.toml)
# Extra arguments go to the job.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.lse-dispatch-installed"
wanted="$(cat pyproject.toml setup.py requirements/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    # pip's and the build backend's chatter (setuptools prints a notice box
    # for every editable install) goes to a log, shown only if pip fails.
    log="$venv/install.log"
    echo "installing the pinned environment into .venv (once; log: $log)..." >&2
    if ! { "$venv/bin/python" -m pip install --quiet --upgrade pip &&
           # The constraints pin torch==2.13.0 (a CPU build) and every other package.
           "$venv/bin/python" -m pip install --quiet -c requirements/constraints.txt -e ".[all]"; } >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "pip failed; the full log is $log" >&2
        exit 1
    fi
    echo "$wanted" > "$stamp"
fi
job="${1:-test}"
shift || true
if [ "$job" = test ] || [ "$job" = conformance ]; then
    # JAX's persistent compilation cache, shared by these two jobs and by pytest's
    # workers: an XLA program that takes 0.1 s or more to compile (each shape of
    # the JAX logcumsumexp program takes about 1.2 s) is compiled once per checkout
    # and loaded after that (the tests' JAX semiring cases: 7m46s writing it,
    # 1m53s reading it; docs/semiring.md).
    export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$root/build/jax-cache}"
    export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.1}"
fi
case "$job" in
    report) exec "$venv/bin/lse-dispatch" report "$@" ;;
    bench) exec "$venv/bin/lse-dispatch" bench "$@" ;;
    conformance) exec "$venv/bin/lse-dispatch" conformance "$@" ;;
    lint) "$venv/bin/ruff" check "$@" . && exec "$venv/bin/mypy" ;;
    test)
        # The numba kernels (extra "fast"), compiled or loaded once here, so that
        # pytest's two workers load them from the on-disk cache instead of each
        # compiling them (docs/fused_cpu.md has the times).
        "$venv/bin/python" -c "from lse_dispatch.backends import _fused_cpu as f; f.available() and f.warm_up()" ||
            echo "warming up the numba kernels failed; the tests will say why" >&2
        exec "$venv/bin/python" -m pytest -n 2 "$@" ;;
    *) echo "unknown job '$job' (report, test, bench, conformance or lint)" >&2; exit 2 ;;
esac
