"""The wheel as a user gets it: what it ships, its metadata, its long description."""

from __future__ import annotations

import re
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


#: Not part of a clean checkout: left out of the copy the wheel is built from
#: (setuptools never empties build/, so a stale file there would be shipped).
LOCAL = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                               ".hypothesis", "conformance.json")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a clean copy of this checkout (pip, build isolation,
    no deps), and pip's output."""
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source") / "lse-dispatch"
    shutil.copytree(ROOT, source, ignore=LOCAL)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), "-v", str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out.glob("lse_dispatch-*.whl")
    return path, done.stdout + done.stderr


def test_build_prints_no_setuptools_warning_box(wheel):
    _, output = wheel
    assert "Package would be ignored" not in output
    assert "is absent from the `packages` configuration" not in output


def test_wheel_ships_the_library_and_no_maintainer_tooling(wheel):
    path, _ = wheel
    names = zipfile.ZipFile(path).namelist()
    assert "lse_dispatch/conformance/xfail/ours.toml" in names
    assert "lse_dispatch/backends/_target.py" in names and "lse_dispatch/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    tooling = [n for n in names if re.search(r"bench|make_.*matrix|scripts/|benchmarks/", n)]
    assert tooling == []
    assert {n.split("/")[0] for n in names} == {"lse_dispatch", path.name.split("-")[0] + "-" +
                                                path.name.split("-")[1] + ".dist-info"}


def test_metadata_license_dependencies_and_long_description(wheel):
    path, _ = wheel
    archive = zipfile.ZipFile(path)
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: BSD-3-Clause" in metadata
    assert re.search(r"^Requires-Dist: mpmath>=1\.3$", metadata, flags=re.MULTILINE)
    assert not re.search(r"^Requires-Dist: ml-dtypes(?!.*extra)", metadata, flags=re.MULTILINE)
    assert "Description-Content-Type: text/markdown" in metadata
    body = metadata.split("\n\n", 1)[1]
    assert "# lse-dispatch" in body and "## Install" in body
    # No relative link or image is left to break on a package index.
    assert re.findall(r"\]\((?![a-z][a-z0-9+.-]*:|#)[^)]*\)", body, flags=re.IGNORECASE) == []


def test_long_description_keeps_absolute_links_and_spells_out_relative_ones():
    long_description = runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")["long_description"]
    text = ("![plot](docs/bench/bench.png) see [the design](docs/dispatch.md), [`docs/x.md`](docs/x.md), "
            "[the standard](https://data-apis.org/array-api/) and [below](#install).")
    assert long_description(text) == (
        "*(plot: `docs/bench/bench.png` in the source repository)* see the design (`docs/dispatch.md` in the "
        "source repository), `docs/x.md` (in the source repository), [the standard](https://data-apis.org/array-api/) "
        "and [below](#install)."
    )
