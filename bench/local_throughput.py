"""Benchmark 6: throughput of the in-process backend, steps per second for n = 20 workers on w8a
(Section 7.1's setting: full local gradients, scaled sign both ways, float64), metrics logged every
--log-every steps.

    python bench/local_throughput.py [--steps 100] [--reps 3] [--baseline PATH]

--baseline PATH times another checkout of cdmpi (e.g. a worktree of an older commit) in the same
run, interleaved: each repetition runs both in fresh subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from common import publish, table

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time, torch
from cdmpi import config, train
from cdmpi.transport import LocalTransport
algorithm, steps, log_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = config.load("configs/logreg/w8a.toml", [f"optim.algorithm={algorithm}", f"run.steps={steps}",
                  f"run.log_every={log_every}", "compress.name=auto"])
if hasattr(train, "build"):
    go = train.build(cfg, LocalTransport(cfg.run.workers)).run
else:  # a baseline checkout from before the engine
    session = train.setup(cfg, LocalTransport(cfg.run.workers), out=None)
    go = lambda: train.run(session)
start = time.perf_counter()
go()
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def time_run(root: Path, algorithm: str, steps: int, log_every: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(root)}
    child = subprocess.run([sys.executable, "-c", CHILD, algorithm, str(steps), str(log_every)], cwd=REPO, env=env,
                           capture_output=True, text=True)
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["(no output)"])[-1]
        sys.exit(f"bench/local_throughput.py: the {algorithm} run of {root} failed: {last}")
    return json.loads(child.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--algorithms", nargs="+", default=["cdadam", "amsgrad"])
    parser.add_argument("--baseline", default=None, help="another cdmpi checkout to time alongside")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the children (run.threads = 1); the table's machine line reports it
    roots = {"this checkout": REPO}
    if args.baseline:
        roots["baseline " + Path(args.baseline).name] = Path(args.baseline).resolve()
    times = {(a, r): [] for a in args.algorithms for r in roots}
    for rep in range(args.reps):
        for algorithm in args.algorithms:
            order = list(roots.items())
            for name, root in order[::-1] if rep % 2 else order:  # alternate which checkout goes first
                times[(algorithm, name)].append(time_run(root, algorithm, args.steps, args.log_every))
    rows = [[algorithm, name, f"{args.steps / statistics.median(t):.1f}", f"{1e3 * statistics.median(t) / args.steps:.2f}"]
            for (algorithm, name), t in times.items()]
    publish("6_local_throughput", "6. In-process backend throughput, n = 20 workers on w8a",
            table(["algorithm", "code", "steps/s", "ms/step"], rows),
            f"{args.steps} steps per run (setup and data loading excluded), metrics every {args.log_every} "
            f"step(s), medians of {args.reps} interleaved repetitions (the checkouts alternate which goes first), "
            f"each a fresh process with one torch thread. Most of a step here is the 20 workers' dense "
            f"logistic-regression gradients (d = 300), which the compiled kernels do not touch.")


if __name__ == "__main__":
    main()
