"""Minibatch samplers of a worker's shard. Each has next() (the rows of the next batch, or None for the
whole shard) and state_dict()/load_state_dict(), so a resumed run draws the same batches."""

from __future__ import annotations

import numpy as np
import torch


def seed_key(*parts: int) -> int:
    """A 63-bit seed derived from integers (numpy's SeedSequence): independent streams per worker and use."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


class RandomRows:
    """batch_size rows drawn with replacement per step from a seeded generator; batch_size 0: every row."""

    def __init__(self, n_samples: int, batch_size: int, seed: int, index: int):
        self.n_samples, self.batch_size = n_samples, batch_size
        self.generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1, index]).generate_state(1)[0]))

    def next(self) -> torch.Tensor | None:
        if not self.batch_size:
            return None
        return torch.randint(self.n_samples, (self.batch_size,), generator=self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class EpochSampler:
    """Minibatches without replacement: a fresh seeded permutation of the shard each epoch, the last
    partial batch dropped. Its state is (epoch, position), so a resume continues the same sequence."""

    def __init__(self, n_samples: int, batch_size: int, seed: int, index: int):
        self.n_samples, self.batch_size, self.seed, self.index = n_samples, batch_size, seed, index
        self.steps_per_epoch = n_samples // batch_size
        self.epoch, self.position = 0, 0
        self._order = None

    def next(self) -> torch.Tensor:
        if self.position == self.steps_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            generator = torch.Generator().manual_seed(seed_key(self.seed, 2, self.index, self.epoch))
            self._order = torch.randperm(self.n_samples, generator=generator)
        start = self.position * self.batch_size
        self.position += 1
        return self._order[start:start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
