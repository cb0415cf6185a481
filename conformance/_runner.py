"""Running checks: implementations x targets x checks x dtypes -> records."""

from __future__ import annotations

import fnmatch
import platform
import shlex
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from ._checks import FAMILIES, Check, Context, Outcome
from ._impls import Implementation, NotApplicable, Unsupported, WrongResult, load
from ._registry import registry
from ._targets import Target, discover, select

__all__ = ["ExpectedFailure", "Record", "Result", "load_xfails", "rerun_command", "run"]

#: Distributions whose versions every report records.
DISTRIBUTIONS = ("lse-dispatch", "numpy", "scipy", "torch", "jax", "jaxlib", "dask", "array-api-strict",
                 "array-api-compat", "cupy-cuda12x", "mpmath", "hypothesis", "ml-dtypes")


@dataclass(frozen=True)
class ExpectedFailure:
    """One entry of an expected-failures file: patterns and the reason."""

    check: str
    reason: str
    backend: str = "*"
    dtype: str = "*"

    def matches(self, check_id: str, target: Target, dtype: str) -> bool:
        return (
            fnmatch.fnmatchcase(check_id, self.check)
            and (fnmatch.fnmatchcase(target.label, self.backend) or fnmatch.fnmatchcase(target.spec.name, self.backend))
            and fnmatch.fnmatchcase(dtype, self.dtype)
        )


def load_xfails(path: str | Path | None) -> list[ExpectedFailure]:
    """Entries of a TOML file of ``[[xfail]]`` tables (``check``, ``backend``,
    ``dtype``, ``reason``); a missing file declares none."""
    if path is None or not Path(path).exists():
        return []
    import tomllib

    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    entries = []
    for number, entry in enumerate(data.get("xfail", []), 1):
        if "check" not in entry or not str(entry.get("reason", "")).strip():
            raise ValueError(f"{path}: xfail entry {number} needs 'check' and a non-empty 'reason'")
        entries.append(ExpectedFailure(entry["check"], entry["reason"], entry.get("backend", "*"), entry.get("dtype", "*")))
    return entries


@dataclass
class Record:
    """The outcome of one check, for one implementation, target and dtype."""

    impl: str
    target: str
    family: str
    check: str
    dtype: str
    status: str
    detail: str = ""
    example: dict | None = None
    reason: str = ""
    seconds: float = 0.0
    rerun: str = ""  # a command that runs exactly this check again


@dataclass
class Result:
    """Everything a run produced; render it with :mod:`._report`."""

    records: list[Record]
    implementations: list[dict]
    targets: dict[str, list[str]]
    skipped_targets: dict[str, list[str]]
    versions: dict[str, str]
    config: dict
    seconds: float = 0.0
    families: tuple[str, ...] = FAMILIES

    @property
    def ok(self) -> bool:
        """No unexpected failure (xfail, xpass and unsupported are not failures)."""
        return not any(r.status == "fail" for r in self.records)

    def counts(self) -> dict[tuple[str, str, str], Counter]:
        """``(impl, target, family) -> Counter(status)``."""
        table: dict[tuple[str, str, str], Counter] = {}
        for r in self.records:
            table.setdefault((r.impl, r.target, r.family), Counter())[r.status] += 1
        return table

    def totals(self) -> Counter:
        return Counter(r.status for r in self.records)

    def failures(self, statuses: Iterable[str] = ("fail",)) -> list[Record]:
        statuses = tuple(statuses)
        return [r for r in self.records if r.status in statuses]

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "totals": dict(self.totals()),
            "seconds": round(self.seconds, 2),
            "config": self.config,
            "versions": self.versions,
            "implementations": self.implementations,
            "targets": self.targets,
            "skipped_targets": self.skipped_targets,
            "matrix": [
                {"impl": i, "target": t, "family": f, **dict(c)} for (i, t, f), c in self.counts().items()
            ],
            "records": [asdict(r) for r in self.records],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        from ._report import to_json

        return to_json(self, path)

    def to_markdown(self, path: str | Path | None = None) -> str:
        from ._report import to_markdown

        return to_markdown(self, path)


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version(), "platform": platform.platform()}
    for name in DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _reference(impl: Implementation, everything: list[Target]) -> Target | None:
    for target in everything:
        if impl.accepts(target.spec.name) and not target.readonly:
            return target
    return None


def _dtypes_of(check: Check, target: Target, wanted: tuple[str, ...] | None) -> list[str]:
    if check.dtypes is None:
        widest = "float64" if "float64" in target.dtypes else "float32"
        chosen = [widest]
    else:
        chosen = [d for d in check.dtypes if d in target.dtypes]
    return [d for d in chosen if wanted is None or d in wanted]


def select_checks(families: Iterable[str] | None, patterns: Iterable[str] | None, quick: bool) -> list[Check]:
    """The registered checks of ``families`` whose ids match ``patterns``
    (``None``: all), less the slow ones in quick mode."""
    unknown = sorted(set(families or ()) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                         f"known: {', '.join(FAMILIES)}")
    patterns = tuple(patterns or ())
    return [
        check
        for check in registry()
        if (not families or check.family in families)
        and (not patterns or any(fnmatch.fnmatchcase(check.id, p) for p in patterns))
        and not (quick and check.slow)
    ]


@dataclass(frozen=True)
class Job:
    """One check of one implementation on one target and dtype."""

    impl: Implementation
    xfails: tuple[ExpectedFailure, ...]
    reference: Target | None
    target: Target
    check: Check
    dtype: str
    max_examples: int

    @property
    def id(self) -> str:
        return f"{self.impl.name}|{self.target.label}|{self.check.id}|{self.dtype}"

    def context(self) -> Context:
        return Context(self.impl, self.target, self.dtype, reference=self.reference, max_examples=self.max_examples)

    def expected_failure(self) -> ExpectedFailure | None:
        return next((x for x in self.xfails if x.matches(self.check.id, self.target, self.dtype)), None)


def plan(impls: list[Implementation], targets: list[Target], checks: list[Check], *,
         dtypes: tuple[str, ...] | None = None, max_examples: int = 25) -> tuple[list[Job], dict, dict]:
    """Every job to run, with ``{impl: [target labels run]}`` and
    ``{impl: [target labels it does not take]}``.  Checks of functions an
    implementation does not have are left out."""
    everything = discover()
    jobs: list[Job] = []
    ran: dict[str, list[str]] = {}
    skipped: dict[str, list[str]] = {}
    for impl in impls:
        xfails = tuple(load_xfails(impl.xfail_file))
        reference = _reference(impl, everything)
        for target in targets:
            if not impl.accepts(target.spec.name):
                skipped.setdefault(impl.name, []).append(target.label)
                continue
            ran.setdefault(impl.name, []).append(target.label)
            other = None if reference is None or reference.label == target.label else reference
            jobs += [Job(impl, xfails, other, target, check, dtype, max_examples)
                     for check in checks
                     if impl.provides(check.ops) and (check.backends is None or target.spec.name in check.backends)
                     for dtype in _dtypes_of(check, target, dtypes)]
    return jobs, ran, skipped


def run_one(check: Check, ctx: Context) -> tuple[str, Outcome]:
    """Run a check; ``("unsupported" | "pass" | "fail", outcome)``; NotApplicable propagates."""
    try:
        # Judge values, not warnings: a host project's "warnings as errors"
        # must not turn an implementation's overflow warning into a crash.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = check.run(ctx)
    except NotApplicable:
        raise
    except Unsupported as exc:
        return "unsupported", Outcome(False, str(exc))
    except WrongResult as exc:
        return "fail", Outcome(False, str(exc))
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return "fail", Outcome(False, f"raised {type(exc).__name__}: {str(exc).strip()[:300]} "
                                      f"(at {Path(where.filename).name}:{where.lineno})")
    return ("pass" if outcome.passed else "fail"), outcome


def _execute(job: Job, xfail: str | Path | None) -> Record | None:
    """Run one job; ``None`` when the check does not apply there."""
    began = time.perf_counter()
    with job.target.scope():
        try:
            status, outcome = run_one(job.check, job.context())
        except NotApplicable:
            return None
    reason = ""
    matched = job.expected_failure()
    if matched is not None and status in ("fail", "pass"):
        status, reason = ("xfail" if status == "fail" else "xpass"), matched.reason
    rerun = "" if status == "pass" else rerun_command(job.impl, job.target, job.check, job.dtype, job.max_examples,
                                                      xfail)
    return Record(job.impl.name, job.target.label, job.check.family, job.check.id, job.dtype, status,
                  outcome.detail, outcome.example, reason, round(time.perf_counter() - began, 4), rerun)


def rerun_command(impl: Implementation, target: Target, check: Check, dtype: str, max_examples: int,
                  xfail: str | Path | None = None) -> str:
    """A command that runs exactly this check again (on the command line when
    the implementation came from ``--impl``, else a ``conformance.run`` call)."""
    if not impl.source:
        return (f"lse_dispatch.conformance.run(<{impl.name}>, backends={target.label!r}, checks=[{check.id!r}], "
                f"dtypes=[{dtype!r}], max_examples={max_examples})")
    words = ["lse-dispatch", "conformance", "--impl", impl.source]
    if impl.source not in ("ours", "scipy", "torch", "jax", "cupy") and impl.name != load_label(impl.source):
        words += ["--name", impl.name]
    if xfail is not None:
        words += ["--xfail", str(xfail)]
    words += ["--backends", target.label, "--check", check.id, "--dtype", dtype]
    if check.family == "invariants":
        words += ["--max-examples", str(max_examples)]
    return " ".join(shlex.quote(word) for word in words)


def load_label(source: str) -> str:
    """The label ``load`` gives an implementation loaded from ``source``."""
    first = source.split(",")[0].split("=")[-1]
    return first.split(":")[0]


def run(
    impl: str | Implementation | Iterable[str | Implementation] = "ours",
    *,
    backends: str | list[str] | None = None,
    device: str | None = None,
    families: Iterable[str] | None = None,
    checks: Iterable[str] | None = None,
    dtypes: Iterable[str] | None = None,
    quick: bool = False,
    max_examples: int | None = None,
    xfail: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
) -> Result:
    """Run the conformance suite and return a :class:`Result`.

    Parameters
    ----------
    impl
        ``"ours"``, ``"scipy"``, ``"torch"``, ``"jax"``, ``"cupy"``, a module
        name, ``module:function`` references (positional in the order
        logsumexp, softmax, log_softmax, or ``op=module:function``; any
        subset), an :class:`Implementation`, or a list of those.
    backends, device
        Patterns narrowing the targets (``"numpy,torch:cpu"``); ``None``: the
        ``LSE_CONFORMANCE_BACKENDS`` / ``LSE_CONFORMANCE_DEVICE`` variables.
    families, checks, dtypes
        Narrow to these families, check-id patterns and dtypes.
    quick
        Leave out the slow checks (2**20-entry reductions) and run 10
        hypothesis examples per invariant instead of 25.
    xfail
        Expected-failures file overriding the implementation's own.
    progress
        Called with a dict after each check (see ``cli.py``).
    """
    started = time.perf_counter()
    impls = [impl] if isinstance(impl, (str, Implementation)) else list(impl)
    impls = [load(i, xfail=xfail) if xfail is not None else load(i) for i in impls]
    families = tuple(families) if families else None
    wanted_dtypes = tuple(dtypes) if dtypes else None
    chosen = select_checks(families, checks, quick)
    examples = max_examples if max_examples is not None else (10 if quick else 25)
    jobs, ran, skipped = plan(impls, select(backends, device), chosen, dtypes=wanted_dtypes, max_examples=examples)
    records: list[Record] = []
    for done, job in enumerate(jobs, 1):
        records.append(_execute(job, xfail))
        if progress is not None:
            progress({"done": done, "total": len(jobs), "job": job, "record": records[-1]})
    records = [record for record in records if record is not None]  # None: not applicable there
    return Result(
        records=records,
        implementations=[i.summary() for i in impls],
        targets=ran,
        skipped_targets=skipped,
        versions=versions(),
        config={"backends": backends, "device": device, "families": list(families) if families else None,
                "checks": list(checks) if checks else None, "dtypes": list(wanted_dtypes) if wanted_dtypes else None,
                "quick": quick, "max_examples": examples},
        seconds=time.perf_counter() - started,
    )
