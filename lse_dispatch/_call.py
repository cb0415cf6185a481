"""A prepared call: what every implementation of an operation receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._namespace import DtypePlan, device_of, plan_dtypes, resolve_namespace
from ._validate import broadcast_shapes, normalize_axis

__all__ = ["Call", "prepare"]


@dataclass(frozen=True)
class Call:
    """One validated call of ``logsumexp``, ``softmax`` or ``log_softmax``.

    ``a`` is the input (``x`` for softmax) in its own dtype, ``b`` and
    ``where`` are ``None`` or arrays of the same namespace and device, ``axes``
    the sorted non-negative reduced axes of the broadcast ``shape``.
    """

    op: str
    xp: Any
    a: Any
    b: Any
    where: Any
    axes: tuple[int, ...]
    shape: tuple
    plan: DtypePlan
    return_sign: bool = False

    @property
    def device(self):
        return device_of(self.a)


def prepare(op: str, a, *, axis, b=None, where=None, return_sign: bool = False) -> Call:
    """Resolve the namespace once, validate every argument and plan dtypes."""
    first = "a" if op == "logsumexp" else "x"
    if a is None:
        raise TypeError(f"argument '{first}' must be an array or a number, got None")
    xp, arrays = resolve_namespace({first: a, "b": b, "where": where}, booleans=("where",))
    a, b, where = arrays[first], arrays["b"], arrays["where"]
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
    plan = plan_dtypes(xp, a, b)
    return Call(op, xp, a, b, where, axes, shape, plan, bool(return_sign))
