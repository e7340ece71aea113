"""A training run: set up this process's part of it, then the one step loop every backend shares."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, algorithms, compress, devices, problems
from .config import Config, replace
from .errors import CdmpiError
from .metrics import EVAL_COLUMNS, MetricsWriter
from .problems.classifier import EVAL_SHARE, TRAIN_SHARE
from .server import ServerRuntime
from .worker import WorkerRuntime

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Session:
    cfg: Config
    transport: object
    d: int
    workers: list[WorkerRuntime]  # the workers that live in this process
    server: ServerRuntime | None  # on the server's process only
    description: str
    device: torch.device  # where this process's frames live (its workers', or the server's)
    steps_per_epoch: int = 0  # 0: no epochs, no lr schedule, no test-set evaluation
    share_layout: str = "gradient"  # see problems.Built
    # Frame buffers by size, made once and reused: an algorithm's frame size may change (onebit-adam).
    _up: dict = field(default_factory=dict)
    _down: dict = field(default_factory=dict)

    def frame_nbytes(self) -> tuple[int, int]:
        """(up, down) frame sizes of the coming step; every process's algorithm agrees on them."""
        algorithm = self.workers[0].algorithm if self.workers else self.server.algorithm
        return algorithm.up_nbytes, algorithm.down_nbytes

    def frame_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(workers), up_nbytes) and (down_nbytes,) uint8 buffers on this process's frame device."""
        up_nbytes, down_nbytes = self.frame_nbytes()
        if up_nbytes not in self._up:
            self._up[up_nbytes] = torch.zeros(len(self.workers), up_nbytes, dtype=torch.uint8, device=self.device)
        if down_nbytes not in self._down:
            self._down[down_nbytes] = torch.zeros(down_nbytes, dtype=torch.uint8, device=self.device)
        return self._up[up_nbytes], self._down[down_nbytes]


def setup(cfg: Config, transport, *, out: str | Path | None, overwrite: bool = False) -> Session:
    """Build this process's workers (and the server, where it runs). Raises CdmpiError on bad input."""
    torch.set_num_threads(cfg.run.threads)
    n = transport.n_workers
    dtype = DTYPES[cfg.run.dtype]
    worker_device = devices.resolve(cfg.comm.worker_device, transport.local_rank)
    server_device = devices.resolve(cfg.comm.server_device, transport.local_rank)
    frame_device = worker_device if transport.worker_indices else server_device
    if "cuda" in (worker_device.type, server_device.type):
        devices.use_deterministic_kernels(cfg.run.deterministic)
    transport.configure(cfg.comm.cuda_aware, frame_device)
    built = problems.build(cfg, n, transport.worker_indices, dtype, worker_device)
    if cfg.run.epochs:
        if not built.steps_per_epoch:
            raise CdmpiError(f"run.epochs needs a problem with epochs (classifier); {cfg.problem.name!r} has none")
        cfg = replace(cfg, "run", steps=cfg.run.epochs * built.steps_per_epoch)
    make = compress.make
    compressor = algorithms.compressor_for(cfg.optim.algorithm, cfg.compress.name)
    up = make(compressor, built.d, ratio=cfg.compress.ratio, k=cfg.compress.k)
    down = make(compressor, built.d, ratio=cfg.compress.ratio, k=cfg.compress.k)
    algorithm = algorithms.get(cfg.optim.algorithm, compressor)
    setting = algorithms.Setting(built.d, n, up, down, cfg.optim, dtype, cfg.run.seed)
    workers = [WorkerRuntime(i, built.shards[i], algorithm.worker(setting, i, worker_device), built.x0,
                             batch_size=cfg.data.batch_size, seed=cfg.run.seed, device=worker_device)
               for i in transport.worker_indices]
    server = None
    if transport.is_server:
        writer = None
        if out is not None:
            attrs = {"config": cfg.to_json(), "algorithm": cfg.optim.algorithm,
                     "compressor": compressor, "n_workers": n, "dim": built.d,
                     "world_size": transport.world_size, "backend": transport.name,
                     "mpi_library": transport.mpi_library, "cdmpi_version": __version__,
                     "problem": built.description, "up_frame_nbytes": up.frame_nbytes,
                     "down_frame_nbytes": down.frame_nbytes, "steps": cfg.run.steps,
                     "steps_per_epoch": built.steps_per_epoch}
            groups = {"eval": EVAL_COLUMNS} if built.steps_per_epoch else {}
            writer = MetricsWriter(out, attrs, flush_every=cfg.run.flush_every, overwrite=overwrite, groups=groups)
        server = ServerRuntime(algorithm.server(setting, server_device), n, writer,
                               share_layout=built.share_layout, steps_per_epoch=built.steps_per_epoch,
                               device=server_device)
    return Session(cfg, transport, built.d, workers, server, built.description, frame_device,
                   built.steps_per_epoch, built.share_layout)


def lr_at(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """optim.lr times lr_gamma for every milestone epoch already completed."""
    passed = sum(step >= m * steps_per_epoch for m in cfg.optim.lr_milestones)
    return cfg.optim.lr * cfg.optim.lr_gamma ** passed


def is_eval_step(step: int, session: Session) -> bool:
    """Test-set evaluation: at the start, after every epoch, and after the last step."""
    spe = session.steps_per_epoch
    return bool(spe) and (step % spe == 0 or step == session.cfg.run.steps)


def record_paths(session: Session) -> None:
    """Collective: every rank's device and frame path, kept in the metrics file's attributes."""
    paths = session.transport.allgather(f"{session.device} {session.transport.path}")
    server = session.server
    if server is not None and server.writer is not None:
        server.writer.set_attrs({"comm_paths": json.dumps(paths),
                                 "comm_path": ", ".join(sorted(set(p.split(" ", 1)[1] for p in paths)))})


def is_log_step(step: int, cfg: Config) -> bool:
    return step % cfg.run.log_every == 0 or step == cfg.run.steps


def run(session: Session, progress: bool = False) -> dict | None:
    """T iterations of Algorithm 1. Returns the last metrics row on the server, None elsewhere."""
    cfg, transport, server = session.cfg, session.transport, session.server
    steps = cfg.run.steps
    bar = None
    if progress and server is not None and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", dynamic_ncols=True, leave=True)
    record_paths(session)
    try:
        for t in range(steps + 1):
            evaluate = is_eval_step(t, session)
            log = is_log_step(t, cfg) or evaluate
            shares = [w.compute(log, evaluate) for w in session.workers]  # gradient at x_t
            if log:
                width = session.d + 1 if session.share_layout == "gradient" else TRAIN_SHARE + EVAL_SHARE * evaluate
                rows = transport.gather_stats(torch.stack(shares) if shares else torch.zeros(0, width,
                                                                                             dtype=torch.float64))
                if server is not None:
                    row = server.record(t, rows, evaluate)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4g}", grad_norm_sq=f"{row['grad_norm_sq']:.3g}",
                                        refresh=False)
            if t == steps:
                break
            up, down = session.frame_buffers()
            for i, worker in enumerate(session.workers):
                worker.encode(up[i])
            frames = transport.gather_frames(up)
            if server is not None:
                server.aggregate(frames, down)
            transport.broadcast(down)
            lr = lr_at(t, cfg, session.steps_per_epoch)
            for worker in session.workers:
                worker.update(down, lr)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if server is not None and server.writer is not None:
            server.writer.close()
    return server.last_row if server is not None else None


def check_world(transport, requested_workers: int | None) -> None:
    if transport.name == "mpi":
        if transport.world_size < 2:
            raise CdmpiError(f"the MPI backend needs at least 2 ranks (rank 0 is the server, the others are "
                             f"workers); got world size {transport.world_size}. Run under mpiexec -n N+1 "
                             f"for N workers, or use --backend local")
        if requested_workers is not None and requested_workers != transport.n_workers:
            raise CdmpiError(f"--workers {requested_workers} disagrees with the world size "
                             f"{transport.world_size} (1 server + {transport.n_workers} workers); "
                             f"launch with mpiexec -n {requested_workers + 1}")
