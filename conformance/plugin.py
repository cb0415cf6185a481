"""pytest plugin: the conformance suite as test items of another project.

Add it with one line, in ``conftest.py``::

    pytest_plugins = ["lse_dispatch.conformance.plugin"]

(or ``-p lse_dispatch.conformance.plugin`` on the command line / in
``addopts``), then choose what to run::

    pytest --lse-impl mypkg.lse:logsumexp,mypkg.lse:softmax,mypkg.lse:log_softmax \\
           --lse-backends numpy,torch --lse-quick

Nothing is collected unless ``--lse-impl`` (or the ini option
``lse_conformance_impl``) is given.  Each check on each target and dtype is
one item: failures fail, declared expected failures are xfailed, unsupported
calls are skipped with their reason.

SciPy reads ``SCIPY_ARRAY_API`` once, when first imported; the plugin sets
it at configure time, which is early enough unless a ``conftest.py`` or
another plugin imports SciPy first -- then export ``SCIPY_ARRAY_API=1``.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["ConformanceFailure", "ConformanceItem"]


def pytest_addoption(parser) -> None:
    group = parser.getgroup("lse-conformance", "lse-dispatch conformance suite")
    group.addoption("--lse-impl", action="append", default=None,
                    help="implementation: ours, scipy, torch, jax, cupy or mod:lse,mod:softmax,mod:log_softmax")
    group.addoption("--lse-name", default=None, help="label for a --lse-impl triple")
    group.addoption("--lse-xfail", default=None, help="expected-failures TOML file")
    group.addoption("--lse-backends", default=None, help="backend patterns (default $LSE_CONFORMANCE_BACKENDS or all)")
    group.addoption("--lse-device", default=None, help="device patterns (default $LSE_CONFORMANCE_DEVICE)")
    group.addoption("--lse-family", action="append", default=None, help="only this family; repeatable")
    group.addoption("--lse-check", action="append", default=None, help="only check ids matching; repeatable")
    group.addoption("--lse-quick", action="store_true", help="skip slow checks, fewer hypothesis examples")
    parser.addini("lse_conformance_impl", "implementation(s) to run the conformance suite against", type="args")


def _impls(config) -> list[str]:
    return config.getoption("--lse-impl") or config.getini("lse_conformance_impl") or []


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "lse_conformance: an item of the lse-dispatch conformance suite")
    if _impls(config):
        os.environ.setdefault("SCIPY_ARRAY_API", "1")


class ConformanceFailure(Exception):
    """A check failed: the message names the check, the target and the example."""


class ConformanceItem(pytest.Item):
    """One check of one implementation on one target and dtype."""

    def __init__(self, *, impl, xfails, reference, target, check, dtype, max_examples, **kwargs):
        super().__init__(**kwargs)
        self.impl, self.xfails, self.reference = impl, xfails, reference
        self.target, self.check, self.dtype, self.max_examples = target, check, dtype, max_examples
        self.add_marker(pytest.mark.lse_conformance)

    def runtest(self) -> None:
        from ._checks import Context
        from ._impls import NotApplicable
        from ._runner import run_one

        self.target.prepare()
        ctx = Context(self.impl, self.target, self.dtype, reference=self.reference, max_examples=self.max_examples)
        try:
            status, outcome = run_one(self.check, ctx)
        except NotApplicable as exc:
            pytest.skip(f"not applicable: {exc}")
        matched = next((x for x in self.xfails if x.matches(self.check.id, self.target, self.dtype)), None)
        if status == "unsupported":
            pytest.skip(f"unsupported: {outcome.detail}")
        if status == "fail" and matched is not None:
            pytest.xfail(f"{matched.reason} ({outcome.detail[:200]})")
        if status == "fail":
            raise ConformanceFailure(outcome)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, ConformanceFailure):
            outcome = excinfo.value.args[0]
            lines = [f"{self.check.id} [{self.dtype}] on {self.target.label} ({self.impl.name}): {outcome.detail}"]
            if self.check.what:
                lines.append(f"  rule: {self.check.what}")
            for key, value in (outcome.example or {}).items():
                lines.append(f"  {key}: {value}")
            return "\n".join(lines)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return "lse-conformance", None, f"{self.impl.name} {self.target.label} {self.check.id} [{self.dtype}]"


def pytest_collection_modifyitems(session, config, items) -> None:
    impls = _impls(config)
    if not impls:
        return
    from ._checks import registry
    from ._impls import load
    from ._runner import _dtypes_of, _reference, _selected, load_xfails
    from ._targets import discover, select

    quick = config.getoption("--lse-quick")
    chosen = _selected(registry(), config.getoption("--lse-family"), config.getoption("--lse-check"), quick)
    targets = select(config.getoption("--lse-backends"), config.getoption("--lse-device"))
    everything = discover()
    for spec in impls:
        impl = load(spec, name=config.getoption("--lse-name"), xfail=config.getoption("--lse-xfail"))
        xfails = load_xfails(impl.xfail_file)
        reference = _reference(impl, everything)
        for target in targets:
            if not impl.accepts(target.spec.name):
                continue
            for check in chosen:
                if check.backends is not None and target.spec.name not in check.backends:
                    continue
                for dtype in _dtypes_of(check, target, None):
                    items.append(ConformanceItem.from_parent(
                        session,
                        name=f"lse-conformance[{impl.name}|{target.label}|{check.id}|{dtype}]",
                        impl=impl, xfails=xfails,
                        reference=None if reference is None or reference.label == target.label else reference,
                        target=target, check=check, dtype=dtype, max_examples=10 if quick else 25,
                    ))
