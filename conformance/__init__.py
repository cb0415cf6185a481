"""The conformance suite: does an implementation of logsumexp, softmax and
log_softmax agree with the math on every backend and device?

Three ways in:

* ``lse-dispatch conformance [--impl ...] [--backends ...]`` (``cli.py``);
* the pytest plugin ``-p lse_dispatch.conformance.plugin`` (``plugin.py``);
* :func:`run`, which returns a :class:`Result`.

Importing this package imports no array library.
"""

from ._checks import FAMILIES, Check, Outcome
from ._impls import BUILTIN, Implementation, NotApplicable, Unsupported, load
from ._runner import ExpectedFailure, Record, Result, load_xfails, run
from ._targets import Target, discover, select

__all__ = [
    "BUILTIN",
    "FAMILIES",
    "Check",
    "ExpectedFailure",
    "Implementation",
    "NotApplicable",
    "Outcome",
    "Record",
    "Result",
    "Target",
    "Unsupported",
    "discover",
    "load",
    "load_xfails",
    "run",
    "select",
]
