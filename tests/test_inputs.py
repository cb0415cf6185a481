"""Honest with inputs: never mutated, read-only accepted, bad input rejected early."""

from __future__ import annotations

import numpy as np
import pytest

from lse_dispatch import log_softmax, logsumexp, softmax

from ._helpers import FUNCTIONS

OPS = tuple(FUNCTIONS)


@pytest.mark.parametrize("op", OPS)
def test_inputs_are_not_mutated(backend, op):
    dtype = "float32"
    a = np.array([[0.0, -40.0, np.inf, 2.0], [1.0, np.nan, -np.inf, 3.0], [5.0, 5.0, -1.0, 0.5]])
    where = np.array([[True, True, False, True], [True, False, True, True], [True, True, True, False]])
    b = np.array([1.0, -2.0, 0.0, 0.5])
    x, w = backend.asarray(a, dtype), backend.asarray(where, "bool")
    kw = {"where": w}
    if op == "logsumexp":
        kw["b"] = backend.asarray(b, dtype)
    before = {name: backend.to_numpy(v).copy() for name, v in [("a", x), *kw.items()]}
    out = backend.call(FUNCTIONS[op], x, axis=1, **kw)
    backend.to_numpy(out)  # Dask: run the graph, then look at the inputs
    for name, v in [("a", x), *kw.items()]:
        np.testing.assert_array_equal(backend.to_numpy(v), before[name], err_msg=f"argument {name!r} was changed")


def test_read_only_numpy_is_accepted():
    a = np.array([[0.0, -40.0, 3.0], [1.0, 2.0, 3.0]])
    b = np.array([1.0, 2.0, -0.5])
    where = np.array([True, False, True])
    for array in (a, b, where):
        array.setflags(write=False)
    value, sign = logsumexp(a, axis=1, b=b, where=where, return_sign=True)
    assert value.shape == sign.shape == (2,)
    assert softmax(a, axis=0).shape == a.shape
    assert log_softmax(a, axis=None, where=where).shape == a.shape


def test_python_scalars_and_sequences_are_numpy():
    out = logsumexp([[0.0, 1.0], [2.0, 3.0]], axis=1)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    assert isinstance(softmax([1, 2, 3]), np.ndarray)
    assert np.isclose(float(logsumexp(0.5)), 0.5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", ["abc", ["a", "b"], [object(), object()], {"a": 1}, None.__class__],
                         ids=["str", "str-list", "objects", "dict", "type"])
def test_non_numeric_input_names_the_argument(op, bad):
    first = "a" if op == "logsumexp" else "x"
    with pytest.raises(TypeError, match=rf"'{first}'"):
        FUNCTIONS[op](bad)


@pytest.mark.parametrize("bad", ["abc", [object()], ["1.0", "2.0"]], ids=["str", "objects", "str-list"])
def test_non_numeric_weights_name_b(bad):
    with pytest.raises(TypeError, match="'b'"):
        logsumexp(np.zeros(1), b=bad)


@pytest.mark.parametrize("op", OPS)
def test_non_boolean_where_is_a_type_error(backend, op):
    x = backend.asarray(np.zeros((2, 3)), "float32")
    for where in (backend.asarray(np.ones((2, 3)), "float32"), backend.asarray(np.ones((2, 3), dtype=np.int32), "int32")):
        with pytest.raises(TypeError, match="'where'"):
            backend.call(FUNCTIONS[op], x, where=where)


@pytest.mark.parametrize("op", OPS)
def test_non_broadcasting_where_is_a_value_error(backend, op):
    x = backend.asarray(np.zeros((2, 3)), "float32")
    for shape in [(4,), (2, 2), (3, 2), (2, 1, 3)]:
        with pytest.raises(ValueError, match="'where'"):
            backend.call(FUNCTIONS[op], x, where=backend.asarray(np.ones(shape, bool), "bool"))


def test_non_broadcasting_b_is_a_value_error(backend):
    x = backend.asarray(np.zeros((2, 3)), "float32")
    for shape in [(4,), (2, 2), (3, 1)]:
        with pytest.raises(ValueError, match="'b'"):
            backend.call(logsumexp, x, b=backend.asarray(np.ones(shape), "float32"))


def test_b_may_enlarge_the_result(backend):
    """b broadcasts against a both ways (as in SciPy): the result takes the joint shape."""
    x = backend.asarray(np.zeros((1, 3)), "float32")
    b = backend.asarray(np.ones((2, 3)), "float32")
    out = backend.to_numpy(backend.call(logsumexp, x, b=b, axis=1))
    np.testing.assert_allclose(out, np.full(2, np.log(3.0)), rtol=1e-6)


def test_mixed_libraries_raise_type_error():
    torch = pytest.importorskip("torch")
    a, b = np.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match="different array libraries"):
        logsumexp(a, b=b)
    with pytest.raises(TypeError, match="different array libraries"):
        logsumexp(b, b=a)
    with pytest.raises(TypeError, match="different array libraries"):
        softmax(a, where=torch.ones(3, dtype=torch.bool))


def test_errors_leave_dask_inputs_unevaluated():
    """Validation fails before anything is computed: no graph runs."""
    da = pytest.importorskip("dask.array")
    import dask

    from .conftest import _refuse_to_compute

    x = da.from_array(np.zeros((4, 3)), chunks=2)
    with dask.config.set(scheduler=_refuse_to_compute):
        with pytest.raises(ValueError, match="'where'"):
            softmax(x, where=da.from_array(np.ones((4, 2), bool), chunks=2))
        with pytest.raises(TypeError, match="'where'"):
            log_softmax(x, where=da.from_array(np.ones((4, 3)), chunks=2))
        with pytest.raises(ValueError, match="axis"):
            logsumexp(x, axis=(0, 0))
