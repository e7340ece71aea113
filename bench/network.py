"""Step time on an emulated cluster (bench/netcluster.sh: one network namespace per rank, links shaped with
tc tbf), measured through the shipped path: `cdmpi train` on the quadratic problem for every method, and
uncompressed AMSGrad with an fp32 Allreduce (bench/ring_allreduce.py) on the same nodes and links. Also the
digits CNN's time to 90% test accuracy, and `cdmpi project`'s prediction beside every measured step.

    python bench/network.py [--rates 100mbit 1gbit 10gbit none] [--workers 4] [--dim 11173962] [--steps 5]

Root only (namespaces, tc). Writes results/network/{README.md,results.json,step_time.png} and the runs'
metrics files to runs/network/. The cluster is taken down at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import median_phases  # noqa: E402  (bench/, this script's folder)
from cdmpi import compress, metrics, project  # noqa: E402
from cdmpi.control import HEADER_NBYTES  # noqa: E402

NETCLUSTER = REPO / "bench" / "netcluster.sh"
PYTHON = Path(sys.executable)
CDMPI = PYTHON.parent / "cdmpi"
H = HEADER_NBYTES

# name: (settings of `cdmpi train bench/quadratic.toml`)
METHODS = {
    "CD-Adam, star": {"optim.algorithm": '"cdadam"', "compress.name": '"scaled_sign"'},
    "CD-Adam, sharded": {"optim.algorithm": '"cdadam"', "compress.name": '"scaled_sign"',
                         "comm.topology": '"sharded"'},
    "AMSGrad, fp32 frames (star)": {"optim.algorithm": '"amsgrad"', "compress.name": '"identity"'},
    "1-bit Adam (after 1 warm-up step)": {"optim.algorithm": '"onebit-adam"', "compress.name": '"scaled_sign"',
                                          "optim.warmup_steps": "1"},
    "EF21 (top-k 1.6%)": {"optim.algorithm": '"ef21"', "compress.name": '"topk"'},
}
ALLREDUCE = "AMSGrad, fp32 ring Allreduce"


def sh(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(shlex.quote(str(a)) for a in args), file=sys.stderr, flush=True)
    return subprocess.run([str(a) for a in args], check=check, text=True, capture_output=True, **kwargs)


def on_cluster(ranks: int, *cmd, timeout: float = 1800) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = sh(NETCLUSTER, "mpiexec", "-n", ranks, "--", *cmd, check=False, timeout=timeout, env=env)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(map(str, cmd))}\n{result.stderr[-3000:]}")


def engine_run(path: Path, n: int, d: int) -> dict:
    """Median step and phases of a `cdmpi train` run, its bytes per step checked against the frame formula."""
    run = metrics.read(path)
    timing, comm, attrs, train = run["timing"], run["comm"], run["attrs"], run["train"]
    steps = int(train["step"][-1])
    sharded = attrs["topology"] == "sharded"
    median = median_phases(timing, sharded)
    up, down = float(train["bits_up"][-1]) / 8 / steps, float(train["bits_down"][-1]) / 8 / steps  # all n frames
    inbound = comm["inbound_nbytes_per_step"]
    if sharded:  # worker s: the n - 1 other up slices, the n - 1 other down slices, n + 1 control rows
        up_c = compress.Sliced.make(attrs["compressor"], d, n)
        formula = [n * H] + [(n - 1) * up_c.slice_nbytes[s] + up_c.frame_nbytes - up_c.slice_nbytes[s] + n * H
                             for s in range(n)]
        assert attrs["up_frame_nbytes"] == attrs["down_frame_nbytes"] == up_c.frame_nbytes
    else:  # rank 0 receives the n messages; each worker one copy of the download message
        formula = [up + n * H] + [down / n + H] * n
    assert np.allclose(inbound, formula, rtol=0, atol=1e-6), (path, inbound.tolist(), formula)
    link = float(np.max(inbound)) + (float(comm["outbound_nbytes_per_step"][0]) if not sharded else
                                     float(np.max(comm["outbound_nbytes_per_step"])))
    m = project.measured(path, medians=True)  # the model of the typical step: medians, no metric rows
    if not sharded:  # the median step's frames: after 1-bit Adam's fp32 warm-up, which the run's mean includes
        m["link_bytes"] = n * (2 * H + int(attrs["up_frame_nbytes"]) + int(attrs["down_frame_nbytes"]))
    return {"median": median, "steps": steps, "inbound_nbytes_per_step": inbound.tolist(),
            "outbound_nbytes_per_step": comm["outbound_nbytes_per_step"].tolist(), "rank0_link_nbytes": link,
            "metrics_nbytes_per_logged_step": float(comm["metrics_inbound_nbytes_per_logged_step"][0]),
            "hosts": attrs["hosts"], "model": m}


def _tag(rate: str, name: str) -> str:
    return f"{rate}-{name.split(',')[0].split(' (')[0].replace(' ', '_')}" + ("-sharded" if "sharded" in name else "")


def digits_run(path: Path) -> dict:
    run = metrics.read(path)
    ev, tr = run["eval"], run["train"]
    hit = np.nonzero(ev["accuracy"] >= 0.9)[0]
    out = {"final_accuracy": float(ev["accuracy"][-1]), "steps": int(tr["step"][-1]), "hosts": run["attrs"]["hosts"]}
    if len(hit):
        step = int(ev["step"][hit[0]])
        wall = dict(zip(tr["step"].tolist(), tr["wall_time"].tolist()))
        out.update(step_to_90=step, wall_to_90=wall.get(step),
                   bits_to_90=float(ev["bits_up"][hit[0]] + ev["bits_down"][hit[0]]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", nargs="+", default=["100mbit", "1gbit", "10gbit", "none"])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=11_173_962)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS) + [ALLREDUCE])
    parser.add_argument("--digits-rates", nargs="*", default=["100mbit", "1gbit"])
    parser.add_argument("--metrics-rates", nargs="*", default=["1gbit"],
                        help="the cost of metrics rows: bench/quadratic.toml (d = 10^6, 2 workers) logging every "
                             "10 steps against logging only at the first and last step")
    parser.add_argument("--metrics-steps", type=int, default=60)
    parser.add_argument("--runs-dir", default="runs/network")
    parser.add_argument("--wait", choices=("spin", "sleep"), default="sleep",
                        help="how ranks wait in collectives (comm.wait): every emulated node shares this machine's "
                             "cores, so a spinning rank would take CPU from the ranks it waits for; on a real "
                             "cluster each node has cores of its own")
    parser.add_argument("--out", default=str(REPO / "results" / "network" / "results.json"))
    parser.add_argument("--reread", action="store_true",
                        help="no runs: read the metrics files of --runs-dir again into --out (after a change of "
                             "what is taken from them)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/network.py: needs root (network namespaces and tc)")
    runs = Path(args.runs_dir).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    n, d = args.workers, args.dim
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("rates", {})
    results.setdefault("digits", {})
    results.setdefault("metrics_cost", {})
    results.update(workers=n, dim=d, steps=args.steps)
    results.setdefault("commands", []).append("python bench/network.py " + " ".join(map(shlex.quote, sys.argv[1:])))
    started = time.monotonic()
    if args.reread:
        for rate, entry in results["rates"].items():
            for name in entry:
                if name in METHODS:
                    target = runs / f"{_tag(rate, name)}.h5"
                    entry[name] = {**engine_run(target, n, d), "wall_seconds": entry[name].get("wall_seconds")}
        out.write_text(json.dumps(results, indent=1))
        return
    try:
        for rate in dict.fromkeys(args.rates + args.digits_rates + args.metrics_rates):
            sh(NETCLUSTER, "up", "--nodes", n + 1, "--rate", rate)
            checked = sh(NETCLUSTER, "check", check=False)
            entry = results["rates"].setdefault(rate, {})
            entry["check"] = (checked.stdout + checked.stderr).strip().splitlines()[-1:]
            if rate in args.rates:
                for name in args.methods:
                    tag = _tag(rate, name)
                    t0 = time.monotonic()
                    if name == ALLREDUCE:
                        target = runs / f"{tag}-allreduce.json"
                        on_cluster(n, PYTHON, REPO / "bench" / "ring_allreduce.py", "--dim", d, "--steps",
                                   args.steps, "--out", target, "--wait", args.wait)
                        entry[name] = json.loads(target.read_text())
                    else:
                        target = runs / f"{tag}.h5"
                        sets = {"problem.dim": str(d), "run.steps": str(args.steps), "comm.wait": f'"{args.wait}"',
                                **METHODS[name]}
                        on_cluster(n + 1, CDMPI, "train", REPO / "bench" / "quadratic.toml",
                                   *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
                                   "--out", target, "--overwrite", "--quiet")
                        entry[name] = engine_run(target, n, d)
                    entry[name]["wall_seconds"] = time.monotonic() - t0
                    print(f"{rate} {name}: median step {entry[name]['median']['step']:.3f} s "
                          f"({entry[name]['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(results, indent=1))
            if rate in args.metrics_rates:
                cost = results["metrics_cost"].setdefault(rate, {})
                for label, every in (("every 10 steps", 10), ("first and last step only", 10**6)):
                    target = runs / f"metrics-{rate}-{every}.h5"
                    on_cluster(3, CDMPI, "train", REPO / "bench" / "quadratic.toml", "--set",
                               f"run.steps={args.metrics_steps}", "--set", f"run.log_every={every}", "--set",
                               f'comm.wait="{args.wait}"', "--out", target, "--overwrite", "--quiet")
                    run = metrics.read(target)
                    cost[label] = {"wall_per_step": float(run["train"]["wall_time"][-1]) / args.metrics_steps,
                                   "rows": len(run["train"]["step"]),
                                   "metrics_nbytes_per_logged_step":
                                       float(run["comm"]["metrics_inbound_nbytes_per_logged_step"][0]),
                                   "frame_nbytes_per_step": float(run["comm"]["inbound_nbytes_per_step"][0])}
                    out.write_text(json.dumps(results, indent=1))
            if rate in args.digits_rates:
                for algorithm, compressor, epochs in (("cdadam", "scaled_sign", 24), ("amsgrad", "identity", 10)):
                    target = runs / f"digits-{rate}-{algorithm}.h5"
                    t0 = time.monotonic()
                    on_cluster(5, CDMPI, "train", REPO / "configs" / "digits" / "small_cnn.toml",
                               "--set", f'optim.algorithm="{algorithm}"', "--set", f'compress.name="{compressor}"',
                               "--set", f"run.epochs={epochs}", "--set", f'comm.wait="{args.wait}"',
                               "--out", target, "--overwrite", "--quiet")
                    results["digits"].setdefault(rate, {})[algorithm] = {**digits_run(target),
                                                                         "wall_seconds": time.monotonic() - t0}
                    out.write_text(json.dumps(results, indent=1))
    finally:
        sh(NETCLUSTER, "down", check=False)
    results["bench_seconds"] = time.monotonic() - started
    results.setdefault("seconds_per_command", []).append(round(results["bench_seconds"], 1))
    out.write_text(json.dumps(results, indent=1))
    print(f"bench/network.py: {time.monotonic() - started:.0f} s; {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
