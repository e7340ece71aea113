"""Point-to-point MPI throughput for bench/netcluster.sh check: rank 0 sends BYTES to rank 1 with
Send/Recv (numpy buffers), REPEATS times; rank 1 answers each with one byte, so rank 0's clock covers the
whole transfer. Prints the hosts, each repeat's bits per second, their median and the best.

Run on two nodes of the emulated cluster:  bench/netcluster.sh mpiexec -n 2 PYTHON bench/netcluster_check.py
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=25_000_000, help="bytes per transfer (default 25,000,000)")
    parser.add_argument("--repeats", type=int, default=7, help="timed transfers (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed transfers first (default 1)")
    args = parser.parse_args(argv)

    comm = MPI.COMM_WORLD
    if comm.size != 2:
        if comm.rank == 0:
            print(f"netcluster_check: needs exactly 2 ranks, got {comm.size}", file=sys.stderr)
        return 2
    hosts = comm.gather(socket.gethostname())
    buf = np.zeros(args.bytes, dtype=np.uint8) if comm.rank == 0 else np.empty(args.bytes, dtype=np.uint8)
    ack = np.zeros(1, dtype=np.uint8)
    rates = []
    for i in range(args.warmup + args.repeats):
        comm.Barrier()
        if comm.rank == 0:
            start = time.perf_counter()
            comm.Send([buf, MPI.BYTE], dest=1, tag=1)
            comm.Recv([ack, MPI.BYTE], source=1, tag=2)
            seconds = time.perf_counter() - start
            if i >= args.warmup:
                rates.append(args.bytes * 8 / seconds)
        else:
            comm.Recv([buf, MPI.BYTE], source=0, tag=1)
            comm.Send([ack, MPI.BYTE], dest=0, tag=2)
    if comm.rank == 0:
        print("hosts", " ".join(hosts))
        print("bits_per_s", " ".join(f"{r:.0f}" for r in rates))
        print("median_bits_per_s", f"{statistics.median(rates):.0f}")
        print("best_bits_per_s", f"{max(rates):.0f}")
        if hosts[0] == hosts[1]:
            print(f"netcluster_check: both ranks ran on host {hosts[0]}: not across the emulated links",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
