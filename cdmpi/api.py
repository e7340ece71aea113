"""Your own model with cdmpi: a plain PyTorch loop, run by ``cdmpi.launch``.

    import cdmpi

    def train(run):                                  # one worker's loop
        model = Net().to(run.device)
        opt = run.optimizer(model, lr=1e-3)           # CD-Adam; a torch.optim.Optimizer
        for step in range(run.step, 1000):           # run.step: where a resumed run goes on
            x, y = batch(run.worker, step)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            run.log(loss=loss.item())                 # this step's row in the metrics file
            opt.step()

    cdmpi.launch(train, out="run.h5", workers=4, resume="auto")

Under ``mpiexec -n N+1 python script.py`` rank 0 becomes the server and ranks 1..N run ``train``; under
plain ``python`` the N workers run ``train`` in this process, taking turns (one runs at a time, each with
its own random state), so both give the same bits. The run gets everything ``cdmpi train`` has: HDF5
metrics (the bits are counted), checkpoints of every rank's state with bit-exact resume, SIGTERM ends in a
checkpoint and exit status 75, and the fault checks. The server needs no step count: it serves until the
workers' loops end.
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
from .rows import mean_of_workers
from .signals import StopOnSigterm
from .problems.classifier import flatten_

# The optimizer's options, as config keys (validated as the config validates them).
OPTIONS = {"algorithm": "optim.algorithm", "lr": "optim.lr", "eps": "optim.nu", "weight_decay": "optim.weight_decay",
           "warmup_steps": "optim.warmup_steps", "compressor": "compress.name", "ratio": "compress.ratio",
           "k": "compress.k"}  # and betas = (optim.beta1, optim.beta2)
# launch()'s settings: the config keys that apply to a user's loop.
SETTINGS = ("run.seed", "run.threads", "run.flush_every", "run.deterministic", "run.progress_every",
            "checkpoint.every", "checkpoint.dir",
            "checkpoint.keep", "checkpoint.check_every", "comm.cuda_aware", "comm.worker_device",
            "comm.server_device", "comm.topology", "comm.wait")
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

    def __init__(self, index: int):
        self.indices = [index]

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

    def __init__(self, n: int):
        self.indices = list(range(n))
        self.n = n
        self._cond = threading.Condition()
        self._turn = 0
        self._items: list = [None] * n
        self._arrived = 0
        self._generation = 0
        self._outcome: tuple = ("ok", None)
        self._states = [random_state() for _ in range(n)]  # every worker starts from the launching thread's
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
    """Handed to your function, one per worker: the worker's place in the run, its optimizer, its metrics."""

    def __init__(self, job: "_Job", index: int):
        self._job = job
        self.worker = index  # this worker's index, 0 .. workers - 1
        self.workers = job.transport.n_workers
        self.device = job.worker_device  # where this worker computes (comm.worker_device)
        self._optimizer: DistributedOptimizer | None = None
        self._train: dict | None = None
        self._eval: dict | None = None
        self._state: dict = {}
        self._restored: dict = {}  # run.state() values of the checkpoint being resumed

    @property
    def step(self) -> int:
        """Steps taken so far: 0 on a fresh run, the checkpoint's step on a resumed one (known once the
        optimizer is made)."""
        return self._job.engine.step_count if self._job.engine is not None else 0

    def optimizer(self, model: nn.Module, **options) -> "DistributedOptimizer":
        """The run's optimizer over the model's trainable parameters (all on one device, float32 or
        float64). Options: algorithm ("cdadam", or any of cdmpi.algorithms.ALGORITHMS), lr, betas, eps, weight_decay,
        compressor ("auto": the algorithm's own), ratio and k (top-k / random-k), warmup_steps
        (onebit-adam). Every worker must make it with the same model and options. On a resumed run the
        model, the optimizer, the random state and run.state() are restored here."""
        if self._optimizer is not None or self._job.engine is not None:
            raise CdmpiError("run.optimizer() was called twice; a run has one optimizer per worker")
        try:
            self._optimizer = DistributedOptimizer(self, model, options)
        except CdmpiError as err:  # bad options: every rank stops with exit status 2, rank 0 says why
            self._job.set_up(self, error=str(err))
            raise SetupFailed() from None
        self._job.set_up(self)
        return self._optimizer

    def state(self, **defaults) -> dict:
        """Your own state for the checkpoints (epoch, best accuracy, a scheduler...): a dict holding the
        defaults, or on a resumed run the checkpoint's values, before or after run.optimizer(). Keep it up
        to date in place; values with state_dict()/load_state_dict() (an LR scheduler) are saved and
        restored through those. Every call adds its keys to the same dict."""
        for key, value in defaults.items():
            if key not in self._state:
                self._state[key] = value
                self._restore(key)
        return self._state

    def _restore(self, key: str) -> None:
        if key not in self._restored:
            return
        saved = self._restored.pop(key)
        if hasattr(self._state[key], "load_state_dict"):
            self._state[key].load_state_dict(saved)
        else:
            self._state[key] = saved

    def log(self, **values) -> None:
        """Values of this step's row in /train (the step that the next opt.step() takes, which describes
        the model before it): floats, each the mean over the workers that logged it."""
        self._train = {**(self._train or {}), **_scalars(values, "log")}

    def log_eval(self, **values) -> None:
        """A row in /eval at this step (e.g. test accuracy), the mean over the workers that logged it."""
        self._eval = {**(self._eval or {}), **_scalars(values, "log_eval")}

    def _take_logs(self) -> tuple[dict | None, dict | None]:
        logs, self._train, self._eval = (self._train, self._eval), None, None
        return logs

    # checkpoint state of the driver: model buffers, random state, user state, learning rate
    def state_dict(self) -> dict:
        opt = self._optimizer
        user = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in self._state.items()}
        user.update(self._restored)  # restored values not yet asked for by run.state() stay in the checkpoint
        return {"buffers": {k: v.detach().clone() for k, v in opt.model.named_buffers()},
                "random": self._job.group.random_state(self.worker), "user": user,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        opt = self._optimizer
        buffers = dict(opt.model.named_buffers())
        with torch.no_grad():
            for name, value in state["buffers"].items():
                buffers[name].copy_(value)
        self._job.group.set_random_state(self.worker, state["random"])
        self._restored = dict(state["user"])
        for key in list(self._state):
            self._restore(key)
        for group, saved in zip(opt.param_groups, state["param_groups"]):
            group.update(saved)


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


class DistributedOptimizer(torch.optim.Optimizer):
    """The worker's optimizer: step() encodes the gradient, exchanges frames with the server (or the slice
    servers) and applies the algorithm's update to the model. The parameters become views into one flat
    vector, so nothing is copied between the model and the algorithm. Make it with run.optimizer()."""

    def __init__(self, run: Run, model: nn.Module, options: dict):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise CdmpiError("run.optimizer(): the model has no trainable parameters")
        kinds = {(p.device, p.dtype) for p in params}
        if len(kinds) > 1:
            raise CdmpiError(f"run.optimizer(): the parameters live on several devices or dtypes {sorted(map(str, kinds))}; "
                             f"move the model to one device first")
        device, dtype = kinds.pop()
        if dtype not in (torch.float32, torch.float64):
            raise CdmpiError(f"run.optimizer(): parameters must be float32 or float64, got {dtype}")
        self.options = _optimizer_config(options)  # validated here, on every worker
        super().__init__(params, {"lr": self.options.optim.lr})
        self.run, self.model = run, model
        self.flat = torch.nn.utils.parameters_to_vector(params).detach().clone()
        self.flat_grad = torch.zeros_like(self.flat)
        flatten_(params, self.flat, self.flat_grad)
        self._params = params
        self._grad_views = [p.grad for p in params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients in place (they are views into one flat buffer, so they are never None)."""
        self.flat_grad.zero_()
        for p, view in zip(self._params, self._grad_views):
            p.grad = view

    def _gather_grads(self) -> None:
        """Gradients that backward() put elsewhere (after a zero_grad that set them to None) go into the flat
        buffer."""
        for p, view in zip(self._params, self._grad_views):
            if p.grad is None:
                view.zero_()
            elif p.grad is not view:
                view.copy_(p.grad)
            p.grad = view

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._gather_grads()
        grad = self.flat_grad
        weight_decay = self.options.optim.weight_decay
        if weight_decay:
            grad.add_(self.flat, alpha=weight_decay)  # coupled L2, before compression
        train, evaluation = self.run._take_logs()
        if train is not None:
            train["grad_norm_sq"] = float(torch.dot(grad, grad))
        self.run._job.step(self.run, WorkerStep(grad, self.param_groups[0]["lr"], train, evaluation))
        return loss

    def state_dict(self) -> dict:
        """This worker's optimizer state: the algorithm's (moments and compression sequences), the step and
        the hyper-parameters."""
        worker = self.run._job.local_worker(self.run.worker)
        return {"state": {"algorithm": worker.algorithm.state_dict(), "step": self.run.step, "d": self.flat.numel()},
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict) -> None:
        """A warm start: the hyper-parameters and the algorithm's moments (AMSGrad's m, v, v_hat; 1-bit Adam's
        m and v) from a state_dict. The compression sequences (Markov and error feedback) stay as they are:
        they pair with the server's, which only a checkpoint of the same run restores (launch(resume=...))."""
        worker = self.run._job.local_worker(self.run.worker)
        try:
            saved = state_dict["state"]
            if saved["d"] != self.flat.numel():
                raise CdmpiError(f"load_state_dict: the state is of {saved['d']} parameters, this model has "
                                 f"{self.flat.numel()}")
            moments = {k: saved["algorithm"][k] for k in worker.algorithm.moments}
            worker.algorithm.load_state_dict({**worker.algorithm.state_dict(), **moments})
            for group, values in zip(self.param_groups, state_dict["param_groups"]):
                group.update({k: v for k, v in values.items() if k != "params"})
        except (KeyError, TypeError, RuntimeError) as err:
            raise CdmpiError(f"load_state_dict: not a state of this optimizer ({type(err).__name__}: {err})") from None


def _optimizer_config(options: dict) -> Config:
    """The optim and compress sections from the optimizer's options, validated like a config file."""
    values: dict = {}
    for name, value in options.items():
        if name == "betas":
            try:
                beta1, beta2 = value
            except (TypeError, ValueError):
                raise CdmpiError(f"betas must be a pair (beta1, beta2), got {value!r}") from None
            values.setdefault("optim", {}).update(beta1=beta1, beta2=beta2)
        elif name in OPTIONS:
            section, key = OPTIONS[name].split(".")
            values.setdefault(section, {})[key] = value
        else:
            raise CdmpiError(f"unknown optimizer option {name!r}; the options are betas, {', '.join(OPTIONS)}")
    values.setdefault("optim", {}).setdefault("lr", 1e-3)
    try:
        return config.from_dict(values)
    except CdmpiError as err:
        message = str(err)
        for name, key in [*OPTIONS.items(), ("betas[0]", "optim.beta1"), ("betas[1]", "optim.beta2")]:
            message = message.replace(f"config: {key} ", f"{name} ").replace(f"config: {key}", name)
        raise CdmpiError(f"optimizer: {message}") from None


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
            models = [runs_here[i]._optimizer for i in sorted(runs_here)]
            with torch.no_grad():
                transport.bcast_from_worker_0([opt.flat for opt in models])
                for name, _, _ in hello["buffers"]:
                    transport.bcast_from_worker_0([dict(opt.model.named_buffers())[name] for opt in models])
        for phase in (partial(self._build_engine, cfg, hello, runs_here), self._start):
            if not runs.agreed(phase, transport, transport.rank):
                raise SetupFailed()
        self.engine.stop_requested = self.stop_requested
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

    def step(self, run: Run, item: WorkerStep) -> None:
        self.group.together(run.worker, item, self.engine.step)

    def finish(self, run: Run) -> None:
        """The worker's function returned: its last logs, and the end of the run once every worker is here."""
        if run._optimizer is None:
            raise CdmpiError(f"worker {run.worker}'s function returned without making an optimizer "
                             f"(run.optimizer(model, ...))")
        train, evaluation = run._take_logs()
        self.group.together(run.worker, WorkerStep(None, 0.0, train, evaluation, done=True, checkpoint=True),
                            self.engine.step)


def _hello(run: Run, error: str | None) -> dict:
    """What a worker tells the server about its model and options (small: no tensors), or what was wrong."""
    if error is not None:
        return {"error": error, "worker": run.worker}
    opt = run._optimizer
    return {"d": opt.flat.numel(), "dtype": str(opt.flat.dtype).removeprefix("torch."),
            "model": type(opt.model).__name__,
            "buffers": [(name, tuple(b.shape), str(b.dtype)) for name, b in opt.model.named_buffers()],
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
        if not transport.worker_indices:  # the MPI server
            group = None
        elif transport.is_server:  # in process
            group = _Turns(transport.n_workers)
        else:
            group = _Solo(transport.worker_indices[0])
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
              f"{row['grad_norm_sq']:.4e}, bits up {row['bits_up']:.4e}, down {row['bits_down']:.4e}"
              + (f" -> {job.out}" if job.out is not None else " (no metrics file: give out= to keep the rows)"),
              file=sys.stderr)
