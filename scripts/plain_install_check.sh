#!/usr/bin/env bash
# A user's first contact, checked: a fresh venv, `pip install <checkout>` with
# no extras, run from another folder; both main jobs must succeed in quick
# mode, the oracle must take an empty reduction, and `lse-dispatch bench`
# (maintainer tooling, not installed) must say so in one line.
#   bash scripts/plain_install_check.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# A clean copy of the checkout: setuptools builds in the source folder and
# never empties build/, whose stale files would end up in the wheel.
mkdir source
tar -C "$root" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ -cf - . | tar -C source -xf -
python3 -m venv venv
venv/bin/python -m pip install --quiet --upgrade pip
venv/bin/python -m pip install --quiet ./source
echo "plain install: $(venv/bin/python -m pip list --format=freeze | tr '\n' ' ')"
venv/bin/lse-dispatch --version
venv/bin/lse-dispatch report --quick
venv/bin/lse-dispatch conformance --quick
venv/bin/python -c "
import numpy as np
from lse_dispatch import oracle
out = oracle.exact_logsumexp(np.zeros((10, 0)), axis=0)
assert out.shape == (0,), out.shape
assert oracle.exact_softmax(np.zeros((0, 3)), axis=1).shape == (0, 3)
print('oracle: empty reductions ok')
"
set +e
message="$(venv/bin/lse-dispatch bench --quick 2>&1)"
code=$?
set -e
if [ "$code" != 2 ] || [ "$(printf '%s\n' "$message" | wc -l)" != 1 ]; then
    echo "lse-dispatch bench outside a checkout: expected one line and exit 2, got $code: $message" >&2
    exit 1
fi
echo "bench outside a checkout (exit 2): $message"
echo "plain install check passed"
