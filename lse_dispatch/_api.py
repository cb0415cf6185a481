"""The public functions: drop-ins for ``scipy.special``'s, on any backend.

Each one resolves the namespace once, validates, runs the implementation the
dispatcher picks and returns in the input's namespace, device and dtype.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, overload

import numpy as np

from . import _dispatch
from ._call import Call, prepare
from ._namespace import plan_dtypes, unwrap_numpy_subclasses
from ._ops import Op
from ._validate import normalize_axis

__all__ = ["log_softmax", "logsumexp", "softmax"]

#: An array of any array-API library, or what NumPy accepts as one (Python
#: scalars and sequences).
Array = Any
#: ``None``, an axis, or a tuple of axes.
Axis = int | tuple[int, ...] | None

_FAST_PLANS: dict = {}
#: The namespaces of the short lane, imported once (an import statement costs a
#: lookup on every call).
_LANE_NAMESPACES: dict = {}


def _short_lane(a):
    """``(key, namespace)`` of the calls the short lane takes, or ``None``.

    Only exact NumPy arrays and torch tensors of a real floating dtype and
    at least one dimension: their namespace follows from the type (taken
    without array-api-compat's type checks, which torch.compile would trace)
    and their plan from dtype and device.
    """
    kind = type(a)
    if kind is np.ndarray:
        if a.dtype in (np.float32, np.float64) and a.ndim:
            xp = _LANE_NAMESPACES.get("numpy")
            if xp is None:
                import array_api_compat.numpy as xp

                _LANE_NAMESPACES["numpy"] = xp
            return (kind, a.dtype), xp
        return None
    torch = sys.modules.get("torch")
    if torch is not None and kind is torch.Tensor and a.dtype in (torch.float32, torch.float64) and a.ndim:
        torch_xp = _LANE_NAMESPACES.get("torch")
        if torch_xp is None:
            import array_api_compat.torch as torch_xp

            _LANE_NAMESPACES["torch"] = torch_xp
        return (kind, a.dtype, a.device), torch_xp
    return None


def _prepare(op: Op, a, axis, b, where, return_sign: bool = False) -> tuple[Call, Any]:
    """``prepare()``, with a short lane for the commonest calls.

    A NumPy array or torch tensor of float32/float64 without ``b`` and
    ``where`` needs no namespace resolution or conversion; its :class:`Call`
    is built directly, with the dtype plan made once per type, dtype and
    device.  tests/test_dispatch.py checks that both lanes give equal calls.

    Returns the call and the mask of a NumPy masked array input (see
    ``unwrap_numpy_subclasses``), or ``None``.
    """
    if b is None and where is None:
        lane = _short_lane(a)
        if lane is not None:
            key, xp = lane
            plan = _FAST_PLANS.get(key)
            if plan is None:
                plan = _FAST_PLANS[key] = plan_dtypes(xp, a)
            shape = tuple(a.shape)
            return Call.trusted(op, xp, a, normalize_axis(axis, len(shape)), shape, plan, bool(return_sign)), None
    a, b, where, mask = unwrap_numpy_subclasses(a, b, where)
    return prepare(op, a, axis=axis, b=b, where=where, return_sign=return_sign), mask


def _out(x: Array) -> Array:
    """A 0-d NumPy result as the NumPy scalar SciPy returns (``np.float64``, not a 0-d array)."""
    if type(x) is np.ndarray and x.ndim == 0:
        return x[()]
    return x


def _normalised_out(call: Call, out: Array, mask) -> Array:
    """softmax/log_softmax output: 0-d for 0-d input, a masked array for a masked one."""
    if call.from_scalar:
        out = call.xp.reshape(out, ())
    if mask is not None:
        return np.ma.MaskedArray(out, mask=mask)
    return _out(out)


def _squeeze(call: Call, x: Array, keepdims: bool) -> Array:
    if keepdims or not call.axes:
        return x
    kind = type(x)
    if kind is np.ndarray:  # the method: a third of the namespace function's time
        return x.squeeze(axis=call.axes)
    torch = sys.modules.get("torch")
    if torch is not None and kind is torch.Tensor:
        # The method, with an int for one axis: 0.97 us, against 1.58 with a
        # tuple and 1.95 for array-api-compat's function (torch 2.13 CPU).
        axes = call.axes
        return x.squeeze(axes[0]) if len(axes) == 1 else x.squeeze(axes)
    return call.xp.squeeze(x, axis=call.axes)


@overload
def logsumexp(
    a: Array, axis: Axis = ..., b: Array | None = ..., keepdims: bool = ...,
    return_sign: Literal[False] = ..., *, where: Array | None = ..., backend: str | None = ...,
) -> Array: ...
@overload
def logsumexp(
    a: Array, axis: Axis = ..., b: Array | None = ..., keepdims: bool = ...,
    *, return_sign: Literal[True], where: Array | None = ..., backend: str | None = ...,
) -> tuple[Array, Array]: ...


def logsumexp(
    a: Array,
    axis: Axis = None,
    b: Array | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    *,
    where: Array | None = None,
    backend: str | None = None,
) -> Array | tuple[Array, Array]:
    """Logarithm of the sum of exponentials, ``log(sum(b * exp(a)))``, accurately.

    Parameters
    ----------
    a : array_like
        Input of any array-API library; Python scalars and sequences are
        treated as NumPy.  Integer and boolean input is computed in the
        namespace's default floating dtype.
    axis : None or int or tuple of ints, optional
        Axes to reduce; ``None`` reduces all, ``()`` none.
    b : array_like, optional
        Weights broadcasting against `a`.  Entries with ``b == 0`` are
        excluded, even where `a` is infinite or NaN.  May be negative.
    keepdims : bool, optional
        Keep the reduced axes with length one.
    return_sign : bool, optional
        Return ``(log|sum|, sign)``.  The sign is 0 for a zero sum and the
        unit phase for complex input.  Without it a negative sum gives NaN.
    where : array_like of bool, optional
        Only entries where this is True are included.
    backend : str, optional
        Implementation for this call: ``"auto"``, ``"generic"``, a backend
        name or a kernel name (``lse_dispatch.available()``).  Wins over
        ``lse_dispatch.use()`` and ``LSE_DISPATCH_BACKEND``.

    Returns
    -------
    res : array
        ``log|sum(b * exp(a))|``; ``-inf`` for an empty or all-excluded
        reduction, ``+inf`` if an included entry is ``+inf``.
    sgn : array
        Only with ``return_sign``.

    Examples
    --------
    >>> import numpy as np
    >>> from lse_dispatch import logsumexp
    >>> float(logsumexp(np.array([0.0, -40.0])))
    4.248354255291589e-18
    >>> float(logsumexp(np.array([1000.0, 1000.0])))
    1000.6931471805599
    >>> value, sign = logsumexp(np.array([0.0, 1.0]), b=np.array([1.0, -1.0]), return_sign=True)
    >>> float(value), float(sign)
    (0.5413248546129181, -1.0)
    """
    lane = None
    if b is None and where is None and backend is None and not return_sign:
        value, lane = _dispatch.through_lane(Op.LOGSUMEXP, a, axis, keepdims)
        if value is not None:
            return _out(value)
    call, _ = _prepare(Op.LOGSUMEXP, a, axis, b, where, return_sign)
    value, sign = _dispatch.run(call, backend, lane)
    value = _out(_squeeze(call, value, keepdims))
    if return_sign:
        return value, _out(_squeeze(call, sign, keepdims))
    return value


def softmax(x: Array, axis: Axis = None, *, where: Array | None = None, backend: str | None = None) -> Array:
    """Softmax, ``exp(x - logsumexp(x))``, with limit semantics at infinities.

    Parameters
    ----------
    x : array_like
        Input of any array-API library.
    axis : None or int or tuple of ints, optional
        Axes over which the result sums to one; ``None`` means all.
    where : array_like of bool, optional
        Excluded entries get 0.
    backend : str, optional
        Implementation for this call: ``"auto"``, ``"generic"``, a backend
        name or a kernel name (``lse_dispatch.available()``).  Wins over
        ``lse_dispatch.use()`` and ``LSE_DISPATCH_BACKEND``.

    Returns
    -------
    array
        Same shape, namespace and device as `x`.  ``k`` entries at ``+inf``
        share 1 equally; a slice with nothing included is all 0.

    Examples
    --------
    >>> import numpy as np
    >>> from lse_dispatch import softmax
    >>> softmax(np.array([0.0, np.inf, np.inf]))
    array([0. , 0.5, 0.5])
    """
    lane = None
    if where is None and backend is None:
        out, lane = _dispatch.through_lane(Op.SOFTMAX, x, axis)
        if out is not None:
            return out
    call, mask = _prepare(Op.SOFTMAX, x, axis, None, where)
    return _normalised_out(call, _dispatch.run(call, backend, lane), mask)


def log_softmax(x: Array, axis: Axis = None, *, where: Array | None = None, backend: str | None = None) -> Array:
    """Logarithm of softmax, computed without cancellation at the max entry.

    Parameters
    ----------
    x : array_like
        Input of any array-API library.
    axis : None or int or tuple of ints, optional
        Axes of the normalisation; ``None`` means all.
    where : array_like of bool, optional
        Excluded entries get ``-inf``.
    backend : str, optional
        Implementation for this call: ``"auto"``, ``"generic"``, a backend
        name or a kernel name (``lse_dispatch.available()``).  Wins over
        ``lse_dispatch.use()`` and ``LSE_DISPATCH_BACKEND``.

    Returns
    -------
    array
        Same shape, namespace and device as `x`.

    Examples
    --------
    >>> import numpy as np
    >>> from lse_dispatch import log_softmax
    >>> float(log_softmax(np.array([0.0, -40.0]))[0])
    -4.248354255291589e-18
    """
    lane = None
    if where is None and backend is None:
        out, lane = _dispatch.through_lane(Op.LOG_SOFTMAX, x, axis)
        if out is not None:
            return out
    call, mask = _prepare(Op.LOG_SOFTMAX, x, axis, None, where)
    return _normalised_out(call, _dispatch.run(call, backend, lane), mask)
