"""The conformance suite tests itself: broken implementations must be caught
by the right family and check id, and every way in must work."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpmath")
pytest.importorskip("hypothesis")

from lse_dispatch import conformance
from lse_dispatch import log_softmax as _ours_log_softmax
from lse_dispatch import logsumexp as _ours_lse
from lse_dispatch import softmax as _ours_softmax
from lse_dispatch.conformance import cli
from lse_dispatch.conformance._checks import condition

# -- deliberately broken implementations -----------------------------------------


def _xp(x):
    import array_api_compat

    return array_api_compat.array_namespace(x)


def naive_logsumexp(a, axis=None, keepdims=False):
    """The unshifted formula: overflows at ln(max) and loses tiny results."""
    xp = _xp(a)
    return xp.log(xp.sum(xp.exp(a), axis=axis, keepdims=keepdims))


def naive_softmax(x, axis=None):
    xp = _xp(x)
    e = xp.exp(x)
    return e / xp.sum(e, axis=axis, keepdims=True)


def naive_log_softmax(x, axis=None):
    xp = _xp(x)
    return x - xp.log(xp.sum(xp.exp(x), axis=axis, keepdims=True))


NAIVE = ",".join(f"{__name__}:naive_{op}" for op in ("logsumexp", "softmax", "log_softmax"))


def _to_default_device(result):
    """Moves array-api-strict results to the default device: drops device1."""
    xp = _xp(result)
    default = xp.__array_namespace_info__().default_device()
    return result.to_device(default) if hasattr(result, "to_device") else result


def device_dropping_logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False, *, where=None):
    out = _ours_lse(a, axis=axis, b=b, keepdims=keepdims, return_sign=return_sign, where=where)
    return tuple(map(_to_default_device, out)) if return_sign else _to_default_device(out)


def device_dropping_softmax(x, axis=None, *, where=None):
    return _to_default_device(_ours_softmax(x, axis=axis, where=where))


def device_dropping_log_softmax(x, axis=None, *, where=None):
    return _to_default_device(_ours_log_softmax(x, axis=axis, where=where))


def mutating_softmax(x, axis=None, *, where=None):
    """Correct result, but scribbles over its (writeable NumPy) input."""
    result = _ours_softmax(x, axis=axis, where=where)
    if isinstance(x, np.ndarray) and x.flags.writeable:
        x[...] = 0.0
    return result


def _impl(name, lse, sm, lsm):
    return conformance.Implementation(name, {"logsumexp": lse, "softmax": sm, "log_softmax": lsm})


def _statuses(result, check_id, target=None):
    return {r.status for r in result.records if r.check == check_id and (target is None or r.target == target)}


# -- the suite catches what it should ----------------------------------------------


def test_naive_formula_is_caught_by_overflow_and_accuracy():
    result = conformance.run(
        NAIVE, backends="numpy:cpu", families=["overflow", "accuracy", "api"],
        checks=["overflow/at-ln-max/*", "accuracy/dominant-element/*", "api/b/*", "api/axis-int/*"],
    )
    assert not result.ok
    failing = {(r.family, r.check) for r in result.failures()}
    # Unshifted exp overflows at ln(max) of every dtype ...
    for op in ("logsumexp", "softmax", "log_softmax"):
        assert ("overflow", f"overflow/at-ln-max/{op}") in failing
    # ... and log(1 + 4e-18) rounds to 0.
    assert ("accuracy", "accuracy/dominant-element/logsumexp") in failing
    first = next(r for r in result.failures() if r.check == "overflow/at-ln-max/logsumexp")
    assert first.example and first.example["got"] and first.example["expected"]
    # No b parameter: reported as unsupported, never as a pass; plain axes still pass.
    assert _statuses(result, "api/b/logsumexp") == {"unsupported"}
    assert _statuses(result, "api/axis-int/logsumexp") == {"pass"}


def test_dropped_device_is_caught_by_metadata_device():
    pytest.importorskip("array_api_strict")
    broken = _impl("drops-device", device_dropping_logsumexp, device_dropping_softmax, device_dropping_log_softmax)
    result = conformance.run(broken, backends="array_api_strict", families=["metadata"], dtypes=["float64"])
    for op in ("logsumexp", "softmax", "log_softmax"):
        check = f"metadata/device/{op}"
        assert _statuses(result, check, "array_api_strict:device1") == {"fail"}
        assert _statuses(result, check, "array_api_strict:CPU_DEVICE") == {"pass"}
        assert _statuses(result, f"metadata/dtype/{op}", "array_api_strict:device1") == {"pass"}
    detail = next(r.detail for r in result.failures() if r.check == "metadata/device/softmax")
    assert "device1" in detail


def test_mutated_input_is_caught_by_input_safety():
    broken = _impl("mutates", _ours_lse, mutating_softmax, _ours_log_softmax)
    result = conformance.run(broken, backends="numpy:cpu", families=["input-safety"])
    assert _statuses(result, "input-safety/not-mutated/softmax") == {"fail"}
    assert _statuses(result, "input-safety/not-mutated/logsumexp") == {"pass"}
    assert _statuses(result, "input-safety/axis-out-of-range/softmax") == {"pass"}


def test_ours_passes_the_contract_rows():
    result = conformance.run("ours", backends="numpy,array_api_strict:device1", families=["special-values", "overflow"])
    assert result.ok, [(r.target, r.check, r.dtype, r.detail) for r in result.failures()]
    assert {r.target for r in result.records} == {"numpy:cpu", "numpy:readonly", "array_api_strict:device1"}
    assert len(result.records) > 100


def test_xfail_file_turns_failures_into_xfail_and_flags_xpass(tmp_path):
    xfail = tmp_path / "naive.toml"
    xfail.write_text(
        '[[xfail]]\ncheck = "overflow/at-ln-max/*"\nreason = "unshifted exp overflows"\n\n'
        '[[xfail]]\ncheck = "api/axis-int/logsumexp"\nbackend = "numpy*"\nreason = "declared but passes"\n'
    )
    result = conformance.run(NAIVE, backends="numpy:cpu", checks=["overflow/at-ln-max/*", "api/axis-int/logsumexp"],
                             xfail=xfail)
    assert _statuses(result, "overflow/at-ln-max/logsumexp") == {"xfail"}
    assert _statuses(result, "api/axis-int/logsumexp") == {"xpass"}
    assert result.ok  # nothing failed unexpectedly
    assert all(r.reason for r in result.records if r.status in ("xfail", "xpass"))


def test_bad_xfail_entry_is_rejected(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[xfail]]\ncheck = "api/*"\n')
    with pytest.raises(ValueError, match="reason"):
        conformance.load_xfails(bad)


def test_torch_adapter_reports_unsupported_not_pass():
    pytest.importorskip("torch")
    result = conformance.run("torch", backends="torch:cpu", checks=["api/b/*", "api/where/*", "api/axis-tuple/softmax",
                                                                    "api/axis-int/*"])
    assert _statuses(result, "api/b/logsumexp") == {"unsupported"}
    assert _statuses(result, "api/where/softmax") == {"unsupported"}
    assert _statuses(result, "api/axis-tuple/softmax") == {"unsupported"}
    assert _statuses(result, "api/axis-int/logsumexp") == {"pass"}
    assert result.skipped_targets == {} and result.targets == {"torch": ["torch:cpu"]}


def test_semiring_family_runs_the_functions_an_implementation_has():
    """Ours passes; torch's scaled idiom fails the issue's example; an author's lone logcumsumexp runs alone."""
    torch = pytest.importorskip("torch")
    result = conformance.run(["ours", "torch"], backends="numpy:cpu,torch:cpu", families=["semiring"], quick=True,
                             dtypes=["float64"])
    ours = [r for r in result.records if r.impl == "ours"]
    assert ours and all(r.status == "pass" for r in ours), [(r.check, r.detail) for r in ours if r.status != "pass"]
    assert {"semiring/logcumsumexp/dominant", "semiring/logmatmulexp/issue-example"} <= {r.check for r in ours}
    torch_example = {r.status for r in result.records if r.impl == "torch" and r.check == "semiring/logmatmulexp/issue-example"}
    assert torch_example == {"fail"}

    def prefix_sums_in_linear_space(x, axis, reverse=False):  # overflows, loses the tail
        flipped = torch.flip(x, (axis,)) if reverse else x
        out = torch.log(torch.cumsum(torch.exp(flipped), dim=axis))
        return torch.flip(out, (axis,)) if reverse else out

    naive = conformance.Implementation("naive-scan", {"logcumsumexp": prefix_sums_in_linear_space})
    result = conformance.run(naive, backends="torch:cpu", families=["semiring"], quick=True, dtypes=["float64"])
    assert {r.check.split("/")[1] for r in result.records} == {"logcumsumexp"}
    assert "semiring/logcumsumexp/dominant" in {r.check for r in result.failures()}


def test_condition_number_of_a_dominant_entry():
    # lse([0, -40]) = e^-40 (to first order); its relative condition number is 40.
    exact = np.array(math.log1p(math.exp(-40.0)))
    assert condition("logsumexp", [0.0, -40.0], exact=exact) == pytest.approx(40.0, rel=1e-6)
    # softmax_j's relative condition: |a_j|(1 - p_j) + sum_{i != j} p_i |a_i|.
    kappa = condition("softmax", [0.0, 3.0])
    p = np.exp([0.0, 3.0]) / np.exp([0.0, 3.0]).sum()
    assert kappa == pytest.approx([p[1] * 3.0, 3.0 * (1 - p[1])])


def test_backend_narrowing_by_environment(monkeypatch):
    monkeypatch.setenv("LSE_CONFORMANCE_BACKENDS", "numpy")
    monkeypatch.setenv("LSE_CONFORMANCE_DEVICE", "readonly,cpu")
    assert [t.label for t in conformance.select()] == ["numpy:cpu", "numpy:readonly"]
    with pytest.raises(ValueError, match="match no installed target"):
        conformance.select("no-such-library")


# -- the three ways in ------------------------------------------------------------------


def test_cli_writes_reports_and_exits_nonzero_on_failure(tmp_path, capsys):
    json_path, md_path = tmp_path / "report.json", tmp_path / "report.md"
    code = cli.main(["--impl", NAIVE, "--name", "naive", "--backends", "numpy:cpu", "--check", "overflow/at-ln-max/*",
                     "--json", str(json_path), "--markdown", str(md_path)])
    assert code == 1
    report = json.loads(json_path.read_text())
    assert report["ok"] is False and report["versions"]["numpy"] == np.__version__
    assert {r["check"] for r in report["records"] if r["status"] == "fail"} >= {"overflow/at-ln-max/logsumexp"}
    markdown = md_path.read_text()
    assert "| naive | numpy:cpu |" in markdown and "overflow/at-ln-max/logsumexp" in markdown
    assert "unexpected failure" in capsys.readouterr().out


def test_cli_exits_zero_when_everything_passes(capsys):
    assert cli.main(["--backends", "numpy:cpu", "--family", "special-values", "--dtype", "float32", "-q"]) == 0
    assert cli.main(["--backends", "nothing-like-this"]) == 2
    assert cli.main(["--list", "--backends", "numpy"]) == 0
    assert "accuracy/dominant-element/logsumexp" in capsys.readouterr().out


def test_pytest_plugin_in_another_project(tmp_path):
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["lse_dispatch.conformance.plugin"]\n')
    (tmp_path / "naive_impl.py").write_text(
        "import numpy as np\n"
        "def logsumexp(a, axis=None, keepdims=False):\n    return np.log(np.sum(np.exp(a), axis=axis, keepdims=keepdims))\n"
        "def softmax(x, axis=None):\n    e = np.exp(x)\n    return e / np.sum(e, axis=axis, keepdims=True)\n"
        "def log_softmax(x, axis=None):\n    return x - np.log(np.sum(np.exp(x), axis=axis, keepdims=True))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore",
               "--lse-impl", "naive_impl:logsumexp,naive_impl:softmax,naive_impl:log_softmax",
               "--lse-backends", "numpy:cpu", "--lse-check", "overflow/at-ln-max/*", "--lse-check", "api/b/*"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "overflow/at-ln-max/logsumexp" in done.stdout
    assert "3 skipped" not in done.stdout and "1 skipped" in done.stdout  # api/b/logsumexp: unsupported
    assert "9 failed" in done.stdout  # at-ln-max: 3 ops x float64, float32, float16
    # Without --lse-impl the plugin collects nothing.
    quiet = subprocess.run(command[:8], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "no tests ran" in quiet.stdout


def test_python_api_result_object():
    result = conformance.run("ours", backends="numpy:cpu", checks=["special-values/pos-inf/*"], dtypes=["float64"])
    assert isinstance(result, conformance.Result) and result.ok
    assert [r.status for r in result.records] == ["pass"] * 3
    assert result.counts()[("ours", "numpy:cpu", "special-values")]["pass"] == 3
    assert "| ours | numpy:cpu |" in result.to_markdown()
    assert json.loads(result.to_json())["implementations"][0]["strict"] is True


def test_importing_the_suite_imports_no_array_library():
    code = ("import sys, lse_dispatch.conformance, lse_dispatch.conformance.cli; "
            "print(sorted(m for m in ('torch', 'jax', 'dask', 'array_api_strict', 'scipy', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_docs_matrix_command_is_named():
    docs = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
    if not docs.exists():
        pytest.skip("docs/conformance.md not generated in this checkout")
    assert "python scripts/make_conformance_matrix.py" in docs.read_text()


# -- as a library author meets it ------------------------------------------------------

_AUTHOR_MODULE = '''\
import numpy as np

def lse(a, axis=None, b=None, keepdims=False, return_sign=False):
    """Shifted, but ignores return_sign."""
    m = np.max(a, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)

def sm(x, axis=None):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)

def logsumexp(a, axis=None, keepdims=False):
    return np.log(np.sum(np.exp(a), axis=axis, keepdims=keepdims))
'''


def _author_folder(tmp_path) -> Path:
    (tmp_path / "mymod.py").write_text(_AUTHOR_MODULE)
    return tmp_path


def _cli(*args, cwd):
    """The installed ``lse-dispatch`` command (not ``python -m``, which would
    put the current folder on sys.path by itself), without PYTHONPATH."""
    command = Path(sys.executable).with_name("lse-dispatch")
    if not command.exists():
        pytest.skip("the lse-dispatch command is not installed beside this Python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(command), "conformance", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_impl_is_found_in_the_current_folder_and_a_subset_runs(tmp_path):
    done = _cli("--impl", "mymod:lse", "--backends", "numpy:cpu", "--quick", "--family", "api",
                cwd=_author_folder(tmp_path))
    assert done.returncode == 1, done.stderr  # it ignores return_sign: that fails
    assert "No module named" not in done.stdout + done.stderr
    assert "mymod: no softmax, log_softmax: their checks did not run" in done.stdout
    checks = re.findall(r"^FAIL mymod numpy:cpu (\S+) ", done.stdout, flags=re.MULTILINE)
    assert checks and all(check.endswith("/logsumexp") for check in checks)


def test_subsets_by_position_name_and_module(monkeypatch, tmp_path):
    monkeypatch.chdir(_author_folder(tmp_path))
    positional = conformance.load("mymod:lse,mymod:sm")
    assert sorted(positional.functions) == ["logsumexp", "softmax"]
    named = conformance.load("softmax=mymod:sm")
    assert list(named.functions) == ["softmax"] and named.name == "mymod"
    module = conformance.load("mymod")
    assert list(module.functions) == ["logsumexp"] and module.functions["logsumexp"].__name__ == "logsumexp"
    result = conformance.run(named, backends="numpy:cpu", families=["special-values", "api"])
    assert result.records and {r.check.rsplit("/", 1)[-1] for r in result.records} == {"softmax"}
    assert result.implementations[0]["functions"] == ["softmax"]


@pytest.mark.parametrize(("spec", "message"), [
    ("nomod:f", "cannot import 'nomod' (looked in {here} and sys.path): No module named 'nomod'"),
    ("mymod:nope", "'mymod:nope': 'mymod' has no attribute 'nope'"),
    ("exp=mymod:lse", "--impl 'exp=mymod:lse': 'exp' is not one of logsumexp, softmax, log_softmax, logcumsumexp, logmatmulexp"),
    ("softmax=mymod:sm,mymod:lse", "--impl 'softmax=mymod:sm,mymod:lse': a positional reference ('mymod:lse') "
                                   "follows a named one"),
    ("mymod:lse,softmax=mymod:sm,softmax=mymod:sm", "--impl 'mymod:lse,softmax=mymod:sm,softmax=mymod:sm': "
                                                    "softmax is given twice"),
])
def test_impl_mistakes_are_one_line_usage_errors(tmp_path, spec, message):
    here = _author_folder(tmp_path)
    done = _cli("--impl", spec, "--backends", "numpy:cpu", cwd=here)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"lse-dispatch conformance: {message.format(here=here)}\n"


def test_ignoring_return_sign_is_reported_as_a_missing_pair(monkeypatch, tmp_path):
    monkeypatch.chdir(_author_folder(tmp_path))
    result = conformance.run("mymod:lse", backends="numpy:cpu", checks=["api/return-sign/logsumexp",
                                                                       "special-values/negative-sum-sign/logsumexp"],
                             dtypes=["float64"])
    details = {r.check: r.detail for r in result.records}
    assert details["api/return-sign/logsumexp"] == (
        "logsumexp(..., return_sign=True): expected a (value, sign) pair, got numpy.ndarray of shape (3, 4)")
    assert "expected a (value, sign) pair, got numpy" in details["special-values/negative-sum-sign/logsumexp"]


def test_printed_rerun_commands_run_exactly_that_check(tmp_path):
    here = _author_folder(tmp_path)
    first = _cli("--impl", "mymod:lse,mymod:sm", "--backends", "numpy", "--quick", "--family", "invariants",
                 "--family", "api", cwd=here)
    reruns = re.findall(r"^  rerun: (.+)$", first.stdout, flags=re.MULTILINE)
    failures = re.findall(r"^FAIL (\S+) (\S+) (\S+) (\S+): ", first.stdout, flags=re.MULTILINE)
    assert len(reruns) == len(failures) >= 2
    for command, (impl, target, check, dtype) in [(reruns[0], failures[0]), (reruns[-1], failures[-1])]:
        words = shlex.split(command)
        assert words[:2] == ["lse-dispatch", "conformance"]
        again = _cli(*words[2:], "--json", str(tmp_path / "again.json"), cwd=here)
        assert again.returncode == 1, again.stderr
        records = json.loads((tmp_path / "again.json").read_text())["records"]
        assert [(r["impl"], r["target"], r["check"], r["dtype"], r["status"]) for r in records] == [
            (impl, target, check, dtype, "fail")]


def test_plugin_usage_mistakes_are_one_line_errors(tmp_path):
    here = _author_folder(tmp_path)
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "lse_dispatch.conformance.plugin"]
    for extra, message in [
        (["--lse-impl", "mymod:lse", "--lse-backends", "nump"], "backend pattern(s) nump match no installed target"),
        (["--lse-impl", "nomod:f"], "cannot import 'nomod'"),
        (["--lse-impl", "mymod:lse", "--lse-family", "acuracy"], "unknown family acuracy"),
    ]:
        done = subprocess.run(base + extra, cwd=here, capture_output=True, text=True, timeout=300)
        output = done.stdout + done.stderr
        assert done.returncode == 4, output  # pytest's usage error
        assert "INTERNALERROR" not in output and "Traceback" not in output
        errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
        assert len(errors) == 1 and message in errors[0], output


def test_plugin_rerun_line_runs_exactly_that_item(tmp_path):
    here = _author_folder(tmp_path)
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    done = subprocess.run(base + ["-p", "lse_dispatch.conformance.plugin", "--lse-impl", "mymod:lse,mymod:sm",
                                  "--lse-backends", "numpy:cpu", "--lse-check", "overflow/*"],
                          cwd=here, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    reruns = re.findall(r"^  rerun: python -m pytest (.+)$", done.stdout, flags=re.MULTILINE)
    assert reruns
    again = subprocess.run(base + shlex.split(reruns[0]), cwd=here, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and re.search(r"^1 failed in ", again.stdout.splitlines()[-1]), again.stdout


def test_conformance_modules_import_without_cycles():
    """Walk every import edge between the suite's modules (including imports
    inside functions): the graph has no cycle."""
    import ast
    import importlib.util

    package = Path(importlib.util.find_spec("lse_dispatch.conformance").origin).parent
    edges: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        name = path.stem
        edges[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [alias.name for alias in node.names]
                edges[name].update(t.split(".")[0] for t in targets)
    cycles = []

    def visit(node, stack):
        for nxt in sorted(edges.get(node, ())):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt in edges:
                visit(nxt, stack + [nxt])

    for start in edges:
        visit(start, [start])
    assert cycles == []
    assert "_family_api" in edges["_registry"] and "_registry" not in edges["_checks"]
