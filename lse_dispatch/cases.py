"""The built-in catalogue of hard inputs and contract rows.

One list serves ``lse-dispatch report``, the test suite and the conformance
suite.  Each :class:`Case` makes NumPy float64 inputs (values exactly
representable in the dtype under test), names the operation and its keyword
arguments, and either leaves the expected values to the mpmath oracle
(``family="accuracy"``) or states them (the contract table's rows).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CASES", "Case", "ULP_BUDGET", "Verdict", "cases", "evaluate", "inputs", "round_to"]

#: Relative error allowed against the oracle, in ulps of the result dtype.
#: float16 and bfloat16 are computed in float32 and rounded once, so they
#: must be within one ulp of their own dtype.
ULP_BUDGET = {"float64": 4.0, "float32": 4.0, "float16": 1.0, "bfloat16": 1.0}

OPS = ("logsumexp", "softmax", "log_softmax")

_INF, _NAN = math.inf, math.nan


def round_to(values, dtype: str) -> np.ndarray:
    """``values`` rounded to ``dtype`` and returned as float64 (exactly)."""
    values = np.asarray(values, dtype=np.float64)
    if dtype == "bfloat16":
        import ml_dtypes

        return values.astype(ml_dtypes.bfloat16).astype(np.float64)
    return values.astype(dtype).astype(np.float64)


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
    "rows-axis-1": (_random(5, lambda g: g.normal(size=(8, 257)) * 3), {"axis": 1}, ("float64", "float32", "float16", "bfloat16")),
    "columns-axis-0": (_random(6, lambda g: g.normal(size=(257, 8)) * 3), {"axis": 0}, ("float64", "float32", "float16", "bfloat16")),
    "tuple-axes": (_random(7, lambda g: g.normal(size=(6, 5, 7))), {"axis": (0, 2)}, ("float64", "float32")),
    "small-values": (_random(8, lambda g: g.uniform(-3, 3, 64)), {}, ("float64", "float32", "float16", "bfloat16")),
}

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


@dataclass(frozen=True)
class Verdict:
    """How one result compares with a case's expectation."""

    passed: bool
    worst_ulps: float
    detail: str


def _stated_match(got: np.ndarray, want: np.ndarray, dtype: str) -> tuple[bool, float]:
    """Stated rows: same shape, same non-finite pattern, finite values within budget."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return False, math.inf
    same_nan = np.isnan(got) == np.isnan(want)
    finite = np.isfinite(want)
    same_inf = np.where(finite | np.isnan(want), True, got == want)
    if not (same_nan.all() and same_inf.all() and np.isfinite(got[finite]).all()):
        return False, math.inf
    if not finite.any():
        return True, 0.0
    spacing = np.spacing(np.abs(round_to(want[finite], dtype)).astype(dtype)).astype(np.float64)
    spacing = np.where(spacing > 0, spacing, np.finfo(np.float16 if dtype == "float16" else dtype if dtype != "bfloat16" else np.float32).smallest_subnormal)
    ulps = np.abs(got[finite] - want[finite]) / spacing
    worst = float(ulps.max())
    return worst <= ULP_BUDGET[dtype], worst


def _built_in(case: Case) -> bool:
    return _BY_ID.get(case.id) is case


@functools.lru_cache(maxsize=None)
def _cached_inputs(case_id: str, dtype: str) -> dict:
    return _BY_ID[case_id].make(dtype)


def inputs(case: Case, dtype: str) -> dict:
    """The case's NumPy inputs for ``dtype`` (made once for built-in cases)."""
    return _cached_inputs(case.id, dtype) if _built_in(case) else case.make(dtype)


@functools.lru_cache(maxsize=None)
def _cached_exact(case_id: str, dtype: str) -> np.ndarray:
    return _exact(_BY_ID[case_id], _cached_inputs(case_id, dtype))


def _exact(case: Case, values: dict) -> np.ndarray:
    from . import oracle

    x = values["a"]
    axis = case.kwargs.get("axis")
    if case.op == "logsumexp":
        return oracle.exact_logsumexp(x, axis=axis, b=values.get("b"), where=values.get("where"))
    if case.op == "log_softmax":
        return oracle.exact_log_softmax(x, axis=axis, where=values.get("where"))
    return oracle.exact_softmax(x, axis=axis, where=values.get("where"))


def evaluate(case: Case, dtype: str, inputs: dict, got) -> Verdict:
    """Compare ``got`` (NumPy, or a ``(value, sign)`` pair) with the case.

    Stated rows compare exactly at non-finite entries and within the ulp
    budget elsewhere; oracle rows compare every entry with the mpmath oracle.
    """
    from . import oracle

    budget = ULP_BUDGET[dtype]
    if case.expected is not None:
        want = case.expected(inputs)
        pairs = list(zip(got, want)) if isinstance(want, tuple) else [(got, want)]
        worst = 0.0
        for got_part, want_part in pairs:
            ok, ulps = _stated_match(got_part, want_part, dtype)
            worst = max(worst, ulps)
            if not ok:
                return Verdict(False, worst, f"expected {np.asarray(want_part)!r}, got {np.asarray(got_part)!r}")
        return Verdict(True, worst, "")
    if _built_in(case) and inputs is _cached_inputs(case.id, dtype):
        exact = _cached_exact(case.id, dtype)
    else:
        exact = _exact(case, inputs)
    np_dtype = np.float32 if dtype == "bfloat16" else dtype
    if dtype == "bfloat16":
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
    errors = oracle.ulp_error(got, exact, np_dtype)
    worst = float(np.max(errors)) if errors.size else 0.0
    if worst <= budget:
        return Verdict(True, worst, "")
    where_worst = np.unravel_index(int(np.argmax(errors)), errors.shape) if errors.ndim else ()
    return Verdict(
        False,
        worst,
        f"{worst:.3g} ulps at index {tuple(int(i) for i in where_worst)}: got "
        f"{float(np.asarray(got, dtype=np.float64)[where_worst])!r}, exact {float(exact[where_worst])!r}",
    )
