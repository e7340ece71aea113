"""Benchmark 4: end-to-end steps under mpiexec (rank 0 the server, ranks 1..n the workers) on the cheap
quadratic problem, with a time breakdown per step: cdadam (scaled sign both ways, Gather + Bcast of packed
frames), uncompressed amsgrad (Gather + Bcast of fp32 frames), amsgrad with an fp32 Allreduce, and cdadam
with the sharded server (comm.topology = "sharded": Alltoallv + Allgatherv of per-slice frames).

    mpiexec -n 5 python bench/end_to_end.py [--dims 1000000 11173962] [--steps 8] [--out-dir runs/bench]

Also checks that the bytes handed to MPI per step equal the frame-size formula, and leaves one HDF5
file per run (with timing/) for `cdmpi project`.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import ms, publish, table

from cdmpi import config, metrics, train
from cdmpi.algorithms import AmsgradState
from cdmpi.control import HEADER_NBYTES
from cdmpi.problems.quadratic import QuadraticShard
from cdmpi.timing import PHASES, PhaseTimer
from cdmpi.transport import MPITransport


def run_cdmpi(transport, algorithm: str, compressor: str, d: int, steps: int, out: Path,
              topology: str = "star", wait: str = "auto") -> tuple[float, float] | None:
    cfg = config.from_dict({
        "run": {"steps": steps, "dtype": "float32", "log_every": steps, "seed": 0},
        "problem": {"name": "quadratic", "dim": d},
        "optim": {"algorithm": algorithm, "lr": 1e-3},
        "compress": {"name": compressor},
        "comm": {"topology": topology, "wait": wait},
    })
    training = train.build(cfg, transport, out=out, overwrite=True)
    transport.inbound_nbytes = transport.outbound_nbytes = 0
    training.run()
    # Each worker's bytes (sent, received), from the buffers and counts it handed to MPI
    counted = transport.gather_stats(torch.tensor([[float(transport.outbound_nbytes), float(transport.inbound_nbytes)]],
                                                  dtype=torch.float64)[: len(training.engine.workers)])
    if not transport.is_server:
        return None
    up_c, down_c = training.engine.exchange.frames(steps)
    n, h = transport.n_workers, HEADER_NBYTES
    formula = (n * up_c.frame_nbytes, n * down_c.frame_nbytes)
    # The last exchange (the end of the run) carries one more round of control words (and, in the star
    # topology, its unused frames); it is left out of the per-step figures below.
    if topology == "sharded":  # worker s receives the n - 1 other slices of each frame and n headers
        inbound = [(n - 1) * up_c.slice_nbytes[s] + down_c.frame_nbytes - down_c.slice_nbytes[s] + n * h
                   for s in range(n)]
        measured = (counted[:, 1] - n * h).div(steps).tolist()
        assert measured == inbound, (measured, inbound)
        return formula
    # star: the server receives the n messages (Gather), each worker its copy of the download one (Bcast)
    last = n * (h + up_c.frame_nbytes), n * (h + down_c.frame_nbytes)
    measured = ((transport.inbound_nbytes - last[0]) / steps, (counted[:, 1].sum().item() - last[1]) / steps)
    worker_sent = (counted[:, 0].sum().item() - last[0]) / steps
    assert measured == (formula[0] + n * h, formula[1] + n * h) and worker_sent == measured[0], \
        (measured, worker_sent, formula)
    return formula


def run_allreduce(transport, d: int, steps: int):
    """Uncompressed AMSGrad with an fp32 Allreduce of the gradients: each worker steps on the mean."""
    torch.manual_seed(0)
    n = transport.n_workers
    timer = PhaseTimer()
    grad_sum = torch.zeros(d, dtype=torch.float32)
    if transport.is_server:  # contributes zeros to the same collective
        for _ in range(steps):
            grad_sum.zero_()
            transport.allreduce_sum_(grad_sum)
        return transport.gather_stats(torch.zeros(0, len(PHASES), dtype=torch.float64))
    shard = QuadraticShard(d, transport.rank - 1, n, 0, torch.float32, "cpu")
    params = torch.zeros(d, dtype=torch.float32)
    state = AmsgradState(d, torch.float32, "cpu", config.OptimConfig())
    timer.start()
    for _ in range(steps):
        grad, _ = shard.evaluate(params)
        grad_sum.copy_(grad)
        timer.lap("compute")
        transport.allreduce_sum_(grad_sum)
        timer.lap("gather")
        state.step(params, grad_sum.div_(n), 1e-3)
        timer.lap("update")
        timer.end_step()
    transport.gather_stats(timer.medians()[:len(PHASES)].reshape(1, -1))
    return None


def breakdown(timing: dict, sharded: bool = False) -> dict:
    """Seconds per step, each phase's median over the steps (timing/*_median; the first step's one-off costs
    and the logged steps' metric shares stay out): the workers' mean of compute, encode, update; the
    aggregate (star: the server's, which the workers wait for inside Bcast, so communicate = their gather +
    broadcast less it; sharded: the workers' own slice work, a phase of its own)."""
    phases = ("compute", "encode", "gather", "aggregate", "broadcast", "update")
    w = {p: statistics.fmean(timing[f"worker_{p}_median"]) for p in phases}
    if sharded:
        return {"compute": w["compute"], "encode": w["encode"], "communicate": w["gather"] + w["broadcast"],
                "decode+aggregate": w["aggregate"], "update": w["update"],
                "optimizer+communication": sum(w[p] for p in phases[1:])}
    aggregate = float(timing["server_aggregate_median"][0])
    return {"compute": w["compute"], "encode": w["encode"], "communicate": w["gather"] + w["broadcast"] - aggregate,
            "decode+aggregate": aggregate, "update": w["update"],
            "optimizer+communication": w["encode"] + w["gather"] + w["broadcast"] + w["update"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1_000_000, 11_173_962])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out-dir", default="runs/bench")
    parser.add_argument("--wait", choices=("auto", "spin", "sleep"), default="auto",
                        help="comm.wait of the runs (the Allreduce baseline waits the same way)")
    args = parser.parse_args()
    transport = MPITransport.from_world()
    out_dir = Path(args.out_dir)
    if transport.is_server:
        out_dir.mkdir(parents=True, exist_ok=True)
    transport.agree(None)
    rows = []
    for d in args.dims:
        results = {}
        for algorithm, compressor, topology in (("cdadam", "scaled_sign", "star"), ("amsgrad", "identity", "star"),
                                                ("cdadam", "scaled_sign", "sharded")):
            name = algorithm if topology == "star" else f"{algorithm} (sharded)"
            path = out_dir / (f"e2e-{algorithm}-d{d}.h5" if topology == "star" else f"e2e-{algorithm}-sharded-d{d}.h5")
            nbytes = run_cdmpi(transport, algorithm, compressor, d, args.steps, path, topology, args.wait)
            if transport.is_server:
                results[name] = (breakdown(metrics.read(path)["timing"], topology == "sharded"), nbytes)
        gathered = run_allreduce(transport, d, args.steps)
        if transport.is_server:
            mean = gathered.mean(dim=0)
            t = dict(zip(PHASES, mean.tolist()))
            results["amsgrad (Allreduce)"] = ({"compute": t["compute"], "encode": 0.0, "communicate": t["gather"],
                                              "decode+aggregate": 0.0, "update": t["update"],
                                              "optimizer+communication": t["gather"] + t["update"]},
                                             (4 * d, 4 * d))
            base = results["amsgrad (Allreduce)"][0]["optimizer+communication"]
            for name, (b, (up, down)) in results.items():
                rows.append([f"{d:,}", name, ms(b["compute"]), ms(b["encode"]), ms(b["communicate"]),
                             ms(b["decode+aggregate"]), ms(b["update"]), ms(b["optimizer+communication"]),
                             f"{b['optimizer+communication'] / base:.2f}", f"{up:,.0f} / {down:,.0f}"])
    if transport.is_server:
        text = table(["d", "algorithm", "compute ms", "encode ms", "communicate ms", "decode+aggregate ms",
                      "update ms", "optimizer+communication ms", "vs Allreduce", "bytes per step up / down"], rows)
        publish("4_end_to_end", f"4. End-to-end steps under mpiexec, {transport.n_workers} workers", text,
                "Times are per step: each phase's median over the steps, means over the workers (server: rank 0's aggregate, which includes the "
                "re-compression of the download frame). optimizer+communication = a worker's encode + Gather + "
                "Bcast + update wall time, so it includes the server's work the worker waits for. Bytes per "
                "step are the frames; the bytes handed to MPI are checked equal to them plus the 40-byte control word "
                "of each message (Gather: all n messages at the server; Bcast: each worker's copy; sharded: every "
                "worker's inbound bytes are its n - 1 up slices, n - 1 down slices and the n other ranks' control "
                "words; its aggregate is its own slice's work, and optimizer+communication adds it); for the "
                "Allreduce they are "
                "each worker's fp32 buffer (4 d), MPI's internal traffic is not visible. "
                "Every rank is one process with one torch thread; the ranks share the machine's cores.",
                launcher=f"mpiexec -n {transport.world_size} ")


if __name__ == "__main__":
    main()
