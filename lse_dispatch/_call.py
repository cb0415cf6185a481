"""A prepared call: what every implementation of an operation receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._namespace import DtypePlan, device_of, is_python_scalar, plan_dtypes, resolve_namespace
from ._numerics import numerics_for
from ._ops import Op
from ._validate import broadcast_shapes, normalize_axis

__all__ = ["Call", "prepare"]


@dataclass(frozen=True)
class Call:
    """One validated call of an operation (:class:`~lse_dispatch._ops.Op`).

    ``a`` is the input (``x`` for softmax) in its own dtype, ``b`` and
    ``where`` are ``None`` or arrays of the same namespace and device, ``axes``
    the sorted non-negative reduced axes of the broadcast ``shape``.
    """

    op: Op
    xp: Any
    a: Any
    b: Any
    where: Any
    axes: tuple[int, ...]
    shape: tuple
    plan: DtypePlan
    return_sign: bool = False
    #: The input was 0-d and is computed as the 1-d array of its one entry
    #: (as SciPy does); softmax and log_softmax return 0-d again.
    from_scalar: bool = False

    @property
    def device(self):
        return device_of(self.a)

    @classmethod
    def trusted(cls, op, xp, a, axes, shape, plan, return_sign=False) -> Call:
        """A call without ``b`` and ``where`` from fields already validated, built as
        the constructor builds it but without its ten ``object.__setattr__`` calls
        (a microsecond, a tenth of a small call's overhead)."""
        call = object.__new__(cls)
        call.__dict__.update(op=op, xp=xp, a=a, b=None, where=None, axes=axes, shape=shape, plan=plan,
                             return_sign=return_sign, from_scalar=False)
        return call


def prepare(op: Op | str, a, *, axis, b=None, where=None, return_sign: bool = False) -> Call:
    """Resolve the namespace once, validate every argument and plan dtypes."""
    op = Op(op)
    first = "a" if op in (Op.LOGSUMEXP, Op.STATE) else "x"
    if a is None:
        raise TypeError(f"argument '{first}' must be an array or a number, got None")
    weak = (is_python_scalar(a), is_python_scalar(b))
    xp, arrays = resolve_namespace({first: a, "b": b, "where": where}, booleans=("where",))
    a, b, where = arrays[first], arrays["b"], arrays["where"]
    if b is not None:
        b = numerics_for(xp).weights(xp, b)
    from_scalar = all(x is None or x.ndim == 0 for x in (a, b, where))
    if from_scalar:
        # SciPy computes 0-d input as the 1-d array of its one entry: axis 0
        # and -1 are accepted, and keepdims gives shape (1,).
        a, b, where = (None if x is None else xp.reshape(x, (1,)) for x in (a, b, where))
    if b is None:
        shape = tuple(a.shape)
    else:
        shape = broadcast_shapes([tuple(a.shape), tuple(b.shape)], [first, "b"])
    if where is not None:
        full = broadcast_shapes([shape, tuple(where.shape)], [first if b is None else "a and b", "where"])
        if len(full) != len(shape) or any(f != s for f, s in zip(full, shape) if s == s):
            raise ValueError(
                f"argument 'where' with shape {tuple(where.shape)} must broadcast to the "
                f"input's shape {shape}, not enlarge it"
            )
    axes = normalize_axis(axis, len(shape))
    strong = [x for x, is_weak in zip((a, b), weak) if x is not None and not is_weak]
    plan = plan_dtypes(xp, *strong, weak=tuple(x for x, is_weak in zip((a, b), weak) if is_weak))
    return Call(op, xp, a, b, where, axes, shape, plan, bool(return_sign), from_scalar)
