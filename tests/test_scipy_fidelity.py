"""Drop-in fidelity: where the contract does not say otherwise, behave as ``scipy.special``.

Types of results (NumPy scalars for 0-d results), dtype promotion (the
namespace's own, Python scalars weak), 0-d input with an axis, the
``AxisError`` class, and errors that name the argument.  Values are checked
against SciPy itself where SciPy is right, and types and messages exactly.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import lse_dispatch
from lse_dispatch import OnlineLogSumExp, log_softmax, logsumexp, lse_finalize, lse_merge, lse_state, softmax

special = pytest.importorskip("scipy.special")

FUNCTIONS = {"logsumexp": (logsumexp, special.logsumexp), "softmax": (softmax, special.softmax),
             "log_softmax": (log_softmax, special.log_softmax)}


# -- 1. 0-d results on NumPy are NumPy scalars ---------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_d_numpy_results_are_numpy_scalars(dtype):
    value = logsumexp(np.array([1000.0, 1000.0], dtype=dtype))
    expected = special.logsumexp(np.array([1000.0, 1000.0], dtype=dtype))
    assert type(value) is type(expected) is np.dtype(dtype).type
    assert isinstance(value, np.generic) and json.loads(json.dumps(float(value))) == float(value)
    assert {value: 1}[value] == 1
    if dtype == np.float64:
        assert isinstance(value, float) and json.dumps(value) == json.dumps(expected)
    value, sign = logsumexp(np.array([0.0, 1.0], dtype=dtype), b=np.array([1.0, -1.0], dtype=dtype), return_sign=True)
    assert type(value) is type(sign) is np.dtype(dtype).type and float(sign) == -1.0
    for name in ("softmax", "log_softmax"):
        ours, scipys = FUNCTIONS[name]
        got = ours(np.array(3.0, dtype=dtype))
        assert type(got) is type(scipys(np.array(3.0, dtype=dtype)))
    # Arrays stay arrays, and other libraries keep their own 0-d types.
    assert type(logsumexp(np.ones((2, 3)), axis=1)) is np.ndarray
    torch = pytest.importorskip("torch")
    assert type(logsumexp(torch.ones(3))) is torch.Tensor


# -- 2. dtype promotion ------------------------------------------------------------------


@pytest.mark.parametrize(("a_dtype", "b_dtype"), [("int32", "float32"), ("int64", "complex64"), ("float32", "float64"),
                                                  ("int8", "float16")])
def test_numpy_promotion_counts_integer_operands(a_dtype, b_dtype):
    a, b = np.array([2, 1], dtype=a_dtype), np.array([1, 1], dtype=b_dtype)
    ours = logsumexp(a, b=b)
    assert ours.dtype == special.logsumexp(a, b=b).dtype == np.result_type(a_dtype, b_dtype)


def test_python_scalars_are_weak(backend):
    a = backend.asarray(np.array([1.0, 2.0]), "float32")
    out = backend.call(lambda x: logsumexp(x, b=2.0), a)
    backend.check_array(out, "float32", ())
    assert float(backend.to_numpy(out)) == pytest.approx(math.log(2 * (math.e + math.e**2)), rel=1e-6)
    if backend.name == "numpy":
        # A NumPy scalar is not weak: it promotes, as in SciPy.
        assert logsumexp(np.float32([1, 2]), b=np.float64(2.0)).dtype == np.float64
        # A Python complex makes a float32 result complex64, as NumPy 2 does.
        assert logsumexp(np.float32([1, 2]), b=1j).dtype == np.complex64


def test_the_namespace_promotes_its_own_way(backend):
    """torch and JAX keep float32 for int32 with float32; NumPy and Dask give float64."""
    if "float64" not in backend.dtypes or backend.name == "array_api_strict":
        pytest.skip("needs a namespace that mixes integer and floating kinds")
    a = backend.asarray(np.array([2, 1]), "int32")
    b = backend.asarray(np.array([1.0, -1.0]), "float32")
    value, _ = backend.call(lambda x, w: logsumexp(x, b=w, return_sign=True), a, b)
    expected = backend.xp.result_type(backend.xp.int32, backend.xp.float32)
    assert value.dtype == expected


# -- 3. 0-d input with an axis -------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 0, -1, ()])
@pytest.mark.parametrize("keepdims", [False, True])
def test_zero_d_input_with_an_axis_as_scipy(backend, axis, keepdims):
    x = backend.asarray(np.array(2.0), "float32")
    got = backend.call(lambda v: logsumexp(v, axis=axis, keepdims=keepdims), x)
    expected = special.logsumexp(np.array(2.0, dtype=np.float32), axis=axis, keepdims=keepdims)
    assert tuple(got.shape) == np.shape(expected)
    np.testing.assert_array_equal(backend.to_numpy(got), expected)
    for name in ("softmax", "log_softmax"):
        ours, scipys = FUNCTIONS[name]
        out = backend.call(lambda v, ours=ours: ours(v, axis=axis), x)
        assert tuple(out.shape) == ()
        assert float(backend.to_numpy(out)) == float(scipys(np.array(2.0), axis=axis))


# -- 4. AxisError ----------------------------------------------------------------------


def test_axis_error_is_numpys():
    for bad in (2, (0, 0)):
        with pytest.raises(np.exceptions.AxisError) as caught:
            logsumexp(np.ones((2, 3)), axis=bad)
        assert isinstance(caught.value, lse_dispatch.AxisError)
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, IndexError)
        assert "axis" in str(caught.value)


# -- 5. errors that name the argument -----------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: logsumexp(None), TypeError, "argument 'a' must be an array or a number, got None"),
        (lambda: softmax(None), TypeError, "argument 'x' must be an array or a number, got None"),
        (lambda: logsumexp([1.0, [2.0, 3.0]]), ValueError, "argument 'a' is a ragged sequence"),
        (lambda: logsumexp([1.0, 2.0], b=[[1.0], [2.0, 3.0]]), ValueError, "argument 'b' is a ragged sequence"),
        (lambda: logsumexp("abc"), TypeError, "argument 'a' must be numeric"),
        (lambda: logsumexp([1.0], where=[1]), TypeError, "argument 'where' must be a boolean array"),
        (lambda: lse_merge(lse_state(np.ones(3)), (1, 0, 0)), TypeError,
         "argument 'second' must be an LSEState (max, count, rest) of arrays"),
        (lambda: lse_merge(lse_state(np.ones((2, 3)), axis=1), lse_state(np.ones((3, 3)), axis=1)), ValueError,
         "argument 'second' with shape (3,) does not broadcast against 'first' with shape (2,)"),
        (lambda: lse_finalize((1.0, 2.0)), TypeError, "argument 'state' must be an LSEState"),
    ],
    ids=["None", "None-x", "ragged", "ragged-b", "string", "where-int", "merge-tuple", "merge-shapes", "finalize"],
)
def test_errors_name_the_argument(call, error, message):
    with pytest.raises(error) as caught:
        call()
    assert message in str(caught.value)


def test_mixing_libraries_in_streams_names_the_argument():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"different array libraries \('first' holds numpy.ndarray, 'second' holds torch"):
        lse_merge(lse_state(np.ones(3)), lse_state(torch.ones(3)))
    running = OnlineLogSumExp(axis=0).update(np.ones(3))
    with pytest.raises(TypeError, match=r"argument 'chunk' is a torch.Tensor, but the stream's earlier chunks were numpy"):
        running.update(torch.ones(3))


# -- 10. a clean run prints what a person needs ----------------------------------------------

COMPILE_SCRIPT = r"""
import json, warnings, torch, lse_dispatch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    f = torch.compile(lambda x: lse_dispatch.logsumexp(x, axis=1) + lse_dispatch.softmax(x, axis=1).sum(1)
                      + lse_dispatch.log_softmax(x, axis=1).sum(1), fullgraph=True)
    value = f(torch.randn(4, 5))
print(json.dumps([[w.category.__name__, w.filename, str(w.message)] for w in caught]))
"""


def test_torch_compile_of_a_first_call_warns_nothing_of_ours():
    """In a fresh process (no cached type lookups), torch.compile(fullgraph=True)
    traces the three functions without Dynamo warning about array-api-compat's
    cached type checks (17 such warnings before)."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    caught = json.loads(done.stdout.strip().splitlines()[-1])
    ours = [w for w in caught if "array_api_compat" in w[2] or "_helpers.py" in w[2] or "lse_dispatch" in w[1]
            or "lru_cache" in w[2]]
    assert ours == [], ours
