"""Objectives. A problem builds the dimension d, the initial point and each local worker's shard."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data
from ..config import Config
from ..errors import CdmpiError
from .classifier import ImageShard
from .logreg import LogRegShard
from .quadratic import QuadraticShard
from .sequence import SequenceShard


@dataclass
class Built:
    d: int
    x0: torch.Tensor
    shards: dict  # worker index -> shard, for the workers that live in this process
    description: str
    steps_per_epoch: int = 0  # 0: the problem has no epochs
    data_path: str | None = None  # the data file, where there is one, and its sha256
    data_sha256: str | None = None
    train_columns: tuple[str, ...] = ()  # metrics columns beyond the core ones


# d-long vectors a local worker holds (x, its gradient, AMSGrad's three, its Markov states, frames and
# scratch) and the server (its two Markov states and the aggregate), for the memory estimate.
VECTORS_PER_WORKER, VECTORS_PER_SERVER = 12, 4


def available_memory() -> int | None:
    """Bytes of memory available to new allocations on this machine (Linux), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(what: str, nbytes: int, available: int | None = None) -> None:
    """A clear error before allocating, when a run would need more memory than this machine has."""
    available = available_memory() if available is None else available
    if available is not None and nbytes > 0.9 * available:
        raise CdmpiError(f"{what} needs about {nbytes / 1e9:.3g} GB in this process, and this machine has "
                         f"{available / 1e9:.3g} GB available; use fewer features (data.n_features), fewer "
                         f"workers per process (mpiexec) or a machine with more memory")


def _logreg(cfg: Config, n_workers: int, worker_indices, dtype, device) -> Built:
    ds = data.load(cfg.data.dataset, n_features=cfg.data.n_features, samples=cfg.data.samples,
                   features=cfg.data.features, seed=cfg.run.seed)
    d, element = ds.n_features, torch.finfo(dtype).bits // 8
    rows = -(-ds.n_samples // n_workers)  # the largest shard, held dense
    local = len(worker_indices)
    check_memory(f"logreg with d = {d} and {local} worker(s) of up to {rows} rows here",
                 local * (rows + VECTORS_PER_WORKER) * d * element + (VECTORS_PER_SERVER + 1) * d * 8)
    bounds = data.shard_bounds(ds.n_samples, n_workers)
    shards = {}
    for i in worker_indices:
        lo, hi = bounds[i]
        shards[i] = LogRegShard(ds.features[lo:hi], ds.labels[lo:hi], n_total=ds.n_samples,
                                n_workers=n_workers, reg=cfg.problem.reg, dtype=dtype, device=device)
    if cfg.data.batch_size > min(hi - lo for lo, hi in bounds):
        raise CdmpiError(f"data.batch_size {cfg.data.batch_size} exceeds the smallest shard "
                         f"({min(hi - lo for lo, hi in bounds)} samples)")
    generator = torch.Generator().manual_seed(cfg.run.seed)
    x0 = cfg.problem.init_scale * torch.randn(ds.n_features, generator=generator, dtype=torch.float64)
    return Built(ds.n_features, x0.to(dtype=dtype, device=device), shards,
                 f"logreg on {ds.name}: {ds.n_samples} samples, {ds.n_features} features",
                 data_path=None if ds.source == "synthetic" else ds.source, data_sha256=ds.sha256,
                 train_columns=("loss_all_rows", "grad_norm_sq_all_rows"))


def _worker_bounds(cfg: Config, samples: int, n_workers: int, what: str) -> tuple[list, int]:
    """Each worker's [lo, hi) of the training samples, and the smallest share (a batch must fit in it)."""
    bounds = data.shard_bounds(samples, n_workers)
    smallest = min(hi - lo for lo, hi in bounds)
    if cfg.data.batch_size > smallest:
        raise CdmpiError(f"data.batch_size {cfg.data.batch_size} exceeds the smallest shard ({smallest} {what})")
    return bounds, smallest


def _initial_point(network, dtype, device) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(network().parameters()).detach().to(dtype=dtype, device=device)


def _classifier(cfg: Config, n_workers: int, worker_indices, dtype, device) -> Built:
    from .. import images, nets

    if cfg.problem.model not in nets.NETWORKS:
        raise CdmpiError(f"unknown model {cfg.problem.model!r}; choose one of {', '.join(nets.NETWORKS)}")
    if cfg.data.batch_size < 1:
        raise CdmpiError("the classifier problem needs data.batch_size >= 1 (the paper uses 128 per worker)")
    ds = images.load(cfg.data.dataset, seed=cfg.run.seed, samples=cfg.data.samples,
                     test_samples=cfg.data.test_samples, image_size=cfg.data.image_size)
    bounds, smallest = _worker_bounds(cfg, len(ds.train_labels), n_workers, "images")

    def network():
        torch.manual_seed(cfg.run.seed)  # every worker builds the same initial x
        return nets.NETWORKS[cfg.problem.model](num_classes=ds.classes, in_channels=ds.train_images.shape[1])

    x0 = _initial_point(network, dtype, device)
    shards = {}
    for i in worker_indices:
        lo, hi = bounds[i]
        # clone: a view would keep the whole training set alive in every worker process
        shards[i] = ImageShard(network(), ds.train_images[lo:hi].clone(), ds.train_labels[lo:hi].clone(), mean=ds.mean,
                               std=ds.std, augment=cfg.data.augment, n_workers=n_workers,
                               weight_decay=cfg.optim.weight_decay, seed=cfg.run.seed, index=i,
                               test=(ds.test_images, ds.test_labels) if i == 0 else None, dtype=dtype,
                               device=device)
    return Built(x0.numel(), x0, shards,
                 f"{cfg.problem.model} on {ds.name}: {len(ds.train_labels)} training and "
                 f"{len(ds.test_labels)} test images, {x0.numel()} parameters",
                 steps_per_epoch=smallest // cfg.data.batch_size)


def _sequence(cfg: Config, n_workers: int, worker_indices, dtype, device) -> Built:
    from .. import sequences
    from ..nets import gpt

    if cfg.problem.model not in gpt.SHAPES:
        raise CdmpiError(f"unknown model {cfg.problem.model!r} for the sequence problem; choose one of "
                         f"{', '.join(gpt.SHAPES)}")
    if cfg.data.batch_size < 1:
        raise CdmpiError("the sequence problem needs data.batch_size >= 1")
    ds = sequences.load(cfg.data.dataset, digits=cfg.data.digits, test_samples=cfg.data.test_samples)
    if len(ds.train) < n_workers * cfg.data.batch_size:
        raise CdmpiError(f"data.test_samples = {cfg.data.test_samples} leaves {len(ds.train)} of the {ds.name} "
                         f"problems for training, fewer than {n_workers} workers x data.batch_size {cfg.data.batch_size}")
    bounds, smallest = _worker_bounds(cfg, len(ds.train), n_workers, "sequences")

    def network():
        torch.manual_seed(cfg.run.seed)  # every worker builds the same initial x
        return gpt.gpt(cfg.problem.model, ds.vocab_size, ds.block_size)

    x0 = _initial_point(network, dtype, device)
    shards = {}
    for i in worker_indices:
        lo, hi = bounds[i]
        shards[i] = SequenceShard(network(), ds.train[lo:hi].clone(), answer_start=ds.answer_start,
                                  n_workers=n_workers, weight_decay=cfg.optim.weight_decay, seed=cfg.run.seed,
                                  index=i, test=ds.test if i == 0 else None, dtype=dtype, device=device)
    return Built(x0.numel(), x0, shards,
                 f"{cfg.problem.model} on {ds.name}: {len(ds.train)} training and {len(ds.test)} test problems, "
                 f"{x0.numel()} parameters", steps_per_epoch=smallest // cfg.data.batch_size)


def _quadratic(cfg: Config, n_workers: int, worker_indices, dtype, device) -> Built:
    d = cfg.problem.dim
    if d <= 0:
        raise CdmpiError(f"problem quadratic needs problem.dim > 0, got {d}")
    element, local = torch.finfo(dtype).bits // 8, len(worker_indices)
    check_memory(f"quadratic with d = {d} and {local} worker(s) here",  # each worker also holds its c_i
                 local * (VECTORS_PER_WORKER + 1) * d * element + (VECTORS_PER_SERVER + 1) * d * 8)
    shards = {i: QuadraticShard(d, i, n_workers, cfg.run.seed, dtype, device) for i in worker_indices}
    x0 = torch.zeros(d, dtype=dtype, device=device)
    return Built(d, x0, shards, f"quadratic 0.5 ||x - c_i||^2, d = {d}")


PROBLEMS = {"logreg": _logreg, "classifier": _classifier, "sequence": _sequence, "quadratic": _quadratic}


def build(cfg: Config, n_workers: int, worker_indices, dtype, device="cpu") -> Built:
    maker = PROBLEMS.get(cfg.problem.name)
    if maker is None:
        raise CdmpiError(f"unknown problem {cfg.problem.name!r}; choose one of {', '.join(PROBLEMS)}")
    return maker(cfg, n_workers, list(worker_indices), dtype, device)
