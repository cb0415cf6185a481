"""lse-dispatch: accurate log-sum-exp, softmax and log_softmax on any array-API backend.

Importing this package imports no array library other than NumPy.
"""

from ._api import log_softmax, logsumexp, softmax
from ._dispatch import available, trace, use, warm_up
from ._validate import AxisError
from .semiring import logcumsumexp, logmatmulexp
from .streaming import LSEState, OnlineLogSumExp, logsumexp_blocked, lse_finalize, lse_merge, lse_state

__all__ = [
    "AxisError",
    "LSEState",
    "OnlineLogSumExp",
    "available",
    "log_softmax",
    "logcumsumexp",
    "logmatmulexp",
    "logsumexp",
    "logsumexp_blocked",
    "lse_finalize",
    "lse_merge",
    "lse_state",
    "softmax",
    "trace",
    "use",
    "warm_up",
]
__version__ = "0.1.0"
