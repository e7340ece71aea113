"""The engine: one process's part of a training run, and the only step loop.

An engine owns, for the workers that live in its process and for the server where it runs there:

- the step pipeline (``cdmpi.exchange``): frame buffers, encode, exchange (star or sharded), aggregate,
  then the update of every local worker's x;
- the decision of each step, made from the control words that travel with the frames
  (``cdmpi.control``): metrics rows, checkpoints, the SIGTERM stop, the end of the run, and the fault
  checks (a non-finite gradient, copies of x that differ, workers out of step);
- the metrics file (on the server) and checkpoints of every role's state, with resume
  (``cdmpi.checkpoint``).

Three drivers step it, all through ``Engine.step``: ``serve()`` (a process without workers, MPI rank 0,
steps until the workers end the run), ``run_problem()`` (``cdmpi train``: the built-in problems' T
steps) and ``cdmpi.api`` (a user's own loop: one step per ``optimizer.step()``).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from . import __version__, algorithms, checkpoint, devices
from .config import Config
from .control import Decision, Flag, Header, decide, x_checksum
from .errors import AgreedError, CdmpiError, RunStopped
from .exchange import FrameExchange
from .metrics import TRAIN_COLUMNS, MetricsWriter
from .rows import Share
from .stepsize import StepSize
from .timing import PHASES, PhaseTimer

FINAL_PARAMS_MAX_ELEMENTS = 50_000_000  # n * d floats gathered at the end; larger runs skip it


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class WorkerStep:
    """What one worker brings to a step: its gradient g_t at x_t (None when it is done), the learning rate
    (a float, or a StepSize per param group), the metric values of a row (a dict each, or None when it logs
    nothing this step) and that row's step (None: this step's; a user's loop sends the values logged
    around step t-1's update with step t), whether it takes no more steps, whether it asks for a checkpoint
    after this step (or, when done, of the end), whether its gradient overflowed under fp16 loss scaling
    (skip: it encodes nothing, and every worker skips the update) and whether it may (amp: it keeps its
    encoder's state so that another worker's skip can undo its encode)."""

    grad: torch.Tensor | None = None
    lr: float | StepSize = 0.0
    train: dict | None = None
    eval: dict | None = None
    done: bool = False
    checkpoint: bool = False
    row: int | None = None
    skip: bool = False
    amp: bool = False
    nograd: bool = False
    later: tuple | None = None  # (step, train, eval) of a later row (a loop's end: what it logged after its last step)

    def rows(self, t: int) -> list[tuple[int, dict | None, dict | None]]:
        """The rows this worker brings to step t: (step, train values, eval values), in step order."""
        rows = [(t if self.row is None else self.row, self.train, self.eval)]
        return rows + [self.later] if self.later is not None else rows

    def logs(self, group: str) -> bool:
        return any((train if group == "train" else ev) is not None for _, train, ev in self.rows(0))


class LocalWorker:
    """A worker that lives in this process: x, its half of the algorithm, and what its driver keeps (a
    problem's sampler, a user's model buffers and random state), all in its checkpoint file."""

    def __init__(self, index: int, params: torch.Tensor, algorithm, driver_state: Stateful):
        self.index = index
        self.params = params
        self.algorithm = algorithm
        self.driver_state = driver_state

    def state_dict(self) -> dict:
        return {"params": self.params.clone(), "algorithm": self.algorithm.state_dict(),
                **self.driver_state.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.params.copy_(state["params"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.driver_state.load_state_dict({k: v for k, v in state.items() if k not in ("params", "algorithm")})


class ServerLog:
    """The server's record of the run: the bits sent so far, the wall time, and the metrics rows."""

    def __init__(self, n_workers: int, reduce: Callable[[list[dict]], dict]):
        self.n_workers = n_workers
        self.reduce = reduce
        self.writer: MetricsWriter | None = None
        self.bits_up = 0
        self.bits_down = 0
        self.start_time = time.perf_counter()
        self.last_row: dict | None = None
        self.last_eval: dict | None = None
        self._bits_before: dict[int, tuple[int, int]] = {}

    def record(self, step: int, group: str, values: list[dict]) -> dict:
        """A row of `group` at `step` from the values the workers gave (worker order), with the bits sent
        before that step."""
        up, down = self._bits_before.get(step, (self.bits_up, self.bits_down))
        row = {"step": step, **self.reduce(values), "bits_up": up, "bits_down": down}
        if group == "train":
            row["wall_time"] = time.perf_counter() - self.start_time
            self.last_row = row
        else:
            self.last_eval = row
        if self.writer is not None:
            self.writer.append(group, row)
        return row

    def count(self, step: int, up, down) -> None:
        """Step `step`'s frames: n upload frames, and the download frame to each of the n workers."""
        self._bits_before = {step: (self.bits_up, self.bits_down)}  # a row may come one step late
        self.bits_up += 8 * up.frame_nbytes * self.n_workers
        self.bits_down += 8 * down.frame_nbytes * self.n_workers

    def state_dict(self) -> dict:
        return {"bits_up": self.bits_up, "bits_down": self.bits_down,
                "wall_time": time.perf_counter() - self.start_time,
                "bits_before": [[step, up, down] for step, (up, down) in self._bits_before.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.bits_up = int(state["bits_up"])
        self.bits_down = int(state["bits_down"])
        self._bits_before = {int(step): (int(up), int(down)) for step, up, down in state.get("bits_before", [])}
        self.start_time = time.perf_counter() - float(state["wall_time"])  # wall_time continues


class ServerRole:
    """server.pt: the star topology's algorithm server (none in the sharded one) and the server's log."""

    def __init__(self, algorithm_server, log: ServerLog):
        self.algorithm_server = algorithm_server
        self.log = log

    def state_dict(self) -> dict:
        return {"algorithm": self.algorithm_server.state_dict() if self.algorithm_server else {},
                **self.log.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.algorithm_server is not None:
            self.algorithm_server.load_state_dict(state["algorithm"])
        self.log.load_state_dict(state)


class ProgressLines:
    """A line on stderr every `every` seconds (rank 0, when stderr is no terminal for a bar): the step, the
    speed, the time left, and the last row's values."""

    def __init__(self, every: float, start_step: int, total: int):
        self.every, self.total = every, total
        self.start, self.start_step = time.monotonic(), start_step
        self.due = self.start + every

    def update(self, step: int, log: "ServerLog") -> None:
        now = time.monotonic()
        if now < self.due:
            return
        self.due = now + self.every
        rate = (step - self.start_step) / max(now - self.start, 1e-9)
        where = f"step {step}"
        if self.total:
            left = (self.total - step) / rate if rate > 0 else float("inf")
            eta = "?" if left == float("inf") else f"{int(left) // 60}:{int(left) % 60:02d}"
            where = f"step {step}/{self.total} ({100 * step / self.total:.0f}%), ETA {eta}"
        row = log.last_row or {}
        values = ", ".join(f"{key} {row[key]:.4g}" for key in ("loss", "grad_norm_sq") if key in row)
        bits = log.bits_up + log.bits_down
        print(f"cdmpi: {where}, {rate:.3g} steps/s" + (f", {values}" if values else "") + f", bits {bits:.4g}",
              file=sys.stderr, flush=True)


class FaultHooks:
    """Fault injection for the reliability tests, from environment variables; inert when unset.
    CDMPI_TEST_PERTURB_X=W:T adds 1e-9 to x[0] of worker W at step T (after its gradient).
    CDMPI_TEST_STEP_SLEEP=S sleeps S seconds per step on every worker (to make runs last).
    CDMPI_TEST_SIGTERM_AT=T: every process sends itself SIGTERM as step T begins (a stop at a known step).
    CDMPI_TEST_SIGTERM_IN_CHECKPOINT=T: every process sends itself SIGTERM as it writes the checkpoint of
    step T.
    CDMPI_TEST_STOP_IN_SETUP=R: rank R stops itself (SIGSTOP) as the set-up begins (see stop_in_setup)."""

    @staticmethod
    def stop_in_setup(rank: int, environ=os.environ) -> None:
        if environ.get("CDMPI_TEST_STOP_IN_SETUP", "") == str(rank):
            import signal

            os.kill(os.getpid(), signal.SIGSTOP)

    def __init__(self, environ=os.environ):
        perturb = environ.get("CDMPI_TEST_PERTURB_X", "")
        self.perturb = tuple(int(v) for v in perturb.split(":")) if perturb else None
        self.sleep = float(environ.get("CDMPI_TEST_STEP_SLEEP", "0") or 0)
        self.sigterm_at = int(environ.get("CDMPI_TEST_SIGTERM_AT", "-1") or -1)
        self.sigterm_in_checkpoint = int(environ.get("CDMPI_TEST_SIGTERM_IN_CHECKPOINT", "-1") or -1)

    def before_checkpoint(self, step: int) -> None:
        if step == self.sigterm_in_checkpoint:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    def before_step(self, t: int, workers: Sequence[LocalWorker]) -> None:
        if t == self.sigterm_at:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
        for w in workers:
            if self.perturb == (w.index, t):
                w.params[0] += 1e-9
        if self.sleep and workers:
            time.sleep(self.sleep)


def _finite_metrics(step: WorkerStep) -> bool:
    """Every metric value the worker brings is finite."""
    for value in (v for _, train, _ in step.rows(0) for v in (train or {}).values()):
        if isinstance(value, Share):
            if not value.finite():
                return False
        elif isinstance(value, torch.Tensor):
            if not bool(torch.isfinite(value).all()):
                return False
        elif isinstance(value, np.ndarray):
            if not np.isfinite(value).all():
                return False
        elif isinstance(value, float) and not math.isfinite(value):
            return False
    return True


def _portable(values: dict | None) -> dict | None:
    """Metric values as they travel to the server: tensors become host NumPy arrays (or floats)."""
    if values is None:
        return None
    out = {}
    for key, value in values.items():
        if isinstance(value, Share):
            value = value.portable()
        elif isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = float(value) if value.dim() == 0 else value.numpy()
        out[key] = value
    return out


class Engine:
    """One process's part of one run. Build it with ``build``."""

    def __init__(self, cfg: Config, transport, exchange: FrameExchange, workers: list[LocalWorker], *, d: int,
                 reduce: Callable[[list[dict]], dict], attrs: dict, description: str):
        self.cfg = cfg
        self.transport = transport
        self.exchange = exchange
        self.workers = workers
        self.d = d
        self.attrs = attrs
        self.description = description
        self.timer = exchange.timer
        self.log = ServerLog(transport.n_workers, reduce) if transport.is_server else None
        self.step_count = 0  # steps taken: the run is at x_{step_count}
        self.checkpoint_root: Path | None = None  # None: no checkpoints
        self.lock = None  # the server's hold on the run's output (cdmpi.lock.RunLock), released at the end
        self.last_checkpoint: Path | None = None  # on the server
        self.stop_requested: Callable[[], bool] = lambda: False  # set by SIGTERM
        self.progress_total: int | None = None  # the server shows a progress bar when this is set
        self.columns: dict[str, dict] = {"train": dict(TRAIN_COLUMNS)}  # known before the run: made with the file
        self.ended = False
        self._hooks = FaultHooks()
        self._bar = None
        self._progress: ProgressLines | None = None
        self._begun = False
        self._traffic = None
        self._logged_steps = 0  # steps whose metric values travelled to the server (train or eval rows)
        self.defer_checkpoints = False  # a user's loop takes a step's checkpoint where its loop body ends
        self.checkpoint_due: tuple[bool, bool] | None = None  # (write one, then stop) after the last step
        self.rows_from = 0  # the first step whose row may still come (a user's loop sends a row one step late)
        # observe(t, inputs) after each step's update: measurements of a study (results/transformer/diagnose.py)
        self.observers: list[Callable[[int, Sequence[WorkerStep]], None]] = []

    # ---- set-up ---------------------------------------------------------------------------------------

    def open_metrics(self, out: str | Path, *, overwrite: bool = False, resume_step: int | None = None,
                     rows_step: int | None = None) -> None:
        """The server's metrics file: a new one, or (resume_step given) the interrupted run's, continued.
        It is made with every column and end-of-run array the run knows of (see cdmpi.metrics)."""
        if self.log is None:
            return
        self.attrs.update(provenance())
        if self.lock is not None:  # who writes this file: `cdmpi watch` tells it from an earlier run's file
            self.attrs["writer"] = json.dumps(self.lock.me, sort_keys=True)
        n, world = self.transport.n_workers, self.transport.world_size
        finals = {"final/steps": ((1,), np.int64)}
        if self.d * n <= FINAL_PARAMS_MAX_ELEMENTS:
            finals["final/params"] = ((self.d,), np.float64)
        for name in (*PHASES, *(f"{phase}_median" for phase in (*PHASES, "step"))):
            finals[f"timing/worker_{name}"] = ((n,), np.float64)
            finals[f"timing/server_{name}"] = ((1,), np.float64)
        if self.transport.traffic() is not None:
            for direction in ("inbound", "outbound"):
                finals[f"comm/{direction}_nbytes_per_step"] = ((world,), np.float64)
                finals[f"comm/metrics_{direction}_nbytes_per_logged_step"] = ((world,), np.float64)
        self.log.writer = MetricsWriter(out, self.attrs, flush_every=self.cfg.run.flush_every, overwrite=overwrite,
                                        resume_step=resume_step, rows_step=rows_step, columns=self.columns,
                                        finals=finals)

    def agree_paths(self) -> None:
        """Collective, in set-up: every rank's device and frame path (into the metrics file's attributes),
        and the agreement on how ranks wait in collectives (comm.wait)."""
        transport = self.transport
        device = self.exchange.frame_device
        votes = transport.allgather((f"{device} {transport.path}", transport.wants_sleep(self.cfg.comm.wait, self.d),
                                     socket.gethostname()))
        paths = [path for path, _, _ in votes]
        sleep = transport.agree_wait([vote for _, vote, _ in votes])
        self.attrs.update(comm_paths=json.dumps(paths), comm_path=", ".join(sorted(set(p.split(" ", 1)[1] for p in paths))),
                          comm_wait="sleep" if sleep else "spin", hosts=json.dumps([host for _, _, host in votes]))

    def resume(self, spec: str, root: Path, warn=None) -> dict | None:
        """Collective: restore every role's state from a checkpoint (see checkpoint.restore); returns its
        manifest (the run goes on at its step), or None when `auto` found none."""
        manifest = checkpoint.restore(self, spec, root, warn=warn)
        if manifest is not None:
            self.step_count = int(manifest["step"])
            self.rows_from = checkpoint.rows_step(manifest)
        return manifest

    def metrics_digest_before(self, step: int) -> str | None:
        writer = self.log.writer if self.log is not None else None
        return writer.digest_before(step) if writer is not None else None

    def metrics_rows_before(self, step: int) -> int:
        writer = self.log.writer if self.log is not None else None
        return writer.rows_before("train", step) if writer is not None else 0

    def roles(self) -> dict[str, tuple[str, Stateful]]:
        """file name -> (role, state holder) for the roles that live in this process."""
        roles = {f"worker-{w.index:04d}.pt": ("worker", w) for w in self.workers}
        roles.update({f"slice-{s:04d}.pt": ("slice", server) for s, server in self.exchange.slice_servers.items()})
        if self.log is not None:
            roles["server.pt"] = ("server", ServerRole(self.exchange.server, self.log))
        return roles

    def checksums(self) -> dict[int, int]:
        return {w.index: x_checksum(w.params) for w in self.workers}

    def flush_metrics(self) -> None:
        if self.log is not None and self.log.writer is not None:
            self.log.writer.flush()

    @property
    def last_row(self) -> dict | None:
        return self.log.last_row if self.log is not None else None

    def _begin(self) -> None:
        self._begun = True
        if getattr(self.transport, "activity", "computing") == "setting up":
            self.transport.activity = "computing"  # the set-up is over: a rank outside collectives steps
        if self.log is not None and self.progress_total is not None:
            if sys.stderr.isatty():
                from tqdm import tqdm

                self._bar = tqdm(total=self.progress_total or None, initial=self.step_count, unit="step",
                                 dynamic_ncols=True, leave=True)
            elif self.cfg.run.progress_every > 0:  # under mpiexec or srun, or into a file: lines
                self._progress = ProgressLines(self.cfg.run.progress_every, self.step_count, self.progress_total)
        self.timer.start()

    # ---- the step ---------------------------------------------------------------------------------------

    def step(self, inputs: Sequence[WorkerStep]) -> Decision:
        """One step of the run for this process: inputs[i] is what its i-th local worker brings. Returns the
        decision; raises AgreedError (every rank) on a fault and RunStopped after a SIGTERM checkpoint."""
        if self.ended:
            raise CdmpiError("this run has ended; it takes no more steps")
        if len(inputs) != len(self.workers):
            raise ValueError(f"{len(inputs)} worker inputs for {len(self.workers)} local workers")
        if not self._begun:
            self._begin()
        try:
            decision = self._step(inputs)
        except (AgreedError, RunStopped):
            self._end()  # every rank ends here together; the rows so far go to the file
            raise
        if Flag.DONE in decision:
            self._finish()
        return decision

    def _step(self, inputs: Sequence[WorkerStep]) -> Decision:
        t, timer = self.step_count, self.timer
        self.transport.step = t
        timer.lap("metrics" if any(s.done for s in inputs) else "compute")  # the last gradient feeds the last row
        self._hooks.before_step(t, self.workers)
        stop = self.stop_requested()
        # Every worker joins the gather another one asks for; a process with nothing to log sends no bytes.
        packed, nbytes = None, 0
        if any(s.logs("train") or s.logs("eval") for s in inputs):
            packed, nbytes = self.transport.pack_objects([[(step, _portable(train), _portable(ev))
                                                           for step, train, ev in s.rows(t)] for s in inputs])
        finite, kept = [], []
        for w, s, frame in zip(self.workers, inputs, self.exchange.upload_frames(t)):
            ok = True
            # under loss scaling another worker's overflow may skip this step: its encode must be undone
            kept.append(w.algorithm.state_dict() if s.amp and not s.skip else None)  # state_dict() copies
            if not s.done and not s.skip:
                ok = w.algorithm.encode(s.grad, frame)
                if ok is None:  # the encoder cannot tell on its way through the gradient
                    ok = bool(torch.isfinite(s.grad).all())
            finite.append(ok and _finite_metrics(s))
        timer.lap("encode")
        headers = [self._header(t, w, s, stop, nbytes, ok) for w, s, ok in zip(self.workers, inputs, finite)]
        timer.lap("checkpoint")  # the checks of x
        decision, down = self.exchange.run(t, headers, stop, self._decide)
        if Flag.ABORT in decision:
            raise AgreedError(decision.error or "the run was stopped by the server (rank 0 says why)")
        done = Flag.DONE in decision
        if Flag.SKIP in decision:  # every worker keeps x and its encoder's state: the step is not taken
            for w, state in zip(self.workers, kept):
                if state is not None:
                    w.algorithm.load_state_dict(state)
        elif not done:
            for w, s in zip(self.workers, inputs):
                w.algorithm.update(w.params, down, s.lr)
            timer.lap("update")
            for observe in self.observers:
                observe(t, inputs)
        if decision.flags & (Flag.LOG | Flag.EVAL):
            self._record(t, decision, packed)
            self._logged_steps += 1
        if not done:
            if self.log is not None:
                self.log.count(t, *self.exchange.frames(t))
            self.step_count = t + 1
            timer.end_step()
            self._traffic = self.transport.traffic()  # per step: the optimizer steps' bytes, not the end's
            if self._bar is not None:
                self._bar.update(1)
            elif self._progress is not None:
                self._progress.update(self.step_count, self.log)
        if Flag.CHECKPOINT in decision or Flag.STOP in decision:
            self.checkpoint_due = (Flag.CHECKPOINT in decision, Flag.STOP in decision)
            if not (self.defer_checkpoints and self.workers) or done:
                self._take_due(final=done and self.cfg.problem.name == checkpoint.OWN_MODEL)
        return decision

    def take_due_checkpoint(self) -> None:
        """Collective: the checkpoint the last step's decision asked for, then the stop it asked for. A user's
        loop (defer_checkpoints) takes it where its loop body ends, after what the body does after
        optimizer.step() (a scheduler's step, logging); the server takes its part at once."""
        if self.checkpoint_due is None:
            return
        try:
            self._take_due()
        except (AgreedError, RunStopped):
            self._end()
            raise

    def _take_due(self, final: bool = False) -> None:
        wanted, stop = self.checkpoint_due
        self.checkpoint_due = None
        if wanted and self.checkpoint_root is not None:
            self._hooks.before_checkpoint(self.step_count)
            path = checkpoint.save(self, self.step_count, self.checkpoint_root, final=final)
            self.last_checkpoint = path or self.last_checkpoint
            self.timer.lap("checkpoint")
        if stop:
            raise RunStopped(self.step_count, self.last_checkpoint)

    def _header(self, t: int, worker: LocalWorker, s: WorkerStep, stop: bool, metrics_nbytes: int,
                finite: bool) -> Header:
        flags = Flag.NONE
        if s.logs("train"):
            flags |= Flag.LOG
        if s.logs("eval"):
            flags |= Flag.EVAL
        if s.skip:
            flags |= Flag.SKIP
        if s.nograd:
            flags |= Flag.NOGRAD
        if stop:
            flags |= Flag.STOP
        if s.done:
            flags |= Flag.DONE
        if s.checkpoint:
            flags |= Flag.CHECKPOINT
        if not finite:
            flags |= Flag.NONFINITE
        checksum = 0
        if t % self.cfg.checkpoint.check_every == 0:
            flags |= Flag.CHECK
            checksum = x_checksum(worker.params)
        return Header(flags, t, checksum, float(s.lr), metrics_nbytes)

    def _decide(self, headers: list[Header], stop: bool) -> Decision:
        decision = decide(self.step_count, headers, stop, checkpoint_every=self.cfg.checkpoint.every,
                          worker_rank=self.transport.worker_rank)
        if Flag.ABORT in decision and decision.error.startswith(("non-finite", "the workers' copies")):
            if self.last_checkpoint is not None:
                note = f"the last checkpoint, {self.last_checkpoint}, holds the last good state"
            elif self.checkpoint_root is not None and checkpoint.list_checkpoints(self.checkpoint_root):
                note = (f"the checkpoints in {self.checkpoint_root} were checked when written (x finite and the "
                        f"same on every worker); --resume auto takes the latest")
            else:
                note = "no checkpoint of this run holds a good state"
            decision = Decision(decision.flags, f"{decision.error}; {note}")
        return decision

    def _record(self, t: int, decision: Decision, packed) -> None:
        """The workers' metric values of step t (packed before the exchange) to the server, into rows."""
        gathered = self.transport.gather_objects(packed, decision.metrics_nbytes)
        if self.log is not None:
            rows = [row for worker_rows in gathered for row in worker_rows]  # worker order within a step
            for row_step in sorted({step for step, _, _ in rows}):
                self.rows_from = max(self.rows_from, row_step + 1)
                train = [values for step, values, _ in rows if step == row_step and values is not None]
                evaluation = [values for step, _, values in rows if step == row_step and values is not None]
                if train:
                    row = self.log.record(row_step, "train", train)
                    if self._bar is not None:
                        self._bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}",
                                              grad_norm_sq=f"{row.get('grad_norm_sq', float('nan')):.3g}",
                                              refresh=False)
                if evaluation:
                    self.log.record(row_step, "eval", evaluation)
        self.timer.lap("metrics")

    def serve(self) -> dict | None:
        """The server's loop (a process without workers): step until the workers end the run."""
        while Flag.DONE not in self.step([]).flags:
            pass
        return self.last_row

    # ---- the end ------------------------------------------------------------------------------------------

    def _finish(self) -> None:
        """Collective, after the last step: time per phase, bytes per rank and the final x into the file."""
        try:
            if self.log is not None and self.log.writer is not None:
                self.log.writer.flush()  # every row is in the file before final/steps says the run finished
                self.log.writer.write_array("final/steps", np.array([self.step_count], dtype=np.int64))
            self._record_timing()
            self._record_traffic()
            if self.d * self.transport.n_workers <= FINAL_PARAMS_MAX_ELEMENTS:
                self._record_final_params()
        finally:
            self._end()

    def _end(self) -> None:
        self.ended = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        try:
            if self.log is not None and self.log.writer is not None:
                self.log.writer.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _record_timing(self) -> None:
        """timing/worker_<phase> (seconds per step of each worker's process, gathered) and
        timing/server_<phase> (the server's process); timing/*_<phase>_median and *_step_median: the medians
        over the last timing.KEEP_STEPS steps of each phase and of the whole step. On the in-process backend one process runs
        everything, so each worker's row is that process's time divided by n."""
        own = torch.cat([self.timer.per_step(), self.timer.medians()])
        local = len(self.workers)
        rows = (own / local).repeat(local, 1) if local else torch.zeros(0, own.numel(), dtype=torch.float64)
        gathered = self.transport.gather_stats(rows)
        if self.log is None or self.log.writer is None:
            return
        names = [*PHASES, *(f"{phase}_median" for phase in (*PHASES, "step"))]
        for j, name in enumerate(names):
            self.log.writer.write_array(f"timing/worker_{name}", gathered[:, j].numpy())
            self.log.writer.write_array(f"timing/server_{name}", own[j:j + 1].numpy())

    def _record_traffic(self) -> None:
        """comm/inbound_nbytes_per_step and comm/outbound_nbytes_per_step, one value per rank (where bytes
        cross links): the bytes each rank received from and sent to other ranks per optimizer step, frames and
        control words, from the buffers and counts handed to the library (set-up and the run's last exchange,
        which ends it, are not steps). comm/metrics_*_nbytes_per_logged_step: the metric values' bytes (the
        pickled values the workers send to the server) per step that logged a row, kept apart from the frames."""
        if self.transport.traffic() is None:
            return
        frames = self._traffic or (0, 0, 0, 0)
        metrics = self.transport.traffic()  # every logged step's values, the last row's included
        per_rank = self.transport.allgather((frames[0], frames[1], metrics[2], metrics[3]))
        steps, logged = max(self.timer.steps, 1), max(self._logged_steps, 1)
        if self.log is not None and self.log.writer is not None:
            for j, direction in enumerate(("inbound", "outbound")):
                self.log.writer.write_array(f"comm/{direction}_nbytes_per_step",
                                            np.array([row[j] / steps for row in per_rank], dtype=np.float64))
                self.log.writer.write_array(f"comm/metrics_{direction}_nbytes_per_logged_step",
                                            np.array([row[2 + j] / logged for row in per_rank], dtype=np.float64))

    def _record_final_params(self) -> None:
        """Gather every worker's x; the server checks the copies agree and stores worker 0's."""
        rows = torch.stack([w.params.detach().to("cpu", torch.float64) for w in self.workers]) if self.workers \
            else torch.zeros(0, self.d, dtype=torch.float64)
        gathered = self.transport.gather_stats(rows)
        if self.log is None:
            return
        differing = [i for i in range(1, gathered.shape[0]) if not torch.equal(gathered[i], gathered[0])]
        if differing:
            raise CdmpiError(f"workers {differing} ended with parameters that differ from worker 0's")
        if self.log.writer is not None:
            self.log.writer.write_array("final/params", gathered[0].numpy())


def provenance() -> dict:
    """Where a run's numbers come from: the versions it ran with and the git commit of cdmpi's checkout."""
    import platform

    import h5py

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "h5py": h5py.__version__}
    mpi4py = sys.modules.get("mpi4py")
    if mpi4py is not None:
        versions["mpi4py"] = mpi4py.__version__
    out = {"versions": json.dumps(versions)}
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                                text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        if commit.returncode == 0 and commit.stdout.strip():
            out["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout, or no git: the versions say what they can
    return out


def build(cfg: Config, transport, *, d: int, dtype: torch.dtype, params: dict[int, torch.Tensor],
          driver_states: dict[int, Stateful], worker_device: torch.device, reduce: Callable[[list[dict]], dict],
          description: str) -> Engine:
    """The engine of this process: its workers start from params[i] (their x, used in place) with
    driver_states[i] checkpointed beside them. Raises CdmpiError on bad input."""
    n = transport.n_workers
    server_device = devices.resolve(cfg.comm.server_device, transport.local_rank)
    frame_device = worker_device if transport.worker_indices else server_device
    if "cuda" in (worker_device.type, server_device.type):
        devices.use_deterministic_kernels(cfg.run.deterministic)
    transport.configure(cfg.comm.cuda_aware, frame_device)
    transport.watch(cfg.comm.timeout)
    compressor = algorithms.compressor_for(cfg.optim.algorithm, cfg.compress.name)
    algorithm = algorithms.get(cfg.optim.algorithm, compressor)
    setting = algorithms.make_setting(compressor, d, n, cfg.optim, dtype, cfg.run.seed, topology=cfg.comm.topology,
                                      ratio=cfg.compress.ratio, k=cfg.compress.k, block=cfg.compress.block,
                                      warmup=cfg.compress.warmup_steps)
    exchange = FrameExchange(transport, algorithm, setting, topology=cfg.comm.topology, frame_device=frame_device,
                             server_device=server_device, worker_device=worker_device,
                             n_local=len(transport.worker_indices), timer=PhaseTimer())
    workers = [LocalWorker(i, params[i], algorithm.worker(setting, i, worker_device), driver_states[i])
               for i in transport.worker_indices]
    up, down = setting.up, setting.down
    attrs = {"config": json.dumps(cfg.applicable(), sort_keys=True), "algorithm": cfg.optim.algorithm,
             "topology": cfg.comm.topology,
             "compressor": compressor, "n_workers": n, "dim": d, "world_size": transport.world_size,
             "backend": transport.name, "mpi_library": transport.mpi_library, "cdmpi_version": __version__,
             "problem": description, "up_frame_nbytes": up.frame_nbytes, "down_frame_nbytes": down.frame_nbytes}
    first_up, first_down = exchange.frames(0)
    if (first_up.frame_nbytes, first_down.frame_nbytes) != (up.frame_nbytes, down.frame_nbytes):
        # a warm-up's fp32 frames come first; up/down_frame_nbytes are the frames after it
        attrs.update(warmup_up_frame_nbytes=first_up.frame_nbytes, warmup_down_frame_nbytes=first_down.frame_nbytes)
    return Engine(cfg, transport, exchange, workers, d=d, reduce=reduce, attrs=attrs, description=description)


# ---- the built-in problems' loop ------------------------------------------------------------------------

class ProblemDriver(Protocol):
    """A built-in problem's worker (cdmpi.worker.ProblemWorker): gradients and metric shares at x."""

    def compute(self, params: torch.Tensor, step: int, log: bool, evaluate: bool) -> WorkerStep: ...


@dataclass(frozen=True)
class Schedule:
    """When a built-in problem's run logs, evaluates and ends, and its learning rate per step."""

    steps: int
    log_every: int
    steps_per_epoch: int = 0  # 0: no epochs, no evaluation
    lr: Callable[[int], float] = lambda step: 0.0
    eval_every: int = 0  # steps between test-set evaluations (0: one per epoch)

    def is_eval(self, step: int) -> bool:
        """Test-set evaluation: at the start, after every epoch (or eval_every steps), and after the last step."""
        every = self.eval_every or self.steps_per_epoch
        return bool(self.steps_per_epoch) and (step % every == 0 or step == self.steps)


def run_problem(engine: Engine, drivers: Sequence[ProblemDriver], schedule: Schedule) -> dict | None:
    """cdmpi train: steps engine.step_count .. T of the local workers (drivers[i] for engine.workers[i]),
    the last one only for the metrics row of x_T; a process without workers serves. Returns the last
    metrics row on the server."""
    if not engine.workers:
        return engine.serve()
    for t in range(engine.step_count, schedule.steps + 1):
        evaluate = schedule.is_eval(t)
        log = t == schedule.steps or evaluate or t % schedule.log_every == 0
        inputs = [d.compute(w.params, t, log, evaluate) for d, w in zip(drivers, engine.workers)]
        for s in inputs:  # the last checkpoint holds x_T before the gradient of the last row draws its batch
            s.lr, s.done, s.checkpoint = schedule.lr(t), t == schedule.steps, t == schedule.steps - 1
        engine.step(inputs)
    return engine.last_row
