"""``lse-dispatch bench`` (benchmarks/bench.py of the checkout): the quick mode
end to end, the target arithmetic, and what a checkout-less install says."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lse_dispatch.__main__ import BENCH_MISSING, load_checkout_module

bench = load_checkout_module("benchmarks/bench.py")
if bench is None:  # pragma: no cover - the tests run from a checkout
    pytest.skip("benchmarks/bench.py is not in this checkout", allow_module_level=True)
pytest.importorskip("scipy")


def test_quick_numpy_run_writes_json_and_plot(tmp_path, capsys):
    assert bench.main(["--quick", "--only", "numpy", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["quick"] is True
    assert "QUICK SMOKE TEST" in printed and "(smoke test)" in printed
    cases = {c.label for c in bench.QUICK_CASES["numpy"]}
    assert {(t["case"], t["op"]) for t in report["timings"]} == {(c, op) for c in cases for op in bench.OPS}
    assert all(t["median_s"] > 0 and t["samples"] == 2 for t in report["timings"])
    ours = [t for t in report["timings"] if t["implementation"] == "lse_dispatch"]
    assert ours and all(t["kernel"] for t in ours)  # which kernel auto ran is named
    # Thread counts and load are stated with the figures.
    assert "load average at start" in report["machine"] and "cpus" in report["machine"]
    # Every target is printed with its verdict and the measured value.
    assert report["targets"]
    for target in report["targets"]:
        assert ("met" if target["met"] else "missed" if target["stretch"] else "MISSED") in printed
        assert f"{target['measured']:8.2f}" in printed
    names = {t["name"] for t in report["targets"]}
    assert "numpy float64: <= 1.0x SciPy" in names and "numpy 10 entries: <= 5 us over max/exp/sum/log" in names
    # --render turns the JSON into Markdown tables, labelled as a smoke test.
    assert bench.main(["--render", str(tmp_path / "bench.json")]) == 0
    markdown = capsys.readouterr().out
    assert "smoke test" in markdown
    rows = sum(1 for t in report["timings"] if t["op"] == "logsumexp")
    assert markdown.count("\n| numpy | logsumexp |") == rows
    counted = [t for t in report["targets"] if not t["stretch"]]
    met = sum(target["met"] for target in counted)
    assert f"{met} of {len(counted)} targets met" in markdown and "(smoke test)." in markdown
    pytest.importorskip("matplotlib")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --plot draws the same run's plot again from its JSON.
    assert bench.main(["--render", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "again.png")]) == 0
    assert capsys.readouterr().out == markdown
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _timing(op, case, name, seconds, group="numpy", peak=None, residuals=None):
    return bench.Timing(op, case.label, case.role, case.size, case.nbytes, group, name, seconds, 5, seconds,
                        peak, residuals)


def _verdicts(timings):
    report = bench.Report("test", False, {}, {}, timings)
    bench.judge_targets(report)
    return {(v.name, v.op, v.case): (round(v.measured, 3), v.met) for v in report.targets}


def test_targets_are_judged_from_the_measured_ratios():
    big, tiny = bench.FULL_CASES["numpy"][0], bench.FULL_CASES["numpy"][-1]
    small64 = next(c for c in bench.FULL_CASES["numpy"] if c.role == "small64")
    verdicts = _verdicts([
        _timing("logsumexp", big, "lse_dispatch", 0.030, peak=big.nbytes // 20),
        _timing("logsumexp", big, "bare np.exp", 0.015),
        _timing("logsumexp", big, "scipy.special", 0.120),
        _timing("softmax", big, "lse_dispatch", 0.030, peak=big.nbytes + big.nbytes // 5),
        _timing("logsumexp", tiny, "lse_dispatch", 20e-6),
        _timing("logsumexp", tiny, "bare max/exp/sum/log", 6e-6),
        _timing("softmax", small64, "lse_dispatch", 9e-6),
        _timing("softmax", small64, "scipy.special", 10e-6),
    ])
    assert verdicts[("numpy: <= 1.0x bare np.exp", "logsumexp", big.label)] == (2.0, False)
    assert verdicts[("numpy moonshot: <= 0.5x bare np.exp", "logsumexp", big.label)] == (2.0, False)
    assert verdicts[("numpy: >= 3x faster than SciPy", "logsumexp", big.label)] == (4.0, True)
    assert verdicts[("numpy: peak extra memory <= 10% of the input", "logsumexp", big.label)] == (5.0, True)
    # softmax: the output does not count; 20 % beyond it misses.
    assert verdicts[("numpy: peak extra memory <= 10% of the input", "softmax", big.label)] == (20.0, False)
    assert verdicts[("numpy 10 entries: <= 5 us over max/exp/sum/log", "logsumexp", tiny.label)] == (14.0, False)
    assert verdicts[("numpy float64: <= 1.0x SciPy", "softmax", small64.label)] == (0.9, True)
    # No reference measured: no verdict rather than a made-up one.
    assert not any(name == "numpy: <= 1.0x bare np.exp" and op == "softmax" for name, op, _ in verdicts)


def test_torch_and_jax_targets_include_backward_and_residuals():
    head = next(c for c in bench.FULL_CASES["torch"] if c.role == "head" and c.grad)
    jit = next(c for c in bench.FULL_CASES["jax"] if c.grad)
    verdicts = _verdicts([
        _timing("softmax", head, "lse_dispatch", 3e-4, group="torch"),
        _timing("softmax", head, "torch", 2e-4, group="torch"),
        _timing("softmax", jit, "lse_dispatch", 1e-3, group="jax", residuals=458_752),
        _timing("softmax", jit, "jax.nn", 1e-3, group="jax", residuals=131_072),
    ])
    assert verdicts[("torch CPU: <= 1.5x torch's own", "softmax", head.label)] == (1.5, True)
    assert verdicts[("jax in the user's jit: <= 1.25x jax.nn", "softmax", jit.label)] == (1.0, True)
    assert verdicts[("jax: residual bytes under grad <= jax.nn's", "softmax", jit.label)] == (3.5, False)


def test_the_full_cases_are_the_issues_shapes():
    labels = {group: {c.label for c in cases} for group, cases in bench.FULL_CASES.items()}
    assert {"(100, 3) axis -1 float64", "(200, 3) axis -1 float64", "(10^7,) float64"} <= labels["numpy"]
    assert {"(32, 4096) axis -1 fwd+bwd", "(8, 128, 128) axis -1 fwd+bwd", "(10,)"} <= labels["torch"]
    assert {"(1024, 128) axis -1", "(1024, 128) axis -1 fwd+bwd", "(4096, 4096) axis -1"} <= labels["jax"]


def test_bench_outside_a_checkout_says_so_in_one_line(tmp_path):
    """Run from a folder with no checkout and with the package imported from
    a copy that has no benchmarks/ beside it: one line, exit 2."""
    code = (
        "import sys, lse_dispatch.__main__ as m\n"
        "m.checkout_file = lambda relative: None\n"
        "sys.exit(m.main(['bench', '--quick']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == BENCH_MISSING and done.stdout == ""


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_per_call_breakdown_names_every_kernel_and_what_ran(library, capsys):
    """benchmarks/per_call.py: each op's public time, then every kernel with its reason or its run."""
    torch = pytest.importorskip("torch") if library == "torch" else None
    threads = torch.get_num_threads() if torch else None
    per_call = load_checkout_module("benchmarks/per_call.py")
    try:
        per_call.main(["--library", library, "--shape", "4,3", "--number", "3", "--repeats", "1"])
    finally:
        if torch:
            torch.set_num_threads(threads)  # the script runs torch on one thread
    printed = capsys.readouterr().out
    from lse_dispatch import _dispatch

    x, _ = per_call._input(library, (4, 3), "float32")
    for op in per_call.OPS:
        assert f"{op}: lse_dispatch " in printed
        section = printed.split(f"{op}: lse_dispatch ")[1].split(": lse_dispatch ")[0]
        names = [kernel.name for _, kernel in _dispatch.kernels_for(x, op)]
        assert names and all(f"  {name}" in section for name in names)
        assert ", run " in section  # at least one kernel takes a plain 2-D float32 call
        assert "decision key " in section  # NumPy arrays and torch CPU tensors reuse decisions


def test_dask_streaming_benchmark_runs(capsys):
    """benchmarks/dask_streaming.py on a short stream: per-run and median lines."""
    pytest.importorskip("dask")
    streaming = load_checkout_module("benchmarks/dask_streaming.py")
    streaming.main(["--chunks", "5", "--repeats", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("5 chunks of (4, 10) float64")
    assert sum(line.startswith("  run ") and line.endswith(" tasks") for line in lines) == 2
    assert lines[-1].startswith("median: update ")


def test_first_calls_benchmark_runs(capsys):
    """benchmarks/first_calls.py: a short loop in a fresh process, with and without warm_up()."""
    first_calls = load_checkout_module("benchmarks/first_calls.py")
    assert first_calls.main(["--library", "numpy", "--shape", "3,10", "--calls", "5"]) == 0
    header, figures = capsys.readouterr().out.splitlines()
    assert header.startswith("# numpy softmax (3,10) float32, 5 calls in a fresh process; load average")
    # Five small calls never load the compiled code.
    assert figures.startswith("total ") and figures.endswith("kernel at the end: numpy.blocked")
    assert first_calls.main(["--library", "numpy", "--shape", "3,10", "--calls", "5", "--warm-up"]) == 0
    out = capsys.readouterr().out
    want = "numpy.fused" if _numba_installed() else "numpy.blocked"  # warm_up() loads nothing without numba
    assert out.rstrip().endswith(f"kernel at the end: {want}"), out


def _numba_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def test_torch_keeps_the_threads_it_was_given(tmp_path, capsys):
    """--threads 1 holds for torch to the end of the run: nothing in the bench (machine
    info, the fused kernels) starts a threading layer that changes torch's."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--only", "numpy,torch", "--threads", "1", "--out", str(tmp_path)]) == 0
        report = json.loads((tmp_path / "bench.json").read_text())
        assert report["machine"]["torch threads"] == 1
        assert report["machine"]["torch threads at end"] == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()


def test_fused_passes_breakdown_runs():
    """benchmarks/fused_passes.py: every pass of the row kernel timed, on a small shape."""
    pytest.importorskip("numba")
    passes = load_checkout_module("benchmarks/fused_passes.py")
    import io
    from contextlib import redirect_stdout

    printed = io.StringIO()
    try:
        import torch
    except ImportError:
        torch = None
    threads = torch.get_num_threads() if torch else None
    try:
        with redirect_stdout(printed):
            passes.main(["--shapes", "4x16", "--repeats", "1"])
    finally:
        if torch:
            torch.set_num_threads(threads)  # the script runs torch on one thread
    line = printed.getvalue().splitlines()[-1]
    assert line.startswith("(4, 16): ")
    for name in ("max", "sum f64", "sum f32", "sum f32+store", "scale", "lsm out", "softmax", "log_softmax", "backward",
                 "np.exp"):
        assert f"{name} " in line
    assert line.endswith("ns a row")
