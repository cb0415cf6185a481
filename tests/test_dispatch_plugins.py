"""Third-party backends through the ``lse_dispatch.backends`` entry points.

A real package, ``tests/plugins/lse_toy_backends``, is built and installed by
pip into a temporary directory (not into the venv, so that its deliberately
broken plugin cannot disturb other tests); a fresh interpreter with that
directory on its path then exercises discovery, lazy loading and selection.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN_SOURCE = Path(__file__).parent / "plugins" / "lse_toy_backends"

SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("always")
report = {}
with warnings.catch_warnings(record=True) as caught:
    import numpy as np
    import lse_dispatch
    report["import_warnings"] = [str(w.message) for w in caught]
    report["loaded_at_import"] = "lse_toy_backend" in sys.modules
    x = np.linspace(-2.0, 3.0, 10)
    with lse_dispatch.trace() as seen:
        auto = lse_dispatch.logsumexp(x)
        with lse_dispatch.use("toy"):
            toy = lse_dispatch.logsumexp(x)
            lse_dispatch.softmax(x[:2])
        lse_dispatch.log_softmax(x, backend="toy.counting")
        lse_dispatch.logsumexp(x, backend="generic")
    report["call_warnings"] = [str(w.message) for w in caught][len(report["import_warnings"]):]
import lse_toy_backend
report["same_value"] = float(auto) == float(toy)
report["ran"] = seen.implementations
report["declined"] = [dict(r.declined) for r in seen.records]
report["toy_calls"] = lse_toy_backend.CALLS
report["available"] = {k: list(v) for k, v in lse_dispatch.available().items()}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """Install the test plugin package with pip into a fresh directory."""
    root = tmp_path_factory.mktemp("plugins")
    source = root / "source"
    shutil.copytree(PLUGIN_SOURCE, source)
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "lse_toy_backends-0.1.0.dist-info" / "entry_points.txt").exists()
    return target


def _run(plugin_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
    env.pop("LSE_DISPATCH_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_plugins_load_lazily_and_a_broken_one_is_skipped(plugin_path):
    report = _run(plugin_path)
    # Importing lse_dispatch neither loads plugins nor warns.
    assert report["import_warnings"] == []
    assert report["loaded_at_import"] is False
    # The first call loads them: the broken one warns once and is skipped.
    (warning,) = report["call_warnings"]
    assert "skipping backend plugin 'broken'" in warning and "broken on purpose" in warning
    assert "broken" not in report["available"]
    assert report["available"]["toy"] == ["toy.counting"]


def test_plugin_kernels_are_selected_by_name(plugin_path):
    report = _run(plugin_path)
    # auto prefers the built-in kernel; use("toy") and backend= select the plugin's.
    assert report["ran"] == ["numpy.blocked", "toy.counting", "generic", "toy.counting", "generic"]
    assert report["declined"][2]["toy.counting"] == "fewer than 4 entries"
    assert report["declined"][4]["toy.counting"] == "generic chosen"
    assert report["toy_calls"] == ["logsumexp", "log_softmax"]
    assert report["same_value"] is True
