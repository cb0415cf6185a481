"""Choosing the implementation that runs a prepared call.

Each backend module declares native :class:`Kernel` s with the conditions
under which they apply; the first one that does not decline runs, otherwise
the generic array-API implementation does.  The backends of an array type are
looked up once and cached (SciPy's ``_support_alternative_backends`` is the
model).

The user's choice is resolved in this order:

1. the per-call ``backend=`` keyword of the public functions;
2. the innermost ``with lse_dispatch.use(...)`` block (a context variable, so
   each thread and each asyncio task sees its own choice);
3. the environment variable ``LSE_DISPATCH_BACKEND``;
4. ``"auto"``.

A choice is one of

* ``"auto"`` -- the first kernel of the array's backends that takes the call,
  else the generic implementation;
* ``"generic"`` -- always the generic array-API implementation;
* a backend name (``"numpy"``, ``"torch"``, a plugin's name) -- only that
  backend's kernels are tried, then the generic implementation;
* a kernel name (``"numpy.blocked"``) -- only that kernel is tried, then the
  generic implementation.

A kernel that declines a call never makes it fail: the generic implementation
always runs instead, and :func:`trace` and ``logging.debug`` (logger
``lse_dispatch.dispatch``) say which implementation ran and why the others
declined.  Third-party backends register a :class:`~lse_dispatch.backends.BackendSpec`
under the entry-point group ``lse_dispatch.backends``; they are loaded on the
first call that needs a backend lookup, and a plugin that fails to load warns
and is skipped.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import _kernel, _numerics
from ._call import Call
from ._env import getenv
from ._generic import IMPLEMENTATIONS as GENERIC
from ._kernel import Kernel, Priority
from ._numerics import compile_time_constant as _compile_time_constant
from ._ops import Op

__all__ = [
    "ENV_VAR",
    "GENERIC",
    "Decision",
    "Kernel",
    "Priority",
    "Trace",
    "available",
    "backend_for",
    "backends_for",
    "kernels_for",
    "plugins",
    "run",
    "run_without",
    "trace",
    "use",
    "warm_up",
]

#: Environment variable holding the default choice (below ``use`` and ``backend=``).
ENV_VAR = "LSE_DISPATCH_BACKEND"
#: Entry-point group third-party backends register under.
ENTRY_POINT_GROUP = "lse_dispatch.backends"

logger = logging.getLogger("lse_dispatch.dispatch")


# --------------------------------------------------------------------------
# The catalogue: built-in backends, then plugins, looked up per array type.

_BACKENDS_OF_TYPE: dict[type, tuple] = {}
# At most this many array types are remembered (first in, first out), so that
# dynamically created subclasses are neither kept alive nor piled up.
_TYPE_CACHE_SIZE = 256
_KERNELS_OF_TYPE: dict[tuple, tuple] = {}
_PLUGINS: list | None = None


def plugins() -> list:
    """Specs of the third-party backends registered under the entry-point group.

    Loaded once, on first use.  A plugin that fails to load, or whose spec is
    malformed (not a ``BackendSpec``, kernels that are not ``Kernel`` s), is
    skipped with a ``RuntimeWarning`` naming it.  The kernels of the loaded
    ones are contained (:func:`_contained`): their failures warn and fall
    back to the built-in implementation instead of failing the call.
    """
    global _PLUGINS
    if _PLUGINS is not None:
        return _PLUGINS
    from importlib.metadata import entry_points

    from .backends import BackendSpec

    found = []
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        try:
            spec = point.load()
            if callable(spec) and not isinstance(spec, BackendSpec):
                spec = spec()
            found.append(_contained_spec(_validated(spec)))
        except Exception as exc:  # any failure of foreign code: warn, skip, go on
            warnings.warn(
                f"lse_dispatch: skipping backend plugin {point.name!r} ({point.value}): "
                f"{type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
    _PLUGINS = found
    return found


def _validated(spec):
    """``spec`` if it is a usable ``BackendSpec``, else ``TypeError`` saying what is wrong."""
    from .backends import BackendSpec

    if not isinstance(spec, BackendSpec):
        raise TypeError(f"it gave {type(spec).__name__}, not a BackendSpec")
    if not isinstance(spec.name, str) or not spec.name or spec.name in ("auto", "generic"):
        raise TypeError(f"its name {spec.name!r} is not a usable backend name")
    for field_name in ("is_array", "namespace", "devices", "to_numpy"):
        if not callable(getattr(spec, field_name)):
            raise TypeError(f"its {field_name} is not callable")
    for kernel in spec.kernels:
        if not isinstance(kernel, Kernel):
            raise TypeError(f"its kernels hold {type(kernel).__name__}, not Kernel")
        if not isinstance(kernel.name, str) or not callable(kernel.run) or not callable(kernel.declines):
            raise TypeError(f"its kernel {kernel.name!r} needs a string name and callable run and declines")
    return spec


def _contained_spec(spec):
    """``spec`` with every kernel wrapped so that its failures cannot fail a call."""
    import dataclasses

    return dataclasses.replace(spec, kernels=tuple(_contained(kernel, spec.name) for kernel in spec.kernels))


def _warn_plugin(plugin: str, kernel, problem: str) -> None:
    warnings.warn(
        f"lse_dispatch: backend plugin {plugin!r}, kernel {kernel.name!r} ({kernel.op}): {problem}",
        RuntimeWarning,
        stacklevel=4,
    )


def _contained(kernel, plugin: str):
    """A plugin's kernel whose exceptions and malformed results fall back, with a warning.

    Third-party code must never make a call fail or return a wrong result
    shape: a ``declines`` that raises counts as declining, a ``run`` that
    raises or returns something other than what the operation promises
    (namespace, shape, dtype) is replaced by what would run without it.
    """

    def declines(call):
        try:
            return kernel.declines(call)
        except Exception as exc:
            _warn_plugin(plugin, kernel, f"declines() raised {type(exc).__name__}: {exc}; skipping the kernel")
            return f"declines() raised {type(exc).__name__}"

    def run(call):
        try:
            result = kernel.run(call)
            problem = _result_problem(call, result)
        except Exception as exc:
            result, problem = None, f"raised {type(exc).__name__}: {exc}"
        if problem is None:
            return result
        _warn_plugin(plugin, kernel, f"{problem}; falling back to the built-in implementation")
        return run_without(call, kernel.name, builtin_only=True)

    return Kernel(kernel.op, kernel.name, run, declines, kernel.priority)


def _result_problem(call: Call, result) -> str | None:
    """What is wrong with a kernel's ``result`` for ``call``, or ``None``."""
    import array_api_compat

    keepdims = tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape))
    if call.op == Op.LOGSUMEXP:
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            return f"returned {type(result).__name__}, expected a (value, sign) pair"
        shape, parts = keepdims, tuple(result)
    elif call.op == Op.STATE:
        if not isinstance(result, tuple) or len(result) != 3:
            return f"returned {type(result).__name__}, expected an LSEState (max, count, rest)"
        shape, parts = keepdims, tuple(result)
    else:
        shape, parts = tuple(call.shape), (result,)
    for part in parts:
        if not array_api_compat.is_array_api_obj(part):
            return f"returned {type(part).__name__}, expected an array"
        try:
            array_api_compat.array_namespace(part, call.a)
        except TypeError:
            return f"returned a {type(part).__module__}.{type(part).__name__}, not an array of the input's library"
        if not _same_shape(tuple(part.shape), shape):
            return f"returned shape {tuple(part.shape)}, expected {shape}"
    wanted = _result_dtypes(call)
    for part, dtype in zip(parts, wanted):
        if part.dtype != dtype:
            return f"returned dtype {part.dtype}, expected {dtype}"
    return None


def _result_dtypes(call: Call) -> tuple:
    plan = call.plan
    if call.op == Op.STATE:
        return (plan.compute, plan.accumulator, plan.accumulator)
    return (plan.result, plan.result)


def _same_shape(got: tuple, want: tuple) -> bool:
    """Shape equality that takes unknown (NaN or None) extents of lazy arrays as equal."""
    return len(got) == len(want) and all(g == w or (g != g and w != w) or None in (g, w) for g, w in zip(got, want))


@_compile_time_constant
def _load_plugins() -> None:
    """:func:`plugins` for :func:`backends_for`, which torch.compile may be tracing."""
    plugins()


def backends_for(array) -> tuple:
    """The specs whose arrays ``array`` is: built-in ones first, then plugins."""
    kind = type(array)
    found = _BACKENDS_OF_TYPE.get(kind)
    if found is not None:
        return found
    from . import backends

    _load_plugins()
    specs = [backends.get(name) for name in backends.BUILTIN] + list(_PLUGINS or ())
    matches = []
    for spec in specs:
        try:
            # A library that was never imported cannot have made this array.
            if spec.module in sys.modules and spec.is_array(array):
                matches.append(spec)
        except Exception as exc:  # a plugin's broken detector must not break calls
            warnings.warn(f"lse_dispatch: backend {spec.name!r} failed to inspect an array: {exc}",
                          RuntimeWarning, stacklevel=2)
    found = tuple(matches)
    if len(_BACKENDS_OF_TYPE) >= _TYPE_CACHE_SIZE:
        del _BACKENDS_OF_TYPE[next(iter(_BACKENDS_OF_TYPE))]
    _BACKENDS_OF_TYPE[kind] = found
    return found


def kernels_for(array, op: Op) -> tuple[tuple[str, Kernel], ...]:
    """``(backend name, kernel)`` of ``op`` for ``array``, highest priority first.

    Ties keep the order of the backends (built-in ones, then plugins in name
    order) and of each backend's declaration.
    """
    key = (type(array), op)
    found = _KERNELS_OF_TYPE.get(key)
    if found is None:
        pairs = [(spec.name, kernel) for spec in backends_for(array) for kernel in spec.kernels if kernel.op == op]
        found = tuple(sorted(pairs, key=lambda pair: -pair[1].priority))  # stable: ties keep their order
        if len(_KERNELS_OF_TYPE) >= 4 * _TYPE_CACHE_SIZE:
            del _KERNELS_OF_TYPE[next(iter(_KERNELS_OF_TYPE))]
        _KERNELS_OF_TYPE[key] = found
    return found


def backend_for(array) -> Any:
    """The first backend spec whose arrays ``array`` is, or ``None`` (generic only)."""
    found = backends_for(array)
    return found[0] if found else None


def available() -> dict[str, tuple[str, ...]]:
    """Every name ``use()`` accepts: backend name -> its kernel names, highest priority first.

    Lists the built-in backends (whether or not their library is installed)
    and the loaded plugins.
    """
    from . import backends

    names: dict[str, tuple[str, ...]] = {}
    for spec in [backends.get(name) for name in backends.BUILTIN] + plugins():
        ordered = sorted(spec.kernels, key=lambda kernel: -kernel.priority)  # stable: ties keep their order
        kernel_names = tuple(dict.fromkeys(kernel.name for kernel in ordered))
        names[spec.name] = names.get(spec.name, ()) + kernel_names
    return names


def warm_up() -> tuple[str, ...]:
    """Load the backends' compiled kernels now; the names of those loaded.

    Compiled kernels load on first use: from the disk cache in about half a
    second, or compiled once per install (about half a minute for numba's
    CPU kernels).  Until then they leave calls below 2**20 entries to the
    other kernels (the calls add up, and 2**27 entries of them load it:
    docs/fused_cpu.md).  Calling this at start-up, before a loop of small
    calls, makes every later call take them.  Each backend with a
    ``warm_up`` hook (``BackendSpec.warm_up``) loads its own; where a
    kernel's compiler is not installed it loads nothing, and calls keep
    their other kernels.
    """
    from . import backends

    loaded: list[str] = []
    for spec in [backends.get(name) for name in backends.BUILTIN] + plugins():
        if spec.warm_up is not None:
            loaded += spec.warm_up()
    return tuple(dict.fromkeys(loaded))


_KNOWN_NAMES: set[str] = set()


def _check_choice(choice) -> str:
    if not isinstance(choice, str):
        raise TypeError(f"argument 'backend' must be a string, got {type(choice).__name__}")
    if choice in ("auto", "generic") or choice in _KNOWN_NAMES:
        return choice
    catalogue = available()
    if choice in catalogue or any(choice in kernels for kernels in catalogue.values()):
        _KNOWN_NAMES.add(choice)
        return choice
    known = sorted({"auto", "generic", *catalogue, *(k for ks in catalogue.values() for k in ks)})
    raise ValueError(f"unknown backend {choice!r}; expected one of: {', '.join(known)}")


# --------------------------------------------------------------------------
# User control: backend= > use() > environment > auto.

_CHOICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("lse_dispatch_backend", default=None)


@contextlib.contextmanager
def use(backend: str) -> Iterator[str]:
    """Run the calls inside the block with ``backend``.

    ``backend`` is ``"auto"``, ``"generic"``, a backend name or a kernel name
    (see :func:`available`).  The choice lives in a context variable: other
    threads and asyncio tasks keep their own, and blocks nest.  A per-call
    ``backend=`` keyword still wins over it.

    >>> import numpy as np, lse_dispatch
    >>> with lse_dispatch.use("generic"), lse_dispatch.trace() as t:
    ...     _ = lse_dispatch.logsumexp(np.zeros(3))
    >>> t.records[-1].implementation
    'generic'
    """
    token = _CHOICE.set(_check_choice(backend))
    try:
        yield backend
    finally:
        _CHOICE.reset(token)


@_compile_time_constant
def _resolve(per_call: str | None) -> tuple[str, str]:
    """``(choice, where it came from)``."""
    if per_call is not None:
        return _check_choice(per_call), "backend="
    chosen = _CHOICE.get()
    if chosen is not None:
        return chosen, "use()"
    env = getenv(ENV_VAR)
    if env:
        try:
            return _check_choice(env.strip()), ENV_VAR
        except ValueError as exc:
            raise ValueError(f"environment variable {ENV_VAR}: {exc}") from None
    return "auto", "default"


# --------------------------------------------------------------------------
# Seeing what ran.


@dataclass(frozen=True)
class Decision:
    """What the dispatcher did with one call.

    ``implementation`` is a kernel name or ``"generic"``; ``declined`` pairs
    every kernel that was considered but did not run with its reason.
    """

    op: str
    backend: str | None
    choice: str
    source: str
    implementation: str
    declined: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        why = "; ".join(f"{name}: {reason}" for name, reason in self.declined) or "none declined"
        return (f"{self.op} on {self.backend or 'unknown backend'} ran {self.implementation} "
                f"(choice {self.choice!r} from {self.source}; {why})")


@dataclass
class Trace:
    """The decisions of the calls made inside a :func:`trace` block, in order."""

    records: list[Decision] = field(default_factory=list)

    @property
    def implementations(self) -> list[str]:
        return [record.implementation for record in self.records]

    def __str__(self) -> str:
        return "\n".join(map(str, self.records))


_TRACES: contextvars.ContextVar[tuple[Trace, ...]] = contextvars.ContextVar("lse_dispatch_traces", default=())


@_compile_time_constant
def _observed() -> bool:
    """Whether a decision is recorded: a :func:`trace` block or debug logging."""
    return bool(_TRACES.get()) or logger.isEnabledFor(logging.DEBUG)


@_compile_time_constant
def _record(op, backend, choice, source, implementation, declined) -> None:
    decision = Decision(op=op, backend=backend, choice=choice, source=source,
                        implementation=implementation, declined=declined)
    for recorder in _TRACES.get():
        recorder.records.append(decision)
    logger.debug("%s", decision)


@contextlib.contextmanager
def trace() -> Iterator[Trace]:
    """Record, for every call in the block, which implementation ran and why.

    Context-local like :func:`use`; nested blocks each see the calls made
    inside them.
    """
    recorder = Trace()
    token = _TRACES.set(_TRACES.get() + (recorder,))
    try:
        yield recorder
    finally:
        _TRACES.reset(token)


# --------------------------------------------------------------------------
# Dispatch.


def _candidates(pairs: tuple, choice: str) -> tuple[list, list[tuple[str, str]]]:
    """Kernels to try for ``choice`` (in priority order), and the ones ruled out by it."""
    if choice == "auto":
        return [kernel for _, kernel in pairs], []
    keep = [kernel for owner, kernel in pairs if choice in (owner, kernel.name)]
    reason = "generic chosen" if choice == "generic" else f"not chosen ({choice!r})"
    return keep, [(kernel.name, reason) for _, kernel in pairs if kernel not in keep]


def run_without(call: Call, excluded: str, *, builtin_only: bool = False) -> Any:
    """The first kernel other than ``excluded`` that takes ``call``, else generic.

    For wrapping kernels (the derivative rules), whose forward is whatever
    would run without them; ``builtin_only`` skips plugins (the fallback of a
    failed plugin kernel, which must not land on another plugin's).
    """
    if builtin_only:
        chosen = _first_taker(call, excluded, {spec.name for spec in _PLUGINS or ()})
        pending = ()
    else:
        key = _decision_key(call)
        chosen, pending = _scan(call, excluded) if key is None else _decided(call, (key, excluded), excluded)
    return _run_chosen(call, chosen, pending)


def _lane_without(call: Call, excluded: str, shape: tuple):
    """``_kernel.lane_without``: the lane of the kernel :func:`run_without` takes
    ``call`` with, or ``None`` (none, a provisional decline, the generic code)."""
    chosen, pending = _scan(call, excluded)
    if chosen is None or pending or chosen.lane is None:
        return None
    return chosen.lane(call, shape)


# --------------------------------------------------------------------------
# Decisions reused per call signature.

#: (op, type, dtype, shape, axes, return_sign, from_scalar, the backend's
#: decision key) -> the kernel ``auto`` chose, or ``None`` for the generic
#: implementation; first in, first out.
_DECIDED: dict = {}
_DECIDED_SIZE = 1024
_UNDECIDED = object()


def _forget_decisions() -> None:
    _DECIDED.clear()
    _LANES.clear()


def _decision_key(call: Call):
    """The signature under which ``auto``'s choice for ``call`` is reused, or ``None``.

    Only calls without ``b`` and ``where`` whose array type has one backend,
    which declares a ``decision_key`` (NumPy arrays, torch CPU tensors):
    the backend's key holds what its kernels' ``declines`` read besides the
    fields here.  A plugin for the same type, or one without a key, turns
    reuse off for that type.
    """
    if call.b is not None or call.where is not None:
        return None
    a = call.a
    specs = backends_for(a)
    if len(specs) != 1 or specs[0].decision_key is None:
        return None
    part = specs[0].decision_key(call)
    if part is None:
        return None
    return (call.op, type(a), a.dtype, call.shape, call.axes, call.return_sign, call.from_scalar, part)


def _first_taker(call: Call, excluded: str | None = None, owners: set | frozenset = frozenset()):
    """The first kernel of ``call``'s array that takes it, other than ``excluded`` and
    the kernels of ``owners``; ``None`` for the generic implementation."""
    return _scan(call, excluded, owners)[0]


def _scan(call: Call, excluded: str | None, owners: set | frozenset = frozenset()):
    """``(first taker, pending)``: ``pending`` holds the provisional declines
    (:class:`~lse_dispatch._kernel.Provisional`) of the kernels before the taker;
    the decision is final where it is empty."""
    pending: tuple = ()
    for owner, kernel in kernels_for(call.a, call.op):
        if owner in owners or kernel.name == excluded:
            continue
        reason = kernel.declines(call)
        if reason is None:
            return kernel, pending
        if isinstance(reason, _kernel.Provisional):
            pending += (reason,)
    return None, pending


def _decided(call: Call, key, excluded: str | None = None):
    """:func:`_scan`, decided once per ``key`` (unless a decline was provisional)."""
    chosen = _DECIDED.get(key, _UNDECIDED)
    if chosen is not _UNDECIDED:
        return chosen, ()
    chosen, pending = _scan(call, excluded)
    if pending:
        return chosen, pending
    _bounded_put(_DECIDED, key, chosen)
    return chosen, ()


def _bounded_put(table: dict, key, value) -> None:
    """``table[key] = value``, first dropping the oldest entry of a full table (first in, first out)."""
    if len(table) >= _DECIDED_SIZE:
        try:  # another thread may be evicting the same entry
            table.pop(next(iter(table)), None)
        except (RuntimeError, StopIteration):
            pass
    table[key] = value


def _run_chosen(call: Call, chosen, pending: tuple) -> Any:
    """Run ``chosen`` (``None``: the generic implementation); where kernels declined
    provisionally, tell each one the seconds the call took (``Provisional.charge``)."""
    if not pending:
        return GENERIC[call.op](call) if chosen is None else chosen.run(call)
    start = time.perf_counter()
    result = GENERIC[call.op](call) if chosen is None else chosen.run(call)
    elapsed = time.perf_counter() - start
    for reason in pending:
        if reason.charge is not None:
            reason.charge(elapsed)
    return result


def run(call: Call, backend: str | None = None, lane=None) -> Any:
    """Run ``call`` with the implementation the user's choice selects.

    ``lane`` is the key :func:`through_lane` gave for the call, under which
    the kernel ``auto`` chose leaves its lane for the next calls.
    """
    choice, source = _resolve(backend)
    verbose = _observed()
    if choice == "auto" and not verbose:  # the commonest case, without bookkeeping
        key = _decision_key(call)
        chosen, pending = _scan(call, None) if key is None else _decided(call, key)
        if lane is not None and key is not None:
            _learn_lane(lane, call, key, chosen)
        return _run_chosen(call, chosen, pending)
    pairs = kernels_for(call.a, call.op)
    declined: list[tuple[str, str]] = []
    kernels, skipped = _candidates(pairs, choice)
    chosen = None
    for kernel in kernels:
        reason = kernel.declines(call)
        if reason is None:
            chosen = kernel
            break
        if verbose:
            declined.append((kernel.name, reason))
    if verbose:
        _record_run(call, choice, source, chosen, skipped + declined, {kernel.name for kernel in kernels})
    if chosen is None:
        return GENERIC[call.op](call)
    return chosen.run(call)


# --------------------------------------------------------------------------
# Lanes: a call whose signature has been decided, run without preparing it.

#: (op, type, dtype, shape, axis as given, keepdims) -> (the decided call
#: without its array, the backend's decision key function, the key's value
#: for that call, the kernel's lane or ``None``); first in, first out.
_LANES: dict = {}


@_compile_time_constant
def _lanes_off() -> bool:
    """Whether a call must take the full path: a choice other than ``auto`` is in force,
    decisions are being recorded, or torch.compile is tracing (Dynamo calls this once,
    as a constant, instead of tracing the lookup)."""
    if _CHOICE.get() is not None or _observed() or getenv(ENV_VAR):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def through_lane(op: Op, a, axis, keepdims: bool = False) -> tuple[Any, Any]:
    """``(result, None)`` by the lane of ``a``'s call signature, or ``(None, lane key)``.

    For the public functions' calls without ``b``, ``where``, ``return_sign``
    and ``backend=``.  A lane is a kernel's run specialised to a signature
    (:attr:`Kernel.lane`), learned by :func:`run` once ``auto`` has decided
    for it for good; it skips the namespace resolution, validation and
    dtype plan of :func:`lse_dispatch._call.prepare` and the dispatch, which
    are most of a small call's time.  It is taken only under ``auto``, with
    nothing recorded, and where the backend's decision key for ``a`` is the
    one it was learned under.  The key is ``None`` where no lane can be
    learned (an input that is not an array, an unhashable ``axis``, a choice
    in force) or where one is known but declined this input.
    """
    if _lanes_off():
        return None, None
    try:
        key = (op, type(a), a.dtype, a.shape, axis, keepdims)
        found = _LANES.get(key)
    except (AttributeError, TypeError):  # not an array; an axis given as a list
        return None, None
    if found is None:
        return None, key
    learned, decision_key, part, lane = found
    if lane is None:
        return None, None
    call = object.__new__(Call)
    fields = call.__dict__
    fields.update(learned.__dict__)
    fields["a"] = a
    if decision_key(call) != part:
        return None, None
    return lane(a), None


def _learn_lane(lane_key, call: Call, key, chosen) -> None:
    """Store the lane of the kernel ``auto`` chose for good (``None``: it has none)."""
    if key not in _DECIDED or type(call.a) is not lane_key[1] or call.from_scalar or call.return_sign:
        return  # a provisional decision, or a call of the unwrapped or converted input
    lane = None
    if chosen is not None and chosen.lane is not None:
        lane = chosen.lane(call, _lane_shape(call, lane_key[-1]))
    learned = object.__new__(Call)
    learned.__dict__.update(call.__dict__, a=None)  # the lane must not keep the array alive
    _bounded_put(_LANES, lane_key, (learned, backends_for(call.a)[0].decision_key, key[-1], lane))


def _lane_shape(call: Call, keepdims: bool) -> tuple:
    """The shape of the public result: the input's, or logsumexp's reduced one."""
    if call.op != Op.LOGSUMEXP:
        return call.shape
    return tuple(1 if ax in call.axes else n for ax, n in enumerate(call.shape) if keepdims or ax not in call.axes)


def _record_run(call: Call, choice: str, source: str, chosen, declined: list, seen: set) -> None:
    """The trace record of one :func:`run`, with every reason a kernel did not run."""
    specs = backends_for(call.a)
    owners = {spec.name for spec in specs}
    if choice not in ("auto", "generic"):
        if not specs:
            declined.insert(0, (choice, "not a backend of this input"))
        elif choice not in seen and choice not in owners:
            declined.append((choice, "does not apply to this input's backend"))
    declined = [pair for pair in declined if chosen is None or pair[0] != chosen.name]
    _record(call.op, specs[0].name if specs else None, choice, source,
            "generic" if chosen is None else chosen.name, tuple(dict.fromkeys(declined)))


def _run_for_kernels(call: Call, without: str | None) -> Any:
    """What ``_kernel.dispatch`` runs: ``auto`` (the array's own best kernel), minus ``without``."""
    if without is None:
        return run(call, "auto")
    return run_without(call, without)


def _declared_numerics(xp):
    """The numerics a built-in backend declares for namespace ``xp``, or ``None``."""
    from . import backends

    for name in backends.BUILTIN:
        spec = backends.get(name)
        if spec.numerics is not None and spec.module in sys.modules and spec.namespace() is xp:
            return spec.numerics
    return None


_kernel.bind_dispatcher(_run_for_kernels)
_kernel.bind_lane_without(_lane_without)
_kernel.bind_choice(lambda: _resolve(None)[0])
_kernel.bind_forget(_forget_decisions)
_numerics.bind_lookup(_declared_numerics)
