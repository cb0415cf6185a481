"""The Triton kernels (``torch.triton``), run through Triton's CPU interpreter.

Without a CUDA device this module sets ``TRITON_INTERPRET=1`` before triton
is imported, in every process that collects it (each xdist worker collects
every module, so the whole run sees it); the kernel then takes CPU tensors
when chosen by name, which is all these tests do.  Nothing else is affected:
``torch.triton`` declines CPU tensors unless chosen by name.  With a CUDA
device the same tests run the compiled kernels on it.

Every path is exercised twice: with the shipped tile sizes (rows up to 8192
entries in one pass) and with tiny tiles (the ``parts`` variant), so that
short rows take the multi-part online state, the n-ary merge and the
elementwise pass.  Skips cleanly where torch or triton is missing.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import lse_dispatch  # noqa: E402
from lse_dispatch import (  # noqa: E402
    _generic,
    _state,
    cases,
    oracle,
)
from lse_dispatch._call import prepare  # noqa: E402
from lse_dispatch.backends import _torch_triton  # noqa: E402
from lse_dispatch.backends import _triton_kernels as kernels  # noqa: E402

from ._helpers import FUNCTIONS  # noqa: E402
from ._helpers import np_dtype as _np_dtype  # noqa: E402
from .test_dispatch_paths import LIMITS, _hard_inputs  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET", "0") != "1" else "cpu"
if DEVICE == "cpu" and tuple(int(p) for p in pytest.importorskip("triton").__version__.split(".")[:2]) < (3, 8):
    # Seen with triton 3.6.0 and NumPy 2.4: its interpreter turns a loop's
    # runtime bound into int() of a 1-element array, which NumPy refuses.
    # (Compiled kernels are unaffected; the pinned triton is 3.8.0.)
    pytest.skip("the interpreter of triton < 3.8 cannot run loops with runtime bounds", allow_module_level=True)

NAME = "torch.triton"
OPS = ("logsumexp", "softmax", "log_softmax")
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}
INF, NAN = math.inf, math.nan

# Tiny tiles: rows longer than 32 entries take the multi-part path.
SMALL_TILES = {"ONE_PASS_MAX": 32, "PART_BLOCK": 8, "PART_TILES": 2, "MERGE_BLOCK": 4, "ELEMENTWISE_BLOCK": 16}


@pytest.fixture(params=["one-pass", "parts"])
def path(request, monkeypatch):
    if request.param == "parts":
        for name, value in SMALL_TILES.items():
            monkeypatch.setattr(kernels, name, value)
    return request.param


def _tensor(values, dtype, requires_grad=False):
    values = np.asarray(values, dtype=np.float64)
    t = torch.tensor(values, dtype=torch.float64).to(TORCH_DTYPES[dtype]).to(DEVICE)
    return t.requires_grad_(requires_grad)


def _host(x):
    return x.detach().to(torch.float64).cpu().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()


def _forced(op, x, **kwargs):
    """``op`` with torch.triton chosen; the trace must say it ran."""
    with lse_dispatch.use(NAME), lse_dispatch.trace() as seen:
        result = FUNCTIONS[op](x, **kwargs)
    assert seen.implementations == [NAME], str(seen)
    return result


def _exact(op, values, **kwargs):
    return {"logsumexp": oracle.exact_logsumexp, "softmax": oracle.exact_softmax,
            "log_softmax": oracle.exact_log_softmax}[op](values, **kwargs)


def _assert_ulps(got, exact, dtype, what):
    errors = oracle.ulp_error(got, exact, _np_dtype(dtype))
    worst = float(errors.max()) if errors.size else 0.0
    assert worst <= cases.ULP_BUDGET[dtype], f"{what}: {worst:.3g} ulps"


# --------------------------------------------------------------------------
# Accuracy against the oracle.


def _takes(case, inputs) -> bool:
    """Whether torch.triton must take the case (worked out here, not asked of it)."""
    if "b" in inputs or (case.kwargs.get("axis", -1) is None and np.ndim(inputs["a"]) == 0):
        return False
    shape = np.shape(inputs["a"])
    if 0 in shape or len(shape) == 0:
        return False
    axis = case.kwargs.get("axis", -1)
    axes = tuple(range(len(shape))) if axis is None else axis if isinstance(axis, tuple) else (axis,)
    axes = tuple(sorted(ax % len(shape) for ax in axes))
    return axes == tuple(range(len(shape) - len(axes), len(shape)))


def _catalogue():
    for case in cases.CASES:
        for dtype in case.dtypes:
            yield pytest.param(case, dtype, id=f"{case.id}[{dtype}]")


@pytest.mark.parametrize(("case", "dtype"), list(_catalogue()))
def test_catalogue(path, case, dtype):
    """Every catalogue case, the kernel forced: within the contract wherever it runs."""
    inputs = cases.inputs(case, dtype)
    if path == "parts" and np.size(inputs["a"]) > 5000:
        pytest.skip("the long cases run with the shipped tiles (thousands of tiny parts otherwise)")
    a = _tensor(inputs["a"], dtype)
    kwargs = dict(case.kwargs)
    if "b" in inputs:
        kwargs["b"] = _tensor(inputs["b"], dtype)
    if "where" in inputs:
        kwargs["where"] = torch.tensor(np.asarray(inputs["where"], dtype=bool), device=DEVICE)
    with lse_dispatch.use(NAME), lse_dispatch.trace() as seen:
        out = FUNCTIONS[case.op](a, **kwargs)
    expected_impl = NAME if _takes(case, inputs) else "generic"
    assert seen.implementations == [expected_impl], str(seen)
    got = tuple(_host(part) for part in out) if kwargs.get("return_sign") else _host(out)
    verdict = cases.evaluate(case, dtype, inputs, got)
    assert verdict.passed, f"{case.id} in {dtype}: {verdict.detail}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", OPS)
def test_hard_inputs(path, op, dtype):
    """The dispatch-path suite's hard inputs (trailing layouts), within 4 ulps."""
    for name, values, axis in _hard_inputs(dtype):
        values = values.astype(dtype)
        ndim = values.ndim
        axes = tuple(range(ndim)) if axis is None else axis if isinstance(axis, tuple) else (axis,)
        if tuple(sorted(ax % ndim for ax in axes)) != tuple(range(ndim - len(axes), ndim)):
            continue  # leading or middle axes: declined (test_declines)
        if path == "parts" and values.size > 1000:
            continue  # hundreds of tiny parts; test_long_rows has long rows
        got = _host(_forced(op, _tensor(values, dtype), axis=axis))
        _assert_ulps(got, _exact(op, values, axis=axis), dtype, f"{op} {name}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("op", OPS)
def test_half_precision(path, op, dtype):
    """float16 and bfloat16: the float64 result rounded through float32.

    The contract allows one ulp; the kernels' bound is half an ulp plus the
    first rounding (2**-14 of a float16 ulp, 2**-17 of a bfloat16 one),
    which catches a truncating cast (Triton's interpreter truncates
    float32 -> bfloat16 unless the kernel rounds itself).
    """
    rng = np.random.default_rng(3)
    for values in (rng.normal(size=(3, 70)) * 3, np.array([[3.0, 3.0, 3.0, 1.0, -2.0]]),
                   rng.uniform(-8, 8, (2, 41)) + 20.0):
        values = cases.round_to(values, dtype)
        got = _host(_forced(op, _tensor(values, dtype), axis=-1))
        exact = _exact(op, values, axis=-1)
        _assert_ulps(got, exact, dtype, f"{op} {values.shape}")
        worst = float(oracle.ulp_error(got, exact, _np_dtype(dtype)).max())
        assert worst <= 0.5 + 2.0**-12, f"{op} {values.shape}: {worst} ulps"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_long_rows(dtype):
    """Rows past ONE_PASS_MAX with the shipped tiles: several parts of 16 tiles each.

    logsumexp against the oracle; softmax and log_softmax at 300 sampled
    entries against exact values formed from the oracle's logsumexp.
    """
    import mpmath

    rng = np.random.default_rng(11)
    # (Not a dominant max over a tiny rest: the oracle's long-slice path
    # rounds 1 + rest to float64; the parts variant covers that case.)
    values = np.stack([rng.normal(size=70_001) * 4, rng.uniform(-60.0, 10.0, 70_001)]).astype(dtype)
    x = _tensor(values, dtype)
    lse = oracle.exact_logsumexp(values, axis=-1)
    _assert_ulps(_host(_forced("logsumexp", x, axis=-1)), lse, dtype, "logsumexp")
    picks = np.r_[0, rng.integers(0, values.shape[1], 299)]
    for op in ("softmax", "log_softmax"):
        got = _host(_forced(op, x, axis=-1))[:, picks]
        with mpmath.workprec(oracle.PRECISION):
            exact = np.array([[mpmath.mpf(float(values[r, j])) - lse[r] for j in picks] for r in range(2)], dtype=object)
            if op == "softmax":
                exact = np.vectorize(mpmath.exp, otypes=[object])(exact)
        _assert_ulps(got, exact, dtype, op)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", OPS)
def test_where_masks(path, op, dtype):
    rng = np.random.default_rng(7)
    values = (rng.normal(size=(4, 45)) * 6).astype(dtype)
    mask = rng.uniform(size=values.shape) < 0.6
    mask[:, 0] = True
    got = _host(_forced(op, _tensor(values, dtype), axis=-1, where=torch.tensor(mask, device=DEVICE)))
    _assert_ulps(got, _exact(op, values, axis=-1, where=mask), dtype, f"{op} where")
    if op != "logsumexp":
        assert np.all(got[~mask] == (0.0 if op == "softmax" else -INF))
    # A where that broadcasts (one mask per column).
    column_mask = mask[:1]
    got = _host(_forced(op, _tensor(values, dtype), axis=-1, where=torch.tensor(column_mask, device=DEVICE)))
    _assert_ulps(got, _exact(op, values, axis=-1, where=np.broadcast_to(column_mask, values.shape)), dtype,
                 f"{op} broadcast where")


# --------------------------------------------------------------------------
# Limits: written by the kernels as the shared rules define them.


@pytest.mark.parametrize("pad", [0, 40], ids=["short", "padded"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_limits(path, dtype, pad):
    fill = {"softmax": 0.0, "log_softmax": -INF}
    rows = [row for row in LIMITS if dtype != "float16" or abs(row[0][0]) != 1.0e30]
    values = np.array([row[0] + [-INF] * pad + [0.5] for row in rows] + [[0.25] * (3 + pad + 1)])
    # The last entry of each LIMITS row is 0.5 (changes no limit... except the
    # finite ones), so compare against the generic path rather than the table.
    x = _tensor(values, dtype)
    for op in OPS:
        got = _forced(op, x, axis=-1)
        with lse_dispatch.use("generic"):
            want = FUNCTIONS[op](x, axis=-1)
        np.testing.assert_allclose(_host(got), _host(want), rtol=4 * float(torch.finfo(x.dtype).eps), atol=0,
                                   err_msg=op)
    # The sign too (0 on a row with nothing in the sum, NaN on a NaN row).
    with lse_dispatch.use(NAME):
        got_sign = _host(lse_dispatch.logsumexp(x, axis=-1, return_sign=True)[1])
    with lse_dispatch.use("generic"):
        want_sign = _host(lse_dispatch.logsumexp(x, axis=-1, return_sign=True)[1])
    np.testing.assert_array_equal(got_sign, want_sign)
    exact_rows = np.array([row[0] + [-INF] * pad for row in rows])
    x = _tensor(exact_rows, dtype)
    got = _host(_forced("logsumexp", x, axis=-1))
    np.testing.assert_array_equal(np.isnan(got), np.isnan([row[1] for row in rows]))
    for op in ("softmax", "log_softmax"):
        got = _host(_forced(op, x, axis=-1))
        want = np.array([row[2 if op == "softmax" else 3] + [fill[op] if row[1] == row[1] else NAN] * pad
                         for row in rows])
        np.testing.assert_allclose(got, want, rtol=4 * float(torch.finfo(x.dtype).eps), atol=0, err_msg=op)


def test_forward_reads_nothing_back(path, monkeypatch):
    """Forward calls never wait for the device: the limit rows are the kernels' own.

    The read-back (``_flagged``) is left to the logsumexp backward; a forward
    that called it would synchronise every call (44 us of 174 on an H200).
    """
    reads = []
    real = _torch_triton._flagged
    monkeypatch.setattr(_torch_triton, "_flagged", lambda special: reads.append(1) or real(special))
    values = np.array([[1.0, INF, INF, 0.5], [-INF] * 4, [NAN, 1.0, 2.0, 3.0], [0.25, 0.5, 1.0, 2.0]])
    x = _tensor(values, "float32")
    for op in OPS:
        _forced(op, x, axis=-1)
        _forced(op, x, axis=-1, where=torch.tensor(values > 0.3, device=DEVICE))
    assert reads == []
    xg = x.clone().requires_grad_(True)
    with lse_dispatch.use(NAME):
        lse_dispatch.logsumexp(xg, axis=-1).sum().backward()
    assert reads == [1]
    with lse_dispatch.use("autodiff"):  # the contract's derivative rules
        xr = x.clone().requires_grad_(True)
        lse_dispatch.logsumexp(xr, axis=-1).sum().backward()
    np.testing.assert_allclose(_host(xg.grad), _host(xr.grad), rtol=4e-7, atol=0)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
def test_forward_calls_are_captured_in_a_cuda_graph():
    """With nothing read back, forward calls can be captured and replayed (limit rows included)."""
    rng = np.random.default_rng(3)

    def fill(target):
        values = rng.standard_normal((64, 1000)) * 4
        values[0] = -INF
        values[1, 3] = values[1, 7] = INF
        values[2, 5] = NAN
        target.copy_(torch.tensor(values, dtype=torch.float32, device=DEVICE))

    static = torch.empty((64, 1000), dtype=torch.float32, device=DEVICE)
    fill(static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, allocator) off the capturing stream
        for op in OPS:
            _forced(op, static, axis=-1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with lse_dispatch.use(NAME), lse_dispatch.trace() as seen, torch.cuda.graph(graph):
        outs = {op: FUNCTIONS[op](static, axis=-1) for op in OPS}
    assert seen.implementations == [NAME] * len(OPS), str(seen)
    fill(static)  # new values, same buffer
    graph.replay()
    torch.cuda.synchronize()
    for op in OPS:
        with lse_dispatch.use("generic"):
            want = FUNCTIONS[op](static, axis=-1)
        np.testing.assert_allclose(_host(outs[op]), _host(want), rtol=4 * float(torch.finfo(torch.float32).eps),
                                   atol=0, err_msg=op)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_fully_masked_rows_never_nan(path, dtype):
    """The attention-mask case: a row with nothing included is -inf / 0 / -inf."""
    values = np.array([[1.0, 2.0, NAN, INF] * 10, [0.5, -1.0, 3.0, 2.0] * 10, [-INF] * 40])
    mask = np.ones(values.shape, dtype=bool)
    mask[0] = False  # nothing included, NaN and +inf among the excluded
    x = _tensor(values, dtype)
    where = torch.tensor(mask, device=DEVICE)
    value, sign = _forced("logsumexp", x, axis=-1, where=where, return_sign=True)
    assert _host(value)[0] == -INF and _host(sign)[0] == 0.0
    assert _host(value)[2] == -INF and _host(sign)[2] == 0.0
    softmax = _host(_forced("softmax", x, axis=-1, where=where))
    log_softmax = _host(_forced("log_softmax", x, axis=-1, where=where))
    assert np.all(softmax[0] == 0.0) and np.all(softmax[2] == 0.0)
    assert np.all(log_softmax[0] == -INF) and np.all(log_softmax[2] == -INF)
    assert not np.isnan(softmax).any() and not np.isnan(log_softmax).any()
    np.testing.assert_allclose(softmax[1].sum(), 1.0, rtol=1e-2)


# --------------------------------------------------------------------------
# The merge and the finite finalisation, held to _state.merge / finalize.


def _chunk_states(case, dtype, n_chunks):
    """States of ``n_chunks`` pieces of the case's flattened entries (the shared code)."""
    inputs = case.make(dtype)
    a = np.asarray(inputs["a"], dtype=np.float64)
    shape = np.broadcast_shapes(a.shape, *(np.shape(inputs[k]) for k in ("b", "where") if k in inputs))
    flat = {k: np.broadcast_to(np.asarray(v, dtype=bool if k == "where" else np.float64), shape).ravel()
            for k, v in inputs.items() if k in ("a", "b", "where")}
    flat["a"] = np.broadcast_to(a, shape).ravel()
    n = flat["a"].size
    n_chunks = min(n_chunks, n)
    if n_chunks < 2:
        return None
    bounds = np.linspace(0, n, n_chunks + 1).astype(int)
    states = []
    for lo, hi in itertools.pairwise(bounds):
        part = {k: v[lo:hi] for k, v in flat.items()}
        call = prepare("logsumexp", torch.tensor(part["a"], dtype=TORCH_DTYPES[dtype]), axis=None,
                       b=None if "b" not in part else torch.tensor(part["b"], dtype=TORCH_DTYPES[dtype]),
                       where=None if "where" not in part else torch.tensor(part["where"]))
        states.append(_generic.logsumexp_state(call))
    return states, "b" in flat


def _merge_cases():
    for case in cases.CASES:
        if case.family == "special-values" and case.op != "logsumexp":
            continue  # same inputs as the logsumexp rows
        for dtype in ("float32", "float64"):
            if dtype in case.dtypes:
                yield pytest.param(case, dtype, id=f"{case.id}[{dtype}]")


@pytest.mark.parametrize(("case", "dtype"), list(_merge_cases()))
def test_merge_and_finalize_match_state(case, dtype):
    """The kernels' merge and finite finalisation against lse_dispatch._state, on the whole catalogue.

    Partial states come from the shared code (weights and masks included);
    merged pairwise by the kernel's ``_merge`` and per row by its n-ary merge,
    they must equal ``_state.merge``'s (max and count exactly, rest to a few
    float64 roundings); the kernel must flag exactly the rows whose max is
    not finite, and finalise the others as ``_state.finalize`` does.
    """
    import array_api_compat.torch as xp
    found = _chunk_states(case, dtype, 3)
    if found is None:
        pytest.skip("a single entry: nothing to merge")
    states, weighted = found
    flat = [tuple(part.reshape(1).to(DEVICE) for part in state) for state in states]
    reference = functools.reduce(lambda s, t: _state.merge(xp, s, t), states)
    for i in range(len(states)):
        for j in range(len(states)):
            pair_ref = _state.merge(xp, states[i], states[j])
            if bool(torch.isfinite(pair_ref.max).all()):
                _assert_states_equal(kernels.merge_pairs(flat[i], flat[j]), pair_ref, f"merge_pairs {i} {j}")
    stacked = [torch.stack([f[i] for f in flat], dim=1) for i in range(3)]  # (1, chunks)
    value = torch.empty((2, 1), dtype=TORCH_DTYPES[dtype], device=DEVICE)
    m, count, rest, special = kernels.merge_rows(*stacked, value=value)
    flagged = not bool(torch.isfinite(reference.max).all())
    assert bool(special[0]) == flagged
    if flagged:
        return
    _assert_states_equal((m, count, rest), reference, "merge_rows")
    if not weighted:
        want, sign = _state.finalize(xp, reference, TORCH_DTYPES[dtype])
        got = value[0].cpu().double().numpy()
        np.testing.assert_allclose(got, want.reshape(-1).double().numpy(), rtol=2 * float(torch.finfo(want.dtype).eps),
                                   atol=0)
        assert float(value[1, 0]) == float(sign.reshape(-1)[0])


def _assert_states_equal(got, want, what):
    m, count, rest = (t.reshape(-1).cpu() for t in got)
    np.testing.assert_array_equal(m.double().numpy(), want.max.reshape(-1).double().numpy(), err_msg=what)
    np.testing.assert_array_equal(count.numpy(), want.count.reshape(-1).numpy(), err_msg=what)
    np.testing.assert_allclose(rest.numpy(), want.rest.reshape(-1).numpy(), rtol=8 * 2.0**-52, atol=1e-300,
                               err_msg=what)


# --------------------------------------------------------------------------
# Backward.


def _grad(op, x, g, backend=None, where=None, create_graph=False):
    kwargs = {"axis": -1} if where is None else {"axis": -1, "where": where}
    if backend is None:
        out = FUNCTIONS[op](x, **kwargs)
    else:
        with lse_dispatch.use(backend), lse_dispatch.trace() as seen:
            out = FUNCTIONS[op](x, **kwargs)
        assert seen.implementations == [backend], str(seen)
    (grad,) = torch.autograd.grad(out, x, g, create_graph=create_graph)
    return grad


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "where"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("op", OPS)
def test_backward_matches_autodiff_formulas(path, op, dtype, masked):
    """The fused backward against the autodiff kernel's formulas, evaluated in float64."""
    rng = np.random.default_rng(5)
    values = rng.normal(size=(3, 50)) * 4
    mask = rng.uniform(size=values.shape) < 0.7 if masked else None
    x = _tensor(cases.round_to(values, dtype), dtype, requires_grad=True)
    where = None if mask is None else torch.tensor(mask, device=DEVICE)
    g_shape = (3, 1) if op == "logsumexp" else values.shape
    g = torch.tensor(rng.normal(size=g_shape), dtype=x.dtype, device=DEVICE)
    if op == "logsumexp":
        g = g.reshape(3)
    got = _grad(op, x, g, NAME, where)
    reference_x = x.detach().double().requires_grad_(True)
    want = _grad(op, reference_x, g.double(), "autodiff", where)
    tol = {"float64": 1e-13, "float32": 1e-6, "float16": 2e-3}[dtype]
    scale = float(want.abs().max())
    np.testing.assert_allclose(_host(got), _host(want), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "where"])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(path, op, masked):
    """Finite differences (float64), first and second order."""
    rng = np.random.default_rng(9)
    x = _tensor(rng.normal(size=(2, 37)), "float64", requires_grad=True)
    where = torch.tensor(rng.uniform(size=(2, 37)) < 0.7, device=DEVICE) if masked else None

    def fn(v):
        kwargs = {"axis": -1} if where is None else {"axis": -1, "where": where}
        with lse_dispatch.use(NAME):
            out = FUNCTIONS[op](v, **kwargs)
        if op == "log_softmax" and where is not None:
            # Excluded entries are -inf, where differences are NaN.
            out = torch.where(where, out, torch.zeros_like(out))
        return out

    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    if path == "one-pass":
        assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", OPS)
def test_backward_limits(path, op, dtype):
    """Rows at the limits: the same gradients as the autodiff kernel, NaN where it has NaN."""
    values = np.array([row[0] + [-INF] * 37 for row in LIMITS] + [[0.5] * 40])
    mask = np.ones(values.shape, dtype=bool)
    mask[-1] = False
    where = torch.tensor(mask, device=DEVICE)
    x = _tensor(values, dtype, requires_grad=True)
    g_shape = (values.shape[0],) if op == "logsumexp" else values.shape
    g = torch.ones(g_shape, dtype=x.dtype, device=DEVICE)
    got = _host(_grad(op, x, g, NAME, where))
    reference_x = x.detach().clone().requires_grad_(True)
    want = _host(_grad(op, reference_x, g, "autodiff", where))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=8 * float(torch.finfo(x.dtype).eps), atol=1e-300)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_backward_ignores_cotangent_on_masked_entries(path, op):
    """An infinite cotangent where the output's weight is exactly 0 gives exactly 0 (_times_weight)."""
    values = np.array([[0.0, 1.0, 2.0, 3.0] * 10])
    mask = np.array([[True, True, False, True] * 10])
    x = _tensor(values, "float32", requires_grad=True)
    g = torch.ones(values.shape, dtype=x.dtype, device=DEVICE)
    g[0, 2::4] = INF
    got = _host(_grad(op, x, g, NAME, torch.tensor(mask, device=DEVICE)))
    assert np.all(got[~mask] == 0.0)
    assert np.all(np.isfinite(got))


def test_config_keeps_the_device_busy():
    """Long rows on a 132-multiprocessor device: at least four programs per multiprocessor where the input allows."""
    for n_rows, n_cols in [(1, 2**20), (1, 2**24), (1, 2**28), (16, 2**20), (2, 10_000)]:
        kind, n_parts, _, _, _, tiles = kernels.config(n_rows, n_cols, True, sms=132)
        assert kind == "parts" and 1 <= tiles <= kernels.PART_TILES
        assert n_parts == -(-n_cols // (kernels.PART_BLOCK * tiles))
        assert n_rows * n_parts >= 4 * 132 or tiles == 1, (n_rows, n_cols, tiles)
        assert tiles == kernels.PART_TILES or n_rows * -(-n_cols // (kernels.PART_BLOCK * tiles * 2)) < 4 * 132
    assert kernels.config(1, 2**28, True, sms=132)[-1] == kernels.PART_TILES
    assert kernels.config(1, 4096, False)[0] == "one" and kernels.config(1, 4097, False)[0] == "parts"
    assert kernels.config(1, 8192, True)[0] == "one" and kernels.config(1, 8193, True)[0] == "parts"


# --------------------------------------------------------------------------
# What the kernel declines, and why.


def _reason(op, x, **kwargs):
    with lse_dispatch.use(NAME), lse_dispatch.trace() as seen:
        FUNCTIONS[op](x, **kwargs)
    (record,) = seen.records
    assert record.implementation == "generic", str(record)
    return dict(record.declined)[NAME]


def test_declines(monkeypatch):
    x = _tensor(np.ones((3, 4)), "float32")
    assert "b given" in _reason("logsumexp", x, axis=-1, b=x)
    assert "layout" in _reason("softmax", x, axis=0)
    assert "layout" in _reason("softmax", x.t(), axis=-1)
    assert "nothing reduced" in _reason("logsumexp", x, axis=())
    assert "empty" in _reason("logsumexp", _tensor(np.ones((0, 4)), "float32"), axis=-1)
    if DEVICE == "cpu":
        # Not chosen by name: CPU calls never reach the interpreter.
        with lse_dispatch.trace() as seen:
            lse_dispatch.logsumexp(x, axis=-1)
        assert seen.implementations[0] in ("torch.fused", "torch.blocked")  # whichever CPU kernel is loaded
        assert "device cpu" in dict(seen.records[0].declined)[NAME]
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "device cpu" in _reason("logsumexp", x, axis=-1)


def test_declines_without_triton(monkeypatch):
    monkeypatch.setattr(_torch_triton, "_triton_missing", lambda: "triton is not installed (ImportError: test)")
    monkeypatch.setattr(_torch_triton, "_interpreting", lambda: True)
    x = _tensor(np.ones((3, 4)), "float32")
    assert "triton is not installed" in _reason("logsumexp", x, axis=-1)


def test_import_does_not_import_triton():
    code = ("import sys, torch, lse_dispatch; import lse_dispatch.backends.torch; "
            "lse_dispatch.logsumexp(torch.ones(3)); assert 'triton' not in sys.modules, 'triton imported'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_kernels_compile_for_sm90():
    """Every kernel variant the host launches compiles for sm_90 (Hopper) without a GPU.

    The interpreter runs NumPy, so it cannot see what the compiler makes of
    the kernels: here the real backend lowers them, and their PTX must hold
    no float32 approximation (every exp, log and division is float64; the
    float32 ones are ex2.approx, lg2.approx and div.full).  Spills, as
    ptxas reports them, are printed (a few bytes at most on triton 3.8.0).
    """
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "_triton_aot.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 30, done.stdout
    for record in records:
        assert record["approximate"] == [], record
        print(record["kernel"], record["constexprs"], "spill bytes:", record["spill_bytes"])
