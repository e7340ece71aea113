"""A built-in problem's worker: its data shard and minibatch sampler, and what it brings to each step."""

from __future__ import annotations

import torch

from .engine import WorkerStep


class ProblemWorker:
    """Worker i of `cdmpi train`: gradients and metric shares of its shard at x (its x lives in the engine)."""

    def __init__(self, shard, batch_size: int, seed: int, index: int, steps_per_epoch: int = 0):
        self.shard = shard
        self.sampler = shard.sampler(batch_size, seed, index)
        self.steps_per_epoch = steps_per_epoch

    def compute(self, params: torch.Tensor, step: int, log: bool, evaluate: bool) -> WorkerStep:
        """The gradient at x_t (kept for encode), its metric shares if `log`, and the test-set values on
        evaluation steps (from the worker that holds the test set)."""
        grad, shares = self.shard.evaluate(params, self.sampler.next(), log)
        test = self.shard.test_values(params) if evaluate else None
        if test is not None:
            test = {"epoch": step / self.steps_per_epoch, **test}
        return WorkerStep(grad, train=shares, eval=test)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "shard": self.shard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.shard.load_state_dict(state["shard"])
