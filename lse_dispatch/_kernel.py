"""What a kernel is: the operations, and the declaration a backend makes for each.

Backend authors use these through :mod:`lse_dispatch.backends` (``Op``,
``Kernel``, ``Priority``, :func:`state_kernels`); the dispatcher
(:mod:`lse_dispatch._dispatch`) chooses among them.

Every kernel of the library computes the shared state ``(max, count, rest)``
and leaves the finalisation and its limit rules to
:mod:`lse_dispatch._state`; :func:`state_kernels` builds the four entries of
a kernel from its state function (and, where it fuses one, its
normalisation pass), so that no kernel writes the finalisation again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _generic
from ._ops import Op

__all__ = [
    "Kernel",
    "Op",
    "Priority",
    "Provisional",
    "bind_choice",
    "bind_dispatcher",
    "bind_lane_without",
    "catalogue_changed",
    "dispatch",
    "lane_without",
    "never_declines",
    "state_kernels",
    "user_choice",
]


class Priority(enum.IntEnum):
    """Declared order of the kernels of an array's backends: higher runs first.

    A kernel that declines a call leaves it to the next one, and the
    generic implementation runs when all decline.  Plugins declare their
    own (``THIRD_PARTY`` by default, after the built-in kernels).
    """

    #: Compiled kernels with derivative rules of their own (torch.triton on
    #: CUDA): ahead of the shared derivative rules for the calls they take.
    COMPILED_WITH_DERIVATIVES = 500
    #: Derivative rules: they take only calls being differentiated, and run
    #: the forward of whatever would run without them.
    DERIVATIVE = 400
    #: Fused compiled kernels (numba on CPU memory, Triton on CUDA).
    COMPILED = 300
    #: Eager native kernels (tiled CPU kernels, ``jax.jit``, Dask's tree).
    NATIVE = 200
    #: Third-party kernels that declare nothing.
    THIRD_PARTY = 100


def never_declines(call) -> str | None:
    """The ``declines`` of a kernel that takes every call."""
    return None


@dataclass(frozen=True)
class Kernel:
    """A native implementation of one operation.

    ``name`` is ``"<backend>.<implementation>"`` and is shared by the kernels
    of the operations that one implementation provides; users select it by
    that name.  ``run`` takes a prepared :class:`~lse_dispatch._call.Call`
    and returns what the generic implementation returns for ``op``.
    ``declines`` returns ``None`` when the kernel can take the call, or a
    short reason why not; a kernel that does not meet the accuracy contract
    for a call must decline it.  ``priority`` orders the kernels of an
    array's backends (:class:`Priority`).

    ``lane`` is optional: ``lane(call, shape)`` specialises ``run`` to the
    signature of a call the kernel took (one without ``b``, ``where`` and
    ``return_sign``), returning ``fn(a)``, or ``None`` where it has no
    such form.  ``fn`` takes any array of the same type, dtype and shape
    whose backend decision key (``BackendSpec.decision_key``) is the call's,
    and returns the result, of ``shape`` (logsumexp's value alone), or
    ``None`` for an input that needs the full ``run`` (a line to finish by
    the shared limit rules).  The dispatcher calls it instead of preparing
    the next such call (:func:`lse_dispatch._dispatch.through_lane`).
    """

    op: Op
    name: str
    run: Callable[[Any], Any]
    declines: Callable[[Any], str | None] = never_declines
    priority: int = Priority.THIRD_PARTY
    lane: Callable[[Any, tuple], Callable[[Any], Any] | None] | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "op", Op(self.op))
        except ValueError:
            raise ValueError(f"kernel {self.name!r}: unknown operation {self.op!r}") from None


def state_kernels(
    name: str,
    state: Callable[[Any], Any],
    declines: Callable[[Any], str | None],
    *,
    priority: int,
    normalised: Callable[[Any, bool], Any] | None = None,
    logsumexp: Callable[[Any], Any] | None = None,
    declines_normalised: Callable[[Any], str | None] | None = None,
    lane: Callable[[Any, tuple], Callable[[Any], Any] | None] | None = None,
) -> tuple[Kernel, ...]:
    """The four kernels of an implementation that computes states.

    ``state(call)`` returns the keepdims state; logsumexp finalises it with
    the shared :func:`~lse_dispatch._generic.logsumexp_from_state` unless a
    ``logsumexp`` of the kernel's own is given (one that finalises its
    finite lines faster and hands the rest to the shared rules).
    ``normalised(call, log)`` is the kernel's fused softmax (``log=False``)
    or log_softmax; without it they take the state and the shared
    elementwise pass.  ``declines_normalised`` (default ``declines``)
    decides for softmax and log_softmax.  ``lane`` is the three public
    operations' :attr:`Kernel.lane`.
    """
    def finalised(call):
        return _generic.logsumexp_from_state(call, state(call))

    def from_state(log: bool):
        if normalised is not None:
            return lambda call: normalised(call, log)
        return lambda call: _generic.normalised_from_state(call, state(call), log)

    declines_normalised = declines if declines_normalised is None else declines_normalised
    return (
        Kernel(Op.STATE, name, state, declines, priority),
        Kernel(Op.LOGSUMEXP, name, finalised if logsumexp is None else logsumexp, declines, priority, lane),
        Kernel(Op.SOFTMAX, name, from_state(False), declines_normalised, priority, lane),
        Kernel(Op.LOG_SOFTMAX, name, from_state(True), declines_normalised, priority, lane),
    )


# The user's choice of implementation (backend= > use() > environment), bound
# by lse_dispatch._dispatch like the dispatcher below.
_CHOICE: Callable[[], str] | None = None


def bind_choice(choice: Callable[[], str]) -> None:
    """Install ``choice()``, the implementation the user chose (done by ``lse_dispatch._dispatch``)."""
    global _CHOICE
    _CHOICE = choice


def user_choice() -> str:
    """The choice in force (``"auto"``, ``"generic"``, a backend or a kernel name), for kernels
    that take some calls only when chosen by name."""
    return "auto" if _CHOICE is None else _CHOICE()


# The dispatcher, bound by lse_dispatch._dispatch when it is imported (always,
# with the package): kernels that run other kernels -- derivative rules
# around the forward, Dask around the state of each block -- reach it here,
# so that no backend imports the layer that imports the backends.
_DISPATCHER: Callable[[Any, str | None], Any] | None = None


def bind_dispatcher(dispatcher: Callable[[Any, str | None], Any]) -> None:
    """Install ``dispatcher(call, without)`` (done once, by ``lse_dispatch._dispatch``)."""
    global _DISPATCHER
    _DISPATCHER = dispatcher


def dispatch(call, *, without: str | None = None):
    """Run ``call`` with the kernel ``auto`` picks, skipping the kernel named ``without``.

    For kernels that wrap others: the derivative rules run their forward
    ``without`` themselves; Dask reduces each block as the eager path
    reduces a NumPy array.
    """
    if _DISPATCHER is None:  # pragma: no cover - lse_dispatch/__init__ always binds it
        raise RuntimeError("lse_dispatch._dispatch is not imported")
    return _DISPATCHER(call, without)


_LANE_WITHOUT: Callable[[Any, str, tuple], Any] | None = None


def bind_lane_without(finder: Callable[[Any, str, tuple], Any]) -> None:
    """Install ``finder(call, without, shape)`` (done once, by ``lse_dispatch._dispatch``)."""
    global _LANE_WITHOUT
    _LANE_WITHOUT = finder


def lane_without(call, without: str, shape: tuple):
    """The lane (:attr:`Kernel.lane`, made for the public result's ``shape``) of the
    kernel :func:`dispatch` would run ``call`` with ``without`` the named one, or
    ``None`` (it has none, its choice is not final, or it is the generic code).

    For a wrapping kernel's own lane: the derivative rules' forward is then
    the wrapped kernel's lane.
    """
    if _LANE_WITHOUT is None:  # pragma: no cover - lse_dispatch/__init__ always binds it
        raise RuntimeError("lse_dispatch._dispatch is not imported")
    return _LANE_WITHOUT(call, without, shape)


# What the dispatcher forgets when the catalogue changes: the kernel it chose
# per call signature (bound by lse_dispatch._dispatch, like the dispatcher).
_FORGET: list[Callable[[], None]] = []


def bind_forget(forget: Callable[[], None]) -> None:
    """Install ``forget()``, run by :func:`catalogue_changed` (done once, by ``lse_dispatch._dispatch``)."""
    _FORGET[:] = [forget]


class Provisional(str):
    """A reason to decline that holds for now only: the kernel may take the same call later.

    ``numpy.fused`` declines small calls while its compiled code is not
    loaded, and those calls count towards loading it; a decision made past
    such a decline is not reused for the call's signature (the dispatcher
    asks again on the next call), so the kernel sees every call it could
    take.  A plain ``str`` is a decline that only :func:`catalogue_changed`
    revokes.

    ``charge``, if given, is called with the seconds that the call then took
    on the implementation that ran (the dispatcher times the calls it runs
    past such a decline), so that the kernel can weigh what declining costs.
    """

    charge: Callable[[float], None] | None

    def __new__(cls, reason: str, charge: Callable[[float], None] | None = None) -> Provisional:
        self = super().__new__(cls, reason)
        self.charge = charge
        return self


def catalogue_changed() -> None:
    """Say that what a kernel's ``declines`` answers may have changed for calls it saw.

    The dispatcher reuses the kernel it chose for a call signature (see
    ``BackendSpec.decision_key``); a kernel whose answers depend on state
    of its own (``numpy.fused`` takes small calls only once its code is
    loaded) calls this when that state changes, and the next call of every
    signature decides again.
    """
    for forget in _FORGET:
        forget()
