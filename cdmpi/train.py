"""A training run: set up this process's part of it, then the one step loop every backend shares."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, algorithms, compress, problems
from .config import Config
from .errors import CdmpiError
from .metrics import MetricsWriter
from .server import ServerRuntime
from .timing import PHASES, PhaseTimer
from .worker import WorkerRuntime

DTYPES = {"float32": torch.float32, "float64": torch.float64}
FINAL_PARAMS_MAX_ELEMENTS = 50_000_000  # n * d floats gathered at the end; larger runs skip it


@dataclass
class Session:
    cfg: Config
    transport: object
    d: int
    workers: list[WorkerRuntime]  # the workers that live in this process
    server: ServerRuntime | None  # on the server's process only
    description: str
    timer: PhaseTimer = field(default_factory=PhaseTimer)  # this process's time per phase of a step
    # Frame buffers by size, made once and reused: an algorithm's frame size may change (onebit-adam).
    _up: dict = field(default_factory=dict)
    _down: dict = field(default_factory=dict)

    def frame_nbytes(self) -> tuple[int, int]:
        """(up, down) frame sizes of the coming step; every process's algorithm agrees on them."""
        algorithm = self.workers[0].algorithm if self.workers else self.server.algorithm
        return algorithm.up_nbytes, algorithm.down_nbytes

    def frame_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(workers), up_nbytes) and (down_nbytes,) uint8 buffers for the coming step."""
        up_nbytes, down_nbytes = self.frame_nbytes()
        if up_nbytes not in self._up:
            self._up[up_nbytes] = torch.zeros(len(self.workers), up_nbytes, dtype=torch.uint8)
        if down_nbytes not in self._down:
            self._down[down_nbytes] = torch.zeros(down_nbytes, dtype=torch.uint8)
        return self._up[up_nbytes], self._down[down_nbytes]


def setup(cfg: Config, transport, *, out: str | Path | None, overwrite: bool = False) -> Session:
    """Build this process's workers (and the server, where it runs). Raises CdmpiError on bad input."""
    torch.set_num_threads(cfg.run.threads)
    n = transport.n_workers
    dtype = DTYPES[cfg.run.dtype]
    built = problems.build(cfg, n, transport.worker_indices, dtype)
    make = compress.make
    compressor = algorithms.compressor_for(cfg.optim.algorithm, cfg.compress.name)
    up = make(compressor, built.d, ratio=cfg.compress.ratio, k=cfg.compress.k)
    down = make(compressor, built.d, ratio=cfg.compress.ratio, k=cfg.compress.k)
    algorithm = algorithms.get(cfg.optim.algorithm, compressor)
    setting = algorithms.Setting(built.d, n, up, down, cfg.optim, dtype, cfg.run.seed)
    workers = [WorkerRuntime(i, built.shards[i], algorithm.worker(setting, i), built.x0,
                             batch_size=cfg.data.batch_size, seed=cfg.run.seed)
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
                     "down_frame_nbytes": down.frame_nbytes}
            writer = MetricsWriter(out, attrs, flush_every=cfg.run.flush_every, overwrite=overwrite)
        server = ServerRuntime(algorithm.server(setting), n, writer)
    return Session(cfg, transport, built.d, workers, server, built.description)


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
    timer = session.timer
    try:
        timer.start()
        for t in range(steps + 1):
            log = is_log_step(t, cfg)
            shares = [w.compute(log) for w in session.workers]  # gradient at x_t
            timer.lap("compute")
            if log:
                rows = transport.gather_stats(torch.stack(shares) if shares else torch.zeros(0, session.d + 1,
                                                                                             dtype=torch.float64))
                if server is not None:
                    row = server.record(t, rows)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4g}", grad_norm_sq=f"{row['grad_norm_sq']:.3g}",
                                        refresh=False)
                timer.lap("metrics")
            if t == steps:
                break
            up, down = session.frame_buffers()
            for i, worker in enumerate(session.workers):
                worker.encode(up[i])
            timer.lap("encode")
            frames = transport.gather_frames(up)
            timer.lap("gather")
            if server is not None:
                server.aggregate(frames, down)
            timer.lap("aggregate")
            transport.broadcast(down)
            timer.lap("broadcast")
            for worker in session.workers:
                worker.update(down, cfg.optim.lr)
            timer.lap("update")
            timer.steps += 1
            if bar is not None:
                bar.update(1)
        _record_timing(session)
        if session.d * transport.n_workers <= FINAL_PARAMS_MAX_ELEMENTS:
            _record_final_params(session)
    finally:
        if bar is not None:
            bar.close()
        if server is not None and server.writer is not None:
            server.writer.close()
    return server.last_row if server is not None else None


def _record_timing(session: Session) -> None:
    """timing/worker_<phase> (seconds per step of each worker's process, gathered) and
    timing/server_<phase> (the server's process) into the metrics file. On the in-process backend one
    process runs everything, so each worker's row is that process's time divided by n."""
    own = session.timer.per_step()
    local = len(session.workers)
    rows = (own / local).repeat(local, 1) if local else torch.zeros(0, len(PHASES), dtype=torch.float64)
    gathered = session.transport.gather_stats(rows)
    server = session.server
    if server is None or server.writer is None:
        return
    for j, phase in enumerate(PHASES):
        server.writer.write_array(f"timing/worker_{phase}", gathered[:, j].numpy())
        server.writer.write_array(f"timing/server_{phase}", own[j:j + 1].numpy())


def _record_final_params(session: Session) -> None:
    """Gather every worker's x; the server checks the copies agree and stores worker 0's."""
    rows = torch.stack([w.params.to(torch.float64) for w in session.workers]) if session.workers \
        else torch.zeros(0, session.d, dtype=torch.float64)
    gathered = session.transport.gather_stats(rows)
    server = session.server
    if server is None:
        return
    differing = [i for i in range(1, gathered.shape[0]) if not torch.equal(gathered[i], gathered[0])]
    if differing:
        raise CdmpiError(f"workers {differing} ended with parameters that differ from worker 0's")
    if server.writer is not None:
        server.writer.write_array("final/params", gathered[0].numpy())


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
