"""Argument checks that run before anything is computed.

Errors name the argument and say what was expected.  Everything here looks at
shapes and Python values only, never at array data, so it is lazy-safe.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

__all__ = ["AxisError", "broadcast_shapes", "normalize_axis"]


class AxisError(np.exceptions.AxisError):
    """An ``axis`` argument that is out of range or repeats an axis.

    A ``numpy.exceptions.AxisError`` (so ``except np.exceptions.AxisError``
    keeps catching it), hence also a ``ValueError`` and an ``IndexError``.
    """

    def __init__(self, message: str):
        super().__init__(message)


#: ``(axis, ndim)`` -> the normalised axes, for ``None`` and the valid plain ints seen
#: (only those: ``1.0`` and ``(1,)`` hash as ``1`` and must still be checked).
_NORMALIZED: dict = {}


def normalize_axis(axis, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Return ``axis`` as a sorted tuple of distinct non-negative axes.

    ``None`` means every axis and ``()`` means none.  Negative axes count
    from the end.
    """
    plain = axis is None or type(axis) is int
    if plain:
        found = _NORMALIZED.get((axis, ndim))
        if found is not None:
            return found
    found = _normalize_axis(axis, ndim, name)
    if plain and len(_NORMALIZED) < 1024:
        _NORMALIZED[axis, ndim] = found
    return found


def _normalize_axis(axis, ndim: int, name: str) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    items = axis if isinstance(axis, tuple) else (axis,)
    normalized = []
    for item in items:
        try:
            index = operator.index(item)
        except TypeError:
            raise TypeError(
                f"argument '{name}' must be None, an int or a tuple of ints, got {axis!r}"
            ) from None
        if not -ndim <= index < ndim:
            raise AxisError(f"{name} {index} is out of range for an array of dimension {ndim}")
        positive = index % ndim
        if positive in normalized:
            raise AxisError(f"{name} {axis!r} repeats axis {positive}")
        normalized.append(positive)
    return tuple(sorted(normalized))


def broadcast_shapes(shapes: Sequence[tuple], names: Sequence[str]) -> tuple:
    """The broadcast shape of ``shapes``; ``ValueError`` naming what clashes.

    Unknown extents (``None`` or NaN, as lazy arrays report) are taken to fit.
    """
    ndim = max(len(shape) for shape in shapes)
    result: list = [1] * ndim
    owner: list = [None] * ndim
    named = dict(zip(names, shapes))
    for shape, name in zip(shapes, names):
        for offset, extent in enumerate(reversed(shape)):
            slot = ndim - 1 - offset
            current = result[slot]
            if extent == 1:
                continue
            if current == 1:
                result[slot], owner[slot] = extent, name
            elif _unknown(extent) or _unknown(current):
                # Two unknown extents are taken to fit; unknown against known cannot be aligned.
                if not _unknown(current):
                    _unknown_against_known(name, shape, owner[slot], named[owner[slot]])
                if not _unknown(extent):
                    _unknown_against_known(owner[slot], named[owner[slot]], name, shape)
            elif current != extent:
                raise ValueError(
                    f"argument '{name}' with shape {tuple(shape)} does not broadcast against "
                    f"'{owner[slot]}' with shape {tuple(named[owner[slot]])}"
                )
    return tuple(result)


def _unknown_against_known(unknown_name, unknown_shape, known_name, known_shape) -> None:
    raise ValueError(
        f"argument '{unknown_name}' with shape {tuple(unknown_shape)} has unknown extents (a lazy array with "
        f"unknown chunk sizes) where '{known_name}' with shape {tuple(known_shape)} has known ones, so they "
        f"cannot be aligned; compute the chunk sizes first (Dask: x.compute_chunk_sizes()) or derive "
        f"'{known_name}' from '{unknown_name}'"
    )


def _unknown(extent) -> bool:
    return extent is None or extent != extent  # NaN != NaN
