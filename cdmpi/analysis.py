"""Post-hoc analysis of metrics files: one summary row per run."""

from __future__ import annotations

import json

import numpy as np

from . import metrics


def summarize(path) -> dict:
    run = metrics.read(path)
    attrs, train = run["attrs"], run["train"]
    if len(train["step"]) == 0:
        final_loss = final_g = min_g = float("nan")
        step = bits_up = bits_down = 0
    else:
        final_loss = float(train["loss"][-1])
        final_g = float(train["grad_norm_sq"][-1])
        min_g = float(np.min(train["grad_norm_sq"]))
        step = int(train["step"][-1])
        bits_up, bits_down = int(train["bits_up"][-1]), int(train["bits_down"][-1])
    return {"file": str(path), "algorithm": attrs.get("algorithm"), "compressor": attrs.get("compressor"),
            "workers": int(attrs.get("n_workers", 0)), "steps": step, "final_loss": final_loss,
            "final_grad_norm_sq": final_g, "min_grad_norm_sq": min_g, "bits_up": bits_up,
            "bits_down": bits_down, "bits_total": bits_up + bits_down}


COLUMNS = [("file", "{}"), ("algorithm", "{}"), ("compressor", "{}"), ("workers", "{}"), ("steps", "{}"),
           ("final_loss", "{:.6g}"), ("final_grad_norm_sq", "{:.4e}"), ("min_grad_norm_sq", "{:.4e}"),
           ("bits_total", "{:.4e}")]


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    cells = [[name for name, _ in columns]]
    for row in rows:
        cells.append([fmt.format(row[name]) for name, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2)
