"""Benchmark 8: one flush of the metrics file, with 1,000 rows already in it and with 100,000: the writer
appends in place (HDF5 SWMR), so the cost must not grow with the file. Target: ratio <= 1.5.

    python bench/metrics_flush.py [--rows 50] [--reps 21] [--baseline PATH]

Each case fills a fresh file to its size, then times flushes of --rows new rows (the default
run.flush_every), interleaved with the other case, medians. --baseline PATH times the MetricsWriter of
another checkout of cdmpi beside it, in the same way (e.g. a worktree of a commit whose flush copied and
renamed the file).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import publish, table

SIZES = (1_000, 100_000)


def load_writer(root: Path):
    """The MetricsWriter class of the cdmpi checkout at root (its own metrics module, imported apart)."""
    name = f"metrics_{abs(hash(str(root)))}"
    package = importlib.util.spec_from_file_location(f"{name}_pkg", root / "cdmpi" / "__init__.py",
                                                     submodule_search_locations=[str(root / "cdmpi")])
    pkg = importlib.util.module_from_spec(package)
    sys.modules[package.name] = pkg
    package.loader.exec_module(pkg)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(
        f"{package.name}.metrics", root / "cdmpi" / "metrics.py"))
    sys.modules[module.__name__] = module
    module.__spec__.loader.exec_module(module)
    return module.MetricsWriter


def row(step: int) -> dict:
    return {"step": step, "loss": 1.0 / (step + 1), "grad_norm_sq": 2.0 / (step + 1), "bits_up": 10 * step,
            "bits_down": 10 * step, "wall_time": 0.01 * step}


class Case:
    """A metrics file of `size` rows, and a flush of `rows` more."""

    def __init__(self, writer_class, folder: Path, size: int, rows: int):
        self.writer = writer_class(folder / f"m{size}.h5", {"config": "{}"}, flush_every=10 ** 9)
        for step in range(size):
            self.writer.append("train", row(step))
        self.writer.flush()
        self.next, self.rows = size, rows

    def flush(self) -> float:
        for step in range(self.next, self.next + self.rows):
            self.writer.append("train", row(step))
        self.next += self.rows
        start = time.perf_counter()
        self.writer.flush()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50, help="rows per flush")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--baseline", default=None, help="another cdmpi checkout to time alongside")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parent.parent
    writers = {"this checkout": load_writer(repo)}
    if args.baseline:
        writers["baseline " + Path(args.baseline).name] = load_writer(Path(args.baseline).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for code, writer_class in writers.items():
            folder = Path(tmp) / code.replace(" ", "_")
            folder.mkdir()
            cases = {size: Case(writer_class, folder, size, args.rows) for size in SIZES}
            times = {size: [] for size in SIZES}
            for _ in range(args.reps):
                for size, case in cases.items():
                    times[size].append(case.flush())
            medians = {size: statistics.median(t) for size, t in times.items()}
            rows.append([code, *(f"{1e3 * medians[size]:.2f}" for size in SIZES),
                         f"{medians[SIZES[1]] / medians[SIZES[0]]:.2f}"])
    publish("8_metrics_flush", "8. One flush of the metrics file against the rows already in it",
            table(["code", *(f"ms, {size:,} rows in the file" for size in SIZES), "ratio (target <= 1.5)"], rows),
            f"Each flush appends {args.rows} rows (run.flush_every's default) to every train column; medians of "
            f"{args.reps} flushes per case, the cases interleaved. The file grows by those rows as it goes, "
            f"which is negligible next to 100,000.")


if __name__ == "__main__":
    main()
