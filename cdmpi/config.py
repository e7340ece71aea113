"""Typed, frozen run configuration: TOML file + `section.key=value` overrides, unknown keys rejected."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import catalog
from .errors import CdmpiError


@dataclass(frozen=True)
class RunConfig:
    steps: int = 1000  # iterations T (not with run.epochs)
    seed: int = 0  # seeds the initial point, the samplers, the synthetic data and random-k's keys
    dtype: str = "float64"  # compute dtype of x, m, v and the Markov states
    workers: int = 20  # n; under MPI the world size decides (world - 1)
    log_every: int = 1  # one HDF5 row every this many steps (and at step 0 and T)
    flush_every: int = 50  # rows buffered before they are written; a crash loses fewer than this
    threads: int = 1  # torch threads per rank; ranks usually share cores
    deterministic: bool = True  # CUDA: deterministic cuDNN kernels (MPI and in-process runs then match bit for bit)
    epochs: int = 0  # > 0 (image problems): run.steps = epochs * steps per epoch, which the shards decide
    eval_every: int = 0  # classifier, sequence: steps between test-set evaluations (0: after every epoch)
    progress_every: float = 10.0  # seconds between progress lines on rank 0 when stderr is not a terminal (0: none)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"  # phishing | mushrooms | a9a | w8a | synthetic | path to a LibSVM file; classifier: digits | cifar10 | synthetic_images; sequence: addition
    n_features: int = 0  # 0: the largest feature index in the file
    batch_size: int = 0  # tau; 0: full local gradient
    samples: int = 2000  # synthetic only
    features: int = 50  # synthetic only
    augment: bool = True  # images: random crop with 4-pixel padding and horizontal flip on training batches
    image_size: int = 32  # synthetic_images only: height = width
    test_samples: int = 200  # synthetic_images and addition: size of the test set
    digits: int = 2  # addition only: digits of each operand (1 to 3)


@dataclass(frozen=True)
class ProblemConfig:
    name: str = "logreg"  # logreg | classifier (networks on images) | sequence (a GPT on a sequence task) | quadratic (a cheap objective for benchmarks at large d)
    reg: float = 0.1  # lambda of the nonconvex regulariser
    init_scale: float = 0.0  # x_1 = init_scale * N(0, I), seeded by run.seed
    model: str = "resnet18"  # classifier: resnet18 | vgg16 | wrn16_4 | small_cnn; sequence: gpt_nano | gpt_micro
    dim: int = 1000  # quadratic only: d of the benchmark objective (1/n) sum_i 0.5 ||x - c_i||^2


@dataclass(frozen=True)
class OptimConfig:
    algorithm: str = "cdadam"  # cdadam / amsgrad / amsgrad-ef / amsgrad-naive / ef21 / onebit-adam (docs/algorithms.md)
    lr: float = 0.005  # the step size alpha
    beta1: float = 0.9  # first-moment decay, in [0, 1)
    beta2: float = 0.99  # second-moment decay, in [0, 1)
    nu: float = 1e-8  # V = diag(v_hat + nu); onebit-adam adds it outside the square root, as DeepSpeed does
    warmup_steps: int = 100  # onebit-adam: uncompressed Adam steps before the variance is frozen
    weight_decay: float = 0.0  # classifier: wd * x is added to each worker's minibatch gradient (coupled L2)
    lr_milestones: tuple[int, ...] = ()  # epochs after which lr is multiplied by lr_gamma (needs run.epochs)
    lr_gamma: float = 0.1  # the factor at each milestone, in (0, 1]


@dataclass(frozen=True)
class CompressConfig:
    name: str = "auto"  # scaled_sign | topk | randk | identity | auto (the algorithm's default compressor)
    ratio: float = 0.016  # topk/randk: k = max(1, round(ratio * d)) unless k > 0
    k: int = 0  # topk/randk: k itself (0: from ratio)
    block: int = 0  # scaled_sign/two_level_sign: one set of scales per block of this many coordinates (0: one for the vector)
    warmup_steps: int = 0  # cdadam, ef21: the first steps send fp32 frames both ways, then the compressor's


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (0: only at the end and on SIGTERM)
    dir: str = ""  # "": next to the metrics file (RUN.h5 -> RUN.ckpt/)
    keep: int = 2  # newest checkpoints kept (0: all)
    check_every: int = 10  # steps between the comparisons of the workers' x checksums


@dataclass(frozen=True)
class CommConfig:
    cuda_aware: str = "auto"  # auto | true | false: hand device buffers to MPI directly, or stage via host
    worker_device: str = "auto"  # auto: cuda:(local rank mod device count) when CUDA is there, else cpu
    server_device: str = "cpu"  # cpu | cuda | cuda:N: where rank 0 aggregates
    # star: rank 0 aggregates every frame (Gather + Bcast, the paper's Algorithm 1). sharded: worker s serves
    # slice s of the vector (Alltoallv + Allgatherv among the workers), one compressor scale per slice.
    topology: str = "star"
    # How a rank waits in a collective: spin (MPI's own busy wait, best with a core per rank), sleep (a
    # barrier that sleeps between polls first, for ranks sharing cores), auto (sleep when d >= 1e6 and any
    # node has more ranks than cores).
    wait: str = "auto"
    # Seconds a rank may wait in one collective; longer ends the job, naming the ranks that did not arrive (a
    # stopped or hung rank) and the step. Must exceed the longest step and checkpoint write. 0: no watchdog.
    timeout: float = 300.0


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    problem: ProblemConfig = field(default_factory=ProblemConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    comm: CommConfig = field(default_factory=CommConfig)

    def to_dict(self) -> dict:
        """Plain JSON types (tuples become lists), so a dict read back from a metrics file compares equal."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def applicable(self) -> dict:
        """to_dict() without the keys that do not apply to this run (a logreg run has no problem.model, a
        run of scaled sign no compress.ratio): what a metrics file records."""
        values = self.to_dict()
        problem, dataset = self.problem.name, self.data.dataset
        drop = {"problem": {"logreg": {"model", "dim"}, "classifier": {"reg", "init_scale", "dim"},
                            "sequence": {"reg", "init_scale", "dim"},
                            "quadratic": {"reg", "init_scale", "model"}}.get(problem, {"reg", "init_scale", "model", "dim"}),
                "data": set(),
                "run": set() if problem in ("classifier", "sequence") else {"epochs", "eval_every"}}
        if problem == "logreg":
            drop["data"] = {"augment", "image_size", "test_samples", "digits"} | (
                set() if dataset == "synthetic" else {"samples", "features"})
        elif problem == "classifier":
            drop["data"] = {"n_features", "features", "digits"} | (set() if dataset == "synthetic_images" else
                                                                   {"samples", "image_size", "test_samples"})
        elif problem == "sequence":
            drop["data"] = {"n_features", "features", "samples", "augment", "image_size"}
        else:  # quadratic and your own model: no data
            drop["data"] = set(values["data"])
        if problem not in ("classifier", "sequence", "own_model"):
            drop["optim"] = {"weight_decay", "lr_milestones", "lr_gamma"}
        elif problem == "own_model":
            drop["optim"] = {"lr_milestones", "lr_gamma"}
            drop["run"] |= {"steps", "log_every", "epochs", "eval_every"}
        if self.optim.algorithm != "onebit-adam":
            drop.setdefault("optim", set()).add("warmup_steps")
        compressor = catalog.compressor_for(self.optim.algorithm, self.compress.name)
        drop["compress"] = ({"ratio", "k"} if compressor not in ("topk", "randk") else set()) | (
            {"block"} if compressor not in catalog.BLOCKED else set()) | (
            {"warmup_steps"} if self.optim.algorithm not in catalog.MARKOV else set())
        return {section: {k: v for k, v in table.items() if k not in drop.get(section, set())}
                for section, table in values.items() if table and set(table) - drop.get(section, set())}

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _check_choices(cfg: Config) -> None:
    positive = {
        "run.steps": cfg.run.steps, "run.workers": cfg.run.workers, "run.log_every": cfg.run.log_every,
        "run.flush_every": cfg.run.flush_every, "run.threads": cfg.run.threads, "optim.lr": cfg.optim.lr,
        "checkpoint.check_every": cfg.checkpoint.check_every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise CdmpiError(f"config: {key} must be > 0, got {value!r}")
    if cfg.run.threads > MAX_THREADS:
        raise CdmpiError(f"config: run.threads must be at most {MAX_THREADS} (torch threads per rank), "
                         f"got {cfg.run.threads}")
    if not 0 <= cfg.run.seed < 2 ** 63:
        raise CdmpiError(f"config: run.seed must be in [0, 2^63), got {cfg.run.seed}")
    if cfg.run.dtype not in ("float32", "float64"):
        raise CdmpiError(f"config: run.dtype must be 'float32' or 'float64', got {cfg.run.dtype!r}")
    for key, value in (("optim.beta1", cfg.optim.beta1), ("optim.beta2", cfg.optim.beta2)):
        if not 0.0 <= value < 1.0:
            raise CdmpiError(f"config: {key} must be in [0, 1), got {value!r}")
    if cfg.optim.nu <= 0:
        raise CdmpiError(f"config: optim.nu must be > 0, got {cfg.optim.nu!r}")
    if cfg.data.batch_size < 0 or cfg.data.n_features < 0 or cfg.compress.k < 0:
        raise CdmpiError("config: data.batch_size, data.n_features and compress.k must be >= 0")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 0:
        raise CdmpiError(f"config: checkpoint.every and checkpoint.keep must be >= 0, got "
                         f"{cfg.checkpoint.every!r} and {cfg.checkpoint.keep!r}")
    if cfg.run.eval_every < 0:
        raise CdmpiError(f"config: run.eval_every must be >= 0 (0: after every epoch), got {cfg.run.eval_every!r}")
    if cfg.run.epochs < 0 or cfg.optim.weight_decay < 0 or not 0.0 < cfg.optim.lr_gamma <= 1.0:
        raise CdmpiError(f"config: run.epochs and optim.weight_decay must be >= 0 and optim.lr_gamma in (0, 1]; "
                         f"got {cfg.run.epochs!r}, {cfg.optim.weight_decay!r}, {cfg.optim.lr_gamma!r}")
    if list(cfg.optim.lr_milestones) != sorted(set(cfg.optim.lr_milestones)) or any(
            m < 1 for m in cfg.optim.lr_milestones):
        raise CdmpiError(f"config: optim.lr_milestones must be increasing epochs >= 1, got "
                         f"{list(cfg.optim.lr_milestones)!r}")
    if cfg.optim.lr_milestones and not cfg.run.epochs:
        raise CdmpiError("config: optim.lr_milestones are epochs and need run.epochs > 0")
    if cfg.comm.cuda_aware not in ("auto", "true", "false"):
        raise CdmpiError(f"config: comm.cuda_aware must be 'auto', 'true' or 'false', got {cfg.comm.cuda_aware!r}")
    for key, value in (("comm.worker_device", cfg.comm.worker_device), ("comm.server_device", cfg.comm.server_device)):
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise CdmpiError(f"config: {key} must be auto, cpu, cuda or cuda:N, got {value!r}")
    if cfg.run.progress_every < 0:
        raise CdmpiError(f"config: run.progress_every must be >= 0 (0: no progress lines), got {cfg.run.progress_every!r}")
    if cfg.comm.timeout < 0:
        raise CdmpiError(f"config: comm.timeout must be >= 0 (0: no watchdog), got {cfg.comm.timeout!r}")
    if cfg.comm.wait not in ("auto", "spin", "sleep"):
        raise CdmpiError(f"config: comm.wait must be 'auto', 'spin' or 'sleep', got {cfg.comm.wait!r}")
    if cfg.comm.topology not in ("star", "sharded"):
        raise CdmpiError(f"config: comm.topology must be 'star' or 'sharded', got {cfg.comm.topology!r}")
    if cfg.optim.warmup_steps < 0:
        raise CdmpiError(f"config: optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps!r}")
    catalog.check(cfg.optim.algorithm, cfg.compress.name)
    if cfg.compress.block < 0 or cfg.compress.warmup_steps < 0:
        raise CdmpiError(f"config: compress.block and compress.warmup_steps must be >= 0, got "
                         f"{cfg.compress.block!r} and {cfg.compress.warmup_steps!r}")
    compressor = catalog.compressor_for(cfg.optim.algorithm, cfg.compress.name)
    if cfg.compress.block and compressor not in catalog.BLOCKED:
        raise CdmpiError(f"config: compress.block applies to {' and '.join(catalog.BLOCKED)}, and this run "
                         f"compresses with {compressor}")
    if cfg.compress.warmup_steps and cfg.optim.algorithm not in catalog.MARKOV:
        raise CdmpiError(f"config: compress.warmup_steps applies to {' and '.join(catalog.MARKOV)}"
                         + (" (onebit-adam's warm-up is optim.warmup_steps)" if cfg.optim.algorithm == "onebit-adam"
                            else f", not {cfg.optim.algorithm}"))
    if not 0.0 < cfg.compress.ratio <= 1.0:
        raise CdmpiError(f"config: compress.ratio must be in (0, 1], got {cfg.compress.ratio!r}")


MAX_THREADS = 1024  # torch threads per rank: more is a typo (and torch crashes trying)


def _coerce(key: str, value, hint):
    """Check one value against its annotated type; ints are accepted where floats are expected."""
    if typing.get_origin(hint) is tuple:  # tuple[int, ...] written as a TOML array
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise CdmpiError(f"config: {key} must be an array of {item.__name__}, got {type(value).__name__}")
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if key == "comm.cuda_aware" and isinstance(value, bool):  # a TOML true/false is as good as "true"/"false"
        return str(value).lower()
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint in (int, float) and isinstance(value, bool)) or not isinstance(value, hint):
        raise CdmpiError(f"config: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    if hint is float and not math.isfinite(value):  # TOML has nan and inf; no key means either
        raise CdmpiError(f"config: {key} must be a finite number, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"section [{prefix}]" if prefix else "the top level"
        raise CdmpiError(f"config: unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; "
                         f"known keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise CdmpiError(f"config: [{key}] must be a table, got {type(value).__name__}")
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(key, value, hint)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """`optim.lr=0.003` -> (['optim', 'lr'], 0.003). Values are TOML; a bare word is a string. A value is one
    line: more TOML after it (a newline, a [section]) is refused, not silently dropped."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise CdmpiError(f"--set expects key=value, got {text!r}")
    if "\n" in raw or "\r" in raw:
        raise CdmpiError(f"--set {key}: the value must be one line, got {raw!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except RecursionError:
        raise CdmpiError(f"--set {key}: the value nests too deeply") from None
    return key.split("."), value


def from_dict(values: dict, overrides: typing.Sequence[str] = ()) -> Config:
    values = json.loads(json.dumps(values))  # deep copy; TOML values are JSON-safe
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CdmpiError(f"--set {text}: {part} is not a section")
        node[path[-1]] = value
    cfg = _build(Config, values, "")
    _check_choices(cfg)
    if cfg.run.epochs and "steps" in values.get("run", {}):
        raise CdmpiError(f"config: run.steps = {cfg.run.steps} and run.epochs = {cfg.run.epochs} are both set; "
                         f"with epochs the steps follow from the data (epochs x steps per epoch): set one "
                         f"(--set run.epochs=0 keeps run.steps; for epochs, remove run.steps from the file)")
    return cfg


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise CdmpiError(f"config file not found: {path}")
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise CdmpiError(f"config file {path} is not valid TOML: {err}") from None
    except RecursionError:
        raise CdmpiError(f"config file {path} nests too deeply to be a cdmpi config") from None
    return from_dict(values, overrides)


def replace(cfg: Config, section: str, **changes) -> Config:
    """A copy of cfg with keys of one section changed (configs are frozen)."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
