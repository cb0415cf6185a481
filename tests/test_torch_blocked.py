"""``torch.blocked``'s own numerics: the TwoSum-corrected float32 terms of
softmax/log_softmax, its tiled paths (made small by shrinking the tiles) and
its Python-float path for tiny inputs, each held to the mpmath oracle.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import oracle

torch = pytest.importorskip("torch")
pytest.importorskip("mpmath")
blocked = pytest.importorskip("lse_dispatch.backends.torch")

ULPS = 4.0
EXACT = {"logsumexp": oracle.exact_logsumexp, "log_softmax": oracle.exact_log_softmax, "softmax": oracle.exact_softmax}


def _forced(op, x, **kwargs):
    with lse_dispatch.use("torch.blocked"), lse_dispatch.trace() as seen:
        result = getattr(lse_dispatch, op)(x, **kwargs)
    assert [record.implementation for record in seen.records] == ["torch.blocked"], str(seen)
    return result


def _worst(got, values, op, axis):
    exact = EXACT[op](values, axis=axis)
    return float(np.max(oracle.ulp_error(got.numpy(), exact, values.dtype)))


@pytest.fixture(params=["parallel", "serial"])
def small_tiles(monkeypatch, request):
    """Tiles of 512 elements: the multi-tile code on small inputs, for the
    large-input tiles (one whole-output normalising pass) and the serial
    ones (normalised piece by piece)."""
    if request.param == "parallel":
        monkeypatch.setattr(blocked, "TILE_ELEMENTS", 512)
        monkeypatch.setattr(blocked, "SERIAL_INPUT_ELEMENTS", 0)
    else:
        monkeypatch.setattr(blocked, "SERIAL_TILE_ELEMENTS", 512)
    monkeypatch.setattr(blocked, "SMALL_ELEMENTS", 0)


def _spread_rows(rng, shape, scale=30.0):
    """Rows with a dominant max and inexact differences x - m far from 0."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# (name, shape, axis): one line longer than a tile (split into pieces), many
# whole lines per tile, and the reduced axis leading.
LAYOUTS = [("long-line", (1, 3001), 1), ("rows", (24, 300), 1), ("columns", (300, 24), 0)]


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "logsumexp"])
@pytest.mark.parametrize(("name", "shape", "axis"), LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_tiled_paths_within_4_ulps(small_tiles, op, name, shape, axis):
    rng = np.random.default_rng(7)
    for scale in (30.0, 3.0):
        values = _spread_rows(rng, shape, scale)
        got = _forced(op, torch.from_numpy(values), axis=axis)
        worst = _worst(got, values, op, axis)
        assert worst <= ULPS, f"{op} {name} scale {scale}: {worst:.2f} ulps"


def _dominated_rows(rng, rows, n):
    """A max of 3.x per row, one entry about 20 below it and the rest 60
    below: ``rest`` is about one term, ``exp(x - m)`` with ``x - m`` inexact
    in float32 (m's low bits fall below the ulp of ``|x - m|``)."""
    top = (3.0 + rng.uniform(0, 1, (rows, 1))).astype(np.float32)
    values = (top - rng.uniform(60.0, 70.0, (rows, n))).astype(np.float32)
    values[:, :1] = top
    values[:, 1:2] = (top - rng.uniform(19.0, 22.0, (rows, 1))).astype(np.float32)
    return values


def test_corrected_terms_matter():
    """The TwoSum correction is what keeps these within 4 ulps: the same
    formulas with exp of the rounded difference fl(x - m) (evaluated in
    float64, so only that rounding differs) miss, which the test checks too,
    so that it fails if the correction stops mattering."""
    rng = np.random.default_rng(3)
    values = _dominated_rows(rng, 16, 1000)
    x = torch.from_numpy(values)
    for op in ("softmax", "log_softmax"):
        assert _worst(_forced(op, x, axis=1), values, op, 1) <= ULPS, op
    rounded = (x - x.amax(1, keepdim=True)).double()  # fl32(x - m), exactly as float64
    # log_softmax of the max, -log1p(rest), from terms of the rounded differences.
    rest = torch.where(rounded == 0, 0.0, rounded.exp()).sum(1, keepdim=True)
    at_max = -torch.log1p(rest)
    exact = oracle.exact_log_softmax(values, axis=1)[:, :1]
    assert np.max(oracle.ulp_error(at_max.float().numpy(), exact, np.float32)) > ULPS
    # softmax as exp(fl(x - m) - log_norm), the exponent otherwise exact.
    log_norm = torch.from_numpy(oracle.exact_logsumexp(values, axis=1).astype(float)[:, None])
    log_norm = log_norm - x.amax(1, keepdim=True).double()
    uncorrected = (rounded - log_norm).exp()
    assert _worst(uncorrected.float(), values, "softmax", 1) > ULPS


def test_dominant_lines_take_the_exact_recheck(small_tiles):
    """rest below 2**-20: the max's log_softmax is -log1p(rest), from corrected terms."""
    values = np.full((3, 700), -40.0, dtype=np.float32)
    values[:, 5] = [0.0, 7.25, -3.5]
    values[:, 9::7] -= np.float32(np.pi)
    for op in ("log_softmax", "softmax", "logsumexp"):
        got = _forced(op, torch.from_numpy(values), axis=1)
        assert _worst(got, values, op, 1) <= ULPS, op


def test_minus_inf_entries_in_finite_lines(small_tiles):
    """-inf entries make TwoSum's error NaN; their terms are 0 and the line is unharmed."""
    rng = np.random.default_rng(11)
    values = _spread_rows(rng, (4, 400), 5.0)
    values[:, ::3] = -np.inf
    finite = np.isfinite(values)
    for op in ("softmax", "log_softmax", "logsumexp"):
        got = _forced(op, torch.from_numpy(values), axis=1).numpy()
        exact = EXACT[op](np.where(finite, values, 0.0), axis=1, where=finite)
        assert np.max(oracle.ulp_error(got, exact, np.float32)) <= ULPS, op
        if op != "logsumexp":
            assert np.all(got[~finite] == (0.0 if op == "softmax" else -np.inf)), op


@pytest.fixture
def tiny_calls(monkeypatch):
    """Record the calls that take the Python-float path."""
    from lse_dispatch.backends import _tiled

    seen = []
    original = _tiled.tiny

    def spy(ops, call):
        result = original(ops, call)
        seen.append((call.op, result is not None))
        return result

    monkeypatch.setattr(_tiled, "tiny", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(10,), (2, 5), (16,)])
def test_tiny_path(tiny_calls, dtype, shape):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(shape) * 20).astype(np.float32 if dtype == torch.float32 else np.float64)
    values.flat[1] = values.flat[2]  # a tie below the max
    x = torch.from_numpy(values)
    ops = ["logsumexp"] + (["softmax", "log_softmax"] if dtype == torch.float32 else [])
    for op in ops:
        got = _forced(op, x)
        expected_shape = () if op == "logsumexp" else shape
        assert got.dtype == dtype and tuple(got.shape) == expected_shape and got.device == x.device
        assert _worst(got, values, op, None) <= ULPS, op
        kept = _forced(op, x, axis=tuple(range(len(shape))), keepdims=True) if op == "logsumexp" else None
        if kept is not None:
            assert tuple(kept.shape) == (1,) * len(shape)
    assert tiny_calls and all(took for _, took in tiny_calls)


def test_tiny_path_leaves_limits_to_the_shared_rules(tiny_calls):
    rows = {
        "inf": ([math.inf, 1.0, math.inf], math.inf, [0.5, 0.0, 0.5]),
        "nan": ([math.nan, 0.0, 1.0], math.nan, [math.nan] * 3),
        "-inf": ([-math.inf, 0.0, -math.inf], 0.0, [0.0, 1.0, 0.0]),
    }
    for values, lse, soft in rows.values():
        x = torch.tensor(values, dtype=torch.float32)
        np.testing.assert_array_equal(_forced("logsumexp", x).numpy(), np.float32(lse))
        np.testing.assert_array_equal(_forced("softmax", x).numpy(), np.array(soft, np.float32))
    assert tiny_calls and not any(took for _, took in tiny_calls)


def test_autograd_calls_go_to_the_derivative_kernels():
    """Differentiated tiny calls run ``autodiff`` (listed first), with torch's gradients.

    The Function's forward may take the Python-float path (grad mode is off
    inside it); the gradient is the Function's backward either way.
    """
    x = torch.linspace(-2.0, 3.0, 10, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(1.0, 2.0, 10, dtype=torch.float64)
    with lse_dispatch.trace() as seen:
        (lse_grad,) = torch.autograd.grad(lse_dispatch.logsumexp(x), x)
        (soft_grad,) = torch.autograd.grad((lse_dispatch.softmax(x) * weights).sum(), x)
        func_grad = torch.func.grad(lambda t: lse_dispatch.logsumexp(t))(x.detach())
    assert seen.implementations == ["autodiff"] * 3
    plain = x.detach().clone().requires_grad_(True)
    (expected_soft,) = torch.autograd.grad((torch.softmax(plain, 0) * weights).sum(), plain)
    torch.testing.assert_close(lse_grad, torch.softmax(x.detach(), 0))
    torch.testing.assert_close(func_grad, torch.softmax(x.detach(), 0))
    torch.testing.assert_close(soft_grad, expected_soft)
    with lse_dispatch.trace() as seen, torch.no_grad():
        lse_dispatch.logsumexp(x)
    # Not recorded: the forward kernels, torch.fused first once its float64 code is loaded.
    from lse_dispatch.backends import _fused_cpu

    loaded = _fused_cpu.available() and "float64" in _fused_cpu._SIGNATURES_SEEN
    assert seen.implementations == ["torch.fused" if loaded else "torch.blocked"]
