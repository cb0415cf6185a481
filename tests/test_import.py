"""Importing lse_dispatch pulls in no array library beyond NumPy."""

from __future__ import annotations

import subprocess
import sys

import pytest

FORBIDDEN = ("torch", "jax", "jaxlib", "dask", "cupy", "array_api_strict", "scipy", "mpmath", "ml_dtypes",
             "distributed", "sparse", "ndonnx")


@pytest.mark.parametrize("module", ["lse_dispatch", "lse_dispatch.backends", "lse_dispatch.cases"])
def test_import_pulls_in_no_array_library(module):
    code = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"importing {module} imported {result.stdout.strip()}"


def test_backend_catalogue_detects_without_importing():
    code = (
        "import sys, numpy as np\n"
        "from lse_dispatch import logsumexp, backends\n"
        "[spec.name for spec in map(backends.get, backends.BUILTIN)]\n"
        "float(logsumexp(np.array([0.0, 1.0])))\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", result.stdout
