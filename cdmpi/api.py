"""Train your own nn.Module with CD-Adam (or another registered algorithm) from your own script.

Workers call ``DistributedOptimizer(model, transport, ...)`` and use it like a torch optimiser
(``zero_grad()``, ``loss.backward()``, ``step()``); rank 0 calls ``serve(model, transport, steps, ...)``.
Both sides must get the same options (algorithm, compressor, seed, dtype follow the model) and the same
number of steps. The model's parameters become views into one flat vector, so nothing is copied between
the network and the algorithm. The transport is passed in: ``MPITransport(comm)`` for your communicator.
With ``topology="sharded"`` the workers serve the slices among themselves and ``serve`` only counts bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import algorithms, compress
from .config import OptimConfig
from .errors import CdmpiError
from .problems.classifier import flatten_
from .transport import sharded_exchange


@dataclass(frozen=True)
class Options:
    algorithm: str = "cdadam"
    compressor: str = "scaled_sign"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    nu: float = 1e-8
    weight_decay: float = 0.0  # added to the gradient before compression (coupled L2)
    ratio: float = 0.016  # top-k / random-k: k = ratio * d
    seed: int = 0
    cuda_aware: str = "auto"
    topology: str = "star"  # star: rank 0 aggregates; sharded: worker s serves slice s (README)


def _setting(model_or_d, transport, options: Options, device, dtype):
    if options.topology not in ("star", "sharded"):
        raise CdmpiError(f"topology must be 'star' or 'sharded', got {options.topology!r}")
    d = model_or_d if isinstance(model_or_d, int) else sum(p.numel() for p in model_or_d.parameters())
    compressor = algorithms.compressor_for(options.algorithm, options.compressor)
    algorithm = algorithms.get(options.algorithm, compressor)
    optim = OptimConfig(algorithm=options.algorithm, lr=options.lr, beta1=options.beta1, beta2=options.beta2,
                        nu=options.nu, weight_decay=options.weight_decay)
    transport.configure(options.cuda_aware, device)
    return algorithm, algorithms.make_setting(compressor, d, transport.n_workers, optim, dtype, options.seed,
                                              topology=options.topology, ratio=options.ratio)


class _FrameBuffers:
    """Upload (rows, nbytes) and download buffers by size: a frame size may change (onebit-adam's warm-up)."""

    def __init__(self, device, rows: int):
        self.device, self.rows, self.cache = device, rows, {}

    def get(self, up: compress.Compressor, down: compress.Compressor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (up.frame_nbytes, down.frame_nbytes)
        if key not in self.cache:
            self.cache[key] = (torch.zeros(self.rows, key[0], dtype=torch.uint8, device=self.device),
                               torch.zeros(key[1], dtype=torch.uint8, device=self.device))
        return self.cache[key]


class DistributedOptimizer:
    """The worker side: one step() = encode the gradient, exchange frames, apply the server's frame."""

    def __init__(self, model: nn.Module, transport, options: Options = Options(), **overrides):
        if transport.is_server or len(transport.worker_indices) != 1:
            raise CdmpiError("DistributedOptimizer runs on a worker rank (rank 0 calls cdmpi.api.serve)")
        self.options = Options(**{**options.__dict__, **overrides})
        self.transport = transport
        first = next(model.parameters())
        self.flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        self.flat_grad = torch.zeros_like(self.flat)
        flatten_(model, self.flat, self.flat_grad)
        self.algorithm, self.setting = _setting(self.flat.numel(), transport, self.options, first.device,
                                                first.dtype)
        index = transport.worker_indices[0]
        self.worker = self.algorithm.worker(self.setting, index, first.device)
        self.slice_server = None  # sharded: this worker serves slice `index`
        if self.options.topology == "sharded":
            self.slice_server = self.algorithm.server(algorithms.slice_setting(self.setting, index), first.device)
        self.frames = _FrameBuffers(first.device, 1)
        self.steps = 0

    def zero_grad(self) -> None:
        self.flat_grad.zero_()

    def step(self, lr: float | None = None) -> None:
        if self.options.weight_decay:
            self.flat_grad.add_(self.flat, alpha=self.options.weight_decay)
        up_compressor, down_compressor = self.algorithm.worker.frames(self.setting, self.steps)
        up, down = self.frames.get(up_compressor, down_compressor)
        self.worker.encode(self.flat_grad, up[0])
        if self.slice_server is None:
            self.transport.gather_frames(up)
            self.transport.broadcast(down)
        else:
            sharded_exchange(self.transport, {self.transport.worker_indices[0]: self.slice_server}, up, down,
                             up_compressor, down_compressor)
        self.worker.update(self.flat, down, self.options.lr if lr is None else lr)
        self.steps += 1

    def state_dict(self) -> dict:
        state = {"params": self.flat.clone(), "algorithm": self.worker.state_dict(), "steps": self.steps}
        if self.slice_server is not None:
            state["slice_server"] = self.slice_server.state_dict()
        return state


def serve(model_or_d, transport, steps: int, options: Options = Options(), device="cpu", **overrides) -> dict:
    """The server side on rank 0: `steps` rounds of gather, aggregate, broadcast. Returns byte counts."""
    if not transport.is_server:
        raise CdmpiError("serve runs on the server rank (rank 0)")
    options = Options(**{**options.__dict__, **overrides})
    dtype = torch.float32 if isinstance(model_or_d, int) else next(model_or_d.parameters()).dtype
    algorithm, setting = _setting(model_or_d, transport, options, torch.device(device), dtype)
    up_nbytes = down_nbytes = 0
    if options.topology == "sharded":  # the workers exchange and aggregate the slices among themselves
        for t in range(steps):
            up, down = algorithm.worker.frames(setting, t)
            up_nbytes += transport.n_workers * up.frame_nbytes
            down_nbytes += transport.n_workers * down.frame_nbytes
        return {"steps": steps, "up_nbytes": up_nbytes, "down_nbytes": down_nbytes}
    server = algorithm.server(setting, device)
    frames = _FrameBuffers(device, 0)
    for t in range(steps):
        up, down = frames.get(*algorithm.worker.frames(setting, t))
        server.aggregate(transport.gather_frames(up), down)
        transport.broadcast(down)
        up_nbytes += transport.n_workers * up.shape[1]
        down_nbytes += transport.n_workers * down.numel()
    return {"steps": steps, "up_nbytes": up_nbytes, "down_nbytes": down_nbytes}
