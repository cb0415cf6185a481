"""Implementations under test: ours, the built-in adapters, or any triple.

An implementation is three functions with ``scipy.special``'s signatures
(``logsumexp(a, axis, b, keepdims, return_sign, *, where)``, ``softmax(x,
axis, *, where)``, ``log_softmax(x, axis, *, where)``).  Adapters translate
those to a library's own API; where the library has no equivalent (torch has
no ``b``), they raise :class:`Unsupported`, which the report shows as
"unsupported", never as a pass.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BUILTIN", "Implementation", "NotApplicable", "Unsupported", "load"]

OPS = ("logsumexp", "softmax", "log_softmax")
XFAIL_DIR = Path(__file__).with_name("xfail")


class Unsupported(Exception):
    """The implementation has no way to express this call (reason in the message)."""


class NotApplicable(Exception):
    """The check has nothing to test on this target (not counted in the report)."""


@dataclass(frozen=True)
class Implementation:
    """Three functions under test and what the suite should expect of them.

    Attributes
    ----------
    name
        Label in reports, and the stem of its expected-failures file.
    functions
        ``{"logsumexp": f, "softmax": g, "log_softmax": h}``.
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

    def accepts(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends

    def __call__(self, op: str, x, **kwargs):
        """Call ``op`` with the keyword arguments that are not ``None``/default."""
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


def _version(module: str) -> str:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:
        return "not installed"


# -- ours ----------------------------------------------------------------------


def _ours() -> Implementation:
    import lse_dispatch

    return Implementation(
        "ours",
        {op: getattr(lse_dispatch, op) for op in OPS},
        strict=True,
        xfail_file=XFAIL_DIR / "ours.toml",
        description="lse_dispatch (this project)",
        versions={"lse_dispatch": lse_dispatch.__version__},
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

    return Implementation(
        "scipy",
        {"logsumexp": logsumexp, "softmax": softmax, "log_softmax": log_softmax},
        xfail_file=XFAIL_DIR / "scipy.toml",
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

    return Implementation(
        "torch",
        {
            "logsumexp": logsumexp,
            "softmax": _normalizer(torch.softmax, "softmax"),
            "log_softmax": _normalizer(torch.log_softmax, "log_softmax"),
        },
        backends=("torch",),
        xfail_file=XFAIL_DIR / "torch.toml",
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

    return Implementation(
        "jax",
        {"logsumexp": logsumexp, "softmax": softmax, "log_softmax": log_softmax},
        backends=("jax",),
        xfail_file=XFAIL_DIR / "jax.toml",
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


def _resolve(reference: str) -> Callable:
    module_name, _, attribute = reference.strip().partition(":")
    if not attribute:
        raise ValueError(f"{reference!r} is not of the form module:function")
    target = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def load(spec: str | Implementation, *, name: str | None = None, xfail: str | Path | None = None) -> Implementation:
    """An :class:`Implementation` from a built-in name or a triple.

    ``spec`` is ``ours``, ``scipy``, ``torch``, ``jax``, ``cupy`` or
    ``module:logsumexp,module:softmax,module:log_softmax``.
    """
    if isinstance(spec, Implementation):
        impl = spec
    elif spec in BUILTIN:
        impl = BUILTIN[spec]()
    else:
        parts = [p for p in spec.split(",") if p.strip()]
        if len(parts) != 3:
            raise ValueError(
                f"--impl must be one of {', '.join(BUILTIN)} or three module:function references "
                f"(logsumexp,softmax,log_softmax), got {spec!r}"
            )
        functions = dict(zip(OPS, map(_resolve, parts)))
        label = name or parts[0].split(":")[0]
        impl = Implementation(label, functions, description=spec)
    if name is not None or xfail is not None:
        from dataclasses import replace

        impl = replace(impl, name=name or impl.name, xfail_file=Path(xfail) if xfail else impl.xfail_file)
    return impl
