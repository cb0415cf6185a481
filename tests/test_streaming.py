"""The mergeable state, the online accumulator and the blocked (out-of-core) path.

Merged results are compared with the eager logsumexp of the whole array on the
same backend (within 2 ulps, the merge-order rule of the issue) and, for the
fixed cases, with the mpmath oracle (the 4-ulp contract).
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lse_dispatch import (
    LSEState,
    OnlineLogSumExp,
    backends,
    log_softmax,
    logsumexp,
    logsumexp_blocked,
    lse_finalize,
    lse_merge,
    lse_state,
    softmax,
)
from lse_dispatch.oracle import exact_log_softmax, exact_logsumexp, exact_softmax, ulp_error

BACKENDS = ["numpy", "array_api_strict", "torch", "jax", "dask"]


class Backend:
    """Makes arrays of one library from NumPy and copies them back."""

    def __init__(self, name):
        self.name = name
        self.spec = backends.get(name)
        pytest.importorskip(self.spec.module)
        self.dtype = "float64"
        if name == "jax":
            import jax

            if not jax.config.jax_enable_x64:
                self.dtype = "float32"

    def __call__(self, array, dtype=None):
        array = np.asarray(array)
        if array.dtype == bool:
            return self.spec.namespace().asarray(array) if self.name != "dask" else _dask_bool(array)
        return self.spec.from_numpy(array, dtype or self.dtype, self.spec.devices()[0])

    def numpy(self, x):
        if self.name == "array_api_strict":
            # The spec's to_numpy calls xp.to_device, which array-api-strict lacks.
            import array_api_strict

            return np.asarray(x.to_device(array_api_strict.__array_namespace_info__().default_device()))
        return np.asarray(self.spec.to_numpy(x))


def _dask_bool(array):
    import dask.array as da

    return da.from_array(array, chunks=tuple(max(1, -(-n // 2)) for n in array.shape) or ())


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request):
    return Backend(request.param)


def _assert_within_ulps(got, expected, dtype, ulps):
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    same_special = (got == expected) | (np.isnan(got) & np.isnan(expected))
    with np.errstate(invalid="ignore", over="ignore"):
        spacing = np.spacing(np.abs(expected.astype(dtype))).astype(np.float64)
        close = np.abs(got - expected) <= ulps * spacing
    assert np.all(same_special | close), (got, expected)


entries = st.one_of(
    st.floats(-60, 60, allow_nan=False),
    st.sampled_from([0.0, -40.0, 5.0, -math.inf]),  # ties, tiny rests, excluded entries
)


def _merge_in_drawn_order(states, data):
    """Merge a list of states by repeatedly joining two drawn ones."""
    states = list(states)
    while len(states) > 1:
        i = data.draw(st.integers(0, len(states) - 1))
        first = states.pop(i)
        j = data.draw(st.integers(0, len(states) - 1))
        second = states.pop(j)
        flip = data.draw(st.booleans())
        states.append(lse_merge(second, first) if flip else lse_merge(first, second))
    return states[0]


# JAX compiles every new shape; fewer examples keep it quick.
EXAMPLES = {"numpy": 40, "array_api_strict": 20, "torch": 20, "jax": 2, "dask": 5}


def test_any_split_and_merge_order_matches_the_eager_result(backend):
    @settings(max_examples=EXAMPLES[backend.name], deadline=None)
    @given(values=st.lists(entries, min_size=1, max_size=40), data=st.data())
    def check(values, data):
        _check_split_and_merge(backend, values, data)

    check()


def _check_split_and_merge(backend, values, data):
    array = np.array(values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(values)), max_size=5)))
    pieces = np.split(array, cuts)  # may contain empty pieces
    states = [lse_state(backend(piece)) for piece in pieces]
    merged = _merge_in_drawn_order(states, data)
    got = backend.numpy(lse_finalize(merged))
    expected = backend.numpy(logsumexp(backend(array)))
    _assert_within_ulps(got, expected, backend.dtype, 2)


def test_weighted_states_split_along_the_reduced_axis(backend):
    @settings(max_examples=EXAMPLES[backend.name], deadline=None)
    @given(rows=st.integers(1, 12), data=st.data())
    def check(rows, data):
        _check_weighted_split(backend, rows, 3, data)

    check()


def _check_weighted_split(backend, rows, columns, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    a = rng.normal(size=(rows, columns)) * 20
    b = rng.normal(size=(rows, columns))
    cuts = sorted(data.draw(st.lists(st.integers(0, rows), max_size=3)))
    states = [
        lse_state(backend(pa), axis=0, b=backend(pb))
        for pa, pb in zip(np.split(a, cuts), np.split(b, cuts))
    ]
    value, sign = lse_finalize(_merge_in_drawn_order(states, data), return_sign=True)
    expected, expected_sign = logsumexp(backend(a), axis=0, b=backend(b), return_sign=True)
    value, expected = backend.numpy(value), backend.numpy(expected)
    # Signed weights can cancel: the rounding of the parts is then amplified
    # by the condition number sum|b e^a| / |sum b e^a| in any summation order,
    # so the 2-ulp rule gets that allowance on top (it is 1 for equal signs).
    magnitude = backend.numpy(logsumexp(backend(a), axis=0, b=backend(np.abs(b))))
    condition = np.exp(magnitude - expected)
    eps = np.finfo(backend.dtype).eps
    allowed = 2 * np.spacing(np.abs(expected).astype(backend.dtype)) + 4 * eps * condition
    assert np.all(np.abs(value - expected) <= allowed), (value, expected, condition)
    np.testing.assert_array_equal(backend.numpy(sign), backend.numpy(expected_sign))

    positive = [
        lse_state(backend(pa), axis=0, b=backend(np.abs(pb)))
        for pa, pb in zip(np.split(a, cuts), np.split(b, cuts))
    ]
    merged = backend.numpy(lse_finalize(_merge_in_drawn_order(positive, data)))
    _assert_within_ulps(merged, magnitude, backend.dtype, 2)


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        pytest.param([[], []], -math.inf, id="empty+empty"),
        pytest.param([[-math.inf], [-math.inf]], -math.inf, id="-inf+-inf"),
        pytest.param([[], [-math.inf, -math.inf]], -math.inf, id="empty+-inf"),
        pytest.param([[math.inf], [1.0]], math.inf, id="+inf+finite"),
        pytest.param([[math.inf], [math.inf]], math.inf, id="+inf++inf"),
        pytest.param([[math.nan], [math.inf]], math.nan, id="nan++inf"),
        pytest.param([[1.0], [math.nan]], math.nan, id="finite+nan"),
        pytest.param([[-math.inf], [math.nan]], math.nan, id="-inf+nan"),
        pytest.param([[0.0], [-40.0]], 4.248354255291589e-18, id="tiny-rest-kept"),
        pytest.param([[1000.0], [1000.0]], 1000.6931471805599, id="tie-across-pieces"),
    ],
)
def test_contract_table_through_merges(backend, pieces, expected):
    states = [lse_state(backend(np.array(piece, dtype=np.float64))) for piece in pieces]
    for merged in (lse_merge(*states), lse_merge(*states[::-1])):
        got = float(backend.numpy(lse_finalize(merged)))
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            _assert_within_ulps(got, expected, backend.dtype, 1)


def test_empty_state_is_the_merge_identity(backend):
    values = backend(np.array([3.0, -1.0, 2.5]))
    state = lse_state(values)
    merged = lse_merge(lse_state(backend(np.zeros(0))), state)
    for got, want in zip(merged, state):
        np.testing.assert_array_equal(backend.numpy(got), backend.numpy(want))


def test_state_agrees_with_the_oracle_on_a_wide_spread():
    rng = np.random.default_rng(5)
    array = np.concatenate([rng.normal(size=300) * 200, [700.0, 700.0, -745.0]])
    states = [lse_state(piece) for piece in np.array_split(rng.permutation(array), 7)]
    total = states[0]
    for state in states[1:]:
        total = lse_merge(total, state)
    assert ulp_error(lse_finalize(total), exact_logsumexp(array), np.float64) <= 4


def test_keepdims_and_where(backend):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 5, 3))
    mask = rng.random((4, 5, 3)) > 0.4
    state = lse_state(backend(a), axis=(0, 2), where=backend(mask), keepdims=True)
    assert tuple(state.max.shape) == (1, 5, 1)
    assert tuple(lse_state(backend(a), axis=(0, 2)).count.shape) == (5,)
    got = backend.numpy(lse_finalize(state))
    expected = backend.numpy(logsumexp(backend(a), axis=(0, 2), where=backend(mask), keepdims=True))
    _assert_within_ulps(got, expected, backend.dtype, 2)  # the Dask kernel merges in a tree


def test_state_of_float32_keeps_its_accumulator():
    state = lse_state(np.array([1.0, 2.0], dtype=np.float32))
    assert state.max.dtype == np.float32
    assert state.rest.dtype == np.float64
    assert lse_finalize(state).dtype == np.float32
    assert lse_finalize(lse_state(np.ones(3, dtype=np.float16)), dtype=np.float16).dtype == np.float16


def test_complex_input_has_no_state():
    with pytest.raises(TypeError, match="argument 'a' must be real"):
        lse_state(np.array([1 + 1j]))


def test_state_functions_jit_under_jax():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 3)).astype(np.float32) * 30

    @jax.jit
    def two_halves(first, second):
        merged = lse_merge(lse_state(first, axis=0), lse_state(second, axis=0))
        return lse_finalize(merged), merged

    value, merged = two_halves(jnp.asarray(a[:2]), jnp.asarray(a[2:]))
    assert isinstance(merged, LSEState)
    _assert_within_ulps(np.asarray(value), np.asarray(logsumexp(jnp.asarray(a), axis=0)), np.float32, 2)


def test_online_matches_eager_on_a_stream(backend):
    # The online accumulator and the eager functions (native kernels or the
    # generic code) are each held to the 4-ulp contract against the oracle.
    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=(n, 4)) * 30).astype(backend.dtype) for n in (3, 1, 3, 3)]  # few shapes: JAX
    running = OnlineLogSumExp(axis=0)
    for batch in batches:
        running.update(backend(batch))
    whole = np.concatenate(batches)
    dtype = np.dtype(backend.dtype)

    def within_contract(got, exact, what):
        errors = ulp_error(got, exact, dtype)
        assert np.all(errors <= 4), f"{what} on {backend.name}: {np.max(errors):.2f} ulps"

    exact = exact_logsumexp(whole, axis=0)
    within_contract(backend.numpy(running.result()), exact, "online logsumexp")
    within_contract(backend.numpy(logsumexp(backend(whole), axis=0)), exact, "eager logsumexp")
    exact = exact_softmax(whole, axis=0)
    within_contract(backend.numpy(running.softmax(backend(batches[1]))), exact[3:4], "online softmax")
    within_contract(backend.numpy(softmax(backend(whole), axis=0)), exact, "eager softmax")
    exact = exact_log_softmax(whole, axis=0)
    within_contract(backend.numpy(running.log_softmax(backend(batches[0]))), exact[:3], "online log_softmax")
    within_contract(backend.numpy(log_softmax(backend(whole), axis=0)), exact, "eager log_softmax")
    assert running.chunks == 4


def test_a_long_stream_of_equal_chunks_keeps_its_roundings(backend):
    """``[0, -1]`` and then 300 chunks of ten equal terms of about an ulp of the rest:
    merged one after another, each merge rounded the same way (float64 NumPy and torch: 82
    ulps before ``merge_compensated``).  Merged as a binary counter, Dask's graph is
    log2(300) merges deep (a chain of 240 merges overflowed its recursion limit)."""
    tail = -37.0 if backend.dtype == "float64" else -17.0
    head = np.array([0.0, -1.0])
    chunk = np.full(10, tail)
    running = OnlineLogSumExp().update(backend(head))
    for _ in range(300):
        running.update(backend(chunk))
    whole = np.concatenate([head] + [chunk] * 300).astype(backend.dtype)
    errors = ulp_error(backend.numpy(running.result()), exact_logsumexp(whole), np.dtype(backend.dtype))
    assert np.all(errors <= 4), f"{backend.name}: {np.max(errors):.2f} ulps"


def test_blocked_logsumexp_keeps_the_roundings_of_its_merges(tmp_path):
    """The same stream through a memmap read 20 entries at a time (28 ulps before)."""
    values = np.concatenate([[0.0, -1.0], np.full(3000, -37.0)])
    array = np.memmap(tmp_path / "tail.f64", dtype=np.float64, mode="w+", shape=values.shape)
    array[:] = values
    errors = ulp_error(logsumexp_blocked(array, block_bytes=160), exact_logsumexp(values), np.dtype(np.float64))
    assert np.all(errors <= 4), f"{np.max(errors):.2f} ulps"


def test_blocked_logsumexp_of_a_max_that_rises_at_every_block(tmp_path):
    """Each merge rescales the total by exp(d) for a small rise d: one rounding of exp each
    time, which the chain kept (100000 entries rising by 1e-5, blocks of 16: 20 ulps before)."""
    values = np.arange(100000) * 1e-5
    errors = ulp_error(logsumexp_blocked(values, block_bytes=128), exact_logsumexp(values), np.dtype(np.float64))
    assert np.all(errors <= 4), f"{np.max(errors):.2f} ulps"


def test_product_error_of_the_merge_is_exact_and_never_overflows():
    """Dekker's error of the rescaling product: exact (checked in rationals), and 0 with no
    warning where splitting the factor would overflow."""
    from fractions import Fraction

    from lse_dispatch._state import _product_error

    a = np.array([3.0, 1.0 / 3.0, 12345.678, 1e308])
    b = np.array([0.1, -0.7, -2.0**-30 / 3.0, 0.5])
    product = a * b
    got = _product_error(np, a, b, product)
    for i in range(3):
        assert Fraction(got[i]) == Fraction(a[i]) * Fraction(b[i]) - Fraction(product[i])
    assert got[3] == 0.0


def test_online_log_softmax_is_exact_at_the_max():
    running = OnlineLogSumExp().update(np.array([0.0])).update(np.array([-40.0]))
    assert running.log_softmax(np.array([0.0]))[0] == -4.248354255291589e-18
    assert float(running.result()) == 4.248354255291589e-18


def test_online_infinities_share_the_mass():
    running = OnlineLogSumExp().update(np.array([math.inf, 1.0])).update(np.array([math.inf]))
    assert running.result() == math.inf
    np.testing.assert_array_equal(running.softmax(np.array([math.inf, 1.0])), [0.5, 0.0])


def test_online_with_weights_and_sign():
    running = OnlineLogSumExp().update(np.array([0.0]), b=np.array([1.0])).update(np.array([1.0]), b=np.array([-1.0]))
    value, sign = running.result(return_sign=True)
    expected, expected_sign = logsumexp(np.array([0.0, 1.0]), b=np.array([1.0, -1.0]), return_sign=True)
    assert (float(value), float(sign)) == (float(expected), float(expected_sign))
    assert math.isnan(float(running.result()))


def test_online_errors_name_the_problem():
    with pytest.raises(ValueError, match="no chunk yet"):
        OnlineLogSumExp().result()
    running = OnlineLogSumExp(axis=0).update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="dimensions"):
        running.update(np.zeros(3))


@pytest.fixture
def memmap_file(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "values.f64"
    array = np.memmap(path, dtype=np.float64, mode="w+", shape=(512, 16, 64))
    array[:] = rng.normal(size=array.shape) * 10
    array.flush()
    del array
    return path


@pytest.mark.parametrize("axis", [None, 0, 1, (0, 2), 2])
def test_blocked_logsumexp_over_a_memmap(memmap_file, axis):
    array = np.memmap(memmap_file, dtype=np.float64, mode="r", shape=(512, 16, 64))
    # 4 KiB blocks: smaller than one leading row (8 KiB), so rows are split too.
    got = logsumexp_blocked(array, axis=axis, block_bytes=4096)
    expected = logsumexp(np.asarray(array), axis=axis)
    assert got.shape == expected.shape
    _assert_within_ulps(got, expected, np.float64, 2)


def test_blocked_extra_memory_is_bounded_by_the_block(memmap_file):
    array = np.memmap(memmap_file, dtype=np.float64, mode="r", shape=(512, 16, 64))
    block_bytes = 64 * 1024  # the file is 4 MiB: 64 blocks
    logsumexp_blocked(array, block_bytes=block_bytes)  # warm caches and imports
    tracemalloc.start()
    try:
        logsumexp_blocked(array, block_bytes=block_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # NumPy reports its buffers to tracemalloc; mapped file pages are not
    # allocations.  The state of one block needs a few block-sized temporaries.
    assert peak <= 8 * block_bytes, peak
    assert array.nbytes >= 64 * block_bytes


def test_blocked_rejects_what_it_cannot_read():
    with pytest.raises(TypeError, match="argument 'array'"):
        logsumexp_blocked([1.0, 2.0])
    with pytest.raises(ValueError, match="block_bytes"):
        logsumexp_blocked(np.zeros(4), block_bytes=4)
