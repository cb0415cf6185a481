"""The blocked CPU kernels' own numerics (``numpy.blocked``, ``torch.blocked``)
on each of their paths, against the oracle.

Both kernels form float32 terms with float64 ``exp`` and go through an input
in a few ways: the direct path of small inputs, whole lines in one tile (the
last axis), lines longer than a tile, and the shared limit rules.  Tiles are
shrunk to 2**14 entries here so that every path runs on inputs of tens of
thousands of entries.  Each test drives one path (the trace says the kernel
ran) and checks entries against exact values, which come in closed form from
a few distinct values with multiplicities, so that long inputs cost no
per-entry mpmath.
"""

from __future__ import annotations

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import oracle

mpmath = pytest.importorskip("mpmath")

ULPS = 4.0
EXACT = {"logsumexp": oracle.exact_logsumexp, "log_softmax": oracle.exact_log_softmax, "softmax": oracle.exact_softmax}
TILE = 1 << 14
SMALL = 4096


class Kernel:
    """A blocked kernel: its name and its library's array conversions."""

    def __init__(self, name):
        self.name = name
        self.library = name.split(".")[0]

    def array(self, values):
        if self.library == "torch":
            import torch

            return torch.from_numpy(np.ascontiguousarray(values))
        return values

    def numpy(self, result):
        return result.numpy() if self.library == "torch" else np.asarray(result)


@pytest.fixture(params=["numpy.blocked", "torch.blocked"])
def kernel(request, monkeypatch):
    kernel = Kernel(request.param)
    if kernel.library == "torch":
        pytest.importorskip("torch")
        from lse_dispatch.backends import torch as module
    else:
        from lse_dispatch.backends import numpy as module
    for name in ("TILE_ELEMENTS", "SERIAL_TILE_ELEMENTS"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, TILE)
    assert getattr(module, "SMALL_ELEMENTS", SMALL) <= SMALL
    return kernel


def _blocked(kernel, op, x, **kwargs):
    with lse_dispatch.use(kernel.name), lse_dispatch.trace() as seen:
        result = getattr(lse_dispatch, op)(kernel.array(x), **kwargs)
    (decision,) = seen.records
    assert decision.implementation == kernel.name, str(decision)
    return kernel.numpy(result)


def _exact_from_counts(values, counts):
    """Exact ``(lse, log_softmax per value, softmax per value)`` of a line
    holding ``values[j]`` ``counts[j]`` times (mpmath, 160 bits)."""
    with mpmath.workprec(160):
        lse = mpmath.log(mpmath.fsum(c * mpmath.exp(mpmath.mpf(float(v))) for v, c in zip(values, counts)))
        log_sm = [mpmath.mpf(float(v)) - lse for v in values]
        return lse, np.array(log_sm, dtype=object), np.array([mpmath.exp(t) for t in log_sm], dtype=object)


def _assert_ulps(got, exact, what):
    errors = oracle.ulp_error(np.asarray(got, dtype=np.float64), exact, np.float32)
    assert errors.max() <= ULPS, f"{what}: {errors.max():.2f} ulps at {int(np.argmax(errors))}"


def _cancelling_pair():
    """``c`` with ``log(exp(-1) + 2 exp(c))`` within a few float32 ulps of 0.

    Float32 terms (the kernel's former logsumexp) gave 1.4e8 ulps here: the
    absolute error of ``log1p(rest)`` lands on a result near 1e-9.
    """
    return np.float32(-1 + np.log((np.e - 1) / 2))


@pytest.mark.parametrize("pad", [0, SMALL + 1000, TILE + 5], ids=["small", "whole-line", "long-line"])
def test_logsumexp_that_cancels_to_near_zero(kernel, pad):
    c = _cancelling_pair()
    values = np.array([-1.0, c, c] + [-300.0] * pad, dtype=np.float32)
    lse, _, _ = _exact_from_counts([-1.0, float(c), -300.0], [1, 2, pad])
    _assert_ulps(_blocked(kernel, "logsumexp", values), np.array(lse, dtype=object), f"logsumexp pad={pad}")
    # The same line along axis 0 of a two-column array (the leading axis).
    both = np.stack([values, np.full_like(values, 2.5)], axis=1)
    with mpmath.workprec(160):
        second = mpmath.mpf(2.5) + mpmath.log(len(values))
    _assert_ulps(_blocked(kernel, "logsumexp", both, axis=0), np.array([lse, second], dtype=object), f"axis 0 pad={pad}")


def test_log_softmax_near_its_zero(kernel):
    """Entries with ``x - m`` close to ``log1p(rest)``: their log_softmax is tiny."""
    c = _cancelling_pair()
    values = np.array([-1.0, c, c] + [-300.0] * (SMALL + 1000), dtype=np.float32)
    _, log_sm, _ = _exact_from_counts([-1.0, float(c), -300.0], [1, 2, SMALL + 1000])
    got = _blocked(kernel, "log_softmax", values)
    _assert_ulps(got[[0, 1, 3]], log_sm, "log_softmax")


# Distinct values far below the max: |x - lse| up to about 85, where a
# float32 exponent would cost ~40 ulps and exp itself has its largest errors.
SPREAD = [12.0, 11.5, 3.25, -7.0, -30.2, -55.0, -62.029507, -72.9]


@pytest.mark.parametrize("offset", [0.0, 1000.0, -2000.0], ids=["unshifted", "shifted-high", "shifted-low"])
@pytest.mark.parametrize("length", [SMALL + 1000, 3 * TILE + 11], ids=["whole-line", "long-line"])
def test_softmax_with_large_exponents(kernel, length, offset):
    """softmax and log_softmax along a line and along axis 0, on every path.

    ``offset`` moves the maxima out of the range where terms are formed
    unshifted (``exp(x)``); the long line's on-the-fly maxima then fall back
    to maxima computed first.
    """
    values = np.array(SPREAD, dtype=np.float32) + np.float32(offset)
    counts = [1, 3] + [(length - 4) // 6] * 6
    counts[-1] += length - sum(counts)
    line = np.repeat(values, counts)
    np.random.default_rng(5).shuffle(line)
    # The runner-up first and the max last: a long line's middle pieces lie
    # far below its running max, which grows at the last piece.
    line = np.concatenate([line[line == values[1]], line[line < values[1]], line[line == values[0]]])
    _, log_sm, soft = _exact_from_counts(values, counts)
    # Each value's first, middlemost and last entry: every piece of a long line.
    where, which = [], []
    for j, v in enumerate(values):
        at = np.flatnonzero(line == v)
        for i in {int(at[0]), int(at[np.argmin(np.abs(at - length // 2))]), int(at[-1])}:
            where.append(i)
            which.append(j)
    log_sm, soft = log_sm[which], soft[which]
    for op, exact in (("softmax", soft), ("log_softmax", log_sm)):
        got = _blocked(kernel, op, line)
        _assert_ulps(got[where], exact, f"{op} line {length} offset {offset}")
        # Axis 0 of a (length, 2) array: lines are columns, longer than a tile
        # or not, and the second column is constant (softmax = 1 / length).
        both = np.stack([line, np.full_like(line, offset)], axis=1)
        got = _blocked(kernel, op, both, axis=0)
        _assert_ulps(got[where, 0], exact, f"{op} axis 0 {length} offset {offset}")
        with mpmath.workprec(160):
            flat = -mpmath.log(length) if op == "log_softmax" else 1 / mpmath.mpf(length)
        _assert_ulps(got[:3, 1], np.array([flat] * 3, dtype=object), f"{op} constant column")


def test_many_short_lines_agree_with_the_oracle(kernel):
    """Rows of (64, 1000) -- one tile of whole lines -- with spread values."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((64, 1000)) * 20).astype(np.float32)
    x[3] -= 580.0  # one row below the unshifted range: the tile takes x - m
    rows = [0, 3, 63]
    for op in ("logsumexp", "softmax", "log_softmax"):
        got = _blocked(kernel, op, x, axis=-1)
        exact = EXACT[op](x[rows].astype(np.float64), axis=-1)
        _assert_ulps(got[rows], exact, op)


@pytest.mark.parametrize("axis", [-1, 0])
def test_long_line_with_a_piece_of_minus_inf(kernel, axis):
    """A piece of a long line that is all -inf (padding): its max is no shift."""
    values = np.full(2 * TILE + 9, -np.inf, dtype=np.float32)
    values[TILE + 100 :] = np.float32(-40.5)
    values[-1] = np.float32(3.0)
    n = len(values) - TILE - 100
    _, log_sm, soft = _exact_from_counts([-40.5, 3.0], [n - 1, 1])
    x = values if axis == -1 else np.stack([values, values], axis=1)
    for op, exact in (("softmax", soft), ("log_softmax", log_sm)):
        got = _blocked(kernel, op, x, axis=axis)
        got = got if axis == -1 else got[:, 1]
        _assert_ulps(got[[TILE + 100, len(values) - 1]], exact, f"{op} axis {axis}")
        assert np.all(got[: TILE + 100] == (0.0 if op == "softmax" else -np.inf))


def test_softmax_of_a_wide_leading_axis(kernel):
    """(300, 4096) along axis 0: the maxima come first (running maxima of
    32-row pieces would take 3 % of the input's memory)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((300, 4096)) * 30).astype(np.float32)
    x[:, 7] -= 700.0  # a column outside the unshifted range
    columns = [0, 7, 4095]
    for op in ("softmax", "log_softmax"):
        got = _blocked(kernel, op, x, axis=0)
        _assert_ulps(got[:, columns], EXACT[op](x[:, columns].astype(np.float64), axis=0), op)


def test_softmax_of_a_wide_leading_axis_stays_within_its_memory(monkeypatch):
    """Peak extra memory beyond the output under 10 % of the input, with
    tiles small enough (2^12 entries, 4 rows of 1024) that running maxima
    per piece would take a quarter of it."""
    import tracemalloc

    from lse_dispatch.backends import numpy as numpy_backend

    kernel = Kernel("numpy.blocked")
    monkeypatch.setattr(numpy_backend, "TILE_ELEMENTS", 1 << 12)
    x = np.random.default_rng(4).standard_normal((4096, 1024)).astype(np.float32)
    _blocked(kernel, "softmax", x[:64], axis=0)  # warm caches outside the measurement
    tracemalloc.start()
    try:
        out = _blocked(kernel, "softmax", x, axis=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - out.nbytes < 0.1 * x.nbytes, f"{(peak - out.nbytes) / x.nbytes:.1%} of the input"
    np.testing.assert_allclose(out.sum(axis=0), 1.0, rtol=1e-5)
