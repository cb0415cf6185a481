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
MISBEHAVING_SOURCE = Path(__file__).parent / "plugins" / "lse_misbehaving_backends"

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


def _install(source_dir: Path, root: Path, dist: str) -> Path:
    """Install a test plugin package with pip into a fresh directory under ``root``."""
    source = root / "source"
    shutil.copytree(source_dir, source)
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / f"{dist}-0.1.0.dist-info" / "entry_points.txt").exists()
    return target


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    return _install(PLUGIN_SOURCE, tmp_path_factory.mktemp("plugins"), "lse_toy_backends")


@pytest.fixture(scope="module")
def misbehaving_path(tmp_path_factory):
    return _install(MISBEHAVING_SOURCE, tmp_path_factory.mktemp("misbehaving"), "lse_misbehaving_backends")


def _run(plugin_path, script=SCRIPT):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
    env.pop("LSE_DISPATCH_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
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


CONTAINMENT_SCRIPT = r"""
import json, warnings
import numpy as np
import lse_dispatch
from lse_dispatch import oracle
report = {"calls": {}}
x = np.array([[0.5, -1.0, 2.0], [1.0, 3.0, -2.0]])
where = np.array([[True, False, True], [True, True, True]])
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    report["available"] = sorted(lse_dispatch.available())
report["load_warnings"] = [str(w.message) for w in caught]
for choice in ("auto", "explodes", "declines_raises", "wrong_shape", "wrong_dtype", "wrong_library", "generic"):
    for op in ("logsumexp", "softmax", "log_softmax"):
        with warnings.catch_warnings(record=True) as caught, lse_dispatch.use(choice):
            out = getattr(lse_dispatch, op)(x, axis=1, where=where)
        exact = getattr(oracle, "exact_" + op)(x, axis=1, where=where)
        errors = oracle.ulp_error(out, exact, "float64")
        report["calls"][f"{choice}/{op}"] = {
            "type": type(out).__name__, "shape": list(out.shape), "dtype": str(out.dtype),
            "worst_ulps": float(errors.max()), "warnings": [str(w.message) for w in caught],
        }
print(json.dumps(report))
"""


def test_misbehaving_plugins_are_contained(misbehaving_path):
    """A plugin's broken kernel warns, names itself and falls back; a malformed spec is skipped."""
    report = _run(misbehaving_path, CONTAINMENT_SCRIPT)
    # kernels=(None,) is refused when the plugins load, with the reason; the rest load.
    (refused,) = report["load_warnings"]
    assert "skipping backend plugin 'no_kernels'" in refused and "not Kernel" in refused
    assert "no_kernels" not in report["available"]
    assert {"explodes", "declines_raises", "wrong_shape", "wrong_dtype", "wrong_library"} <= set(report["available"])
    expected_problem = {
        "explodes": "raised RuntimeError: kernel exploded mid-call",
        "declines_raises": "declines() raised ValueError: declines exploded",
        "wrong_shape": "returned shape",
        "wrong_dtype": "returned dtype float16, expected float64",
        "wrong_library": "returned list",
    }
    for key, outcome in report["calls"].items():
        choice, op = key.split("/")
        # Every call returns the right array, whatever the plugin did.
        assert outcome["type"] == "ndarray", key
        assert outcome["shape"] == ([2] if op == "logsumexp" else [2, 3]), key
        assert outcome["dtype"] == "float64", key
        assert outcome["worst_ulps"] <= 4.0, key
        if choice in expected_problem:
            (message,) = outcome["warnings"]
            assert f"backend plugin {choice!r}" in message and expected_problem[choice] in message, (key, message)
        elif choice == "generic":
            assert outcome["warnings"] == [], key
    # Under auto the first plugin that takes the call (alphabetical: declines_raises,
    # then explodes, ...) is contained: warnings, but right values (checked above).
    assert report["calls"]["auto/logsumexp"]["warnings"], report["calls"]["auto/logsumexp"]
