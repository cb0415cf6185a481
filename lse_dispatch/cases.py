"""The built-in catalogue of hard inputs and contract rows, and its runner.

One list serves ``lse-dispatch report``, the test suite and the conformance
suite.  Each :class:`Case` makes NumPy float64 inputs (values exactly
representable in the dtype under test), names the operation and its keyword
arguments, and either leaves the expected values to the mpmath oracle
(``family="accuracy"``) or states them (the contract table's rows).

:func:`run_case` is the one way the three of them run a case: it makes the
inputs on a :class:`~lse_dispatch.backends._target.Target`, calls an
implementation there, checks what comes back (a ``(value, sign)`` pair where
``return_sign`` asks for one; namespace, device, dtype and shape) and returns
the :class:`Verdict` of :func:`evaluate`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import oracle as _oracle
from ._validate import normalize_axis

__all__ = [
    "CASES",
    "OPS",
    "ULP_BUDGET",
    "Case",
    "Verdict",
    "applies",
    "cases",
    "compare",
    "describe",
    "evaluate",
    "exact",
    "expected_shape",
    "inputs",
    "round_to",
    "run_case",
]

#: Relative error allowed against the oracle, in ulps of the result dtype.
#: float16 and bfloat16 are computed in float32 and rounded once, so they
#: must be within one ulp of their own dtype.
ULP_BUDGET = {"float64": 4.0, "float32": 4.0, "float16": 1.0, "bfloat16": 1.0}

OPS = ("logsumexp", "softmax", "log_softmax")

_INF, _NAN = math.inf, math.nan


def round_to(values, dtype: str) -> np.ndarray:
    """``values`` rounded to ``dtype`` and returned as float64 (exactly); see
    :func:`lse_dispatch.oracle.round_to`."""
    return _oracle.round_to(values, dtype)


@dataclass(frozen=True)
class Case:
    """One named input and what the contract says about it.

    Attributes
    ----------
    id
        Stable identifier, ``family/name/op``.
    family
        ``accuracy`` (checked against the oracle), ``overflow`` (also the
        oracle, near the dtype's overflow threshold) or ``special-values``
        (expected values stated here).
    op
        ``logsumexp``, ``softmax`` or ``log_softmax``.
    make
        ``make(dtype) -> dict`` of NumPy float64 inputs: ``a`` (``x`` for
        softmax), optional ``b`` and ``where``.
    kwargs
        Further keyword arguments (``axis``, ``return_sign``, ...).
    expected
        For stated rows: ``expected(inputs) -> array`` or a tuple of arrays
        (value and sign with ``return_sign``).  ``None``: use the oracle.
    dtypes
        The dtypes the case applies to.
    row
        The contract-table row it checks, in words.
    needs_float64
        Holds only where float32 is computed in a float64 accumulator (a
        backend and device that have float64; not JAX without x64).
    """

    id: str
    family: str
    op: str
    make: Callable[[str], dict]
    kwargs: dict = field(default_factory=dict)
    expected: Callable[[dict], object] | None = None
    dtypes: tuple[str, ...] = ("float64", "float32", "float16", "bfloat16")
    row: str = ""
    needs_float64: bool = False


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _inputs(**arrays) -> Callable[[str], dict]:
    """A ``make`` that rounds fixed arrays (``a`` or ``x``) to the dtype."""

    def make(dtype: str) -> dict:
        out = {}
        for name, value in arrays.items():
            out[name] = value if name == "where" else round_to(value, dtype)
        return out

    return make


def _random(seed: int, sampler: Callable[[np.random.Generator], np.ndarray]) -> Callable[[str], dict]:
    return lambda dtype: {"a": round_to(sampler(_rng(seed)), dtype)}


# -- accuracy: well-conditioned hard inputs, checked against the oracle -------

_ALL_DTYPES = ("float64", "float32", "float16", "bfloat16")

_ACCURACY_INPUTS: dict[str, tuple[Callable[[str], dict], dict, tuple[str, ...]]] = {
    # lse([0, -40]) = 4.25e-18: torch and jax return 0 (a 5.5e15-ulp error).
    "dominant-element": (_inputs(a=[0.0, -40.0]), {}, ("float64", "float32")),
    "dominant-among-many": (
        _random(1, lambda g: np.concatenate([[0.0], -30.0 + g.uniform(-1, 1, 999)])),
        {},
        ("float64", "float32"),
    ),
    "ties-at-max": (_inputs(a=[3.0, 3.0, 3.0, 1.0, -2.0]), {}, ("float64", "float32", "float16", "bfloat16")),
    "large-offset": (_random(2, lambda g: 1e4 + g.normal(size=1000)), {}, ("float64", "float32")),
    "negative-offset": (_random(3, lambda g: -1e4 + g.normal(size=1000)), {}, ("float64", "float32")),
    "wide-spread": (_random(4, lambda g: g.uniform(-80, 80, 512)), {}, ("float64", "float32")),
    "rows-axis-1": (_random(5, lambda g: g.normal(size=(8, 257)) * 3), {"axis": 1}, _ALL_DTYPES),
    "columns-axis-0": (_random(6, lambda g: g.normal(size=(257, 8)) * 3), {"axis": 0}, _ALL_DTYPES),
    "tuple-axes": (_random(7, lambda g: g.normal(size=(6, 5, 7))), {"axis": (0, 2)}, ("float64", "float32")),
    "small-values": (_random(8, lambda g: g.uniform(-3, 3, 64)), {}, ("float64", "float32", "float16", "bfloat16")),
}


def _equal_tail(dtype: str, columns: int | None = None) -> dict:
    """A max of 0, a term ``e**-1``, and 5000 equal terms of about a ulp of the sum (``e**-37`` in
    float64, ``e**-17`` otherwise): a plain sum's roundings all go one way (float64 on torch:
    10.7 ulps before sums became order-free)."""
    tail = -37.0 if dtype == "float64" else -17.0
    line = np.concatenate([[0.0, -1.0], np.full(5000, tail)])
    return {"a": round_to(line if columns is None else np.tile(line[:, None], (1, columns)), dtype)}


_ACCURACY_INPUTS["equal-terms-after-a-larger-one"] = (_equal_tail, {}, ("float64", "float32"))
_ACCURACY_INPUTS["equal-terms-down-columns"] = (lambda dtype: _equal_tail(dtype, 3), {"axis": 0}, ("float64", "float32"))

# Long reductions: a pairwise-summed 2**20 row, and 2**20 entries down a
# strided axis (a column of a C-ordered array), where a sequential float32
# sum would lose ~sqrt(n) ulps.  logsumexp only: the oracle's cost is per entry.
_LONG_INPUTS = {
    "long-contiguous": (_random(9, lambda g: g.normal(size=2**20)), {}),
    "long-strided-axis-0": (_random(10, lambda g: g.normal(size=(2**20, 2))), {"axis": 0}),
}


def _overflow_inputs(dtype: str) -> dict:
    """Entries at the dtype's overflow threshold ln(max) and beyond it."""
    info = {"float16": 11.089866488461016, "float32": 88.72283905282, "bfloat16": 88.72283905282}
    threshold = info.get(dtype, 709.782712893384)
    return {"a": round_to([threshold, threshold - 1.0, threshold + 5.0, 0.0], dtype)}


def _many_zeros(dtype: str) -> dict:
    # 70,000 ones in float16 sum past its max (65,504): exact answer log(70000).
    return {"a": np.zeros(70_000)}


# -- stated rows of the contract table -----------------------------------------


def _expected_lse(value, sign=None):
    def expected(inputs):
        return (np.float64(value), np.float64(sign)) if sign is not None else np.float64(value)

    return expected


def _expected_array(values):
    return lambda inputs: np.asarray(values, dtype=np.float64)


def _special_cases() -> list[Case]:
    rows: list[Case] = []

    def add(name, op, make, expected, row, **kwargs):
        rows.append(Case(f"special-values/{name}/{op}", "special-values", op, make, kwargs, expected, row=row))

    empty = lambda dtype: {"a": np.zeros((0,))}  # noqa: E731
    add("empty", "logsumexp", empty, _expected_lse(-_INF), "empty reduction: -inf")
    add("empty-sign", "logsumexp", empty, _expected_lse(-_INF, 0.0), "empty reduction: sign 0", return_sign=True)
    add("empty", "softmax", empty, _expected_array([]), "softmax of empty is empty")
    add("empty", "log_softmax", empty, _expected_array([]), "log_softmax of empty is empty")
    nan_in = _inputs(a=[1.0, _NAN, 0.0])
    add("nan", "logsumexp", nan_in, _expected_lse(_NAN), "NaN included: NaN")
    add("nan", "softmax", nan_in, _expected_array([_NAN] * 3), "NaN included: slice NaN")
    add("nan", "log_softmax", nan_in, _expected_array([_NAN] * 3), "NaN included: slice NaN")
    pos_inf = _inputs(a=[1.0, _INF, 0.0, _INF])
    add("pos-inf", "logsumexp", pos_inf, _expected_lse(_INF), "+inf included: +inf")
    add("pos-inf", "softmax", pos_inf, _expected_array([0.0, 0.5, 0.0, 0.5]), "k entries at +inf share 1/k")
    add("pos-inf", "log_softmax", pos_inf, _expected_array([-_INF, -math.log(2), -_INF, -math.log(2)]),
        "k entries at +inf get -log k, others -inf")
    all_neg_inf = _inputs(a=[-_INF, -_INF, -_INF])
    add("all-neg-inf", "logsumexp", all_neg_inf, _expected_lse(-_INF), "all -inf: -inf")
    add("all-neg-inf-sign", "logsumexp", all_neg_inf, _expected_lse(-_INF, 0.0), "all -inf: sign 0", return_sign=True)
    add("all-neg-inf", "softmax", all_neg_inf, _expected_array([0.0] * 3), "all -inf: softmax 0, never NaN")
    add("all-neg-inf", "log_softmax", all_neg_inf, _expected_array([-_INF] * 3), "all -inf: log_softmax -inf")
    masked = _inputs(a=[_NAN, _INF, 2.0], where=np.array([False, False, False]))
    add("all-masked", "logsumexp", masked, _expected_lse(-_INF), "where excludes all: -inf")
    add("all-masked", "softmax", masked, _expected_array([0.0] * 3), "where excludes all: 0")
    add("all-masked", "log_softmax", masked, _expected_array([-_INF] * 3), "where excludes all: -inf")
    partly = _inputs(a=[_NAN, _INF, 0.0, 0.0], where=np.array([False, False, True, True]))
    add("where-excludes-nan-inf", "logsumexp", partly, _expected_lse(math.log(2)), "where=False excludes NaN and inf")
    add("where-excludes-nan-inf", "softmax", partly, _expected_array([0.0, 0.0, 0.5, 0.5]), "where=False entries get 0")
    add("where-excludes-nan-inf", "log_softmax", partly,
        _expected_array([-_INF, -_INF, -math.log(2), -math.log(2)]), "where=False entries get -inf")
    zero_b = _inputs(a=[_NAN, _INF, 0.0], b=[0.0, 0.0, 2.0])
    add("b-zero-excludes", "logsumexp", zero_b, _expected_lse(math.log(2)), "b == 0 excludes NaN and inf")
    all_zero_b = _inputs(a=[1.0, 2.0], b=[0.0, 0.0])
    add("b-all-zero", "logsumexp", all_zero_b, _expected_lse(-_INF), "b excludes all: -inf")
    negative = _inputs(a=[0.0, 1.0], b=[1.0, -1.0])
    add("negative-sum", "logsumexp", negative, _expected_lse(_NAN), "negative sum without return_sign: NaN")
    add("negative-sum-sign", "logsumexp", negative,
        _expected_lse(math.log(math.e - 1.0), -1.0), "return_sign: log|sum| and sign -1", return_sign=True)
    cancel = _inputs(a=[1.0, 1.0], b=[1.0, -1.0])
    add("zero-sum-sign", "logsumexp", cancel, _expected_lse(-_INF, 0.0), "zero sum: -inf with sign 0", return_sign=True)
    return rows


def _build() -> list[Case]:
    built: list[Case] = []
    for name, (make, kwargs, dtypes) in _ACCURACY_INPUTS.items():
        for op in OPS:
            built.append(Case(f"accuracy/{name}/{op}", "accuracy", op, make, kwargs, dtypes=dtypes,
                              row="within the ulp budget of the mpmath oracle"))
    # log(e^-1 + 2 e^c) for c = -1 + log((e - 1) / 2) is 0 up to c's rounding:
    # -1.66e-9 in float32, with condition number sum|x p| / |lse| of 6e8.
    # Ill-conditioned, so outside the well-conditioned promise, but float32
    # computed in float64 keeps it: terms exp(x - m) formed in float32 put an
    # absolute error of a float32 ulp on log1p(rest), 1.4e8 ulps of the result
    # (measured on the former numpy and torch kernels).  float64 has no wider
    # accumulator, so it is not checked there.
    cancelling = -1.0 + math.log((math.e - 1) / 2)
    for op in OPS:
        built.append(Case(f"accuracy/cancels-to-near-zero/{op}", "accuracy", op, _inputs(a=[-1.0, cancelling, cancelling]),
                          dtypes=("float32",), needs_float64=True,
                          row="float32 in a float64 accumulator: lse cancelling to -1.7e-9 within the ulp budget"))
    for name, (make, kwargs) in _LONG_INPUTS.items():
        built.append(Case(f"accuracy/{name}/logsumexp", "accuracy", "logsumexp", make, kwargs,
                          dtypes=("float64", "float32"), row="n >= 2**20 within the ulp budget"))
    for op in OPS:
        built.append(Case(f"overflow/at-ln-max/{op}", "overflow", op, _overflow_inputs,
                          row="entries at and beyond ln(max) of the dtype: no overflow"))
    built.append(Case("overflow/many-zeros/logsumexp", "overflow", "logsumexp", _many_zeros,
                      dtypes=("float16", "bfloat16", "float32", "float64"),
                      row="70,000 zeros: log(70000), no overflow in the float16 sum"))
    built.extend(_special_cases())
    return built


#: Every built-in case.
CASES: tuple[Case, ...] = tuple(_build())
_BY_ID = {case.id: case for case in CASES}


def cases(*, family: str | None = None, op: str | None = None, dtype: str | None = None) -> list[Case]:
    """The built-in cases, optionally narrowed."""
    return [
        case
        for case in CASES
        if (family is None or case.family == family)
        and (op is None or case.op == op)
        and (dtype is None or dtype in case.dtypes)
    ]


def applies(case: Case, dtype: str, target) -> str | None:
    """Why ``case`` does not run in ``dtype`` on ``target``, or ``None`` if it does."""
    if dtype not in case.dtypes:
        return f"{case.id} is not a {dtype} case"
    if dtype not in target.dtypes:
        return f"{target.id} has no {dtype}"
    if case.needs_float64 and "float64" not in target.dtypes:
        return f"{target.id} has no float64 accumulator for {dtype}"
    return None


# -- inputs and exact values ----------------------------------------------------


def _built_in(case: Case) -> bool:
    return _BY_ID.get(case.id) is case


@functools.cache
def _cached_inputs(case_id: str, dtype: str) -> dict:
    return _BY_ID[case_id].make(dtype)


def inputs(case: Case, dtype: str) -> dict:
    """The case's NumPy inputs for ``dtype`` (made once for built-in cases)."""
    return _cached_inputs(case.id, dtype) if _built_in(case) else case.make(dtype)


@functools.cache
def _cached_exact(case_id: str, dtype: str) -> np.ndarray:
    return _exact(_BY_ID[case_id], _cached_inputs(case_id, dtype))


def _exact(case: Case, values: dict) -> np.ndarray:
    x = values["a"]
    axis = case.kwargs.get("axis")
    if case.op == "logsumexp":
        return _oracle.exact_logsumexp(x, axis=axis, b=values.get("b"), where=values.get("where"))
    if case.op == "log_softmax":
        return _oracle.exact_log_softmax(x, axis=axis, where=values.get("where"))
    return _oracle.exact_softmax(x, axis=axis, where=values.get("where"))


def exact(case: Case, dtype: str, values: dict | None = None) -> np.ndarray:
    """The oracle's values (``mpf``) for an oracle row; cached for built-in
    cases on their own inputs, which every implementation and target share."""
    if _built_in(case) and (values is None or values is _cached_inputs(case.id, dtype)):
        return _cached_exact(case.id, dtype)
    return _exact(case, inputs(case, dtype) if values is None else values)


def expected_shape(op: str, shape: tuple, axis, keepdims: bool = False) -> tuple:
    """The result shape the contract promises for an input of ``shape``."""
    if op != "logsumexp":
        return tuple(shape)
    axes = normalize_axis(axis, len(shape))
    if keepdims:
        return tuple(1 if ax in axes else n for ax, n in enumerate(shape))
    return tuple(n for ax, n in enumerate(shape) if ax not in axes)


# -- verdicts --------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """How one result compares with a case's expectation.

    ``got`` is the result as NumPy float64 (a ``(value, sign)`` tuple with
    ``return_sign``) when one came back; ``expected`` the stated values or the
    oracle's rounded to float64.
    """

    passed: bool
    worst_ulps: float
    detail: str
    got: object = None
    expected: object = None


def compare(got, exact_values, dtype: str, allowed=None) -> Verdict:
    """``got`` against exact values (``mpf`` or floats) in ulps of ``dtype``.

    ``allowed`` is the error allowed per element, in ulps (default: the
    dtype's budget, :data:`ULP_BUDGET`).  Shapes must match.
    """
    got = np.asarray(got, dtype=np.float64)
    exact_values = np.asarray(exact_values, dtype=object)
    want = exact_values.astype(np.float64) if exact_values.size else np.zeros(exact_values.shape)
    if got.shape != exact_values.shape:
        return Verdict(False, math.inf, f"shape {got.shape}, expected {exact_values.shape}", got, want)
    errors = _oracle.ulp_error(got, exact_values, dtype)
    allowed = np.broadcast_to(ULP_BUDGET[dtype] if allowed is None else np.asarray(allowed, np.float64), errors.shape)
    worst = float(errors.max()) if errors.size else 0.0
    bad = errors > allowed
    if not bad.any():
        return Verdict(True, worst, f"worst {worst:.3g} ulps", got, want)
    index = np.unravel_index(int(np.argmax(np.where(bad, errors / np.maximum(allowed, 1e-300), -1))), errors.shape)
    detail = (f"{errors[index]:.4g} ulps (allowed {allowed[index]:.3g}) at index {tuple(int(i) for i in index)}: "
              f"got {float(got[index])!r}, exact {float(exact_values[index])!r}")
    return Verdict(False, worst, detail, got, want)


def _stated(got, want, dtype: str) -> Verdict:
    """A stated row: same shape, the same NaN, infinities and zeros exactly
    (the contract's limits), other finite values within the ulp budget."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    mismatch = f"expected {want!r}, got {got!r}"
    if got.shape != want.shape:
        return Verdict(False, math.inf, mismatch, got, want)
    limits = ~np.isfinite(want) | (want == 0)
    same = np.where(np.isnan(want), np.isnan(got), got == want)
    if not same[limits].all() or not np.isfinite(got[~limits]).all():
        return Verdict(False, math.inf, mismatch, got, want)
    verdict = compare(got[~limits], want[~limits], dtype)
    return Verdict(verdict.passed, verdict.worst_ulps, "" if verdict.passed else mismatch, got, want)


def evaluate(case: Case, dtype: str, inputs: dict, got, *, tolerance=None) -> Verdict:
    """Compare ``got`` (NumPy, or a ``(value, sign)`` pair) with the case.

    Stated rows compare exactly at the limits (NaN, infinities, zeros) and
    within the ulp budget elsewhere; oracle rows compare every entry with
    the mpmath oracle, within ``tolerance(exact)`` ulps per element if given
    (the conformance suite's conditioning-aware allowance), else the budget.
    """
    if case.expected is None:
        exact_values = exact(case, dtype, inputs)
        allowed = None if tolerance is None else tolerance(exact_values)
        return compare(got, exact_values, dtype, allowed)
    want = case.expected(inputs)
    pairs = list(zip(got, want)) if isinstance(want, tuple) else [(got, want)]
    worst = 0.0
    for got_part, want_part in pairs:
        verdict = _stated(got_part, want_part, dtype)
        worst = max(worst, verdict.worst_ulps)
        if not verdict.passed:
            return Verdict(False, worst, verdict.detail, got, want)
    return Verdict(True, worst, f"worst {worst:.3g} ulps", got, want)


# -- running a case ------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _functions() -> dict:
    from . import _api

    return {"logsumexp": _api.logsumexp, "softmax": _api.softmax, "log_softmax": _api.log_softmax}


def describe(result) -> str:
    """``numpy.ndarray of shape (3, 4)``: what came back, in a few words."""
    shape = getattr(result, "shape", None)
    kind = f"{type(result).__module__}.{type(result).__name__}"
    return f"{kind} of shape {tuple(shape)}" if shape is not None else f"{kind} {result!r:.60}"


def run_case(case: Case, dtype: str, target, call=None, *, tolerance=None, check_metadata: bool = True) -> Verdict:
    """Run ``case`` in ``dtype`` on ``target`` and judge the result.

    ``call(op, x, **kwargs)`` is the implementation (default: lse_dispatch's
    functions); it runs under the target's regime (``jax.jit``, guarded Dask
    compute).  With ``check_metadata`` every result must be an array of the
    target's library on its device, of ``dtype`` and of the contract's shape;
    without it only the shape is held (the conformance suite checks the
    rest in its metadata family).  Exceptions from the call propagate.
    """
    values = inputs(case, dtype)
    kwargs = dict(case.kwargs)
    if "b" in values:
        kwargs["b"] = target.asarray(values["b"], dtype)
    if "where" in values:
        kwargs["where"] = target.asarray(np.asarray(values["where"], dtype=bool), "bool")
    fn = _functions()[case.op] if call is None else functools.partial(call, case.op)
    result = target.call(fn, target.asarray(values["a"], dtype), **kwargs)
    pair = bool(kwargs.get("return_sign"))
    if pair and not (isinstance(result, tuple) and len(result) == 2):
        return Verdict(False, math.inf, f"expected a (value, sign) pair, got {describe(result)}")
    shape = expected_shape(case.op, np.shape(values["a"]), kwargs.get("axis"), kwargs.get("keepdims", False))
    parts = result if pair else (result,)
    for part in parts:
        problem = target.mismatch(part, dtype, shape) if check_metadata else None
        if problem is not None:
            return Verdict(False, math.inf, problem)
    got = tuple(np.asarray(target.to_numpy(part), dtype=np.float64) for part in parts)
    return evaluate(case, dtype, values, got if pair else got[0], tolerance=tolerance)
