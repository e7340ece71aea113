"""Figures from metrics files: one column per dataset, one row per x axis (the paper's Figure 2 layout).

matplotlib is imported only here, lazily, with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import analysis, metrics
from .errors import CdmpiError

X_AXES = {"bits": "bits communicated (up + down, all workers)", "step": "iteration"}


def _x(train: dict, axis: str) -> np.ndarray:
    return train["bits_up"] + train["bits_down"] if axis == "bits" else train["step"]


def figure(files, *, xs=("bits", "step"), y="grad_norm_sq", out: str | Path, best_only=False,
           title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for axis in xs:
        if axis not in X_AXES:
            raise CdmpiError(f"--x must be one of {', '.join(X_AXES)}, got {axis!r}")
    rows = [analysis.summarize(path) for path in files]
    if best_only:
        rows = analysis.best(rows)
    if not rows:
        raise CdmpiError("nothing to plot")
    datasets = list(dict.fromkeys(str(r["dataset"]) for r in rows))
    labels = list(dict.fromkeys(_label(r, best_only) for r in rows))
    colors = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}
    fig, axes = plt.subplots(len(xs), len(datasets), figsize=(4.2 * len(datasets), 3.4 * len(xs)),
                             squeeze=False)
    for row in rows:
        train = metrics.read(row["file"])["train"]
        if y not in train:
            raise CdmpiError(f"{row['file']} has no column {y!r}; it has {', '.join(sorted(train))}")
        column = datasets.index(str(row["dataset"]))
        for r, axis in enumerate(xs):
            x, values = _x(train, axis), train[y]
            keep = (values > 0) & ((x > 0) if axis == "bits" else True)
            label = _label(row, best_only)
            axes[r][column].plot(x[keep], values[keep], color=colors[label], label=label, linewidth=1.3)
    for r, axis in enumerate(xs):
        for c, dataset in enumerate(datasets):
            ax = axes[r][c]
            ax.set_yscale("log")
            if axis == "bits":
                ax.set_xscale("log")
            ax.set_xlabel(X_AXES[axis])
            ax.set_ylabel(y)
            ax.set_title(dataset)
            ax.grid(True, which="major", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # collect every label once, whichever panel drew it
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), frameon=False)
    if title:
        fig.suptitle(title)
    rows_of_legend = (len(names) + 3) // 4
    fig.tight_layout(rect=(0, 0.05 * rows_of_legend + 0.02, 1, 0.96 if title else 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _label(row: dict, best_only: bool) -> str:
    sharded = ", sharded" if row.get("topology", "star") == "sharded" else ""  # star labels stay as they were
    text = f"{row['algorithm']} ({row['compressor']}{sharded})"
    return text + ("" if best_only else f" lr={row['lr']:g}")
