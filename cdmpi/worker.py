"""One worker: its data shard, parameters, algorithm state and minibatch sampler."""

from __future__ import annotations

import numpy as np
import torch


class WorkerRuntime:
    def __init__(self, index: int, shard, algorithm_worker, x0: torch.Tensor, *, batch_size: int, seed: int):
        self.index = index
        self.shard = shard
        self.algorithm = algorithm_worker
        self.params = x0.clone()
        self.batch_size = batch_size
        self.sampler = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, 1, index]).generate_state(1)[0]))
        self.grad: torch.Tensor | None = None

    def compute(self, want_stats: bool) -> torch.Tensor | None:
        """Local gradient at the current x (kept for encode); the metric share if asked."""
        rows = None
        if self.batch_size:
            rows = torch.randint(self.shard.n_samples, (self.batch_size,), generator=self.sampler)
        self.grad, share = self.shard.evaluate(self.params, rows, want_stats)
        return share

    def encode(self, up_frame: torch.Tensor) -> None:
        self.algorithm.encode(self.grad, up_frame)

    def update(self, down_frame: torch.Tensor, lr: float) -> None:
        self.algorithm.update(self.params, down_frame, lr)

    def state_dict(self) -> dict:
        return {"params": self.params.clone(), "algorithm": self.algorithm.state_dict(),
                "sampler": self.sampler.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.params.copy_(state["params"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.sampler.set_state(state["sampler"])
