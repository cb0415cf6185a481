"""The operations of the library, named once."""

from __future__ import annotations

import enum

__all__ = ["Op"]


class Op(str, enum.Enum):
    """The operations a kernel can implement (equal to their names as strings)."""

    #: ``(log|sum|, sign)`` with the reduced axes kept.
    LOGSUMEXP = "logsumexp"
    #: The normalised exponentials, same shape as the input.
    SOFTMAX = "softmax"
    #: Their logarithm, same shape as the input.
    LOG_SOFTMAX = "log_softmax"
    #: The keepdims :class:`~lse_dispatch._state.LSEState` of a logsumexp
    #: call (``lse_state``, streaming, the blocks of a Dask reduction).
    STATE = "state"

    def __str__(self) -> str:
        return self.value

    # Hash as the string it equals, so that dicts keyed by either find both.
    __hash__ = str.__hash__
