"""Post-hoc analysis of metrics files: one summary row per run, best step sizes, steps and bits to a target."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import metrics
from .errors import CdmpiError


def summarize(path, target: tuple[str, str, float] | None = None) -> dict:
    """One row per run; with target = (column, "<=" or ">=", value), also the first step at which the
    column (of /train, else /eval) reaches the value and the bits (up + down) spent until then (None if
    never reached)."""
    run = metrics.read(path)
    attrs, train = run["attrs"], run["train"]
    cfg = attrs.get("config", {})
    if len(train["step"]) == 0:
        final_loss = final_g = min_g = float("nan")
        step = bits_up = bits_down = 0
    else:
        final_loss = float(train["loss"][-1])
        final_g = float(train["grad_norm_sq"][-1])
        g = train["grad_norm_sq"]
        min_g = float(np.nanmin(g)) if np.isfinite(g).any() else float("nan")  # NaN: a skipped fp16 step
        step = int(train["step"][-1])
        bits_up, bits_down = int(train["bits_up"][-1]), int(train["bits_down"][-1])
    final_step = run.get("final", {}).get("steps")  # a user's loop logs row t before step t: rows end at T - 1
    if final_step is not None and final_step[0] >= 0:
        step = int(final_step[0])
    compressor = attrs.get("compressor")
    options = cfg.get("compress", {})
    if options.get("block"):  # compress.block and compress.warmup_steps make another method of the same compressor
        compressor = f"{compressor}/{options['block']}"
    if options.get("warmup_steps"):
        compressor = f"{compressor}+warmup{options['warmup_steps']}"
    accuracy = run.get("eval", {}).get("accuracy")
    test_accuracy = float(accuracy[-1]) if accuracy is not None and len(accuracy) else None
    row = {"file": str(path), "algorithm": attrs.get("algorithm"), "compressor": compressor,
           "topology": attrs.get("topology", "star"),  # files from before the sharded topology are star
           "dataset": cfg.get("data", {}).get("dataset"), "data_sha256": attrs.get("data_sha256"),
           "problem": attrs.get("problem"),
           "lr": cfg.get("optim", {}).get("lr"),
           "workers": int(attrs.get("n_workers", 0)), "steps": step, "final_loss": final_loss,
           "final_grad_norm_sq": final_g, "min_grad_norm_sq": min_g, "test_accuracy": test_accuracy, "bits_up": bits_up,
           "bits_down": bits_down, "bits_total": bits_up + bits_down}
    row["last"] = {f"{group}/{name}": float(values[-1]) for group in ("train", "eval")
                   for name, values in (run.get(group) or {}).items() if len(values) and name != "step"}
    if target is not None:
        column, direction, value = target
        rows = rows_with(run, path, column)
        values = rows[column]
        hit = np.flatnonzero(values <= value if direction == "<=" else values >= value)
        row["target"] = f"{column}{direction}{value:g}"
        row["steps_to_target"] = int(rows["step"][hit[0]]) if len(hit) else None
        row["bits_to_target"] = (int(rows["bits_up"][hit[0]] + rows["bits_down"][hit[0]])
                                 if len(hit) else None)
    return row


def rows_with(run: dict, path, column: str) -> dict:
    """The group (/train first, then /eval) that has the column."""
    for group in ("train", "eval"):
        if column in (run.get(group) or {}):
            return run[group]
    have = sorted({name for group in ("train", "eval") for name in (run.get(group) or {}) if name != "step"})
    raise CdmpiError(f"{path}: no column {column!r} in /train or /eval; it has {', '.join(have)}")


HIGHER_IS_BETTER = ("accuracy", "test_accuracy")  # columns whose best value is the largest


def best_by_default(column: str) -> tuple[str, str] | None:
    """What --best ranks a figure of `column` by: grad_norm_sq as ever, any other column by its own last value
    (the highest accuracy, the lowest loss)."""
    if column == "grad_norm_sq":
        return None
    return column, "max" if column in HIGHER_IS_BETTER else "min"


def best(rows: list[dict], by: tuple[str, str] | None = None) -> list[dict]:
    """Per (dataset, algorithm, compressor, topology): the run with the lowest final grad_norm_sq, or with
    by = (column, "min" or "max") the best last value of that /train or /eval column (NaN and a missing
    value count as worst; ties go to the smaller step size), in the order the groups first appear."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        key = (row["dataset"], row["algorithm"], row["compressor"], row.get("topology", "star"))
        if by is None:
            value = row["final_grad_norm_sq"]
        else:
            column, direction = by
            value = row["last"].get(f"train/{column}", row["last"].get(f"eval/{column}", float("nan")))
            value = -value if direction == "max" else value
        score = (_nan_last(value), row["lr"] if row["lr"] is not None else 0.0)
        if key not in groups or score < groups[key][0]:
            groups[key] = (score, row)
    return [row for _, row in groups.values()]


def best_warnings(rows: list[dict]) -> list[str]:
    """What makes best() compare unlike runs: within one (dataset, algorithm, compressor, topology) group,
    runs of different lengths, worker counts or data files."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["algorithm"], row["compressor"], row.get("topology", "star")),
                          []).append(row)
    warnings = []
    for (dataset, algorithm, compressor, _), group in groups.items():
        for column, what in (("steps", "steps"), ("workers", "workers"), ("data_sha256", "data files (sha256)")):
            values = sorted({str(row.get(column)) for row in group})
            if len(values) > 1:
                where = dataset if dataset is not None else "your own loop"
                warnings.append(f"--best compares {algorithm} ({compressor}) runs on {where} that differ in "
                                f"{what}: {', '.join(values)}")
    return warnings


def _nan_last(value: float) -> float:
    return float("inf") if value != value else value


def expand(paths) -> list[Path]:
    """Metrics files named directly, or every *.h5 inside a named folder (sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.h5"))
            if not found:
                raise CdmpiError(f"no .h5 files in {path}")
            files += found
        else:
            files.append(path)
    return files


def parse_target(text: str) -> tuple[str, str, float]:
    """COLUMN<=VALUE (a ceiling to get under: a loss), COLUMN>=VALUE (a floor to get over: an accuracy), or
    COLUMN=VALUE, which means <=."""
    for op in ("<=", ">=", "="):
        column, sep, value = text.partition(op)
        if sep:
            try:
                return column.strip(), "<=" if op == "=" else op, float(value)
            except ValueError:
                break
    raise CdmpiError(f"--target expects COLUMN<=VALUE or COLUMN>=VALUE, e.g. grad_norm_sq<=1e-4 or "
                     f"accuracy>=0.9; got {text!r}")


def parse_best_by(text: str) -> tuple[str, str]:
    column, _, direction = text.partition(":")
    direction = direction or "min"
    if not column or direction not in ("min", "max"):
        raise CdmpiError(f"--best-by expects COLUMN or COLUMN:max or COLUMN:min, e.g. accuracy:max; got {text!r}")
    return column, direction


COLUMNS = [("file", "{}"), ("algorithm", "{}"), ("compressor", "{}"), ("topology", "{}"), ("workers", "{}"),
           ("lr", "{:g}"), ("steps", "{}"), ("final_loss", "{:.6g}"), ("final_grad_norm_sq", "{:.4e}"), ("min_grad_norm_sq", "{:.4e}"),
           ("test_accuracy", "{:.4f}"), ("bits_total", "{:.4e}")]
BEST_COLUMNS = [("dataset", "{}"), ("algorithm", "{}"), ("compressor", "{}"), ("lr", "{:g}"), ("steps", "{}"),
                ("final_grad_norm_sq", "{:.4e}"), ("bits_total", "{:.4e}"), ("file", "{}")]
TARGET_COLUMNS = [("steps_to_target", "{}"), ("bits_to_target", "{:.4e}")]


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    cells = [[name for name, _ in columns]]
    for row in rows:
        cells.append(["-" if row[name] is None else fmt.format(row[name]) for name, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def to_json(rows: list[dict]) -> str:
    return json.dumps([{k: v for k, v in row.items() if k != "last"} for row in rows], indent=2)
