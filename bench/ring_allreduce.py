"""Uncompressed AMSGrad with an fp32 Allreduce of the gradients, as DDP or Horovod users run it: every rank
is a worker, the gradient is summed in place by MPI_Allreduce (MPICH: reduce-scatter + allgather for long
vectors, each link carrying 2 (n - 1) / n of the 4 d bytes each way) and every worker steps on the mean.

    mpiexec -n 4 python bench/ring_allreduce.py --dim 11173962 --steps 5 --out runs/network/allreduce.json

The baseline of bench/network.py, on the same emulated nodes and links as the cdmpi runs. It uses cdmpi's
quadratic gradient and its AMSGrad step (cdmpi.algorithms), but not the engine: the engine has no Allreduce.
Writes the median step and its phases (compute, allreduce, update) and the bytes handed to MPI as JSON.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

import torch
from mpi4py import MPI

from cdmpi import config
from cdmpi.algorithms import AmsgradState
from cdmpi.problems.quadratic import QuadraticShard
from cdmpi.transport import MPITransport


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=11_173_962)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--wait", choices=("spin", "sleep"), default="spin",
                        help="sleep: wait for every rank in a sleeping barrier before the Allreduce, as cdmpi's "
                             "comm.wait = sleep does before its collectives (ranks that share cores)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    transport = MPITransport(comm)  # its Allreduce waits as comm.wait says, as cdmpi's collectives do
    transport.agree_wait([args.wait == "sleep"])
    n, rank, d = comm.Get_size(), comm.Get_rank(), args.dim
    shard = QuadraticShard(d, rank, n, 0, torch.float32, "cpu")
    params = torch.zeros(d, dtype=torch.float32)
    grad_sum = torch.zeros(d, dtype=torch.float32)
    state = AmsgradState(d, torch.float32, "cpu", config.OptimConfig())
    rows = []
    comm.Barrier()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        grad, _ = shard.evaluate(params)
        grad_sum.copy_(grad)
        t1 = time.perf_counter()
        transport.allreduce_sum_(grad_sum)
        t2 = time.perf_counter()
        state.step(params, grad_sum.div_(n), 1e-3)
        t3 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    everyone = comm.gather(rows, root=0)
    hosts = comm.gather(socket.gethostname(), root=0)
    if rank == 0:
        # per step, the slowest worker's phases (the step ends for everyone when the Allreduce does)
        per_step = [max((r[s] for r in everyone), key=lambda row: row[3]) for s in range(args.steps)]
        median = {name: statistics.median(row[j] for row in per_step)
                  for j, name in enumerate(("compute", "allreduce", "update", "step"))}
        with open(args.out, "w") as fh:
            json.dump({"n_workers": n, "dim": d, "steps": args.steps, "wait": args.wait, "median": median, "hosts": hosts,
                       "link_nbytes_per_step": 2 * (n - 1) / n * 4 * d, "buffer_nbytes": 4 * d}, fh, indent=1)


if __name__ == "__main__":
    main()
