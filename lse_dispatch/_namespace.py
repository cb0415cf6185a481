"""Namespace, device and dtype policy.

Inputs are resolved to one array-API namespace (through array-api-compat), and
the dtypes a call computes and accumulates in are chosen here, in one place.
Nothing in this module imports an array library other than NumPy.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat
import numpy as np

__all__ = [
    "DtypePlan",
    "device_of",
    "is_python_scalar",
    "plan_dtypes",
    "real_sign",
    "resolve_namespace",
    "scalar",
    "unwrap_numpy_subclasses",
]

Array = Any


def device_of(x: Array):
    """The device of ``x`` (``"cpu"`` for NumPy).

    The standard's ``x.device`` where the array has one (NumPy 2, torch,
    CuPy, array-api-strict, concrete JAX arrays), which torch.compile traces
    without array-api-compat's cached type checks; array-api-compat's
    ``device`` for the rest (Dask arrays, JAX tracers, NumPy 1).
    """
    try:
        return x.device
    except AttributeError:
        return array_api_compat.device(x)


def scalar(xp, value: float, like: Array) -> Array:
    """A 0-d array holding ``value``, with the dtype and device of ``like``.

    Constants are made on the input's device, so that array-api-strict's
    non-default devices and accelerators never see a mixed-device operation.
    """
    return xp.asarray(value, dtype=like.dtype, device=device_of(like))


def real_sign(xp, x: Array) -> Array:
    """``sign(x)`` of a real floating array, NaN kept, without in-place writes.

    array-api-compat's torch ``sign`` patches NaNs in with a boolean-mask
    assignment, which ``torch.func.vmap`` cannot batch; two ``where`` s can.
    """
    one = scalar(xp, 1.0, x)
    return xp.where(x > 0, one, xp.where(x < 0, -one, x))


def _as_array(value, name: str):
    """``(array, from_python)``: ``value`` if it is an array-API array, else a NumPy array of it.

    Python integers beyond int64 make NumPy's object arrays; they are taken as
    float64, as NumPy's own functions take them (``np.exp(2**70)``).
    """
    if array_api_compat.is_array_api_obj(value):
        return value, False
    try:
        converted = np.asarray(value)
    except ValueError as exc:  # ragged nested sequences
        raise ValueError(
            f"argument '{name}' is a ragged sequence: its nested lists differ in length ({exc})"
        ) from None
    except TypeError as exc:
        raise TypeError(f"argument '{name}' must be an array or a number, got {type(value).__name__}") from exc
    if converted.dtype == object and _all_python_numbers(converted):
        is_complex = any(isinstance(item, complex) for item in converted.flat)
        try:
            converted = np.asarray(value, dtype=np.complex128 if is_complex else np.float64)
        except OverflowError:
            raise ValueError(f"argument '{name}' holds an integer too large for float64") from None
    if converted.dtype.kind not in "biufc":
        raise TypeError(
            f"argument '{name}' must be numeric (an array, a number or a sequence of numbers), "
            f"got {type(value).__name__}" + (f" of NumPy dtype {converted.dtype}" if converted.dtype != object else "")
        )
    return converted, True


def _all_python_numbers(array: np.ndarray) -> bool:
    return all(isinstance(item, (int, float, complex)) for item in array.flat)


def _check_kind(xp, x: Array, name: str, *, boolean: bool) -> None:
    if boolean:
        if not xp.isdtype(x.dtype, "bool"):
            raise TypeError(f"argument '{name}' must be a boolean array, got dtype {x.dtype}")
        return
    if not xp.isdtype(x.dtype, ("bool", "integral", "real floating", "complex floating")):
        raise TypeError(f"argument '{name}' must be numeric (bool, integer, floating or complex), got dtype {x.dtype}")


def unwrap_numpy_subclasses(a, b, where):
    """``(a, b, where, mask)`` with NumPy masked arrays and matrices made plain.

    A masked entry of ``a`` or ``b`` is excluded exactly as ``where=False``
    excludes it (a masked ``where`` entry counts as False), so masked
    arrays give the values of their unmasked data, never of what lies
    under the mask.  ``mask`` is ``a``'s own mask (full shape) when ``a`` is a
    masked array, for softmax and log_softmax to return a masked array
    again, else ``None``.  ``np.matrix`` is computed as the 2-D ndarray it
    holds, with ndarray results.  Other inputs pass through untouched.
    """
    kinds = (np.ma.MaskedArray, np.matrix)
    if not any(isinstance(x, kinds) for x in (a, b, where)):
        return a, b, where, None
    excluded = []
    mask = None
    if isinstance(a, np.ma.MaskedArray):
        mask = np.ma.getmaskarray(a)
        excluded.append(mask)
        a = np.ma.getdata(a)
    if isinstance(b, np.ma.MaskedArray):
        excluded.append(np.ma.getmaskarray(b))
        b = np.ma.getdata(b)
    if isinstance(where, np.ma.MaskedArray):
        where = np.ma.filled(where, False)
    a, b, where = (np.asarray(x) if isinstance(x, np.matrix) else x for x in (a, b, where))
    if excluded:
        included = ~np.logical_or.reduce(np.broadcast_arrays(*excluded)) if len(excluded) > 1 else ~excluded[0]
        where = included if where is None else (np.asarray(where) & included)
    return a, b, where, mask


def is_python_scalar(value) -> bool:
    """A Python ``bool``, ``int``, ``float`` or ``complex`` (a weak scalar for promotion)."""
    return isinstance(value, (bool, int, float, complex)) and not isinstance(value, np.generic)


def resolve_namespace(
    named: dict[str, Any], *, booleans: tuple[str, ...] = ()
) -> tuple[Any, dict[str, Array]]:
    """Resolve one namespace for the named inputs and convert them into it.

    ``None`` entries are passed through.  Python scalars and sequences take the
    namespace (and device) of the array inputs, or NumPy's when there are none.
    Arrays of two different libraries raise ``TypeError`` naming the arguments.
    """
    arrays: dict[str, Array] = {}
    foreign: dict[str, Array] = {}
    for name, value in named.items():
        if value is None:
            continue
        converted, was_python = _as_array(value, name)
        (foreign if was_python else arrays)[name] = converted
    if arrays:
        try:
            xp = array_api_compat.array_namespace(*arrays.values())
        except TypeError as exc:
            libraries = ", ".join(f"'{n}' is {type(v).__module__}.{type(v).__name__}" for n, v in arrays.items())
            raise TypeError(f"arguments come from different array libraries ({libraries})") from exc
        device = device_of(next(iter(arrays.values())))
        for name, value in foreign.items():
            arrays[name] = xp.asarray(value, device=device)
    else:
        xp = array_api_compat.array_namespace(*foreign.values())
        arrays = foreign
    for name, value in arrays.items():
        _check_kind(xp, value, name, boolean=name in booleans)
    return xp, {name: arrays.get(name) for name in named}


class DtypePlan(NamedTuple):
    """The dtypes of one call.

    ``result`` is what the caller gets back, ``compute`` what the entries are
    evaluated in (float32 for float16 and bfloat16), and ``accumulator`` what
    sums are carried in (float64 for float32 when the device has it).
    """

    result: Any
    compute: Any
    accumulator: Any
    is_complex: bool


def _promoted(xp, dtypes: list):
    """The namespace's result type of ``dtypes``; the floating ones' where kinds may not mix."""
    try:
        return xp.result_type(*dtypes)
    except TypeError:
        floating = [d for d in dtypes if xp.isdtype(d, ("real floating", "complex floating"))]
        return xp.result_type(*floating) if floating else None


def _on_device(info_method, device):
    try:
        return info_method(device=device)
    except TypeError:  # namespaces whose info takes no device
        return info_method()


def plan_dtypes(xp, *arrays: Array | None, weak: tuple[Array, ...] = ()) -> DtypePlan:
    """Choose result, compute and accumulator dtypes for the given inputs.

    The result is the namespace's own promotion of the inputs (NumPy's
    makes ``int32`` with ``float32`` ``float64``, as SciPy's does; where the
    namespace refuses to mix kinds, as array-api-strict does, the floating
    inputs' alone), made floating: integer and boolean inputs alone give the
    namespace's default real floating dtype.  ``weak`` inputs came from
    Python scalars and do not widen the others (NumPy 2, torch and the array
    API treat them so): ``float32`` with ``b=2.0`` stays ``float32``, a
    Python ``complex`` makes a real result complex of the same precision.
    """
    present = [x for x in arrays if x is not None]
    device = device_of((present or list(weak))[0])
    info = xp.__array_namespace_info__()
    defaults = _on_device(info.default_dtypes, device)
    result = _promoted(xp, [x.dtype for x in present]) if present else None
    if result is None or not xp.isdtype(result, ("real floating", "complex floating")):
        weak_float = [x.dtype for x in weak if xp.isdtype(x.dtype, ("real floating", "complex floating"))]
        result = _promoted(xp, weak_float) if (weak_float and not present) else defaults["real floating"]
    if any(xp.isdtype(x.dtype, "complex floating") for x in weak) and not xp.isdtype(result, "complex floating"):
        result = xp.complex128 if result == getattr(xp, "float64", None) else xp.complex64
    available = _on_device(info.dtypes, device)
    if xp.isdtype(result, "complex floating"):
        widest = "complex128" in available and result == xp.complex64
        return DtypePlan(result, result, xp.complex128 if widest else result, True)
    compute = result if result in (xp.float32, getattr(xp, "float64", None)) else xp.float32
    accumulator = xp.float64 if (compute == xp.float32 and "float64" in available) else compute
    return DtypePlan(result, compute, accumulator, False)
