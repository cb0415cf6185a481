"""The oracle and the unit every accuracy figure is counted in."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import cases, oracle


@pytest.mark.parametrize(("shape", "axis", "reduced"), [((10, 0), 0, (0,)), ((10, 0), 1, (10,)), ((0,), None, ()),
                                                        ((0, 3), 1, (0,)), ((2, 0, 3), (0, 2), (0,))])
def test_logsumexp_of_empty_input(shape, axis, reduced):
    out = oracle.exact_logsumexp(np.zeros(shape), axis=axis)
    assert out.shape == reduced and out.dtype == object
    # An empty slice sums to 0: log 0 = -inf.
    assert all(value == -math.inf for value in out.reshape(-1))


@pytest.mark.parametrize("function", [oracle.exact_softmax, oracle.exact_log_softmax])
@pytest.mark.parametrize(("shape", "axis"), [((10, 0), 0), ((10, 0), 1), ((0,), None), ((0, 3), 1)])
def test_normalisations_of_empty_input(function, shape, axis):
    out = function(np.zeros(shape), axis=axis)
    assert out.shape == shape and out.size == 0


def test_axis_errors_are_the_library_s():
    with pytest.raises(lse_dispatch.AxisError, match="axis 2 is out of range"):
        oracle.exact_logsumexp(np.zeros((2, 3)), axis=2)
    with pytest.raises(ValueError, match="repeats axis 0"):
        oracle.exact_logsumexp(np.zeros((2, 3)), axis=(0, -2))


def test_ulp_is_the_spacing_in_the_binade_floored_at_the_smallest_normal():
    for dtype in ("float64", "float32", "float16"):
        info = np.finfo(dtype)
        values = np.array([1.0, 1.5, 3.0, 1000.0, float(info.smallest_normal) * 3, float(info.max) / 2])
        expected = np.spacing(values.astype(dtype)).astype(np.float64)
        np.testing.assert_array_equal(oracle.ulp(values, dtype), expected)
        # At the largest finite value: the spacing below it (np.spacing overflows).
        assert oracle.ulp(float(info.max), dtype) == expected[-1] * 2
        below = np.array([0.0, float(info.smallest_normal) / 3, float(info.smallest_subnormal)])
        np.testing.assert_array_equal(oracle.ulp(below, dtype), float(info.smallest_normal))
    np.testing.assert_array_equal(oracle.ulp([1.0, 3.0, 1e-40], "bfloat16"), [2.0**-7, 2.0**-6, 2.0**-126])
    # No tolerance around a limit: every comparison with NaN fails.
    assert np.isnan(oracle.ulp([math.inf, -math.inf, math.nan], "float32")).all()


def test_bfloat16_rounding_without_ml_dtypes_matches_it():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    scales = rng.choice([1e-45, 1e-40, 1e-38, 1e-10, 1.0, 1e10, 1e38, 3.39e38, 3.4e38], 50_000)
    values = np.concatenate([rng.normal(size=50_000) * scales,
                             [0.0, -0.0, math.inf, -math.inf, 1.00390625, 1.01171875, 3.3961775292304e38]])
    with np.errstate(over="ignore"):
        expected = values.astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(oracle.round_to(values, "bfloat16"), expected)
    assert np.isnan(oracle.round_to([math.nan], "bfloat16")).all()
    finite = expected[np.isfinite(expected) & (np.abs(expected) >= 2.0**-126) & (np.abs(expected) < 3.3e38)]
    np.testing.assert_array_equal(oracle.ulp(finite, "bfloat16"),
                                  np.spacing(np.abs(finite).astype(ml_dtypes.bfloat16)).astype(np.float64))


def test_round_to_is_the_dtype_cast_for_ieee_formats():
    values = np.random.default_rng(1).normal(size=1000) * 1e3
    for dtype in ("float64", "float32", "float16"):
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(oracle.round_to(values, dtype), values.astype(dtype).astype(np.float64))
    assert cases.round_to is not oracle.round_to and cases.round_to([1.1], "float16")[0] == np.float16(1.1)


def test_ulp_error_counts_in_ulps_of_the_rounded_exact_value():
    exact = oracle.exact_logsumexp([0.0, -40.0]).reshape(1)
    tiny = float(exact[0])  # 4.25e-18: the unit is float64's at that magnitude
    assert oracle.ulp_error([tiny + 2 * np.spacing(tiny)], exact, "float64")[0] == pytest.approx(2.0, abs=0.5)
    assert oracle.ulp_error([0.0], exact, np.float64)[0] > 1e15  # torch's answer
    assert oracle.ulp_error([math.inf, math.nan], np.array([math.inf, math.nan], dtype=object), "float32").tolist() \
        == [0.0, 0.0]
    assert oracle.ulp_error([1.0], np.array([math.inf], dtype=object), "float32")[0] == math.inf


def test_stated_rows_compare_limits_exactly():
    case = next(c for c in cases.CASES if c.id == "special-values/pos-inf/softmax")
    inputs = cases.inputs(case, "float32")
    assert cases.evaluate(case, "float32", inputs, np.array([0.0, 0.5, 0.0, 0.5])).passed
    # A zero that is not exactly zero is a wrong limit, however small.
    verdict = cases.evaluate(case, "float32", inputs, np.array([1e-45, 0.5, 0.0, 0.5]))
    assert not verdict.passed and "expected" in verdict.detail


def test_the_oracle_gives_the_same_values_from_several_threads():
    """mpmath's working precision is process-wide: concurrent oracle calls must not
    change it under each other (they did, by thousands of ulps, before they took
    turns), so twenty runs of four threads."""
    import sys

    from ._helpers import in_threads

    mpmath = pytest.importorskip("mpmath")

    rng = np.random.default_rng(41)
    inputs = [rng.standard_normal((6, 9)) * 5 for _ in range(24)]
    expected = [oracle.exact_log_softmax(x, axis=-1) for x in inputs]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often
    try:
        for _ in range(20):
            # An overlap leaves mpmath at the oracle's precision for good (the
            # last block to exit restores what the first one set), which hides
            # later overlaps: each run starts from mpmath's default.
            mpmath.mp.prec = 53
            results: dict = {}

            def work(part, results=results):
                for index in range(part, len(inputs), 4):
                    results[index] = oracle.exact_log_softmax(inputs[index], axis=-1)

            in_threads(work, range(4))
            for index, want in enumerate(expected):
                assert all(got == exact for got, exact in zip(results[index].ravel(), want.ravel())), index
    finally:
        sys.setswitchinterval(interval)
        mpmath.mp.prec = 53


@pytest.mark.parametrize(("a", "b", "expected"), [
    # log(1 + t) = t - t**2 / 2 + ...: t alone is exact to far below its ulp.
    ([0.0, -290.0], None, math.exp(-290.0)),
    ([0.0, -745.5], [1.0, 1e308], 1e308 * math.exp(-745.5 + 700) * math.exp(-700)),
    ([0.0, -290.0], [-1.0, -1.0], math.exp(-290.0)),  # a negative sum: the log of its magnitude
])
def test_sums_near_one_keep_what_lies_beyond_the_working_precision(a, b, expected):
    """Found 2026-11-30: the sum was rounded to 160 bits before its log, which gave 0 for these
    (mpmath's fsum rounds too); now the terms are added exactly and the log is log1p(|sum| - 1)."""
    got = float(oracle.exact_logsumexp(a, b=b))
    assert got == pytest.approx(expected, rel=1e-13, abs=0)


def test_prefix_sums_near_one_keep_what_lies_beyond_the_working_precision():
    got = oracle.exact_logcumsumexp(np.array([0.0, -290.0, -300.0]))
    assert float(got[1]) == pytest.approx(math.exp(-290.0), rel=1e-13, abs=0)
    assert float(got[2]) == pytest.approx(math.exp(-290.0) + math.exp(-300.0), rel=1e-13, abs=0)


def test_log_softmax_at_the_max_keeps_a_tiny_rest():
    """Found 2026-11-30 by fuzzing the kernels: ``x - lse`` with ``lse = m + L`` rounded to
    160 bits gave 0 at the max of ``[310.0042..., 202.0073...]`` (the kernels gave -1.25e-47,
    which is right); now ``(x - m) - L``."""
    x = np.array([310.00422989145846, 202.00733672, -245.75635902058073])
    want = -math.exp(202.00733672 - 310.00422989145846)
    assert float(oracle.exact_log_softmax(x)[0]) == pytest.approx(want, rel=1e-13, abs=0)
    assert float(oracle.exact_log_softmax(x[None, :], axis=1, where=np.array([[True, True, False]]))[0, 0]) == (
        pytest.approx(want, rel=1e-13, abs=0))


@pytest.mark.parametrize(("a", "expected"), [([1e30, 0.0], 1e30), ([-1e30, 0.0], 0.0), ([0.0, -1e30], 0.0)])
def test_terms_too_far_apart_to_add_exactly(a, expected):
    """An exact ``1 + exp(-1e30)`` does not fit in memory (mpmath raised OverflowError);
    terms below 2**-4000 of the largest are added at the working precision."""
    got = oracle.exact_logsumexp(np.array(a))
    assert float(got) == expected
    assert float(oracle.exact_log_softmax(np.array(a))[0]) == pytest.approx(float(a[0]) - expected, abs=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_vectorised_ulp_errors_agree_with_the_loop(dtype):
    """``ulp_errors`` (double-double, vectorised) scores as ``ulp_error`` does: finite
    errors, limits matched and missed, values beyond the range and below the normal one."""
    from ._helpers import np_dtype

    rng = np.random.default_rng(0)
    values = oracle.round_to(rng.standard_normal(50) * 30, dtype)
    exact = oracle.exact_logcumsumexp(values)
    got = oracle.round_to(np.array([float(e) for e in exact]) * (1 + 3e-3 * rng.standard_normal(50)), dtype)
    got[[3, 7]] = [np.inf, np.nan]
    info = np.finfo(np.float32 if dtype == "bfloat16" else dtype)
    edges = np.array([math.inf, -math.inf, math.nan, math.inf, float(info.max) * 4, float(info.smallest_normal) / 8,
                      0.0], dtype=object)
    edge_got = np.array([math.inf, -math.inf, math.nan, 1.0, math.inf, 0.0, float(info.smallest_normal) / 2])
    exact = np.concatenate([exact, edges])
    got = np.concatenate([got, edge_got])
    want = oracle.ulp_error(got, exact, np_dtype(dtype))
    np.testing.assert_allclose(oracle.ulp_errors(got, exact, dtype), want, rtol=1e-9)
    np.testing.assert_allclose(oracle.ulp_errors(got, oracle.double_double(exact), dtype), want, rtol=1e-9)
