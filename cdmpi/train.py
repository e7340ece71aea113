"""`cdmpi train`: the built-in problems (logreg, classifier, sequence, quadratic) as users of the engine."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import devices, problems, runs
from .config import Config, replace
from .engine import Engine, Schedule, build as build_engine, run_problem
from .errors import CdmpiError
from .metrics import EVAL_COLUMNS
from .rows import sum_of_shares
from .worker import ProblemWorker

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def lr_at(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """optim.lr times lr_gamma for every milestone epoch already completed."""
    passed = sum(step >= m * steps_per_epoch for m in cfg.optim.lr_milestones)
    return cfg.optim.lr * cfg.optim.lr_gamma ** passed


@dataclass
class Training:
    """One process's part of a `cdmpi train` run: the engine and the problem's local workers."""

    cfg: Config
    engine: Engine
    drivers: list[ProblemWorker]
    schedule: Schedule

    def run(self) -> dict | None:
        """Train to run.steps (from the resumed step, if any). Returns the last metrics row on the server."""
        return run_problem(self.engine, self.drivers, self.schedule)


def build(cfg: Config, transport, *, out: str | Path | None = None, overwrite: bool = False,
          checkpoints: bool = False) -> Training:
    """Build this process's workers (and the server, where it runs); with `out`, a fresh start into that
    metrics file (runs.start: locked; checkpoints only if asked). Raises CdmpiError on bad input."""
    torch.set_num_threads(cfg.run.threads)
    dtype = DTYPES[cfg.run.dtype]
    worker_device = devices.resolve(cfg.comm.worker_device, transport.local_rank)
    built = problems.build(cfg, transport.n_workers, transport.worker_indices, dtype, worker_device)
    if cfg.run.epochs:
        if not built.steps_per_epoch:
            raise CdmpiError(f"run.epochs needs a problem with epochs (classifier, sequence); {cfg.problem.name!r} has none")
        cfg = replace(cfg, "run", steps=cfg.run.epochs * built.steps_per_epoch)
    drivers = {i: ProblemWorker(built.shards[i], cfg.data.batch_size, cfg.run.seed, i, built.steps_per_epoch)
               for i in transport.worker_indices}
    engine = build_engine(cfg, transport, d=built.d, dtype=dtype,
                          params={i: built.x0.to(worker_device, copy=True) for i in drivers},
                          driver_states=drivers, worker_device=worker_device, reduce=sum_of_shares,
                          description=built.description)
    engine.attrs.update(steps=cfg.run.steps, steps_per_epoch=built.steps_per_epoch)
    if built.data_sha256:
        engine.attrs.update(data_path=str(built.data_path), data_sha256=built.data_sha256)
    engine.columns["train"].update(dict.fromkeys(built.train_columns, np.float64))
    if built.steps_per_epoch:  # the test-set evaluations
        engine.columns["eval"] = {**EVAL_COLUMNS, "epoch": np.float64, "loss": np.float64, "accuracy": np.float64}
    schedule = Schedule(cfg.run.steps, cfg.run.log_every, built.steps_per_epoch,
                        partial(lr_at, cfg=cfg, steps_per_epoch=built.steps_per_epoch), cfg.run.eval_every)
    if out is not None:
        runs.start(engine, out, overwrite=overwrite, checkpoints=checkpoints)
    return Training(cfg, engine, [drivers[i] for i in transport.worker_indices], schedule)
