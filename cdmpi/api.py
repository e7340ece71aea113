"""Train your own nn.Module with CD-Adam (or another registered algorithm) from your own script.

Workers call ``DistributedOptimizer(model, transport, ...)`` and use it like a torch optimiser
(``zero_grad()``, ``loss.backward()``, ``step()``); rank 0 calls ``serve(model, transport, steps, ...)``.
Both sides must get the same options (algorithm, compressor, seed, dtype follow the model) and the same
number of steps. The model's parameters become views into one flat vector, so nothing is copied between
the network and the algorithm. The transport is passed in: ``MPITransport(comm)`` for your communicator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import algorithms, compress
from .config import OptimConfig
from .errors import CdmpiError
from .problems.classifier import flatten_


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


def _setting(model_or_d, transport, options: Options, device, dtype):
    d = model_or_d if isinstance(model_or_d, int) else sum(p.numel() for p in model_or_d.parameters())
    compressor = algorithms.compressor_for(options.algorithm, options.compressor)
    up = compress.make(compressor, d, ratio=options.ratio)
    down = compress.make(compressor, d, ratio=options.ratio)
    algorithm = algorithms.get(options.algorithm, compressor)
    optim = OptimConfig(algorithm=options.algorithm, lr=options.lr, beta1=options.beta1, beta2=options.beta2,
                        nu=options.nu, weight_decay=options.weight_decay)
    transport.configure(options.cuda_aware, device)
    return algorithm, algorithms.Setting(d, transport.n_workers, up, down, optim, dtype, options.seed)


class _FrameBuffers:
    """Upload (rows, nbytes) and download buffers by size: a frame size may change (onebit-adam's warm-up)."""

    def __init__(self, device, rows: int):
        self.device, self.rows, self.cache = device, rows, {}

    def get(self, algorithm) -> tuple[torch.Tensor, torch.Tensor]:
        key = (algorithm.up_nbytes, algorithm.down_nbytes)
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
        algorithm, setting = _setting(self.flat.numel(), transport, self.options, first.device, first.dtype)
        self.worker = algorithm.worker(setting, transport.worker_indices[0], first.device)
        self.frames = _FrameBuffers(first.device, 1)
        self.steps = 0

    def zero_grad(self) -> None:
        self.flat_grad.zero_()

    def step(self, lr: float | None = None) -> None:
        if self.options.weight_decay:
            self.flat_grad.add_(self.flat, alpha=self.options.weight_decay)
        up, down = self.frames.get(self.worker)
        self.worker.encode(self.flat_grad, up[0])
        self.transport.gather_frames(up)
        self.transport.broadcast(down)
        self.worker.update(self.flat, down, self.options.lr if lr is None else lr)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"params": self.flat.clone(), "algorithm": self.worker.state_dict(), "steps": self.steps}


def serve(model_or_d, transport, steps: int, options: Options = Options(), device="cpu", **overrides) -> dict:
    """The server side on rank 0: `steps` rounds of gather, aggregate, broadcast. Returns byte counts."""
    if not transport.is_server:
        raise CdmpiError("serve runs on the server rank (rank 0)")
    options = Options(**{**options.__dict__, **overrides})
    dtype = torch.float32 if isinstance(model_or_d, int) else next(model_or_d.parameters()).dtype
    algorithm, setting = _setting(model_or_d, transport, options, torch.device(device), dtype)
    server = algorithm.server(setting, device)
    frames = _FrameBuffers(device, 0)
    up_nbytes = down_nbytes = 0
    for _ in range(steps):
        up, down = frames.get(server)
        server.aggregate(transport.gather_frames(up), down)
        transport.broadcast(down)
        up_nbytes += transport.n_workers * up.shape[1]
        down_nbytes += transport.n_workers * down.numel()
    return {"steps": steps, "up_nbytes": up_nbytes, "down_nbytes": down_nbytes}
