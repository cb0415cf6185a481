"""Dask: one tree reduction over the state, each block computed once, on a real cluster."""

from __future__ import annotations

import collections
import threading
import weakref

import array_api_compat
import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

from lse_dispatch import _dispatch, _generic, log_softmax, logsumexp, softmax  # noqa: E402
from lse_dispatch._call import prepare  # noqa: E402
from lse_dispatch.oracle import exact_softmax, ulp_error  # noqa: E402


def assert_softmax_contract(got, x, axis):
    # Softmax is exp(x - lse): a 1-ulp change of lse moves it by |lse| / 2 ulps
    # or so, so a tree-merged state is checked against the oracle (4-ulp
    # contract), not for equality with the eager summation order.
    assert np.max(ulp_error(got, exact_softmax(x, axis=axis), got.dtype)) <= 4


class CountingSource:
    """A lazily generated array whose blocks count how often they are made
    and how many are alive at once (weak references to the block buffers)."""

    def __init__(self, chunks):
        self.made = collections.Counter()
        self.alive = 0
        self.most_alive = 0
        self._lock = threading.Lock()
        self.array = da.map_blocks(self._block, chunks=chunks, dtype=np.float64)

    def _block(self, block_info=None):
        location = block_info[None]["chunk-location"]
        shape = block_info[None]["chunk-shape"]
        block = np.random.default_rng(list(location)).normal(size=shape) * 10
        with self._lock:
            self.made[location] += 1
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(block, self._freed)
        return block

    def _freed(self):
        with self._lock:
            self.alive -= 1


def _eager_copy(source):
    return source.array.compute(scheduler="sync")


CHUNKS = ((20,) * 8, (30,) * 3)


def test_the_dask_kernel_is_chosen_and_declines_complex_input():
    x = da.ones((8, 6), chunks=4)
    spec = _dispatch.backend_for(x)
    call = prepare("logsumexp", x, axis=0)
    chosen = [k.name for k in spec.kernels if k.op == "logsumexp" and k.declines(call) is None]
    assert chosen == ["dask-single-pass-tree"]
    complex_call = prepare("logsumexp", x.astype(np.complex128), axis=0)
    reasons = [k.declines(complex_call) for k in spec.kernels if k.op == "logsumexp"]
    assert reasons == ["complex input has no real (max, count, rest) state"]


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_single_pass_makes_each_block_once_and_holds_few(axis):
    source = CountingSource(CHUNKS)
    result = logsumexp(source.array, axis=axis)
    assert not source.made  # building the graph computes nothing
    got = result.compute(scheduler="sync")
    assert set(source.made.values()) == {1} and len(source.made) == 8 * 3
    # A block is dropped as soon as its state is taken.
    assert source.most_alive <= 2
    source.made.clear()
    expected = logsumexp(_eager_copy(source), axis=axis)
    np.testing.assert_array_max_ulp(got, expected, maxulp=2)


def test_two_pass_generic_method_holds_every_block_until_the_max_is_known():
    source = CountingSource(CHUNKS)
    call = prepare("logsumexp", source.array, axis=None)
    value, _ = _generic.logsumexp(call)  # max first, then sum of exp(a - max)
    value.compute(scheduler="sync")
    assert set(source.made.values()) == {1}
    # Nothing can be summed before the global max: every block stays alive.
    assert source.most_alive == 8 * 3


def test_value_and_sign_share_one_reduction():
    source = CountingSource(CHUNKS)
    b = da.from_array(np.linspace(-1, 1, 90), chunks=30)
    value, sign = logsumexp(source.array, axis=0, b=b, return_sign=True)
    value, sign = dask.compute(value, sign, scheduler="sync")
    assert set(source.made.values()) == {1} and len(source.made) == 24
    eager = _eager_copy(source)
    expected, expected_sign = logsumexp(eager, axis=0, b=np.linspace(-1, 1, 90), return_sign=True)
    np.testing.assert_array_equal(sign, expected_sign)
    np.testing.assert_allclose(value, expected, rtol=1e-13)


def test_softmax_is_the_state_then_one_elementwise_pass():
    source = CountingSource(CHUNKS)
    got = softmax(source.array, axis=1).compute(scheduler="sync")
    # Each block feeds the reduction and the elementwise pass, made once.
    assert set(source.made.values()) == {1}
    assert_softmax_contract(got, _eager_copy(source), axis=1)


@pytest.mark.parametrize("split_every", [2, 3, 16])
def test_split_every_changes_the_tree_not_the_result(split_every):
    x = da.from_array(np.random.default_rng(0).normal(size=(64, 64)) * 30, chunks=8)
    with dask.config.set(split_every=split_every):
        result = logsumexp(x, axis=0)
        depth = sum(1 for name in result.dask.layers if "lse-state-partial" in name)
        got = result.compute(scheduler="sync")
    assert depth == {2: 2, 3: 1, 16: 0}[split_every]
    np.testing.assert_array_max_ulp(got, logsumexp(x.compute(), axis=0), maxulp=2)


def test_float32_and_where_on_dask():
    rng = np.random.default_rng(1)
    a = (rng.normal(size=(30, 20)) * 20).astype(np.float32)
    mask = rng.random((30, 20)) > 0.3
    mask[:, 0] = False  # a fully excluded slice gives -inf
    x, w = da.from_array(a, chunks=7), da.from_array(mask, chunks=9)
    got = logsumexp(x, axis=0, where=w).compute(scheduler="sync")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, logsumexp(a, axis=0, where=mask))
    got = log_softmax(x, axis=0, where=w).compute(scheduler="sync")
    np.testing.assert_array_equal(got, log_softmax(a, axis=0, where=mask))


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as cluster, distributed.Client(cluster) as client:
        yield client


def test_cluster_results_match_the_eager_path(client):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(120, 40)) * 50
    a[5, :] = 1000.0  # ties at a large max
    b = rng.normal(size=(120, 40))
    x, weights = da.from_array(a, chunks=(37, 20)), da.from_array(b, chunks=(37, 20))
    lazy = {
        "lse_all": logsumexp(x),
        "lse_0": logsumexp(x, axis=0),
        "lse_1_b": logsumexp(x, axis=1, b=weights, return_sign=True),
        "softmax_0": softmax(x, axis=0),
        "log_softmax_1": log_softmax(x, axis=1),
    }
    (got,) = dask.compute(lazy)  # one graph, run by the 2 worker processes
    assert len(client.scheduler_info()["workers"]) == 2
    np.testing.assert_array_max_ulp(got["lse_all"], logsumexp(a), maxulp=2)
    np.testing.assert_array_max_ulp(got["lse_0"], logsumexp(a, axis=0), maxulp=2)
    value, sign = got["lse_1_b"]
    expected, expected_sign = logsumexp(a, axis=1, b=b, return_sign=True)
    np.testing.assert_array_equal(sign, expected_sign)
    np.testing.assert_allclose(value, expected, rtol=1e-13)
    assert_softmax_contract(got["softmax_0"], a, axis=0)
    # log_softmax = (x - m) - log1p(c - 1 + r): the tree changes only the
    # rounding of the log1p term, an absolute error of a few eps.
    eps = np.finfo(np.float64).eps
    np.testing.assert_allclose(got["log_softmax_1"], log_softmax(a, axis=1), rtol=4 * eps, atol=4 * eps)


def test_lse_state_of_a_dask_array_is_one_tree_too():
    from lse_dispatch import OnlineLogSumExp, lse_finalize, lse_state

    source = CountingSource(CHUNKS)
    state = lse_state(source.array, axis=1)
    running = OnlineLogSumExp(axis=1).update(source.array)
    assert not source.made
    got, streamed = dask.compute(lse_finalize(state), running.result(), scheduler="sync")
    assert set(source.made.values()) == {1} and source.most_alive <= 2
    expected = logsumexp(_eager_copy(source), axis=1)
    np.testing.assert_array_max_ulp(got, expected, maxulp=2)
    np.testing.assert_array_max_ulp(streamed, expected, maxulp=2)


def test_a_stream_of_chunks_merges_in_a_few_layers_and_runs_on_the_cluster(client):
    """Merging two streamed states is one blockwise task per block (``Numerics.elementwise``),
    not a graph layer for each of the compensated merge's ~200 operations (185 ms of graph
    building per update before, benchmarks/dask_streaming.py); chunks chunked differently
    are merged all the same."""
    from lse_dispatch import OnlineLogSumExp, streaming

    rng = np.random.default_rng(4)
    pieces = [rng.normal(size=(30, n)) * 20 for n in (7, 12, 5, 9)]

    def layers(*arrays):
        return set().union(*(array.__dask_graph__().layers for array in arrays))

    first, second = (OnlineLogSumExp(axis=1).update(da.from_array(piece, chunks=(rows, 4)))._levels[0]
                     for piece, rows in zip(pieces[:2], (10, 15)))
    merged, low = streaming._merged(array_api_compat.array_namespace(first[2]), first[1], first[2], second[1], second[2])
    before = layers(*first[1], first[2], *second[1], second[2])
    # One blockwise layer, a getitem per output, and a rechunk of each of the eight
    # inputs (the two chunks' rows were chunked by 10 and 15); 220 layers before.
    assert len(layers(*merged, low) - before) <= 1 + 4 + 8

    running = OnlineLogSumExp(axis=1)
    for piece, rows in zip(pieces, (10, 15, 30, 6)):
        running.update(da.from_array(piece, chunks=(rows, 3)))
    last = da.from_array(pieces[-1], chunks=(6, 3))
    value, normalised = dask.compute(running.result(), running.softmax(last))
    whole = np.concatenate(pieces, axis=1)
    np.testing.assert_array_max_ulp(value, logsumexp(whole, axis=1), maxulp=2)
    exact = exact_softmax(whole, axis=1)[:, whole.shape[1] - pieces[-1].shape[1]:]
    assert np.max(ulp_error(normalised, exact, normalised.dtype)) <= 4
