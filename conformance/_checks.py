"""What a check is, what it returns, and the tolerance every family shares.

Tolerance (documented in docs/conformance.md)
---------------------------------------------
Results are compared with the mpmath oracle in ulps of the result dtype at
the exact value (``oracle.ulp_error``).  Each result element ``j`` may be
off by at most::

    tol_j = B[dtype] * max(1, kappa_j)        (third-party implementations)
    tol_j = B[dtype]                          (strict: our own contract)

``B`` is ``cases.ULP_BUDGET`` (4 ulps for float64/float32, 1 for
float16/bfloat16) and ``kappa_j`` the relative condition number of element
``j`` with respect to relative perturbations of the inputs ``a`` (and of ``b``
when weights are given) -- see :func:`condition`.  The inputs are exactly
representable, so ``kappa`` grants slack only to an implementation that is
backward stable (exact for inputs perturbed by B ulps) but not forward
accurate, and only where the problem itself amplifies such perturbations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lse_dispatch import cases as _cases
from lse_dispatch._validate import normalize_axis
from lse_dispatch.oracle import move_to_end

from ._impls import OPS, Implementation, Unsupported, WrongResult

__all__ = ["FAMILIES", "Check", "Context", "Outcome", "Unsupported", "compare_exact", "condition", "register"]


@dataclass
class Outcome:
    """The verdict of one check on one target and dtype."""

    passed: bool
    detail: str = ""
    example: dict | None = None


@dataclass(frozen=True)
class Check:
    """One named property.

    ``id`` is stable (``family/name/op``); ``dtypes`` the dtypes it runs in
    (``None``: once, in the target's widest float dtype); ``backends`` the
    backend names it applies to (``None``: all); ``slow`` checks are left out
    in quick mode; ``ops`` the functions it calls (default: the op its id
    ends with), so that an implementation of a subset of the three
    functions runs exactly the checks it can answer.
    """

    id: str
    family: str
    run: Callable[[Context], Outcome]
    dtypes: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None
    slow: bool = False
    what: str = ""
    ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.ops:
            last = self.id.rsplit("/", 1)[-1]
            # e.g. metadata/dtype/logsumexp-return-sign calls logsumexp
            op = next((o for o in sorted(OPS, key=len, reverse=True) if last.startswith(o)), None)
            if op is None:
                raise ValueError(f"check {self.id} names no function; give ops=")
            object.__setattr__(self, "ops", (op,))


@dataclass
class Context:
    """Everything a check needs: the implementation, the target and the dtype."""

    impl: Implementation
    target: object
    dtype: str
    reference: object | None = None  # another target of the same implementation, for agreement
    max_examples: int = 25
    notes: dict = field(default_factory=dict)

    @property
    def xp(self):
        return self.target.xp

    @property
    def strict(self) -> bool:
        return self.impl.strict

    @property
    def budget(self) -> float:
        return _cases.ULP_BUDGET[self.dtype]

    def array(self, values, dtype: str | None = None):
        """``values`` rounded to ``dtype`` (default: the check's) as an array of the target."""
        dtype = dtype or self.dtype
        return self.target.asarray(_cases.round_to(values, dtype), dtype)

    def mask(self, values):
        return self.target.asarray(np.asarray(values, dtype=bool), "bool")

    def call(self, op: str, x, **kwargs):
        """The implementation's ``op``; with ``return_sign`` the result must be a pair."""
        result = self.impl(op, x, **kwargs)
        if kwargs.get("return_sign") and not (isinstance(result, tuple) and len(result) == 2):
            raise WrongResult(f"{op}(..., return_sign=True): expected a (value, sign) pair, "
                              f"got {_cases.describe(result)}")
        return result

    def numpy(self, result):
        """A result (or a ``(value, sign)`` pair) as NumPy float64."""
        if isinstance(result, tuple):
            return tuple(self.numpy(r) for r in result)
        return np.asarray(self.target.to_numpy(result)).astype(np.float64)


#: Every registered check; filled by the family modules as they are imported
#: (``_registry.registry()`` imports them all).
REGISTRY: list[Check] = []


def register(check: Check) -> Check:
    if any(c.id == check.id for c in REGISTRY):
        raise ValueError(f"duplicate check id {check.id}")
    REGISTRY.append(check)
    return check


FAMILIES = (
    "accuracy",
    "overflow",
    "special-values",
    "api",
    "metadata",
    "invariants",
    "laziness",
    "differentiation",
    "input-safety",
    "semiring",
)


def condition(op: str, a, axis=None, b=None, where=None, exact=None) -> np.ndarray:
    """Relative condition number of each result element (float64 estimate).

    With ``p_i`` the softmax weights of the included entries, ``w_i =
    |b_i| e^{a_i - m}`` and ``S = sum b_i e^{a_i - m}``:

    * logsumexp: ``(sum w_i |a_i| + [b given] sum w_i) / (|S| |lse|)``;
    * log_softmax_j: ``(|a_j| (1 - p_j) + sum_{i != j} p_i |a_i|) / |log_softmax_j|``;
    * softmax_j: ``|a_j| (1 - p_j) + sum_{i != j} p_i |a_i|`` (relative error of
      ``softmax_j`` is the absolute error of its log).

    ``exact`` (the oracle's result, any numeric array) supplies the
    denominators ``|lse|`` and ``|log_softmax_j|``, which float64 cannot
    always resolve (``lse([0, -40])`` is 4e-18).  A zero numerator gives 0.
    Non-finite inputs or results give 1 (such rows are compared exactly).
    """
    if exact is not None:
        exact = np.abs(np.asarray(exact, dtype=object).astype(np.float64))
    a = np.asarray(a, dtype=np.float64)
    shape = np.broadcast_shapes(a.shape, np.shape(b) if b is not None else (), np.shape(where) if where is not None else ())
    a = np.broadcast_to(a, shape)
    weights = np.broadcast_to(np.ones(()) if b is None else np.asarray(b, np.float64), shape)
    mask = np.broadcast_to(np.ones((), bool) if where is None else np.asarray(where, bool), shape)
    axes = normalize_axis(axis, len(shape))
    fa, fb, fm = (move_to_end(x, axes) for x in (a, weights, mask))
    with np.errstate(all="ignore"):
        include = fm & (fb != 0)
        safe_a = np.where(include & np.isfinite(fa), fa, -np.inf)
        top = np.max(safe_a, axis=-1, keepdims=True, initial=-np.inf)
        top = np.where(np.isfinite(top), top, 0.0)
        terms = np.where(include, fb * np.exp(safe_a - top), 0.0)
        w = np.abs(terms)
        total = np.sum(terms, axis=-1, keepdims=True)
        sensitivity = np.sum(w * np.abs(np.where(include, fa, 0.0)), axis=-1, keepdims=True)
        if op == "logsumexp":
            extra = np.sum(w, axis=-1, keepdims=True) if b is not None else 0.0
            numerator = ((sensitivity + extra) / np.abs(total))[..., 0]
            kept = tuple(shape[ax] for ax in range(len(shape)) if ax not in axes)
            numerator = numerator.reshape(kept)
            lse = exact if exact is not None else np.abs(np.reshape(top + np.log(np.abs(total)), kept))
            kappa = np.where(numerator == 0, 0.0, numerator / lse)
            return np.where(np.isnan(kappa), 1.0, kappa)
        p = w / np.abs(total)
        own = np.abs(np.where(include, fa, 0.0))
        spread = own * (1 - p) + (sensitivity / np.abs(total) - p * own)
        spread = np.where(include & np.isfinite(fa) & np.isfinite(spread), spread, 1.0)
    kept = tuple(ax for ax in range(len(shape)) if ax not in axes)
    moved_shape = tuple(shape[ax] for ax in kept) + tuple(shape[ax] for ax in axes)
    spread = np.transpose(spread.reshape(moved_shape), np.argsort(kept + axes))
    if op == "softmax":
        return spread
    if exact is None:
        raise ValueError("log_softmax's condition number needs the exact result")
    with np.errstate(all="ignore"):
        kappa = np.where(spread == 0, 0.0, spread / exact)
    return np.where(np.isnan(kappa), 1.0, kappa)


def tolerance(ctx: Context, kappa) -> np.ndarray:
    """Allowed ulps per element: ``B`` (strict) or ``B * max(1, kappa)``."""
    kappa = np.asarray(kappa, dtype=np.float64)
    if ctx.strict:
        return np.full(kappa.shape, ctx.budget)
    return ctx.budget * np.maximum(1.0, kappa)


def summarize(values, limit: int = 12):
    """A JSON-friendly, bounded rendering of an array (shape + first entries)."""
    if values is None:
        return None
    if isinstance(values, tuple):
        return [summarize(v, limit) for v in values]
    array = np.asarray(values)
    flat = array.reshape(-1)
    head = [_jsonable(v) for v in flat[:limit].tolist()]
    out = {"shape": list(array.shape), "values": head}
    if flat.size > limit:
        out["truncated"] = int(flat.size)
    return out


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def compare_exact(ctx: Context, got, exact, kappa, inputs: dict, kwargs: dict) -> Outcome:
    """``got`` against oracle values ``exact`` (object array of mpf), per tolerance."""
    exact = np.asarray(exact, dtype=object)
    verdict = _cases.compare(got, exact, ctx.dtype, tolerance(ctx, kappa))
    example = {
        "inputs": {k: summarize(v) for k, v in inputs.items() if v is not None},
        "kwargs": {k: repr(v) for k, v in kwargs.items()},
        "got": summarize(verdict.got),
        "expected": summarize(verdict.expected),
    }
    return Outcome(verdict.passed, verdict.detail, None if verdict.passed else example)
