"""Shared helpers of the benchmarks: interleaved repetitions, medians, markdown tables with their command.

The development machine's cores are shared with other jobs, so every benchmark times its cases
interleaved (case A, case B, case A, ...) and reports medians: a burst of outside load then hits
every case alike instead of skewing one of them.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "results" / "bench"
SIZES = {"1e5": 100_000, "1e6": 1_000_000, "11.2M": 11_173_962}  # 11.2M: ResNet-18's parameter count


def micro_args(doc: str, reps: int, add=None) -> tuple[argparse.Namespace, torch.dtype]:
    """--reps and --dtype of the single-process benchmarks (plus any `add(parser)` adds); one torch thread."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    if add is not None:
        add(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    return args, getattr(torch, args.dtype)


def interleaved(cases: dict, reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each zero-argument callable, timed in interleaved rounds."""
    times = {name: [] for name in cases}
    for round_ in range(warmup + reps):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s), Python {platform.python_version()}")


def publish(name: str, title: str, text: str, notes: str = "", launcher: str = "") -> Path:
    """Print the table and write it, with the command that made it, to results/bench/NAME.md."""
    command = launcher + "python " + " ".join(shlex.quote(a) for a in [f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    body = (f"## {title}\n\nCommand: `{command}`\n\nMachine: {machine()}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{text}\n")
    if notes:
        body += f"\n{notes}\n"
    print(body)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(body)
    return path


def median_phases(timing: dict, sharded: bool) -> dict[str, float]:
    """A run's typical step from its metrics file's timing/*_median: each phase's median, the workers' mean
    (star: the aggregate is rank 0's, which the workers wait for in Bcast), and the whole step's."""
    phases = ("compute", "encode", "gather", "aggregate", "broadcast", "update")
    median = {p: statistics.fmean(timing[f"worker_{p}_median"]) for p in phases}
    if not sharded:
        median["aggregate"] = float(timing["server_aggregate_median"][0])
    median["step"] = statistics.fmean(timing["worker_step_median"])
    return median


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"
