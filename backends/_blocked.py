"""Helpers shared by the tiled kernels of NumPy and torch (``*.blocked``)."""

from __future__ import annotations

__all__ = ["Pairwise", "piece"]


class Pairwise:
    """Adds equal-shape partial sums as a balanced tree, holding O(log n) of them.

    A binary counter: a new partial merges with the stored one of the same
    size, so the error grows like log(number of partials), not linearly.
    """

    def __init__(self):
        self.levels = []  # (number of partials, their sum), sizes decreasing

    def add(self, part):
        size = 1
        while self.levels and self.levels[-1][0] == size:
            size += self.levels[-1][0]
            part = self.levels.pop()[1] + part
        self.levels.append((size, part))

    def total(self):
        parts = [part for _, part in self.levels]
        total = parts.pop()
        while parts:
            total = parts.pop() + total
        return total


def piece(view, axis, k, r):
    """The tile ``(k, r)`` of a 2-D view whose reduced axis is ``axis``."""
    return view[k, r] if axis == 1 else view[r, k]
