"""Figures from metrics files: one column per dataset, one row per x axis (the paper's Figure 2 layout).

Each method has its own colour and each step size its own line style, so that twenty curves stay apart;
every label names its lr. matplotlib is imported only here, lazily, with the Agg backend (no display needed).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from . import analysis, metrics
from .errors import CdmpiError

X_AXES = {"bits": "bits communicated (up + down, all workers)", "step": "iteration"}
# What a column is, for axis labels; the objective's name is added where the run says it.
QUANTITIES = {"grad_norm_sq": "‖∇f(x_t)‖²", "loss": "f(x_t)", "grad_norm_sq_all_rows": "‖∇f(x_t)‖², (7.1)",
              "loss_all_rows": "f(x_t), (7.1)", "accuracy": "test accuracy", "wall_time": "wall time (s)"}

# One colour per method in every figure cdmpi draws (plot, results/digits, results/network): a method keeps
# its colour from figure to figure; CD-Adam's sharded topology has a colour of its own, the other methods'
# a darker shade of theirs.
METHOD_COLOURS = {
    ("cdadam", "star"): "#d62728", ("cdadam", "sharded"): "#e377c2",
    ("amsgrad", "star"): "#1f77b4", ("amsgrad", "sharded"): "#124a73", ("amsgrad", "allreduce"): "#6a3d9a",
    ("amsgrad-ef", "star"): "#2ca02c", ("amsgrad-ef", "sharded"): "#1b641b",
    ("amsgrad-naive", "star"): "#7f7f7f", ("amsgrad-naive", "sharded"): "#4d4d4d",
    ("ef21", "star"): "#8c564b", ("ef21", "sharded"): "#5a372f",
    ("onebit-adam", "star"): "#ff7f0e", ("onebit-adam", "sharded"): "#a65309",
}
OTHER_COLOURS = ["#17becf", "#bcbd22", "#9467bd", "#393b79", "#637939", "#843c39"]


def method_colour(algorithm: str, topology: str = "star") -> str:
    """The colour of a method (an algorithm on a topology), the same in every figure."""
    known = METHOD_COLOURS.get((algorithm, topology)) or METHOD_COLOURS.get((algorithm, "star"))
    if known:
        return known
    return OTHER_COLOURS[sum(map(ord, f"{algorithm}/{topology}")) % len(OTHER_COLOURS)]  # stable across runs


def quantity(column: str, problem: str | None = None) -> str:
    """The y axis label of a column: what it is, and of which objective."""
    name = QUANTITIES.get(column, column)
    objective = (problem or "").split(":")[0].split(",")[0].strip()
    if len(objective) > 28:  # a formula (the quadratic's): its name is enough
        objective = objective.split()[0]
    return f"{name} ({column}){', ' + objective if objective and column != 'wall_time' else ''}"
LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)), (0, (1, 3))]


def _x(train: dict, axis: str) -> np.ndarray:
    return train["bits_up"] + train["bits_down"] if axis == "bits" else train["step"]


def panel_grid(xs, datasets, methods, by_method: bool) -> dict[tuple, tuple[int, int]]:
    """(x axis, dataset, method or None) -> (row, column) of its panel: a row per x axis and a column per
    dataset, or (by_method) a row per method and a column per dataset and x axis, so that each panel holds
    one method's step sizes."""
    if not by_method:
        return {(axis, dataset, None): (r, c) for r, axis in enumerate(xs) for c, dataset in enumerate(datasets)}
    return {(axis, dataset, method): (r, c * len(xs) + a) for r, method in enumerate(methods)
            for c, dataset in enumerate(datasets) for a, axis in enumerate(xs)}


def figure(files, *, xs=("bits", "step"), y="grad_norm_sq", out: str | Path, best_only=False,
           title: str | None = None, warn=None, by_method: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for axis in xs:
        if axis not in X_AXES:
            raise CdmpiError(f"--x must be one of {', '.join(X_AXES)}, got {axis!r}")
    rows = [analysis.summarize(path) for path in files]
    if best_only:
        for warning in analysis.best_warnings(rows) if warn else ():
            warn(warning)
        rows = analysis.best(rows, analysis.best_by_default(y))
    if not rows:
        raise CdmpiError("nothing to plot")
    datasets = list(dict.fromkeys(str(r["dataset"]) for r in rows))
    problems = {str(r["dataset"]): r.get("problem") for r in rows}
    titles = {"None": ", ".join(sorted({str(r.get("problem") or "your own loop") for r in rows
                                        if str(r["dataset"]) == "None"}))}
    methods = list(dict.fromkeys(_method(r) for r in rows))
    lrs = sorted({r["lr"] for r in rows if r["lr"] is not None})
    colors = {_method(r): method_colour(r["algorithm"], r.get("topology", "star")) for r in rows}
    # Two runs of one method, dataset and lr (a run in process and under MPI, a rerun): their file names
    # tell the curves apart in the legend.
    seen = Counter((str(r["dataset"]), _method(r), r["lr"]) for r in rows)
    # With the best step size only, one method's lr differs between datasets: there, a style per method.
    styles = ({method: LINESTYLES[i % len(LINESTYLES)] for i, method in enumerate(methods)} if best_only else
              {lr: LINESTYLES[i % len(LINESTYLES)] for i, lr in enumerate(lrs)})
    panels = panel_grid(xs, datasets, methods, by_method)
    rows_n, columns_n = (max(r for r, _ in panels.values()) + 1, max(c for _, c in panels.values()) + 1)
    fig, axes = plt.subplots(rows_n, columns_n, figsize=(4.2 * columns_n, 3.4 * rows_n), squeeze=False)
    for row in sorted(rows, key=lambda r: (methods.index(_method(r)), r["lr"] or 0.0)):
        train = analysis.rows_with(metrics.read(row["file"]), row["file"], y)  # /train, else /eval
        column = datasets.index(str(row["dataset"]))
        style = styles[_method(row)] if best_only else styles.get(row["lr"], "-")
        label = f"{_method(row)}" + (f" lr={row['lr']:g}" if row["lr"] is not None else "")
        if seen[(str(row["dataset"]), _method(row), row["lr"])] > 1:
            label += f" [{Path(row['file']).name}]"
        for axis in xs:
            r, c = panels[(axis, datasets[column], _method(row) if by_method else None)]
            x, values = _x(train, axis), train[y]
            keep = np.isfinite(values) & ((x > 0) if axis == "bits" else True)  # a log axis masks values <= 0
            axes[r][c].plot(x[keep], values[keep], color=colors[_method(row)], linestyle=style,
                            label=label, linewidth=1.3)
    for (axis, dataset, method), (r, c) in panels.items():
        ax = axes[r][c]
        # a loss between 0.3 and 0.7 reads better on a linear axis, and an accuracy always does
        if _spans_a_decade(ax) and y not in analysis.HIGHER_IS_BETTER:
            _log_axis(ax, "y")
        if axis == "bits":
            _log_axis(ax, "x")
        ax.set_xlabel(X_AXES[axis])
        # the objective in the first column's label; the other columns' titles name their datasets
        ax.set_ylabel(quantity(y, problems.get(dataset) if c == 0 and not by_method else None))
        ax.set_title((dataset if dataset != "None" else titles.get(dataset, "your own loop"))
                     + (f": {method}" if method else ""), fontsize=10 if method else None)
        ax.grid(True, which="major", alpha=0.3)
    if by_method:  # each row one method: its step sizes in a legend beside the row's last panel
        for r in range(rows_n):
            axes[r][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    elif best_only:  # each dataset its own best step sizes: a legend under each column
        for c in range(len(datasets)):
            ax = axes[-1][c]
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1, fontsize=8, frameon=False)
    else:  # one legend right of the figure: every run's method and lr
        handles, names = [], []
        for ax in axes.flat:
            for handle, name in zip(*ax.get_legend_handles_labels()):
                if name not in names:
                    handles.append(handle)
                    names.append(name)
        fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
                   ncol=1 if len(names) <= 12 * len(xs) else 2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")  # tight: the legends outside the axes are kept whole
    plt.close(fig)
    return out


def _spans_a_decade(ax) -> bool:
    values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [[]])
    values = values[values > 0]
    return values.size > 0 and values.max() >= 10 * values.min()


def _log_axis(ax, which: str) -> None:
    """A log axis labelled at whole decades only, spanning at least one decade, so that matplotlib never
    falls back to labelling minor ticks (6.92x10^-1)."""
    import matplotlib.ticker as ticker

    getattr(ax, f"set_{which}scale")("log", nonpositive="mask")
    axis = getattr(ax, f"{which}axis")
    low, high = getattr(ax, f"get_{which}lim")()
    if low > 0 and high > 0 and math.log10(high) - math.log10(low) < 1.0:
        middle = math.sqrt(low * high)
        getattr(ax, f"set_{which}lim")(middle / 10 ** 0.5, middle * 10 ** 0.5)
    axis.set_major_locator(ticker.LogLocator(base=10, numticks=8))
    axis.set_major_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=True))
    axis.set_minor_locator(ticker.LogLocator(base=10, subs=np.arange(2, 10), numticks=12))
    axis.set_minor_formatter(ticker.NullFormatter())


def _method(row: dict) -> str:
    sharded = ", sharded" if row.get("topology", "star") == "sharded" else ""
    return f"{row['algorithm']} ({row['compressor']}{sharded})"
