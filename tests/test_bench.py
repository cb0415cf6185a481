"""``lse-dispatch bench``: the quick mode end to end, and the target arithmetic."""

from __future__ import annotations

import json

import pytest

from lse_dispatch import _bench

pytest.importorskip("scipy")


def test_quick_numpy_run_writes_json_and_plot(tmp_path, capsys):
    assert _bench.main(["--quick", "--only", "numpy", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["quick"] is True
    implementations = {t["implementation"] for t in report["timings"]}
    assert implementations == {"lse_dispatch (auto)", "lse_dispatch (generic)", "bare np.exp",
                               "NumPy shift-by-max", "scipy.special"}
    cases = {c.label for c in _bench.QUICK_CASES}
    assert {(t["case"], t["op"]) for t in report["timings"]} == {(c, op) for c in cases for op in _bench.OPS}
    assert all(t["median_s"] > 0 and t["samples"] == 2 for t in report["timings"])
    # Every target is printed with its verdict and the measured value.
    assert report["targets"]
    for target in report["targets"]:
        assert ("met" if target["met"] else "MISSED") in printed
        assert f"{target['measured']:8.2f}" in printed
    # --render turns the JSON into the README's Markdown tables.
    assert _bench.main(["--render", str(tmp_path / "bench.json")]) == 0
    markdown = capsys.readouterr().out
    assert markdown.count("\n| logsumexp |") >= len(cases) * len(implementations)
    met = sum(target["met"] for target in report["targets"])
    assert f"{met} of {len(report['targets'])} targets met." in markdown
    pytest.importorskip("matplotlib")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _timing(op, case, group, name, seconds, peak=None):
    return _bench.Timing(op, case.label, case.size, group, name, seconds, 5, peak, seconds)


def test_targets_are_judged_from_the_measured_ratios():
    big, tiny = _bench.FULL_CASES[0], _bench.FULL_CASES[-1]
    report = _bench.Report("test", False, {}, {})
    input_bytes = big.size * 4
    report.timings += [
        _timing("logsumexp", big, "numpy", "lse_dispatch (auto)", 0.030, peak=input_bytes // 20),
        _timing("logsumexp", big, "numpy", "bare np.exp", 0.015),
        _timing("logsumexp", big, "numpy", "scipy.special", 0.120),
        _timing("logsumexp", big, "torch", "lse_dispatch (auto)", 0.024),
        _timing("logsumexp", big, "torch", "torch.logsumexp", 0.020),
        _timing("softmax", big, "numpy", "lse_dispatch (auto)", 0.030, peak=input_bytes + input_bytes // 5),
        _timing("logsumexp", tiny, "numpy", "lse_dispatch (auto)", 20e-6),
        _timing("logsumexp", tiny, "numpy", "NumPy shift-by-max", 6e-6),
    ]
    _bench._targets(report, [big, tiny])
    verdicts = {(t.name, t.op): (round(t.measured, 3), t.met) for t in report.targets}
    assert verdicts[("numpy: <= 1.5x bare np.exp", "logsumexp")] == (2.0, False)
    assert verdicts[("numpy: >= 3x faster than SciPy", "logsumexp")] == (4.0, True)
    assert verdicts[("torch CPU: <= 1.25x torch's own", "logsumexp")] == (1.2, True)
    assert verdicts[("numpy: peak extra memory <= 10% of the input", "logsumexp")] == (5.0, True)
    # softmax: the output does not count; 20 % beyond it misses.
    assert verdicts[("numpy: peak extra memory <= 10% of the input", "softmax")] == (20.0, False)
    assert verdicts[("numpy tiny: dispatch overhead", "logsumexp")] == (14.0, False)
