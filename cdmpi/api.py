"""Your own model with cdmpi: a plain PyTorch loop, run by ``cdmpi.launch``.

    import cdmpi

    def train(run):                                  # one worker's loop
        model = Net().to(run.device)
        opt = run.optimizer(model, lr=1e-3)           # CD-Adam; a torch.optim.Optimizer
        for step in run.steps(1000):                 # from 0, or from where a stopped run was
            x, y = batch(run.worker, step)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log(loss=loss.item())                 # this step's row in the metrics file

    cdmpi.launch(train, out="run.h5", workers=4, resume="auto")

Under ``mpiexec -n N+1 python script.py`` rank 0 becomes the server and ranks 1..N run ``train``; under
plain ``python`` the N workers run ``train`` in this process, taking turns (one runs at a time, each with
its own random state, seeded from run.seed), so both give the same bits. The run gets everything ``cdmpi
train`` has: HDF5 metrics (the bits are counted), checkpoints of every rank's state with bit-exact resume,
SIGTERM ends in a checkpoint and exit status 75, and the fault checks. The server needs no step count: it
serves until the workers' loops end. Loops without ``run.steps()`` work too (see ``Run``).
"""

from __future__ import annotations

import random
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import checkpoint, config, devices, engine as engines, launcher, log, runs
from .config import Config
from .engine import Engine, WorkerStep
from .errors import EXIT_BAD_INPUT, AgreedError, CdmpiError, RunStopped, SetupFailed
from .control import Decision, Flag
from .optimizer import DistributedOptimizer
from .rows import mean_of_workers
from .signals import StopOnSigterm

# launch()'s settings: the config keys that apply to a user's loop.
SETTINGS = ("run.seed", "run.threads", "run.flush_every", "run.deterministic", "run.progress_every",
            "checkpoint.every", "checkpoint.dir",
            "checkpoint.keep", "checkpoint.check_every", "comm.cuda_aware", "comm.worker_device",
            "comm.server_device", "comm.topology", "comm.wait", "comm.timeout")
RESERVED_COLUMNS = ("step", "bits_up", "bits_down", "wall_time", "grad_norm_sq")


class _Cancelled(BaseException):
    """Another worker of this process failed: unwinds this worker's function."""


# ---- random state: each worker's own, as if it were a process of its own ---------------------------------

def random_state() -> dict:
    """This thread's view of the global generators (torch, CUDA, NumPy, random), in types that
    torch.load(weights_only=True) reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, python_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": version, "words": list(words), "gauss": python_gauss}}


def seed_random_state(seed: int, worker: int) -> None:
    """Seed this thread's global generators for worker `worker` of a run with run.seed `seed`: the same in
    process and under MPI, whatever the process's own seed was (each worker its own stream)."""
    from .problems.sampling import seed_key

    key = seed_key(seed, 5, worker)
    torch.manual_seed(key)
    np.random.seed(key % 2**32)
    random.seed(key)


def set_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"]), p["gauss"]))


class _Solo:
    """The workers of an MPI rank: one, in the rank's own thread."""

    def __init__(self, index: int, seed: int):
        self.indices = [index]
        seed_random_state(seed, index)

    def together(self, index: int, item, action: Callable[[list], object]):
        return action([item])

    def random_state(self, index: int) -> dict:
        return random_state()

    def set_random_state(self, index: int, state: dict) -> None:
        set_random_state(state)


class _Turns:
    """The n workers of an in-process run, one thread each, taking turns: one runs at a time, in index
    order, from one `together` call to the next; the last to arrive runs the action for all of them. Each
    worker's global random state is put aside when it hands over and taken back when its turn comes, so
    every worker draws what it would draw as a process of its own."""

    def __init__(self, n: int, seed: int):
        self.indices = list(range(n))
        self.n = n
        self._cond = threading.Condition()
        self._turn = 0
        self._items: list = [None] * n
        self._arrived = 0
        self._generation = 0
        self._outcome: tuple = ("ok", None)
        self._states = []
        launching = random_state()
        for index in range(n):  # each worker's own seeded generators, as under MPI
            seed_random_state(seed, index)
            self._states.append(random_state())
        set_random_state(launching)
        self.failure: BaseException | None = None

    def _wait_turn(self, index: int, generation: int = -1) -> None:
        while not (self._turn == index and self._generation > generation) and self.failure is None:
            self._cond.wait()
        if self.failure is not None:
            raise _Cancelled()
        set_random_state(self._states[index])

    def start(self, index: int) -> None:
        with self._cond:
            self._wait_turn(index)

    def together(self, index: int, item, action: Callable[[list], object]):
        with self._cond:
            self._states[index] = random_state()
            self._items[index] = item
            self._arrived += 1
            generation = self._generation
            if self._arrived == self.n:
                try:
                    self._outcome = ("ok", action(list(self._items)))
                except BaseException as err:  # noqa: BLE001 - every worker must learn how it ended
                    self._outcome = ("error", err)
                self._arrived, self._items = 0, [None] * self.n
                self._generation += 1
                self._turn = 0
            else:
                self._turn = index + 1
            self._cond.notify_all()
            self._wait_turn(index, generation)
            status, value = self._outcome
        if status == "error":
            raise value
        return value

    def leave(self, index: int) -> None:
        """This worker's function has ended: the next one's turn."""
        with self._cond:
            self._turn = index + 1
            self._cond.notify_all()

    def fail(self, err: BaseException) -> None:
        with self._cond:
            if self.failure is None:
                self.failure = err
            self._cond.notify_all()

    def random_state(self, index: int) -> dict:
        return self._states[index]  # inside an action every worker's state is put aside

    def set_random_state(self, index: int, state: dict) -> None:
        self._states[index] = state


# ---- the run as one worker sees it --------------------------------------------------------------------

class Run:
    """Handed to your function, one per worker: the worker's place in the run, its optimizer, its loop, its
    metrics and its own state for the checkpoints.

    Where a step ends. `for step in run.steps(total)` tells cdmpi where the loop body ends: the row of a
    step holds what the body logged, before and after optimizer.step(), and a checkpoint is taken between
    two bodies, after the body's scheduler step and logging; a resumed run starts the loop at its step. A
    loop that only calls optimizer.step() (a `Trainer` of its own, a loop over a DataLoader's epochs)
    resumes by replaying its first steps without training (every optimizer.step() returns at once and
    nothing travels), up to the optimizer.step() where the checkpoint was taken; there cdmpi puts back the
    state and the loop goes on. Its rows: values logged between two optimizer.step() calls belong to the
    step before them when the loop's first step came before its first run.log() (logging after
    optimizer.step()), else to the step after them; values logged before the first step, to step 0."""

    def __init__(self, job: "_Job", index: int):
        self._job = job
        self.worker = index  # this worker's index, 0 .. workers - 1
        self.workers = job.transport.n_workers
        self.device = job.worker_device  # where this worker computes (comm.worker_device)
        self.model: nn.Module | None = None  # the module kept in step (run.optimizer(model=...))
        self._optimizer: DistributedOptimizer | None = None
        self._state: dict = {}
        self._restored: dict = {}  # run.state() values of the checkpoint being resumed
        self._resumed: dict | None = None  # the checkpoint's loop state, put back where the loop resumes
        self._steps = 0  # the optimizer steps this loop has taken (replayed ones included)
        self._replay = 0  # optimizer steps still to replay
        self._loop = False  # the loop runs over run.steps()
        self._body_steps = 0  # optimizer steps in the current run.steps() body
        self._lag: int | None = None  # optimizer.step()-only loops: 1 when values logged after a step are its row's
        self._open = _Row()  # the row being logged
        self._closed: _Row | None = None  # a finished row not yet sent (it travels with the next step)

    @property
    def step(self) -> int:
        """The step the loop is at: 0 on a fresh run; on a resumed one, once the optimizer is made, the
        checkpoint's step when the loop runs over run.steps(), else the steps replayed so far."""
        return self._steps

    def optimizer(self, params, *, model: nn.Module | None = None, **options) -> DistributedOptimizer:
        """The run's optimizer, a torch.optim.Optimizer: params is a module (its trainable parameters), an
        iterable of tensors, or param groups (dicts with "params" and their own "lr", "weight_decay",
        "decoupled_weight_decay"), all on one device, float32 or float64. model: the module whose every
        parameter and buffer (frozen ones, BatchNorm statistics) starts from worker 0's values and is
        checkpointed (default: params, when it is a module). Options: algorithm ("cdadam", or any of
        cdmpi.algorithms.ALGORITHMS), lr, betas, eps, weight_decay, decoupled_weight_decay (AdamW's decay
        instead of L2), compressor ("auto": the algorithm's own), ratio and k (top-k / random-k),
        warmup_steps (onebit-adam), block (scales per block of coordinates: scaled_sign, two_level_sign),
        compress_warmup_steps (cdadam, ef21: fp32 frames for the first steps). Every worker must make it
        with the same model and options. On a resumed run the parameters and the optimizer's state are
        restored here."""
        if self._optimizer is not None or self._job.engine is not None:
            raise CdmpiError("run.optimizer() was called twice; a run has one optimizer per worker")
        self.model = model if model is not None else params if isinstance(params, nn.Module) else None
        try:
            if self.model is not None and not isinstance(self.model, nn.Module):
                raise CdmpiError(f"run.optimizer(model=...) takes a torch.nn.Module, got {type(self.model).__name__}")
            self._optimizer = DistributedOptimizer(self, params, options)
        except CdmpiError as err:  # bad options: every rank stops with exit status 2, rank 0 says why
            self._job.set_up(self, error=str(err))
            raise SetupFailed() from None
        self._job.set_up(self)
        return self._optimizer

    def state(self, **defaults) -> dict:
        """Your own state for the checkpoints (epoch, best accuracy, a scheduler, a torch.Generator, a
        GradScaler...): a dict holding the defaults, or on a resumed run the checkpoint's values. Keep it up
        to date in place; values with state_dict()/load_state_dict() (schedulers, scalers) and generators
        (get_state()/set_state()) are saved and restored through those. Every call adds its keys to the same
        dict."""
        for key, value in defaults.items():
            if key not in self._state:
                self._state[key] = value
                self._restore(key)
        return self._state

    def steps(self, total: int):
        """The loop's steps, from where the run is (0, or a resumed checkpoint's step) to total - 1. cdmpi
        owns the boundary between two bodies: each body takes one optimizer.step(), its row holds what it
        logged before and after it, and checkpoints are taken between bodies."""
        if self._optimizer is None:
            raise CdmpiError("run.steps() comes after run.optimizer(): the run's step is known once it is made")
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise CdmpiError(f"run.steps(total): total must be an int >= 0, got {total!r}")
        if self._steps and not self._loop and self._resumed is None:
            raise CdmpiError("run.steps() after optimizer.step() calls outside it: one loop drives a run")
        self._loop = True
        if self._job.engine.progress_total is not None:  # the progress line shows the total (in process)
            self._job.engine.progress_total = total
        return self._step_loop(total)

    def _step_loop(self, total: int):
        if self._resumed is not None:
            if self._resumed.get("boundary") != "loop":
                raise CdmpiError(f"the checkpoint of step {self._steps} was written by a loop without run.steps(); "
                                 f"resume it with that loop (it replays its steps), or start over")
            self._resume_here()
        for t in range(self._steps, total):
            self._open = _Row(t)
            self._body_steps = 0
            yield t
            self._end_body(t)

    def _end_body(self, t: int) -> None:
        if self._body_steps != 1:
            raise CdmpiError(f"the body of run.steps() took {self._body_steps} optimizer steps at step {t}; "
                             f"each takes one optimizer.step()")
        self._closed, self._open = self._open.closed(), _Row(t + 1)
        self._take_due_checkpoint()  # between two bodies: the body's state is complete

    def _take_due_checkpoint(self) -> None:
        """The checkpoint (and stop) the last step's decision asked for, taken where this loop's step has
        ended: between two run.steps() bodies, else as the next optimizer.step() or the function's return
        begins (after the body's scheduler step and logging)."""
        if self._job.engine.checkpoint_due is not None:
            self._job.group.together(self.worker, None, lambda _: self._job.engine.take_due_checkpoint())

    def loader(self, dataset, batch_size: int, *, shuffle: bool = True, **options):
        """This worker's batches, one per step, from the step the loop is at: a torch DataLoader over the
        worker's shard of `dataset` (every workers-th sample), in an order that is a function of (run.seed,
        worker, epoch) and so continues on resume; the last partial batch of each epoch is dropped. options
        go to torch.utils.data.DataLoader (num_workers, collate_fn, pin_memory...)."""
        from torch.utils.data import DataLoader

        from .problems.sampling import seed_key

        shard = len(dataset) // self.workers
        if shard < batch_size:
            raise CdmpiError(f"run.loader(): each of the {self.workers} workers gets {shard} of the {len(dataset)} "
                             f"samples, fewer than batch_size = {batch_size}")
        seed = self._job.settings.run.seed
        sampler = _ShardBatches(shard, batch_size, self.worker, self.workers, seed, shuffle, self._steps)
        generator = torch.Generator().manual_seed(seed_key(seed, 4, self.worker))  # no draw from the global one
        return iter(DataLoader(dataset, batch_sampler=sampler, generator=generator, **options))

    def log(self, **values) -> None:
        """Values of this step's row in /train (see the class: which step a value belongs to): floats, each
        the mean over the workers that logged it."""
        self._open.train = {**(self._open.train or {}), **_scalars(values, "log")}

    def log_eval(self, **values) -> None:
        """A row in /eval at this step (e.g. test accuracy), the mean over the workers that logged it."""
        self._open.eval = {**(self._open.eval or {}), **_scalars(values, "log_eval")}

    # ---- optimizer.step() ------------------------------------------------------------------------------

    def _optimizer_step(self, opt: DistributedOptimizer, grad_scaler) -> None:
        if grad_scaler is not None and grad_scaler._per_optimizer_states[id(opt)]["stage"].name == "READY":
            grad_scaler.unscale_(opt)  # the inf check of this worker's gradient, and its true values
        if self._replay:
            self._replay_one()
            return
        if self._resumed is not None:  # the replay has come to where the checkpoint was taken
            self._resume_replayed()
        self._take_due_checkpoint()
        self._body_steps += 1
        opt.gather_grads()
        nograd = opt.took_no_gradient()
        found_inf = grad_scaler is not None and bool(sum(
            v.item() for v in grad_scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values()))
        opt.add_coupled_decay()
        grad = opt.flat_grad
        t = self._steps
        norm_sq = None if found_inf else torch.dot(grad, grad)  # read (a host sync) only for a logged row
        if self._loop:
            send, self._closed = self._closed, None  # the last body's row
            self._open.grad_norm_sq = norm_sq
        else:
            self._decide_lag()
            if self._lag == 0:  # values logged since the last step describe this one
                self._open.step, self._open.grad_norm_sq = t, norm_sq
                send, self._open = self._open.closed(), _Row(t + 1)
            else:  # they describe the last one (before the first step: x_0); this step's row opens now
                if self._open.step is None:
                    self._open.step = t
                send, self._open = self._open.closed(), _Row(t)
                self._open.grad_norm_sq = norm_sq
        item = WorkerStep(grad, opt.step_size(), send.train if send else None, send.eval if send else None,
                          row=send.step if send else None, skip=found_inf, amp=grad_scaler is not None,
                          nograd=nograd)
        self._steps = t + 1
        decision = self._job.step(self, item)
        if grad_scaler is not None and Flag.SKIP in decision:  # every worker's scaler backs off alike
            for found in grad_scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values():
                found.fill_(1.0)

    def _decide_lag(self) -> None:
        """The loop's first step decides which step its values describe: logged (run.log) before it, the
        next step's; else the last one's."""
        if self._lag is None:
            self._lag = 0 if self._open.train is not None else 1

    @property
    def replaying(self) -> bool:
        """True while a resumed loop replays the steps before its checkpoint's (optimizer.step() returns at
        once then, and what the loop logs is dropped): a loop can skip its evaluations and saving then."""
        return self._replay > 0

    def _replay_one(self) -> None:
        """A step before the resumed checkpoint's: nothing is computed or sent."""
        self._replay -= 1
        self._steps += 1
        self._decide_lag()
        self._open = _Row(self._steps)  # what the replayed steps log is not kept
        if not self._replay:
            self._job.transport.activity = "computing"

    def _resume_replayed(self) -> None:
        """The replay has reached the checkpoint's step (the next optimizer.step() begins, or the function
        returns): the state of the checkpoint, taken at this very point, comes back."""
        if self._resumed.get("boundary") == "loop":
            raise CdmpiError(f"the checkpoint of step {self._steps} was written by a loop over run.steps(); "
                             f"resume it with that loop")
        self._resume_here()

    def _finish_rows(self) -> list[tuple[int, dict | None, dict | None]]:
        """The rows that go with the end of the run: the last step's, and what was logged after it (in a
        run.steps() loop, or logged-before-the-step order: the row of x_T, the final parameters)."""
        rows = [self._closed] if self._closed is not None else []
        last = self._open.closed()
        if last is not None:
            if self._loop or self._lag == 0:
                last.step = self._steps
            rows.append(last)
        return [(row.step, row.train, row.eval) for row in rows]

    # ---- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The loop's checkpoint state: the module's frozen parameters and buffers, random state, your
        state, the hyper-parameters, the rows not yet sent, and where it was taken."""
        opt = self._optimizer
        return {"boundary": "loop" if self._loop else "step", "step": self._steps, "lag": self._lag,
                "module": {k: v.detach().clone() for k, v in _module_state(self.model, opt).items()},
                "random": self._job.group.random_state(self.worker), "user": self._user_state(),
                "param_groups": opt.hyper_parameters(), "open": self._open.state_dict(),
                "closed": self._closed.state_dict() if self._closed is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """At set-up, from the checkpoint being resumed. A run.steps() loop starts at the checkpoint's step:
        what code before the loop reads comes back now, the rest where the loop starts. Any other loop
        replays its steps from 0 and gets everything back after the last replayed one."""
        self._resumed = state
        if state.get("boundary") == "loop":
            self._steps = int(state["step"])
            self._put_back(state)
        else:
            self._replay = int(state["step"])
            if self._replay:
                self._job.transport.activity = "replaying"
                if self.worker == 0:
                    log.LOGGER.warning("replaying the first %d steps of the loop without training, to the "
                                       "checkpoint's (a loop over run.steps() would start there)", self._replay)

    def _resume_here(self) -> None:
        """Where the resumed loop takes over: the state of the checkpoint comes back. (A replayed loop drew
        the same random numbers as the run it resumes: its generators are where the checkpoint's were.)"""
        state, self._resumed = self._resumed, None
        self._put_back(state)
        if state["boundary"] == "loop":
            set_random_state(state["random"])  # this worker's thread holds the global generators now
        self._steps, self._lag = int(state["step"]), state["lag"]
        self._open = _Row.from_state(state["open"])
        self._closed = _Row.from_state(state["closed"]) if state["closed"] is not None else None

    def _put_back(self, state: dict) -> None:
        """The module's frozen parameters and buffers, run.state() and the hyper-parameters of a checkpoint."""
        own = _module_state(self.model, self._optimizer)
        with torch.no_grad():
            for name, value in state["module"].items():
                own[name].copy_(value)
        self._restored = dict(state["user"])
        for key in list(self._state):
            self._restore(key)
        self._optimizer.load_hyper_parameters(state["param_groups"])

    def _user_state(self) -> dict:
        user = {k: _saved(v) for k, v in self._state.items()}
        user.update(self._restored)  # restored values not yet asked for by run.state() stay in the checkpoint
        return user

    def _restore(self, key: str) -> None:
        if key not in self._restored:
            return
        saved = self._restored.pop(key)
        value = self._state[key]
        if isinstance(value, torch.Generator):
            value.set_state(saved)
        elif hasattr(value, "load_state_dict"):
            value.load_state_dict(saved)
        else:
            self._state[key] = saved


class _Row:
    """The metric values logged for one step's row, and that step's gradient norm (added when the row has
    values)."""

    def __init__(self, step: int | None = None):
        self.step = step
        self.train: dict | None = None
        self.eval: dict | None = None
        self.grad_norm_sq: float | None = None

    def logged(self) -> bool:
        return self.train is not None or self.eval is not None

    def closed(self) -> "_Row | None":
        """The row as it is sent, or None when nothing was logged for it."""
        if not self.logged():
            return None
        if self.train is not None and self.grad_norm_sq is not None:
            self.train = {**self.train, "grad_norm_sq": float(self.grad_norm_sq)}
            self.grad_norm_sq = None
        return self

    def state_dict(self) -> dict:
        norm_sq = None if self.grad_norm_sq is None else float(self.grad_norm_sq)
        return {"step": self.step, "train": self.train, "eval": self.eval, "grad_norm_sq": norm_sq}

    @classmethod
    def from_state(cls, state: dict) -> "_Row":
        row = cls(state["step"])
        row.train, row.eval, row.grad_norm_sq = state["train"], state["eval"], state["grad_norm_sq"]
        return row


class _ShardBatches:
    """run.loader()'s batch sampler: worker w's shard is samples w, w + n, ...; each epoch a permutation of
    it drawn from (seed, worker, epoch), in batches, the last partial one dropped; endless, from a step."""

    def __init__(self, shard: int, batch_size: int, worker: int, workers: int, seed: int, shuffle: bool, start: int):
        from .problems.sampling import EpochSampler

        self.worker, self.workers, self.shuffle = worker, workers, shuffle
        self.sampler = EpochSampler(shard, batch_size, seed, worker)
        per_epoch = self.sampler.steps_per_epoch
        self.sampler.load_state_dict({"epoch": start // per_epoch, "position": start % per_epoch})

    def __iter__(self):
        while True:
            rows = self.sampler.next()
            if not self.shuffle:
                start = self.sampler.batch_size * (self.sampler.position - 1)
                rows = torch.arange(start, start + self.sampler.batch_size)
            yield (rows * self.workers + self.worker).tolist()


def _module_state(model: nn.Module | None, opt: DistributedOptimizer) -> dict[str, torch.Tensor]:
    """The module's tensors that are not in the flat vector: frozen parameters and buffers, by name."""
    if model is None:
        return {}
    flat = {id(p) for p in opt.flat_params}
    named = {f"param:{k}": p for k, p in model.named_parameters() if id(p) not in flat}
    named.update({f"buffer:{k}": b for k, b in model.named_buffers()})
    return named


def _saved(value):
    if isinstance(value, torch.Generator):
        return value.get_state()
    return value.state_dict() if hasattr(value, "state_dict") else value


def _scalars(values: dict, what: str) -> dict:
    out = {}
    for key, value in values.items():
        if key in RESERVED_COLUMNS:
            raise CdmpiError(f"run.{what}({key}=...): {key} is measured by cdmpi; choose another name")
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise CdmpiError(f"run.{what}({key}=...) takes numbers, got {type(value).__name__}") from None
    return out


def _settings_config(settings: dict | None) -> Config:
    values: dict = {}
    for key, value in (settings or {}).items():
        if key not in SETTINGS:
            hint = (" (give optimizer options to run.optimizer())" if key.startswith(("optim.", "compress."))
                    else "")
            raise CdmpiError(f"launch(settings=...): {key!r} does not apply to your own loop{hint}; the settings "
                             f"are {', '.join(SETTINGS)}")
        section, name = key.split(".")
        values.setdefault(section, {})[name] = value
    return config.from_dict(values)


# ---- the job: one process's part of the run --------------------------------------------------------------

class _Job:
    """Everything of the run in this process: the transport, the workers' group, and the engine once the
    workers have made their optimizers."""

    def __init__(self, transport, group, settings: Config, *, out, resume, overwrite):
        self.transport = transport
        self.group = group
        self.settings = settings
        self.out, self.resume, self.overwrite = out, resume, overwrite
        self.worker_device = devices.resolve(settings.comm.worker_device, transport.local_rank)
        self.engine: Engine | None = None
        self.runs: dict[int, Run] = {}
        self.stop_requested: Callable[[], bool] = lambda: False
        self.quiet = False

    def local_worker(self, index: int):
        return next(w for w in self.engine.workers if w.index == index)

    # set-up: every worker's description meets on the server, which builds the run's config
    def set_up(self, run: Run, error: str | None = None) -> None:
        """Collective (every worker, and the server): the run's config from every worker's model and options,
        then the engine, then resume or a fresh start. Raises SetupFailed on every rank if any failed."""
        self.runs[run.worker] = run
        self.group.together(run.worker, _hello(run, error), self._set_up_workers)

    def _set_up_workers(self, hellos: list[dict]) -> None:
        transport = self.transport
        if transport.is_server:  # in process: the server is here
            agreed = {}
            if not runs.agreed(lambda: agreed.update(cfg=_agree(self.settings, hellos)), transport, 0):
                raise SetupFailed()
            cfg = agreed["cfg"]
        else:
            transport.collect(hellos[0])
            cfg = transport.share(None)
            if cfg is None:
                raise SetupFailed()
        self._build(cfg, hellos[0], {i: self.runs[i] for i in transport.worker_indices})

    def set_up_server(self) -> None:
        """The server's side of the set-up (MPI rank 0): it agrees the config from the workers' hellos."""
        hellos = self.transport.collect(None)[1:]
        cfg = None
        try:
            cfg = _agree(self.settings, hellos)
        except CdmpiError as err:
            print(f"cdmpi: error: {err}", file=sys.stderr)
        self.transport.share(cfg)
        if cfg is None:
            raise SetupFailed()
        self._build(cfg, hellos[0], {})

    def _build(self, cfg: Config, hello: dict, runs_here: dict[int, Run]) -> None:
        """Every worker starts from worker 0's parameters and buffers (however each seeded); then, as agreed
        phases, this process's engine and the resume or fresh start."""
        transport = self.transport
        if runs_here:
            here = [runs_here[i] for i in sorted(runs_here)]
            with torch.no_grad():
                transport.bcast_from_worker_0([run._optimizer.flat for run in here])
                tensors = [_module_state(run.model, run._optimizer) for run in here]
                for name, _, _ in hello["module"]:
                    transport.bcast_from_worker_0([own[name] for own in tensors])
        for phase in (partial(self._build_engine, cfg, hello, runs_here), self._start):
            if not runs.agreed(phase, transport, transport.rank):
                raise SetupFailed()
        self.engine.stop_requested = self.stop_requested
        self.engine.defer_checkpoints = True  # taken where the loop's step ends (Run._take_due_checkpoint)
        if not self.quiet:
            self.engine.progress_total = 0
        log.LOGGER.info("%s; %s with %s, %d workers, %s backend", self.engine.description, cfg.optim.algorithm,
                        self.engine.attrs["compressor"], transport.n_workers, transport.name)

    def _build_engine(self, cfg: Config, hello: dict, runs_here: dict[int, Run]) -> None:
        device = runs_here[min(runs_here)]._optimizer.flat.device if runs_here else self.worker_device
        self.engine = engines.build(cfg, self.transport, d=hello["d"], dtype=getattr(torch, hello["dtype"]),
                                    params={i: r._optimizer.flat for i, r in runs_here.items()},
                                    driver_states=runs_here, worker_device=device, reduce=mean_of_workers,
                                    description=f"own model {hello['model']}: {hello['d']} parameters")

    def _start(self) -> None:
        step = runs.start(self.engine, self.out, resume=self.resume, overwrite=self.overwrite,
                          warn=log.LOGGER.warning)
        if step is not None:
            log.LOGGER.info("resuming from checkpoint step %d in %s", step, self.engine.checkpoint_root)

    def step(self, run: Run, item: WorkerStep) -> Decision:
        return self.group.together(run.worker, item, self.engine.step)

    def finish(self, run: Run) -> None:
        """The worker's function returned: its last logs, and the end of the run once every worker is here."""
        if run._optimizer is None:
            raise CdmpiError(f"worker {run.worker}'s function returned without making an optimizer "
                             f"(run.optimizer(model, ...))")
        if run._replay:
            raise CdmpiError(f"worker {run.worker}'s function returned after {run.step} steps, while the resumed "
                             f"checkpoint is at step {run.step + run._replay}: the loop must take the same steps "
                             f"as the run it resumes")
        if run._resumed is not None:
            run._resume_replayed()
        run._take_due_checkpoint()
        rows = run._finish_rows() or [(run.step, None, None)]
        run._open, run._closed = _Row(run.step), None  # they go with the end (the end's checkpoint holds none)
        (row, train, evaluation), *later = rows
        self.group.together(run.worker, WorkerStep(None, 0.0, train, evaluation, done=True, checkpoint=True,
                                                   row=row, later=later[0] if later else None), self.engine.step)


def _hello(run: Run, error: str | None) -> dict:
    """What a worker tells the server about its model and options (small: no tensors), or what was wrong."""
    if error is not None:
        return {"error": error, "worker": run.worker}
    opt = run._optimizer
    return {"d": opt.flat.numel(), "dtype": str(opt.flat.dtype).removeprefix("torch."),
            "model": type(run.model).__name__ if run.model is not None else "parameters",
            "groups": [hi - lo for lo, hi in opt.ranges],
            "module": [(name, tuple(t.shape), str(t.dtype)) for name, t in _module_state(run.model, opt).items()],
            "optim": opt.options.to_dict()["optim"], "compress": opt.options.to_dict()["compress"]}


def _agree(settings: Config, hellos: list[dict]) -> Config:
    """The run's config from the launch settings and the workers' optimizers, which must all agree."""
    for hello in hellos:
        if "error" in hello:
            raise CdmpiError(hello["error"])
    first = hellos[0]
    for i, hello in enumerate(hellos[1:], 1):
        differ = [k for k in first if hello[k] != first[k]]
        if differ:
            k = differ[0]
            raise CdmpiError(f"the workers made different optimizers: worker 0 has {k} = {first[k]!r}, "
                             f"worker {i} has {hello[k]!r}; every worker must build the same model and options")
    values = settings.to_dict()
    values.update(optim=first["optim"], compress=first["compress"])
    values["run"].update(dtype=first["dtype"], workers=len(hellos), steps=1)
    values["problem"]["name"] = checkpoint.OWN_MODEL
    return config.from_dict(values)


# ---- launch ---------------------------------------------------------------------------------------------

def launch(fn: Callable[[Run], object], *, out: str | Path | None = None, workers: int | None = None,
           resume: str | None = None, overwrite: bool = False, settings: dict | None = None,
           backend: str = "auto", quiet: bool = False) -> list:
    """Run fn(run) on every worker. Under an MPI launcher (mpiexec -n N+1, srun) rank 0 serves and ranks
    1..N are the workers; otherwise `workers` workers (default 1) run in this process.

    out: the HDF5 metrics file (checkpoints go to OUT.ckpt/); resume: "auto" (the newest valid checkpoint,
    or a fresh start) or a checkpoint path; overwrite: replace an earlier run's file and checkpoints;
    settings: config keys that apply to your loop, e.g. {"checkpoint.every": 50, "comm.topology":
    "sharded"} (see cdmpi.api.SETTINGS). Returns what fn returned on this process's workers. Ends the
    process with SystemExit: 2 on bad input, 1 when the run failed, 75 after a SIGTERM checkpoint."""
    from . import transport as transports

    if backend not in ("auto", "mpi", "local"):
        raise CdmpiError(f"backend must be 'auto', 'mpi' or 'local', got {backend!r}")
    if backend == "auto":
        backend = "mpi" if launcher.launched_by_mpi() else "local"
    stop = StopOnSigterm().install()
    try:
        transport = transports.MPITransport.from_world() if backend == "mpi" else None
        rank = transport.rank if transport is not None else 0
        log.setup(rank, verbose=not quiet)
        prepared = {}
        if not runs.agreed(partial(_prepare, prepared, transport, settings, out, workers), transport, rank):
            raise SystemExit(EXIT_BAD_INPUT)
        transport = prepared["transport"]
        transport.watch(prepared["cfg"].comm.timeout, setting_up=True)  # no rank waits unwatched from here
        if not transport.worker_indices:  # the MPI server
            group = None
        elif transport.is_server:  # in process
            group = _Turns(transport.n_workers, prepared["cfg"].run.seed)
        else:
            group = _Solo(transport.worker_indices[0], prepared["cfg"].run.seed)
        job = _Job(transport, group, prepared["cfg"], out=out, resume=resume, overwrite=overwrite)
        job.stop_requested, job.quiet = stop.requested, quiet
        if not transport.worker_indices:
            status, _ = runs.finish(lambda: (job.set_up_server(), job.engine.serve()), transport, rank)
            _report(job, status)
            return []
        if not transport.is_server:
            status, value = runs.finish(lambda: _worker(job, fn, transport.worker_indices[0]), transport, rank)
            if status:
                raise SystemExit(status)
            return [value]
        return _in_process(job, fn)
    finally:
        if backend != "mpi":
            stop.uninstall()
        else:  # an MPI rank ends with the run: a SIGTERM after its stop must not change its exit status
            stop.settle()


def _prepare(prepared: dict, transport, settings, out, workers) -> None:
    """Set-up phase 1 (agreed): the settings, the output's name, the world; the in-process transport."""
    from . import transport as transports

    cfg = _settings_config(settings)
    if out is not None and Path(out).suffix not in (".h5", ".hdf5"):
        raise CdmpiError(f"out={str(out)!r}: the metrics file is HDF5; name it .h5 or .hdf5")
    if transport is None:
        transport = transports.LocalTransport(workers if workers is not None else 1)
    transport.check_workers(workers)
    torch.set_num_threads(cfg.run.threads)
    prepared.update(cfg=cfg, transport=transport)


def _worker(job: _Job, fn, index: int):
    """One worker's function, then the end of the run. sys.exit(0) in it ends the function, not the run."""
    run = Run(job, index)
    try:
        value = fn(run)
    except SystemExit as end:
        if end.code not in (0, None) or isinstance(end, (RunStopped, SetupFailed)):
            raise
        value = None
    job.finish(run)
    return value


def _in_process(job: _Job, fn) -> list:
    """The workers in threads taking turns; the first failure ends them all."""
    group: _Turns = job.group
    results: list = [None] * group.n
    errors: list = [None] * group.n

    def body(index: int) -> None:
        try:
            group.start(index)
            results[index] = _worker(job, fn, index)
        except _Cancelled:
            return
        except BaseException as err:  # noqa: BLE001
            errors[index] = err
            if not isinstance(err, (AgreedError, RunStopped, SetupFailed)):
                group.fail(err)  # the others cannot go on without this one
        group.leave(index)

    threads = [threading.Thread(target=body, args=(i,), name=f"cdmpi-worker-{i}", daemon=True)
               for i in range(group.n)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        group.fail(KeyboardInterrupt())
        raise
    failure = group.failure or next((e for e in errors if e is not None), None)
    if failure is not None:
        raise SystemExit(runs.exit_status(failure, None, 0))
    _report(job, 0)
    return results


def _report(job: _Job, status: int) -> None:
    if status:
        raise SystemExit(status)
    row = job.engine.last_row if job.engine is not None else None
    if row is not None and job.transport.rank == 0 and not job.quiet:
        print(f"cdmpi: finished {job.engine.step_count} steps: loss {row.get('loss', float('nan')):.6g}, grad_norm_sq "
              f"{row.get('grad_norm_sq', float('nan')):.4e}, bits up {row['bits_up']:.4e}, down {row['bits_down']:.4e}"
              + (f" -> {job.out}" if job.out is not None else " (no metrics file: give out= to keep the rows)"),
              file=sys.stderr)
