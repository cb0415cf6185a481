"""Helpers shared by the tiled kernels of NumPy and torch (``*.blocked``)."""

from __future__ import annotations

__all__ = ["Pairwise", "kernels", "piece"]


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


def kernels(name, logsumexp, normalised, declines):
    """The three ``Kernel`` entries of a blocked kernel called ``name``.

    ``normalised(call, log)`` gives log_softmax (``log=True``) or softmax;
    both decline float64, whose exponent needs the shared compensated path.
    """
    import functools

    from lse_dispatch._dispatch import Kernel

    from ._spec import FLOAT64_LOG_SOFTMAX, FLOAT64_SOFTMAX, declines_also

    return (
        Kernel("logsumexp", name, logsumexp, declines),
        Kernel("softmax", name, functools.partial(normalised, log=False),
               declines_also(declines, FLOAT64_SOFTMAX, dtype="float64")),
        Kernel("log_softmax", name, functools.partial(normalised, log=True),
               declines_also(declines, FLOAT64_LOG_SOFTMAX, dtype="float64")),
    )
