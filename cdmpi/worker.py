"""One worker: its data shard, parameters, algorithm state and minibatch sampler."""

from __future__ import annotations

import numpy as np
import torch

from .problems.classifier import EpochSampler


class WorkerRuntime:
    def __init__(self, index: int, shard, algorithm_worker, x0: torch.Tensor, *, batch_size: int, seed: int,
                 device="cpu"):
        self.index = index
        self.shard = shard
        self.algorithm = algorithm_worker
        self.params = x0.to(device=device, copy=True)
        self.batch_size = batch_size
        if getattr(shard, "epoch_sampling", False):  # image problems: epochs without replacement
            self.sampler = EpochSampler(shard.n_samples, batch_size, seed, index)
        else:
            self.sampler = torch.Generator().manual_seed(
                int(np.random.SeedSequence([seed, 1, index]).generate_state(1)[0]))
        self.grad: torch.Tensor | None = None

    def _rows(self) -> torch.Tensor | None:
        if isinstance(self.sampler, EpochSampler):
            return self.sampler.next()
        if self.batch_size:
            return torch.randint(self.shard.n_samples, (self.batch_size,), generator=self.sampler)
        return None

    def compute(self, want_stats: bool, want_eval: bool = False) -> torch.Tensor | None:
        """Local gradient at the current x (kept for encode); the metric share (host float64) if asked,
        followed by the test-set share on evaluation steps."""
        self.grad, share = self.shard.evaluate(self.params, self._rows(), want_stats)
        if share is not None:
            share = share.to("cpu", torch.float64)
            if want_eval:
                share = torch.cat([share, self.shard.test_share(self.params)])
        return share

    def encode(self, up_frame: torch.Tensor) -> None:
        self.algorithm.encode(self.grad, up_frame)

    def update(self, down_frame: torch.Tensor, lr: float) -> None:
        self.algorithm.update(self.params, down_frame, lr)

    def state_dict(self) -> dict:
        sampler = self.sampler.state_dict() if isinstance(self.sampler, EpochSampler) else self.sampler.get_state()
        state = {"params": self.params.clone(), "algorithm": self.algorithm.state_dict(), "sampler": sampler}
        if hasattr(self.shard, "state_dict"):
            state["shard"] = self.shard.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.params.copy_(state["params"])
        self.algorithm.load_state_dict(state["algorithm"])
        if isinstance(self.sampler, EpochSampler):
            self.sampler.load_state_dict(state["sampler"])
        else:
            self.sampler.set_state(state["sampler"])
        if "shard" in state:
            self.shard.load_state_dict(state["shard"])
