"""The bench plot: one figure, read at a glance.

One panel per backend; each case is a column and each implementation a
colour (the same colour in every panel), each operation a marker shape; the
y axis is time relative to the backend's native function (SciPy for NumPy,
torch's own, jax.nn), so 1 is "as fast as what you use today" and lower is
faster.  Points are not joined: the cases are unrelated shapes.  One legend
for the whole figure.  Quick runs are titled as a smoke test.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot"]

OPS = ("logsumexp", "softmax", "log_softmax")
MARKERS = {"logsumexp": "o", "softmax": "s", "log_softmax": "^"}
NATIVE = {"numpy": "scipy.special", "torch": "torch", "jax": "jax.nn"}
#: One colour per implementation, whatever panel it appears in.
COLOURS = {
    "lse_dispatch": "#1f77b4",
    "bare np.exp": "#7f7f7f",
    "bare max/exp/sum/log": "#2ca02c",
}
NATIVE_COLOUR = "#d62728"
PANEL_TITLES = {"numpy": "NumPy (1 = scipy.special)", "torch": "torch CPU (1 = torch's own)",
                "jax": "JAX inside jax.jit (1 = jax.nn)"}


def _ratios(report, group: str):
    """``{(case, op, implementation): time / native time}`` and the case order."""
    times = {(t.case, t.op, t.implementation): t.median_s for t in report.timings if t.group == group}
    cases = list(dict.fromkeys(t.case for t in report.timings if t.group == group))
    ratios = {}
    for (case, op, name), seconds in times.items():
        native = times.get((case, op, NATIVE[group]))
        if native and name != NATIVE[group]:
            ratios[(case, op, name)] = seconds / native
    return ratios, cases


def _panel(ax, report, group: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ratios, cases = _ratios(report, group)
    offsets = {op: (i - 1) * 0.22 for i, op in enumerate(OPS)}
    for (case, op, name), ratio in ratios.items():
        ax.plot(cases.index(case) + offsets[op], ratio, MARKERS[op], color=COLOURS.get(name, "#9467bd"),
                markersize=7, markeredgecolor="black", markeredgewidth=0.4, linestyle="none")
    ax.axhline(1.0, color=NATIVE_COLOUR, linewidth=1.2)
    ax.set_yscale("log")
    # At least 0.5x to 2x, so that a panel whose points all lie near 1 still
    # has labelled ticks on both sides of the line.
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, 0.5), max(high, 2.0))
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c.replace(" axis", "\naxis").replace(" fwd+bwd", "\nfwd+bwd") for c in cases], fontsize=7)
    ax.set_xlim(-0.6, len(cases) - 0.4)
    ax.set_title(PANEL_TITLES[group], fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)


def _legend(fig, report) -> None:
    from matplotlib.lines import Line2D

    names = sorted({t.implementation for t in report.timings if t.implementation not in NATIVE.values()},
                   key=lambda n: (n != "lse_dispatch", n))
    handles = [Line2D([], [], marker="o", linestyle="none", color=COLOURS.get(n, "#9467bd"), label=n) for n in names]
    handles.append(Line2D([], [], color=NATIVE_COLOUR, label="native function (= 1)"))
    handles += [Line2D([], [], marker=MARKERS[op], linestyle="none", color="white", markeredgecolor="black",
                       label=op) for op in OPS]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)


def plot(report, path: Path) -> bool:
    """Draw ``report`` into ``path``; ``False`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = [g for g in NATIVE if any(t.group == g for t in report.timings)]
    # One row per backend, all as wide as the one with the most cases.
    columns = max(len({t.case for t in report.timings if t.group == g}) for g in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(8.0, 1.25 * columns + 2), 3.3 * len(groups) + 1.2),
                             squeeze=False)
    for row, group in zip(axes, groups):
        _panel(row[0], report, group)
        row[0].set_ylabel("time / native")
    title = ("lse-dispatch bench: median time relative to the native function (log scale; below 1 is faster); "
             "float32 unless the case says float64")
    if report.quick:
        title = "QUICK SMOKE TEST: small cases, few repeats; these ratios do not measure the targets"
    machine = ", ".join(f"{k} {v}" for k, v in report.machine.items() if k not in ("python", "XLA_FLAGS"))
    if "XLA_FLAGS" in report.machine:
        machine += f"\nXLA_FLAGS {report.machine['XLA_FLAGS']}"
    fig.suptitle(f"{title}\n{machine}", fontsize=9)
    _legend(fig, report)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
