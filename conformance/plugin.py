"""pytest plugin: the conformance suite as test items of another project.

Add it with one line, in ``conftest.py``::

    pytest_plugins = ["lse_dispatch.conformance.plugin"]

(or ``-p lse_dispatch.conformance.plugin`` on the command line / in
``addopts``), then choose what to run::

    pytest --lse-impl mypkg.lse:logsumexp,mypkg.lse:softmax,mypkg.lse:log_softmax \\
           --lse-backends numpy,torch --lse-quick

``--lse-impl`` takes what ``lse-dispatch conformance --impl`` takes (a module,
positional or ``op=`` named references: any subset of the three functions).
Nothing is collected unless ``--lse-impl`` (or the ini option
``lse_conformance_impl``) is given.  Each check on each target and dtype is
one item: failures fail (with a command that re-runs exactly that item),
declared expected failures are xfailed, unsupported calls are skipped with
their reason.  A mistake in the options (an unknown backend, module or
function) stops the run with a one-line usage error.

SciPy reads ``SCIPY_ARRAY_API`` once, when first imported; the plugin sets
it at configure time, which is early enough unless a ``conftest.py`` or
another plugin imports SciPy first -- then export ``SCIPY_ARRAY_API=1``.
"""

from __future__ import annotations

import os
import shlex

import pytest

__all__ = ["ConformanceFailure", "ConformanceItem"]

_JOBS = pytest.StashKey[list]()


def pytest_addoption(parser) -> None:
    group = parser.getgroup("lse-conformance", "lse-dispatch conformance suite")
    group.addoption("--lse-impl", action="append", default=None,
                    help="implementation: ours, scipy, torch, jax, cupy, a module, or module:function references "
                         "(positional logsumexp,softmax,log_softmax or op=module:function)")
    group.addoption("--lse-name", default=None, help="label for your --lse-impl")
    group.addoption("--lse-xfail", default=None, help="expected-failures TOML file")
    group.addoption("--lse-backends", default=None, help="backend patterns (default $LSE_CONFORMANCE_BACKENDS or all)")
    group.addoption("--lse-device", default=None, help="device patterns (default $LSE_CONFORMANCE_DEVICE)")
    group.addoption("--lse-family", action="append", default=None, help="only this family; repeatable")
    group.addoption("--lse-check", action="append", default=None, help="only check ids matching; repeatable")
    group.addoption("--lse-dtype", action="append", default=None, help="only this dtype; repeatable")
    group.addoption("--lse-quick", action="store_true", help="skip slow checks, fewer hypothesis examples")
    group.addoption("--lse-max-examples", type=int, default=None, help="hypothesis examples per invariant check")
    parser.addini("lse_conformance_impl", "implementation(s) to run the conformance suite against", type="args")


def _impls(config) -> list[str]:
    return config.getoption("--lse-impl") or config.getini("lse_conformance_impl") or []


def _plan(config) -> list:
    """The jobs the options ask for; ``pytest.UsageError`` (one line) on a mistake."""
    from ._impls import load
    from ._runner import plan, select_checks
    from ._targets import select

    quick = config.getoption("--lse-quick")
    examples = config.getoption("--lse-max-examples") or (10 if quick else 25)
    try:
        impls = [load(spec, name=config.getoption("--lse-name"), xfail=config.getoption("--lse-xfail"))
                 for spec in _impls(config)]
        targets = select(config.getoption("--lse-backends"), config.getoption("--lse-device"))
        checks = select_checks(config.getoption("--lse-family"), config.getoption("--lse-check"), quick)
    except (ValueError, ImportError, RuntimeError) as exc:
        raise pytest.UsageError(f"lse-dispatch conformance plugin: {exc}") from None
    dtypes = tuple(config.getoption("--lse-dtype") or ()) or None
    jobs, _, _ = plan(impls, targets, checks, dtypes=dtypes, max_examples=examples)
    return jobs


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "lse_conformance: an item of the lse-dispatch conformance suite")
    if _impls(config):
        os.environ.setdefault("SCIPY_ARRAY_API", "1")
        config.stash[_JOBS] = _plan(config)


class ConformanceFailure(Exception):
    """A check failed: the message names the check, the target and the example."""


def rerun_command(job, config) -> str:
    """A pytest command that runs exactly this item again."""
    words = ["python", "-m", "pytest", "-p", "lse_dispatch.conformance.plugin", "--lse-impl", job.impl.source]
    for option in ("--lse-name", "--lse-xfail"):
        if config.getoption(option):
            words += [option, str(config.getoption(option))]
    words += ["--lse-backends", job.target.label, "--lse-check", job.check.id, "--lse-dtype", job.dtype]
    if job.check.family == "invariants":
        words += ["--lse-max-examples", str(job.max_examples)]
    return " ".join(shlex.quote(word) for word in words)


class ConformanceItem(pytest.Item):
    """One check of one implementation on one target and dtype."""

    def __init__(self, *, job, **kwargs):
        super().__init__(**kwargs)
        self.job = job
        self.add_marker(pytest.mark.lse_conformance)

    def runtest(self) -> None:
        from ._impls import NotApplicable
        from ._runner import run_one

        job = self.job
        with job.target.scope():
            try:
                status, outcome = run_one(job.check, job.context())
            except NotApplicable as exc:
                pytest.skip(f"not applicable: {exc}")
        matched = job.expected_failure()
        if status == "unsupported":
            pytest.skip(f"unsupported: {outcome.detail}")
        if status == "fail" and matched is not None:
            pytest.xfail(f"{matched.reason} ({outcome.detail[:200]})")
        if status == "fail":
            raise ConformanceFailure(outcome)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, ConformanceFailure):
            outcome, job = excinfo.value.args[0], self.job
            lines = [f"{job.check.id} [{job.dtype}] on {job.target.label} ({job.impl.name}): {outcome.detail}"]
            if job.check.what:
                lines.append(f"  rule: {job.check.what}")
            for key, value in (outcome.example or {}).items():
                lines.append(f"  {key}: {value}")
            if job.impl.source:
                lines.append(f"  rerun: {rerun_command(job, self.config)}")
            return "\n".join(lines)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        job = self.job
        return "lse-conformance", None, f"{job.impl.name} {job.target.label} {job.check.id} [{job.dtype}]"


def pytest_collection_modifyitems(session, config, items) -> None:
    for job in config.stash.get(_JOBS, []):
        items.append(ConformanceItem.from_parent(session, name=f"lse-conformance[{job.id}]", job=job))
