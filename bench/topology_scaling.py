"""Sharded-server scaling: the frame bytes per step into the busiest rank, and the step time, against the
number of workers n, for the star topology (rank 0 aggregates) and the sharded one (worker s serves slice s).

    python bench/topology_scaling.py [--workers 2 4 8 16] [--dim 1000000] [--steps 10] [--out-dir runs/bench]

Each (topology, n) is a real `mpiexec -n n+1 cdmpi train` of cdadam with scaled sign on the quadratic
benchmark problem (float32). The inbound bytes are those each rank handed to MPI to receive
(comm/inbound_nbytes_per_step in the run's HDF5 file) and are checked against the message-size formula; the
projected column uses `cdmpi project`'s model of each topology on a 10 Gbit/s link with 5 us latency.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from common import publish, table

from cdmpi import compress, metrics, project
from cdmpi.control import HEADER_NBYTES
from cdmpi.timing import PHASES

REPO = Path(__file__).resolve().parent.parent


def expected_busiest_inbound(topology: str, d: int, n: int) -> int:
    """Bytes per step into the busiest rank: n whole messages (control word and frame) at rank 0 (star), or
    (n - 1) slices of the up frame, the down frame's other n - 1 slices and the n other ranks' control words
    at a worker (sharded)."""
    if topology == "star":
        return n * (HEADER_NBYTES + compress.ScaledSign(d).frame_nbytes)
    sliced = compress.Sliced.make("scaled_sign", d, n)
    return max((n - 1) * c + (sliced.frame_nbytes - c) for c in sliced.slice_nbytes) + n * HEADER_NBYTES


def run(topology: str, n: int, d: int, steps: int, out: Path) -> dict:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", str(n + 1), sys.executable, "-m", "cdmpi",
           "train", str(REPO / "bench" / "quadratic.toml"), "--set", f"problem.dim={d}", "--set", f"run.steps={steps}",
           "--set", f'comm.topology="{topology}"', "--out", str(out), "--overwrite", "--quiet"]
    subprocess.run(cmd, check=True, timeout=1200, capture_output=True, text=True)
    result = metrics.read(out)
    inbound = result["comm"]["inbound_nbytes_per_step"]
    busiest = int(np.argmax(inbound))
    timing = result["timing"]
    worker_step = statistics.fmean(sum(float(timing[f"worker_{p}"][i]) for p in PHASES if p not in ("metrics", "checkpoint"))
                                   for i in range(n))
    m = project.measured(out)
    return {"busiest": busiest, "inbound": float(inbound[busiest]), "rank0": float(inbound[0]),
            "step": worker_step, "aggregate": m["aggregate"], "projected": project.star_step(m, 10.0, 5e-6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out-dir", default="runs/bench")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as every rank of the runs (run.threads = 1); the table's machine line reports it
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.workers:
        for topology in ("star", "sharded"):
            r = run(topology, n, args.dim, args.steps, out_dir / f"topology-{topology}-n{n}.h5")
            want = expected_busiest_inbound(topology, args.dim, n)
            assert r["inbound"] == want, (topology, n, r["inbound"], want)
            print(f"n={n} {topology}: {r}", flush=True)
            rows.append([n, topology, "0 (server)" if r["busiest"] == 0 else f"{r['busiest']} (worker)",
                         f"{r['inbound']:,.0f}", f"{r['rank0']:,.0f}", f"{1e3 * r['aggregate']:.2f}",
                         f"{1e3 * r['step']:.1f}", f"{1e3 * r['projected']:.2f}"])
    publish("7_topology_scaling", f"7. Star against sharded server, d = {args.dim:,}, cdadam with scaled sign",
            table(["n", "topology", "busiest rank", "inbound bytes/step at busiest rank", "inbound bytes/step at rank 0",
                   "aggregate ms (server, or a worker's slice)", "measured step ms", "projected step ms, 10 Gbit/s"],
                  rows),
            f"One `mpiexec -n n+1 cdmpi train bench/quadratic.toml` per row, {args.steps} steps, float32. Inbound "
            "bytes are the frame bytes each rank receives per step from other ranks, counted from the buffers "
            "and counts handed to MPI, and asserted equal to the formula (star: n frames of 4 + ceil(d/8) bytes "
            "at rank 0; sharded: n - 1 up slices and n - 1 down slices at a worker). measured step ms is the "
            "workers' mean wall time per step over compute, encode, exchange, aggregate and update, with all "
            "n + 1 ranks time-sharing this machine's 2 cores, so it grows with n for reasons no network has. "
            "projected = `cdmpi project`'s model on 10 Gbit/s links with 5 us latency from the measured "
            "compute times and the exact bytes.")


if __name__ == "__main__":
    main()
