"""api, metadata and input-safety: the calling convention, what comes back,
and what happens to what goes in."""

from __future__ import annotations

import math

import numpy as np

from lse_dispatch import oracle as _oracle
from lse_dispatch._validate import normalize_axis
from lse_dispatch.cases import round_to

from ._checks import Check, Context, Outcome, compare_exact, condition, register, summarize
from ._impls import OPS, Unsupported

__all__: list[str] = []
_SHAPE = (3, 4, 5)


def _data(seed: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=_SHAPE) * 2


def _exact(op, a, axis, b=None, where=None):
    if op == "logsumexp":
        return _oracle.exact_logsumexp(a, axis=axis, b=b, where=where)
    if op == "log_softmax":
        return _oracle.exact_log_softmax(a, axis=axis, where=where)
    return _oracle.exact_softmax(a, axis=axis, where=where)


def _keepdims(value, axes):
    return np.expand_dims(value, axes) if axes else value


def _against_oracle(ctx: Context, op: str, *, axis, oracle_axis=None, b=None, where=None, keepdims=False,
                    return_sign=False) -> Outcome:
    """Call ``op`` on the standard 3-D input and compare with the oracle."""
    a = round_to(_data(), ctx.dtype)
    b = None if b is None else round_to(b, ctx.dtype)
    kwargs = {"axis": axis}
    if b is not None:
        kwargs["b"] = ctx.array(b)
    if where is not None:
        kwargs["where"] = ctx.mask(where)
    if keepdims:
        kwargs["keepdims"] = True
    if return_sign:
        kwargs["return_sign"] = True
    got = ctx.numpy(ctx.call(op, ctx.array(a), **kwargs))
    oracle_axis = axis if oracle_axis is None else oracle_axis
    exact = _exact(op, a, oracle_axis, b, where)
    kappa = condition(op, a, oracle_axis, b, where, exact=exact)
    sign = None
    if op == "logsumexp":
        axes = normalize_axis(oracle_axis, a.ndim)
        if return_sign:
            sign = _exact_sign(a, axes, b)
        if keepdims:
            exact, kappa = _keepdims(exact, axes), _keepdims(kappa, axes)
            sign = None if sign is None else _keepdims(sign, axes)
    inputs = {"a": a, "b": b, "where": where}
    shown = {k: v for k, v in kwargs.items() if k in ("axis", "keepdims", "return_sign")}
    if return_sign:
        value, got_sign = got
        outcome = compare_exact(ctx, value, exact, kappa, inputs, shown)
        if outcome.passed and (np.shape(got_sign) != np.shape(sign) or not np.array_equal(got_sign, sign)):
            return Outcome(False, f"sign {summarize(got_sign)}, expected {summarize(sign)}",
                           {"inputs": {k: summarize(v) for k, v in inputs.items() if v is not None},
                            "got": summarize(got_sign), "expected": summarize(sign)})
        return outcome
    return compare_exact(ctx, got, exact, kappa, inputs, shown)


def _exact_sign(a, axes, b):
    """Sign of ``sum(b * exp(a))`` over ``axes``, by an exact float sum."""
    weights = np.ones_like(a) if b is None else np.broadcast_to(b, a.shape)
    top = np.max(a, axis=axes, keepdims=True)
    terms = weights * np.exp(a - top)
    moved = np.moveaxis(terms, axes, tuple(range(-len(axes), 0)))
    flat = moved.reshape(moved.shape[: a.ndim - len(axes)] + (-1,))
    out = np.empty(flat.shape[:-1])
    for index in np.ndindex(out.shape):
        out[index] = np.sign(math.fsum(flat[index].tolist()))
    return out


def _where_mask(shape=_SHAPE, seed: int = 12) -> np.ndarray:
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask[..., 0] = True  # every slice along the last axis keeps an entry
    return mask


def _register_api() -> None:
    axis_forms = {
        "axis-none": (None, None),
        "axis-int": (1, None),
        "axis-negative": (-1, 2),
        "axis-tuple": ((0, 2), None),
        "axis-tuple-negative": ((-1, -3), (0, 2)),
        "axis-empty-tuple": ((), None),
    }
    for name, (axis, oracle_axis) in axis_forms.items():
        for op in OPS:
            register(Check(f"api/{name}/{op}", "api",
                           lambda ctx, op=op, axis=axis, oa=oracle_axis: _against_oracle(ctx, op, axis=axis, oracle_axis=oa),
                           what=f"axis={axis!r}"))
    weights = np.random.default_rng(13).uniform(0.25, 4, _SHAPE)
    signed = np.random.default_rng(14).uniform(-2, 2, _SHAPE)
    signed[..., 0] = 8.0  # keep every sum clearly away from zero
    signed[0, :, 0] = -8.0  # ... and some clearly negative
    extra = {
        "api/keepdims/logsumexp": dict(axis=1, keepdims=True),
        "api/keepdims-tuple/logsumexp": dict(axis=(0, 2), keepdims=True),
        "api/keepdims-none/logsumexp": dict(axis=None, keepdims=True),
        "api/b/logsumexp": dict(axis=-1, oracle_axis=2, b=weights),
        "api/b-broadcast/logsumexp": dict(axis=-1, oracle_axis=2, b=weights[0, 0]),
        "api/return-sign/logsumexp": dict(axis=-1, oracle_axis=2, return_sign=True),
        "api/b-negative-return-sign/logsumexp": dict(axis=-1, oracle_axis=2, b=signed, return_sign=True),
    }
    for check_id, kwargs in extra.items():
        shown = ", ".join(f"{k}={f'<array of shape {v.shape}>' if isinstance(v, np.ndarray) else repr(v)}"
                          for k, v in kwargs.items() if k != "oracle_axis")
        register(Check(check_id, "api", lambda ctx, kw=kwargs: _against_oracle(ctx, "logsumexp", **kw), what=shown))
    for op in OPS:
        register(Check(f"api/where/{op}", "api",
                       lambda ctx, op=op: _against_oracle(ctx, op, axis=-1, oracle_axis=2, where=_where_mask()),
                       what="where mask, same shape"))
        register(Check(f"api/where-broadcast/{op}", "api",
                       lambda ctx, op=op: _against_oracle(ctx, op, axis=-1, oracle_axis=2,
                                                          where=np.array([True, False, True, True, False])),
                       what="where mask broadcasting from (5,)"))


# -- metadata -------------------------------------------------------------------


def _device(x):
    import array_api_compat

    return array_api_compat.device(x)


def _metadata(ctx: Context, op: str, aspect: str, return_sign: bool = False) -> Outcome:
    x = ctx.array(_data()[0])
    kwargs = {"axis": -1}
    if return_sign:
        kwargs["return_sign"] = True
    result = ctx.call(op, x, **kwargs)
    parts = result if isinstance(result, tuple) else (result,)
    for i, part in enumerate(parts):
        label = ("value", "sign")[i] if return_sign else "result"
        if aspect == "namespace" and not ctx.target.owns(part):
            return Outcome(False, f"{label} is a {type(part).__module__}.{type(part).__name__}, "
                                  f"not an array of {ctx.target.spec.name}",
                           {"got": f"{type(part).__module__}.{type(part).__name__}", "expected": ctx.target.spec.name})
        if aspect == "dtype" and str(getattr(part, "dtype", None)) != str(x.dtype):
            return Outcome(False, f"{label} dtype {getattr(part, 'dtype', None)}, expected {x.dtype}",
                           {"got": str(getattr(part, "dtype", None)), "expected": str(x.dtype)})
        if aspect == "device":
            try:
                got, want = _device(part), _device(x)
            except Exception as exc:  # not an array of a known library
                return Outcome(False, f"{label} has no device: {exc}")
            if got != want:
                return Outcome(False, f"{label} on device {got!r}, input on {want!r}",
                               {"got": repr(got), "expected": repr(want)})
    return Outcome(True)


def _register_metadata() -> None:
    for aspect in ("namespace", "dtype", "device"):
        for op in OPS:
            register(Check(f"metadata/{aspect}/{op}", "metadata",
                           lambda ctx, op=op, aspect=aspect: _metadata(ctx, op, aspect),
                           dtypes=("float64", "float32", "float16", "bfloat16"), what=f"{aspect} preserved"))
        register(Check(f"metadata/{aspect}/logsumexp-return-sign", "metadata",
                       lambda ctx, aspect=aspect: _metadata(ctx, "logsumexp", aspect, return_sign=True),
                       dtypes=("float64", "float32"), what=f"{aspect} preserved for value and sign"))


# -- input-safety -----------------------------------------------------------------


def _not_mutated(ctx: Context, op: str) -> Outcome:
    values = _data()[0].copy()
    values[0, 1] = -np.inf
    values[2, 3] = 40.0
    x = ctx.array(values)
    before = ctx.numpy(x).copy()
    mask = _where_mask((4, 5))
    where = ctx.mask(mask)
    weights = np.random.default_rng(15).uniform(0.5, 2, (4, 5))
    b = ctx.array(weights)
    b_before = ctx.numpy(b).copy()
    calls = [dict(axis=-1), dict(axis=None), dict(axis=-1, where=where)]
    if op == "logsumexp":
        calls += [dict(axis=-1, b=b), dict(axis=0, b=b, return_sign=True)]
    ran = 0
    for kwargs in calls:
        try:
            ctx.call(op, x, **kwargs)
        except Unsupported:
            continue
        ran += 1
        after, b_after = ctx.numpy(x), ctx.numpy(b)
        where_after = ctx.target.to_numpy(where)
        changed = [name for name, old, new in (("x", before, after), ("b", b_before, b_after))
                   if not np.array_equal(old, new, equal_nan=True)]
        if not np.array_equal(where_after, mask):
            changed.append("where")
        if changed:
            return Outcome(False, f"call with {sorted(kwargs)} changed its input(s) {', '.join(changed)}",
                           {"inputs": summarize(before), "kwargs": repr({k: v for k, v in kwargs.items() if k == 'axis'}),
                            "got": summarize(after), "expected": summarize(before)})
    return Outcome(True, f"{ran} call(s), inputs unchanged")


def _read_only(ctx: Context, op: str) -> Outcome:
    values = np.asarray(_data()[0], dtype=ctx.dtype)
    values.flags.writeable = False
    result = ctx.numpy(ctx.call(op, values, axis=-1))
    if not np.isfinite(result).all():
        return Outcome(False, f"read-only input gave non-finite results {summarize(result)}")
    return Outcome(True)


def _raises(ctx: Context, op: str, make_kwargs, what: str) -> Outcome:
    x = ctx.array(_data()[0])
    kwargs = make_kwargs(ctx)
    try:
        result = ctx.call(op, x, **kwargs)
        ctx.numpy(result)  # lazy libraries may only fail when computed
    except (ValueError, TypeError, IndexError) as exc:
        if not str(exc).strip():
            return Outcome(False, f"{type(exc).__name__} with an empty message for {what}")
        return Outcome(True, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    except Unsupported:
        raise
    except Exception as exc:
        return Outcome(False, f"{what}: raised {type(exc).__module__}.{type(exc).__name__}, not "
                              f"ValueError/TypeError/IndexError: {str(exc)[:160]}")
    return Outcome(False, f"{what}: no error raised; returned {summarize(ctx.numpy(result))}",
                   {"inputs": {"a": summarize(_data()[0])}, "kwargs": {k: repr(v) for k, v in kwargs.items()},
                    "got": "no exception", "expected": "ValueError, TypeError or IndexError"})


def _register_input_safety() -> None:
    for op in OPS:
        register(Check(f"input-safety/not-mutated/{op}", "input-safety",
                       lambda ctx, op=op: _not_mutated(ctx, op), what="inputs unchanged after the call"))
        register(Check(f"input-safety/read-only/{op}", "input-safety",
                       lambda ctx, op=op: _read_only(ctx, op), backends=("numpy",),
                       what="read-only NumPy input accepted"))
        register(Check(f"input-safety/axis-out-of-range/{op}", "input-safety",
                       lambda ctx, op=op: _raises(ctx, op, lambda c: {"axis": 2}, "axis=2 of a 2-d array"),
                       what="axis out of range raises"))
        register(Check(f"input-safety/where-shape-mismatch/{op}", "input-safety",
                       lambda ctx, op=op: _raises(ctx, op, lambda c: {"axis": -1, "where": c.mask([True, False, True])},
                                                  "where of shape (3,) against (4, 5)"),
                       what="where that does not broadcast raises"))
    register(Check("input-safety/duplicate-axis/logsumexp", "input-safety",
                   lambda ctx: _raises(ctx, "logsumexp", lambda c: {"axis": (0, -2)}, "axis=(0, -2) repeats axis 0"),
                   what="repeated axis raises"))
    register(Check("input-safety/b-shape-mismatch/logsumexp", "input-safety",
                   lambda ctx: _raises(ctx, "logsumexp", lambda c: {"axis": -1, "b": c.array([1.0, 2.0, 3.0])},
                                       "b of shape (3,) against (4, 5)"),
                   what="b that does not broadcast raises"))


_register_api()
_register_metadata()
_register_input_safety()
