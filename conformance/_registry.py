"""Every check of every family, in report order.

The family modules register their checks with ``_checks.register`` when they
are imported; this module imports them all.  The families import
``_checks``, never the other way round, so there is no import cycle.
"""

from __future__ import annotations

from . import _family_api, _family_cases, _family_invariants, _family_semiring, _family_transforms  # noqa: F401  (they register)
from ._checks import FAMILIES, REGISTRY, Check

__all__ = ["registry"]


def registry() -> list[Check]:
    """Every check, families in report order."""
    order = {family: i for i, family in enumerate(FAMILIES)}
    return sorted(REGISTRY, key=lambda check: order[check.family])
