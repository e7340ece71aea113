"""A training run: set up this process's part of it, then the one step loop every backend shares."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__, algorithms, checkpoint, compress, devices, problems
from .config import Config, replace
from .errors import AgreedError, CdmpiError
from .metrics import EVAL_COLUMNS, MetricsWriter
from .problems.classifier import EVAL_SHARE, TRAIN_SHARE
from .server import ServerRuntime
from .timing import PHASES, PhaseTimer
from .transport import sharded_exchange
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
    device: torch.device  # where this process's frames live (its workers', or the server's)
    steps_per_epoch: int = 0  # 0: no epochs, no lr schedule, no test-set evaluation
    share_layout: str = "gradient"  # see problems.Built
    start_step: int = 0  # > 0 after a resume
    checkpoint_root: Path | None = None  # None: no checkpoints
    stop_requested: Callable[[], bool] = lambda: False  # set by SIGTERM; agreed on at check steps
    stopped_at: int | None = None  # the step a requested stop happened at
    last_checkpoint: Path | None = None  # on the server
    attrs: dict = field(default_factory=dict)  # the metrics file's attributes
    timer: PhaseTimer = field(default_factory=PhaseTimer)  # this process's time per phase of a step
    algorithm: algorithms.Algorithm | None = None
    setting: algorithms.Setting | None = None  # the workers' setting (whole-vector compressors)
    slice_servers: dict = field(default_factory=dict)  # sharded topology: slice index -> its server here
    # Frame buffers by size, made once and reused: an algorithm's frame size may change (onebit-adam).
    _up: dict = field(default_factory=dict)
    _down: dict = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        return self.cfg.comm.topology == "sharded"

    def frame_compressors(self, step: int) -> tuple[compress.Compressor, compress.Compressor]:
        """The compressors of step `step`'s (up, down) frames; every process knows them, even where no
        worker lives (rank 0 of the sharded topology counts bits from them)."""
        return self.algorithm.worker.frames(self.setting, step)

    def frame_buffers(self, up: compress.Compressor, down: compress.Compressor) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(workers), up frame nbytes) and (down frame nbytes,) uint8 buffers on this process's frame device."""
        up_nbytes, down_nbytes = up.frame_nbytes, down.frame_nbytes
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
    compressor = algorithms.compressor_for(cfg.optim.algorithm, cfg.compress.name)
    algorithm = algorithms.get(cfg.optim.algorithm, compressor)
    sharded = cfg.comm.topology == "sharded"
    setting = algorithms.make_setting(compressor, built.d, n, cfg.optim, dtype, cfg.run.seed,
                                      topology=cfg.comm.topology, ratio=cfg.compress.ratio, k=cfg.compress.k)
    workers = [WorkerRuntime(i, built.shards[i], algorithm.worker(setting, i, worker_device), built.x0,
                             batch_size=cfg.data.batch_size, seed=cfg.run.seed, device=worker_device)
               for i in transport.worker_indices]
    slice_servers = {}
    if sharded:  # worker s serves slice s, on the worker's device
        slice_servers = {s: algorithm.server(algorithms.slice_setting(setting, s), worker_device)
                         for s in transport.slices_served(n)}
    server = None
    if transport.is_server:
        server = ServerRuntime(None if sharded else algorithm.server(setting, server_device), n, None,
                               share_layout=built.share_layout, steps_per_epoch=built.steps_per_epoch,
                               device=server_device)
    up, down = setting.up, setting.down
    attrs = {"config": cfg.to_json(), "algorithm": cfg.optim.algorithm, "topology": cfg.comm.topology,
             "compressor": compressor, "n_workers": n, "dim": built.d,
             "world_size": transport.world_size, "backend": transport.name,
             "mpi_library": transport.mpi_library, "cdmpi_version": __version__,
             "problem": built.description, "up_frame_nbytes": up.frame_nbytes,
             "down_frame_nbytes": down.frame_nbytes, "steps": cfg.run.steps,
             "steps_per_epoch": built.steps_per_epoch}
    first_up, first_down = algorithm.worker.frames(setting, 0)
    if (first_up.frame_nbytes, first_down.frame_nbytes) != (up.frame_nbytes, down.frame_nbytes):
        # onebit-adam's fp32 warm-up frames come first; up/down_frame_nbytes are the frames after it
        attrs.update(warmup_up_frame_nbytes=first_up.frame_nbytes, warmup_down_frame_nbytes=first_down.frame_nbytes)
    session = Session(cfg, transport, built.d, workers, server, built.description, frame_device,
                      built.steps_per_epoch, built.share_layout, attrs=attrs, algorithm=algorithm,
                      setting=setting, slice_servers=slice_servers)
    if out is not None:
        open_metrics(session, out, overwrite=overwrite)
    return session


def open_metrics(session: Session, out: str | Path, *, overwrite: bool = False,
                 resume_step: int | None = None) -> None:
    """The server's metrics file: a new one, or (resume_step given) the interrupted run's, continued."""
    if session.server is not None:
        groups = {"eval": EVAL_COLUMNS} if session.steps_per_epoch else {}
        session.server.writer = MetricsWriter(out, session.attrs, flush_every=session.cfg.run.flush_every,
                                              overwrite=overwrite, resume_step=resume_step, groups=groups)


NON_FINITE = -2  # in place of a checksum: this worker's x holds inf or nan


def x_checksum(x: torch.Tensor) -> int:
    """A 62-bit digest of x's bytes; copies of x on different workers must agree bit for bit."""
    digest = hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class FaultHooks:
    """Fault injection for the reliability tests, from environment variables; inert when unset.
    CDMPI_TEST_PERTURB_X=W:T adds 1e-9 to x[0] of worker W before step T.
    CDMPI_TEST_STEP_SLEEP=S sleeps S seconds per step on every worker (to make runs last)."""

    def __init__(self, environ=os.environ):
        perturb = environ.get("CDMPI_TEST_PERTURB_X", "")
        self.perturb = tuple(int(v) for v in perturb.split(":")) if perturb else None
        self.sleep = float(environ.get("CDMPI_TEST_STEP_SLEEP", "0") or 0)

    def before_step(self, t: int, workers) -> None:
        for w in workers:
            if self.perturb == (w.index, t):
                w.params[0] += 1e-9
        if self.sleep and workers:
            time.sleep(self.sleep)


def check_copies(session: Session, t: int) -> bool:
    """Collective: every worker's x checksum and every process's stop request. Returns whether to stop;
    raises AgreedError on every process when the workers' copies of x differ."""
    stop, hashes = session.transport.check(
        session.stop_requested(),
        [x_checksum(w.params) if bool(torch.isfinite(w.params).all()) else NON_FINITE for w in session.workers])

    def where(indices) -> str:
        return ", ".join(f"worker {i} (rank {i + 1 if session.transport.name == 'mpi' else 0})" for i in indices)

    if NON_FINITE in hashes:  # checked before a checkpoint is written, so none holds a non-finite x
        bad = [i for i, h in enumerate(hashes) if h == NON_FINITE]
        raise AgreedError(f"non-finite x at step {t} on {where(bad)}; the last checkpoint holds the last good state")
    values = sorted(set(hashes), key=hashes.count, reverse=True)
    if len(values) > 1:
        odd = [i for i, h in enumerate(hashes) if h != values[0]]
        raise AgreedError(f"the workers' copies of x differ at step {t}: {where(odd)} disagree(s) with the other "
                          f"{len(hashes) - len(odd)} worker(s) (checksum of x, compared every "
                          f"{session.cfg.checkpoint.check_every} steps)")
    return stop


def check_finite_shares(session: Session, t: int, shares: torch.Tensor) -> None:
    """On the server: the loss and gradient shares of every worker must be finite before they are logged."""
    bad = [i for i in range(shares.shape[0]) if not bool(torch.isfinite(shares[i]).all())]
    if bad:
        rank = bad[0] + 1 if session.transport.name == "mpi" else 0
        raise CdmpiError(f"non-finite loss or gradient at step {t} from worker {bad[0]} (rank {rank}); "
                         f"the last checkpoint holds the last good state")


def check_finite(session: Session, t: int) -> None:
    for w in session.workers:
        if not bool(torch.isfinite(w.grad).all()):
            raise CdmpiError(f"non-finite gradient at step {t} on worker {w.index} (rank "
                             f"{session.transport.rank}); the last checkpoint holds the last good state")


def lr_at(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """optim.lr times lr_gamma for every milestone epoch already completed."""
    passed = sum(step >= m * steps_per_epoch for m in cfg.optim.lr_milestones)
    return cfg.optim.lr * cfg.optim.lr_gamma ** passed


def is_eval_step(step: int, session: Session) -> bool:
    """Test-set evaluation: at the start, after every epoch, and after the last step."""
    spe = session.steps_per_epoch
    return bool(spe) and (step % spe == 0 or step == session.cfg.run.steps)


def record_paths(session: Session) -> None:
    """Collective: every rank's device and frame path, kept in the metrics file's attributes, and the
    agreement on how ranks wait in collectives (comm.wait)."""
    transport = session.transport
    votes = transport.allgather((f"{session.device} {transport.path}",
                                 transport.wants_sleep(session.cfg.comm.wait, session.d)))
    paths = [path for path, _ in votes]
    sleep = transport.agree_wait([vote for _, vote in votes])
    server = session.server
    if server is not None and server.writer is not None:
        server.writer.set_attrs({"comm_paths": json.dumps(paths),
                                 "comm_path": ", ".join(sorted(set(p.split(" ", 1)[1] for p in paths))),
                                 "comm_wait": "sleep" if sleep else "spin"})


def is_log_step(step: int, cfg: Config) -> bool:
    return step % cfg.run.log_every == 0 or step == cfg.run.steps


def run(session: Session, progress: bool = False) -> dict | None:
    """T iterations of Algorithm 1. Returns the last metrics row on the server, None elsewhere."""
    cfg, transport, server = session.cfg, session.transport, session.server
    steps = cfg.run.steps
    bar = None
    if progress and server is not None and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=session.start_step, unit="step", dynamic_ncols=True, leave=True)
    record_paths(session)
    hooks = FaultHooks()
    timer = session.timer
    every, check_every, root = cfg.checkpoint.every, cfg.checkpoint.check_every, session.checkpoint_root
    try:
        timer.start()
        for t in range(session.start_step, steps + 1):
            hooks.before_step(t, session.workers)
            if t > session.start_step:  # checks and checkpoints see x_t before its gradient is computed
                save = root is not None and (t == steps or (every > 0 and t % every == 0))
                stop = check_copies(session, t) if save or t % check_every == 0 else False
                stop = stop and t < steps  # at step T the run just finishes
                if save or (stop and root is not None):
                    session.last_checkpoint = checkpoint.save(session, t, root)
                if stop:
                    session.stopped_at = t
                    return server.last_row if server is not None else None
                timer.lap("checkpoint")
            evaluate = is_eval_step(t, session)
            log = is_log_step(t, cfg) or evaluate
            shares = [w.compute(log, evaluate) for w in session.workers]  # gradient at x_t
            if not log:  # on log steps the server finds it in the shares, and keeps its rows when it stops
                check_finite(session, t)
            timer.lap("compute" if t < steps else "metrics")  # at step T the gradient only feeds the last row
            if log:
                width = session.d + 1 if session.share_layout == "gradient" else TRAIN_SHARE + EVAL_SHARE * evaluate
                rows = transport.gather_stats(torch.stack(shares) if shares else torch.zeros(0, width,
                                                                                             dtype=torch.float64))
                if server is not None:
                    check_finite_shares(session, t, rows)
                    row = server.record(t, rows, evaluate)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4g}", grad_norm_sq=f"{row['grad_norm_sq']:.3g}",
                                        refresh=False)
                timer.lap("metrics")
            if t == steps:
                break
            up_compressor, down_compressor = session.frame_compressors(t)
            up, down = session.frame_buffers(up_compressor, down_compressor)
            for i, worker in enumerate(session.workers):
                worker.encode(up[i])
            timer.lap("encode")
            if session.sharded:
                sharded_exchange(transport, session.slice_servers, up, down, up_compressor, down_compressor,
                                 timer.lap)
                if server is not None:  # rank 0 sees no frames; it counts what the workers send
                    server.count_bits(transport.n_workers * up.shape[1], down.numel())
            else:
                frames = transport.gather_frames(up)
                timer.lap("gather")
                if server is not None:
                    server.aggregate(frames, down)
                timer.lap("aggregate")
                transport.broadcast(down)
                timer.lap("broadcast")
            lr = lr_at(t, cfg, session.steps_per_epoch)
            for worker in session.workers:
                worker.update(down, lr)
            timer.lap("update")
            timer.steps += 1
            if bar is not None:
                bar.update(1)
        _record_timing(session)
        _record_traffic(session)
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


def _record_traffic(session: Session) -> None:
    """comm/inbound_nbytes_per_step and comm/outbound_nbytes_per_step, one value per rank (MPI only):
    the frame bytes each rank received from and sent to other ranks per step, from the buffers and counts
    handed to MPI. The busiest rank's inbound bytes are what the topologies are compared by."""
    transport = session.transport
    if transport.name != "mpi":
        return
    per_rank = transport.allgather((transport.inbound_nbytes, transport.outbound_nbytes))
    server, steps = session.server, max(session.timer.steps, 1)
    if server is not None and server.writer is not None:
        for j, direction in enumerate(("inbound", "outbound")):
            server.writer.write_array(f"comm/{direction}_nbytes_per_step",
                                      torch.tensor([row[j] / steps for row in per_rank], dtype=torch.float64).numpy())


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
