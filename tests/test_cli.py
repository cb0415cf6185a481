"""The lse-dispatch command: version, usage mistakes, progress, help texts."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

import lse_dispatch
from lse_dispatch import __main__ as cli
from lse_dispatch import _report, backends
from lse_dispatch._progress import Progress


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lse_dispatch", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_version():
    done = _run("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"lse-dispatch {lse_dispatch.__version__}\n", "")


def test_unknown_subcommand_names_it_and_lists_the_valid_ones(capsys):
    assert cli.main(["reprot"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == ("lse-dispatch: unknown subcommand 'reprot'; did you mean 'report'? "
                           "(choose from report, conformance, bench)")
    assert cli.main(["frobnicate"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lse-dispatch: unknown subcommand 'frobnicate' (choose from report, conformance, bench)")


def test_no_subcommand_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lse-dispatch [--version] {report,conformance,bench}")
    assert cli.main(["--help"]) == 0
    assert "check every installed backend" in capsys.readouterr().out


def test_report_with_an_unknown_backend_is_one_line(capsys):
    assert _report.main(["--backends", "bogus"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("lse-dispatch report: unknown backend 'bogus'; known: " + ", ".join(backends.BUILTIN) + "\n")


def test_report_with_an_uninstalled_backend_is_one_line(capsys):
    missing = [spec.name for spec in map(backends.get, backends.BUILTIN) if not spec.installed()]
    if not missing:
        pytest.skip("every built-in backend is installed here")
    assert _report.main(["--backends", missing[0]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"lse-dispatch report: backend {missing[0]!r} is not installed here (installed: numpy")


def test_report_runs_and_is_quiet_off_a_terminal(capsys):
    assert _report.main(["--backends", "numpy", "--quick"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # no progress when stderr is not a terminal
    assert "| numpy | cpu | float64 |" in out and ", 0 deviations" in out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only():
    terminal, pipe = _Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        with Progress(3, "report", stream=stream) as progress:
            progress.step("a")
            progress.note("numpy:cpu done")
            progress.step("b")
            progress.step("c")
    assert pipe.getvalue() == ""
    text = terminal.getvalue()
    assert "\rreport [1/3] a" in text and "numpy:cpu done\n" in text and "\rreport [3/3] c" in text
    assert text.endswith("\r")  # the line is cleared when the job ends


@pytest.mark.parametrize("subcommand", ["report", "conformance", "bench"])
def test_help_texts_have_no_rest_markup(subcommand):
    done = _run(subcommand, "--help")
    if subcommand == "bench" and done.returncode == 2:
        pytest.skip("no checkout beside the package")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: lse-dispatch {subcommand}")
    assert not re.search(r"``|:func:|:class:|:mod:|:data:", done.stdout), done.stdout
