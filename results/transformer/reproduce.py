"""Every method on the transformer workload (configs/transformer/addition.toml), through `cdmpi sweep`:

1. each method's step-size grid on seed 0;
2. the step size that reaches 90% exact-match in the fewest steps (or, if none does, ends highest) on
   seeds 1 and 2;
3. the diagnosis of results/transformer/diagnose.py;
4. results/transformer/README.md, its tables and figures (make_readme.py).

    python results/transformer/reproduce.py [--runs runs/transformer] [--jobs 2]

About 30 minutes on 2 cores (`make reproduce-transformer`). Runs already in --runs are kept (a sweep skips
finished runs), so an interrupted reproduction continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "transformer" / "addition.toml"
ADAM_LRS = (0.001, 0.003, 0.01)
SGD_LRS = (0.1, 0.3, 1.0)  # EF21 takes plain SGD steps
SEEDS = (1, 2)  # seed 0 is the grid's


@dataclass(frozen=True)
class Method:
    key: str  # its folder in --runs
    label: str
    algorithm: str  # --algorithms ALGORITHM[:COMPRESSOR]
    sets: tuple[str, ...] = ()
    lrs: tuple[float, ...] = ADAM_LRS
    option: bool = False  # an option of this project's beyond the paper's Algorithm 1
    colour: str = ""  # options: their colour in this folder's figures (the paper's methods keep cdmpi's)


METHODS = (
    Method("amsgrad", "AMSGrad, fp32 (uncompressed)", "amsgrad:identity"),
    Method("cdadam", "CD-Adam (Algorithm 1: scaled sign)", "cdadam"),
    Method("cdadam-sharded", "CD-Adam, sharded server", "cdadam", ('comm.topology="sharded"',)),
    Method("amsgrad-ef", "AMSGrad + error feedback", "amsgrad-ef:scaled_sign"),
    Method("amsgrad-naive", "AMSGrad, naive compression", "amsgrad-naive:scaled_sign"),
    Method("ef21", "EF21 (top-k, 1.6%)", "ef21:topk", lrs=SGD_LRS),
    Method("onebit-adam", "1-bit Adam (300 fp32 warm-up steps)", "onebit-adam:scaled_sign"),
    Method("cdadam-topk", "CD-Adam, top-k 1.6% with indices", "cdadam:topk", option=True, colour="#17becf"),
    Method("cdadam-block64", "CD-Adam, a scale per 64 coordinates", "cdadam", ("compress.block=64",), option=True,
           colour="#bcbd22"),
    Method("cdadam-two-level", "CD-Adam, two-level sign", "cdadam", ('compress.name="two_level_sign"',), option=True,
           colour="#9467bd"),
    Method("cdadam-two-level-block64", "CD-Adam, two-level sign per 64", "cdadam",
           ('compress.name="two_level_sign"', "compress.block=64"), option=True, colour="#393b79"),
    Method("cdadam-two-level-block64-sharded", "CD-Adam, two-level sign per 64, sharded", "cdadam",
           ('compress.name="two_level_sign"', "compress.block=64", 'comm.topology="sharded"'), option=True,
           colour="#637939"),
    Method("cdadam-warmup", "CD-Adam, 100 fp32 warm-up steps", "cdadam", ("compress.warmup_steps=100",), option=True,
           colour="#000000"),
    Method("cdadam-beta2", "CD-Adam, beta2 = 0.999", "cdadam", ("optim.beta2=0.999",), option=True, colour="#7b4173"),
)


def cdmpi_command() -> list[str]:
    return [sys.executable, "-m", "cdmpi"]


def sweep(method: Method, out_dir: Path, grid: str, sets=()) -> None:
    cmd = [*cdmpi_command(), "sweep", str(CONFIG), "--algorithms", method.algorithm, "--grid", grid,
           "--out-dir", str(out_dir), "--jobs", "1"]
    for value in (*method.sets, *sets):
        cmd += ["--set", value]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def best_lr(grid_dir: Path) -> float:
    from make_readme import best_of, summarize_run

    return best_of([summarize_run(path) for path in sorted(grid_dir.glob("*.h5"))])["lr"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/transformer", help="folder of the metrics files")
    parser.add_argument("--jobs", type=int, default=2, help="sweeps at once (default 2)")
    parser.add_argument("--skip-diagnosis", action="store_true", help="only the runs and the README")
    args = parser.parse_args()
    runs = (ROOT / args.runs).resolve() if not Path(args.runs).is_absolute() else Path(args.runs)
    sys.path.insert(0, str(HERE))

    def one(method: Method) -> None:
        folder = runs / method.key
        sweep(method, folder / "grid", "optim.lr=" + ",".join(map(str, method.lrs)))
        lr = best_lr(folder / "grid")
        sweep(method, folder / "seeds", "run.seed=" + ",".join(map(str, SEEDS)), (f"optim.lr={lr}",))

    with ThreadPoolExecutor(args.jobs) as pool:
        for _ in pool.map(one, METHODS):
            pass
    if not args.skip_diagnosis:
        subprocess.run([sys.executable, str(HERE / "diagnose.py"), "--out", str(HERE),
                        "--runs", str(runs / "diagnosis")], check=True, cwd=ROOT)
    subprocess.run([sys.executable, str(HERE / "make_readme.py"), str(runs), str(HERE)], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
