"""Benchmark 10: how long the command line takes to answer when nothing is trained: `cdmpi --help`, a
config error and `cdmpi report` of a metrics file, against `python -c "import torch"`. Targets: at most
0.5x the torch import for help and errors, 0.2x for report (which imports neither torch nor MPI).

    python bench/startup.py [--reps 11]

Each case is a fresh process, timed from spawn to exit, interleaved with the others, medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import publish, table


def elapsed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=11)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.toml"
        bad.write_text("[optim]\nlr = -1\n")
        run = Path(tmp) / "run.h5"  # a finished metrics file of 1,001 rows to report on
        subprocess.run([sys.executable, "-m", "cdmpi", "train", "configs/logreg/mushrooms.toml", "--backend", "local",
                        "--workers", "2", "--set", "run.steps=1000", "--out", str(run), "--quiet"], check=True)
        cases = {"python -c 'import torch'": [sys.executable, "-c", "import torch"],
                 "cdmpi --help": [sys.executable, "-m", "cdmpi", "--help"],
                 "cdmpi train --help": [sys.executable, "-m", "cdmpi", "train", "--help"],
                 "cdmpi train bad.toml (optim.lr = -1)": [sys.executable, "-m", "cdmpi", "train", str(bad)],
                 "cdmpi report run.h5 (1,001 rows)": [sys.executable, "-m", "cdmpi", "report", str(run)]}
        times = {name: [] for name in cases}
        for rep in range(args.reps + 1):  # the first round warms the file cache and is not counted
            for name, cmd in cases.items():
                t = elapsed(cmd)
                if rep:
                    times[name].append(t)
    medians = {name: statistics.median(t) for name, t in times.items()}
    torch_s = medians["python -c 'import torch'"]
    rows = [[name, f"{1e3 * m:.0f}", f"{m / torch_s:.2f}"] for name, m in medians.items()]
    publish("10_startup", "10. Answers without training: help and a config error against importing torch",
            table(["command", "ms (median)", "ratio to the torch import (target <= 0.5; report <= 0.2)"], rows),
            f"Medians of {args.reps} fresh processes each, interleaved, after one uncounted round. cdmpi reads and "
            f"checks the command line and the config before it imports torch, mpi4py, h5py or numba "
            f"(tests/test_first_hour.py checks that none of them is imported); report, plot, watch and project "
            f"read files with h5py and NumPy alone.")


if __name__ == "__main__":
    main()
