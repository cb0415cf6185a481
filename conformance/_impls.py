"""Implementations under test: ours, the built-in adapters, or your functions.

An implementation is up to three functions with ``scipy.special``'s
signatures (``logsumexp(a, axis, b, keepdims, return_sign, *, where)``,
``softmax(x, axis, *, where)``, ``log_softmax(x, axis, *, where)``); the
suite runs the checks of the functions given and leaves out the others.
Adapters translate those to a library's own API; where the library has no
equivalent (torch has no ``b``), they raise :class:`Unsupported`, which the
report shows as "unsupported", never as a pass.

An ``--impl`` value (see :func:`load`) is one of::

    ours | scipy | torch | jax | cupy          built-in
    mymod                                      mymod.logsumexp / .softmax / .log_softmax, those it has
    mymod:f,mymod:g,mymod:h                    positional: logsumexp, softmax, log_softmax, in that
    mymod:f                                    order, as many as given (one: logsumexp only)
    softmax=mymod:g,log_softmax=mymod:h        named: any subset, any order

Modules are imported as ``python -m`` would: the current folder first, then
``sys.path``; ``pkg.mod:Class.method`` paths work.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = ["BUILTIN", "SEMIRING_OPS", "Implementation", "NotApplicable", "Unsupported", "load"]

OPS = ("logsumexp", "softmax", "log_softmax")
# The log-semiring functions (family "semiring"), optional beside the three:
# logcumsumexp(x, axis, reverse=False) and logmatmulexp(a, b).
SEMIRING_OPS = ("logcumsumexp", "logmatmulexp")
# Every function an implementation may bring.
ALL_OPS = OPS + SEMIRING_OPS
XFAIL_DIR = Path(__file__).with_name("xfail")


class Unsupported(Exception):
    """The implementation has no way to express this call (reason in the message)."""


class NotApplicable(Exception):
    """The check has nothing to test on this target (not counted in the report)."""


class WrongResult(Exception):
    """The implementation returned something of the wrong kind (message says what)."""


@dataclass(frozen=True)
class Implementation:
    """Three functions under test and what the suite should expect of them.

    Attributes
    ----------
    name
        Label in reports, and the stem of its expected-failures file.
    functions
        ``{"logsumexp": f, "softmax": g, "log_softmax": h}``, or any
        non-empty subset: checks of the missing functions do not run.
    backends
        Backend names whose arrays it accepts; ``None``: any.
    strict
        Hold accuracy to the fixed ulp budget (``cases.ULP_BUDGET``) with no
        conditioning slack: our own contract.
    xfail_file
        TOML file of expected failures, or ``None``.
    """

    name: str
    functions: dict[str, Callable]
    backends: tuple[str, ...] | None = None
    strict: bool = False
    xfail_file: Path | None = None
    description: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the --impl text that loads it again ("" when built in Python)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.functions) - set(ALL_OPS))
        if unknown or not self.functions:
            raise ValueError(f"implementation {self.name!r}: functions must be a non-empty subset of "
                             f"{', '.join(ALL_OPS)}; got {', '.join(unknown) or 'none'}")

    def accepts(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends

    def provides(self, ops) -> bool:
        """Whether it has every function in ``ops``."""
        return all(op in self.functions for op in ops)

    def summary(self) -> dict:
        """What reports record about it."""
        has_xfails = self.xfail_file is not None and self.xfail_file.exists()
        return {"name": self.name, "description": self.description, "strict": self.strict,
                "functions": [op for op in ALL_OPS if op in self.functions],
                "xfail_file": self.xfail_file.name if has_xfails else None, "versions": self.versions}

    def __call__(self, op: str, x, **kwargs):
        """Call ``op`` with the keyword arguments that are not ``None``/default."""
        if op not in self.functions:
            raise NotApplicable(f"{self.name} has no {op}")
        func = self.functions[op]
        given = {k: v for k, v in kwargs.items() if v is not None and v is not False}
        if "axis" in kwargs and kwargs["axis"] is None:
            given["axis"] = None  # axis=None is meaningful (all axes): always pass it
        _require_parameters(func, given)
        return func(x, **given)


def _require_parameters(func, given: dict) -> None:
    """Raise :class:`Unsupported` if ``func`` has no parameter for a given argument."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):  # builtins without a signature: just try
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    missing = [name for name in given if name not in parameters]
    if missing:
        raise Unsupported(f"{getattr(func, '__qualname__', func)} has no parameter {', '.join(missing)}")


# -- ours ----------------------------------------------------------------------


def _ours() -> Implementation:
    import lse_dispatch

    return Implementation(
        "ours",
        {op: getattr(lse_dispatch, op) for op in ALL_OPS},
        strict=True,
        xfail_file=XFAIL_DIR / "ours.toml",
        description="lse_dispatch (this project)",
        versions={"lse_dispatch": lse_dispatch.__version__},
        source="ours",
    )


# -- scipy.special in array-API mode --------------------------------------------


def _scipy() -> Implementation:
    # SciPy reads SCIPY_ARRAY_API once, when it is first imported.
    if "scipy" not in sys.modules:
        os.environ["SCIPY_ARRAY_API"] = "1"
    from scipy._lib import _array_api

    if not _array_api.SCIPY_ARRAY_API:
        raise RuntimeError(
            "scipy was imported before SCIPY_ARRAY_API=1 was set, so it is not in array-API "
            "mode; set SCIPY_ARRAY_API=1 in the environment (the CLI does this itself)"
        )
    import scipy
    import scipy.special as special

    def logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False, *, where=None):
        if where is not None:
            raise Unsupported("scipy.special.logsumexp has no where")
        return special.logsumexp(a, axis=axis, b=b, keepdims=keepdims, return_sign=return_sign)

    def softmax(x, axis=None, *, where=None):
        if where is not None:
            raise Unsupported("scipy.special.softmax has no where")
        return special.softmax(x, axis=axis)

    def log_softmax(x, axis=None, *, where=None):
        if where is not None:
            raise Unsupported("scipy.special.log_softmax has no where")
        return special.log_softmax(x, axis=axis)

    def accumulate(x, axis, reverse=False):
        import numpy as np

        if not isinstance(x, np.ndarray):
            raise Unsupported("np.logaddexp.accumulate takes NumPy arrays only")
        if reverse:
            return np.flip(np.logaddexp.accumulate(np.flip(x, axis), axis=axis), axis)
        return np.logaddexp.accumulate(x, axis=axis)

    def broadcast_sum(a, b):  # the idiom: n k m entries
        return special.logsumexp(a[..., :, :, None] + b[..., None, :, :], axis=-2)

    return Implementation(
        "scipy",
        {"logsumexp": logsumexp, "softmax": softmax, "log_softmax": log_softmax,
         "logcumsumexp": accumulate, "logmatmulexp": broadcast_sum},
        xfail_file=XFAIL_DIR / "scipy.toml",
        source="scipy",
        description="scipy.special with SCIPY_ARRAY_API=1",
        versions={"scipy": scipy.__version__},
    )


# -- torch ------------------------------------------------------------------------


def _torch() -> Implementation:
    import torch

    def logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False, *, where=None):
        for name, value in (("b", b), ("where", where), ("return_sign", return_sign or None)):
            if value is not None:
                raise Unsupported(f"torch.logsumexp has no {name}")
        dim = tuple(range(a.ndim)) if axis is None else axis
        return torch.logsumexp(a, dim=dim, keepdim=keepdims)

    def _normalizer(function, label):
        def normalize(x, axis=None, *, where=None):
            if where is not None:
                raise Unsupported(f"torch.{label} has no where")
            if axis is None:  # torch needs a dim: normalise over the flattened input
                return function(x.reshape(-1), dim=0).reshape(x.shape)
            if isinstance(axis, tuple):
                raise Unsupported(f"torch.{label} takes a single int dim, not a tuple")
            return function(x, dim=axis)

        return normalize

    def logcumsumexp(x, axis, reverse=False):
        if reverse:
            return torch.flip(torch.logcumsumexp(torch.flip(x, (axis,)), dim=axis), (axis,))
        return torch.logcumsumexp(x, dim=axis)

    def scaled_idiom(a, b):  # the "scaled exp then matmul" form Pyro and others keep privately
        a_max = a.max(dim=-1, keepdim=True).values
        b_max = b.max(dim=-2, keepdim=True).values
        return torch.log(torch.exp(a - a_max) @ torch.exp(b - b_max)) + a_max + b_max

    return Implementation(
        "torch",
        {
            "logsumexp": logsumexp,
            "softmax": _normalizer(torch.softmax, "softmax"),
            "log_softmax": _normalizer(torch.log_softmax, "log_softmax"),
            "logcumsumexp": logcumsumexp,
            "logmatmulexp": scaled_idiom,
        },
        backends=("torch",),
        xfail_file=XFAIL_DIR / "torch.toml",
        source="torch",
        description="torch.logsumexp / torch.softmax / torch.log_softmax",
        versions={"torch": torch.__version__},
    )


# -- jax ----------------------------------------------------------------------------


def _jax() -> Implementation:
    import jax
    import jax.nn as nn

    def logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False, *, where=None):
        return nn.logsumexp(a, axis=axis, b=b, keepdims=keepdims, return_sign=return_sign, where=where)

    def softmax(x, axis=None, *, where=None):
        return nn.softmax(x, axis=axis, where=where)

    def log_softmax(x, axis=None, *, where=None):
        return nn.log_softmax(x, axis=axis, where=where)

    def logcumsumexp(x, axis, reverse=False):  # JAX has no log-space matrix product
        return jax.lax.cumlogsumexp(x, axis=axis % x.ndim, reverse=reverse)

    return Implementation(
        "jax",
        {"logsumexp": logsumexp, "softmax": softmax, "log_softmax": log_softmax, "logcumsumexp": logcumsumexp},
        backends=("jax",),
        xfail_file=XFAIL_DIR / "jax.toml",
        source="jax",
        description="jax.nn.logsumexp / softmax / log_softmax",
        versions={"jax": jax.__version__},
    )


# -- cupy -----------------------------------------------------------------------------


def _cupy() -> Implementation:
    import cupy
    import cupyx.scipy.special as special

    def logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False, *, where=None):
        if where is not None:
            raise Unsupported("cupyx.scipy.special.logsumexp has no where")
        return special.logsumexp(a, axis=axis, b=b, keepdims=keepdims, return_sign=return_sign)

    def softmax(x, axis=None, *, where=None):
        if where is not None:
            raise Unsupported("cupyx.scipy.special.softmax has no where")
        return special.softmax(x, axis=axis)

    def log_softmax(x, axis=None, *, where=None):
        if where is not None:
            raise Unsupported("cupyx.scipy.special.log_softmax has no where")
        return special.log_softmax(x, axis=axis)

    return Implementation(
        "cupy",
        {"logsumexp": logsumexp, "softmax": softmax, "log_softmax": log_softmax},
        backends=("cupy",),
        xfail_file=XFAIL_DIR / "cupy.toml",
        source="cupy",
        description="cupyx.scipy.special",
        versions={"cupy": cupy.__version__},
    )


#: Built-in implementations by name.
BUILTIN: dict[str, Callable[[], Implementation]] = {
    "ours": _ours,
    "scipy": _scipy,
    "torch": _torch,
    "jax": _jax,
    "cupy": _cupy,
}


def _import(module_name: str):
    """Import ``module_name`` as ``python -m`` would: the current folder first."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {module_name!r} (looked in {here} and sys.path): {exc}") from None


def _resolve(reference: str) -> Callable:
    module_name, _, attribute = reference.strip().partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{reference!r} is not of the form module:function")
    target = _import(module_name)
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{reference!r}: {getattr(target, '__name__', target)!r} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{reference!r} is a {type(target).__name__}, not a function")
    return target


def parse(spec: str) -> dict[str, str]:
    """``op -> "module:function"`` for an ``--impl`` value (see the module docstring).

    Raises ``ValueError`` with a one-line message on a malformed value.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError("--impl is empty")
    chosen: dict[str, str] = {}
    for position, part in enumerate(parts):
        op, equals, reference = part.rpartition("=")
        if not equals:
            if chosen.keys() - set(OPS[:position]):
                raise ValueError(f"--impl {spec!r}: a positional reference ({part!r}) follows a named one")
            if position >= len(OPS):
                raise ValueError(f"--impl {spec!r}: more than three functions")
            op = OPS[position]
        elif op not in ALL_OPS:
            raise ValueError(f"--impl {spec!r}: {op!r} is not one of {', '.join(ALL_OPS)}")
        if op in chosen:
            raise ValueError(f"--impl {spec!r}: {op} is given twice")
        chosen[op] = reference
    return chosen


def _from_references(spec: str, name: str | None) -> Implementation:
    text = spec.strip()
    if not any(mark in text for mark in ":=,"):  # a module: the functions it has
        module = _import(text)
        functions = {op: getattr(module, op) for op in ALL_OPS if callable(getattr(module, op, None))}
        if not functions:
            raise ValueError(f"--impl {spec!r}: module {text!r} has none of {', '.join(ALL_OPS)}")
        label = text
    else:
        references = parse(text)
        functions = {op: _resolve(reference) for op, reference in references.items()}
        label = next(iter(references.values())).split(":")[0]
    return Implementation(name or label, functions, description=spec, source=text)


def load(spec: str | Implementation, *, name: str | None = None, xfail: str | Path | None = None) -> Implementation:
    """An :class:`Implementation` from a built-in name or references to functions.

    ``spec`` is ``ours``, ``scipy``, ``torch``, ``jax``, ``cupy``, a module
    name, or ``module:function`` references, positional and/or ``op=``
    named (see the module docstring).  Errors are ``ValueError`` with a
    one-line message.
    """
    if isinstance(spec, Implementation):
        impl = spec
    elif spec in BUILTIN:
        impl = BUILTIN[spec]()
    else:
        impl = _from_references(spec, name)
    if name is not None or xfail is not None:
        impl = replace(impl, name=name or impl.name, xfail_file=Path(xfail) if xfail else impl.xfail_file)
    return impl
