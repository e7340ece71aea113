"""A cheap objective for benchmarks at large d: f(x) = (1/n) sum_i 0.5 ||x - c_i||^2, c_i ~ N(0, I)
seeded per worker. Worker i's gradient x - c_i costs one pass over d, so a step's time is the
optimizer's and the network's, not the model's."""

from __future__ import annotations

import numpy as np
import torch

from ..rows import Share
from .sampling import RandomRows


class QuadraticShard:
    def __init__(self, d: int, index: int, n_workers: int, seed: int, dtype, device):
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 2, index]).generate_state(1)[0]))
        self.center = torch.randn(d, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
        self.grad = torch.empty_like(self.center)
        self.n_workers = n_workers
        self.n_samples = 1
        self.d = d

    def sampler(self, batch_size: int, seed: int, index: int) -> RandomRows:
        return RandomRows(self.n_samples, 0, seed, index)  # one "sample": the whole objective

    def test_values(self, x: torch.Tensor) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def evaluate(self, x: torch.Tensor, rows=None, want_share: bool = False):
        """(g_i, shares): g_i = x - c_i (in a buffer reused every step); shares {"loss_and_grad":
        [f_i / n, g_i / n]} in float64, g_i travelling in the compute dtype (rows.Share)."""
        torch.sub(x, self.center, out=self.grad)
        share = None
        if want_share:
            g = self.grad.to(torch.float64)
            share = {"loss_and_grad": Share(self.grad.clone(), self.n_workers, head=(0.5 * torch.dot(g, g)).reshape(1))}
        return self.grad, share
