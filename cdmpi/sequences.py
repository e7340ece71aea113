"""Synthetic sequence tasks for the transformer workload: made here, nothing to download."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CdmpiError

SPLIT_SEED = 1337  # the train/test split is the same for every run.seed: seeds vary the model and the order


@dataclass(frozen=True)
class SequenceSet:
    """Token sequences of one task. A model reads tokens[:, :-1] and predicts tokens[:, 1:]; only the
    positions from `answer_start` on count (the answer), and a test problem is solved when the answer it
    generates greedily from the prompt tokens[:, :answer_start] is exact."""

    name: str
    train: torch.Tensor  # (samples, length) int64
    test: torch.Tensor
    vocab_size: int
    answer_start: int

    @property
    def block_size(self) -> int:
        return self.train.shape[1] - 1


def addition(digits: int, test_samples: int) -> SequenceSet:
    """a + b for every pair of `digits`-digit numbers (leading zeros written): the digits of a, the digits of
    b, then the digits+1 digits of the sum, least significant first (the order a person adds in). minGPT's
    adder task; a fixed split holds test_samples pairs out."""
    if not 1 <= digits <= 3:
        raise CdmpiError(f"data.digits must be 1, 2 or 3 for the addition task, got {digits}")
    count = 10 ** (2 * digits)
    if not 1 <= test_samples < count:
        raise CdmpiError(f"data.test_samples must be in [1, {count}) for {digits}-digit addition "
                         f"({count} problems in all), got {test_samples}")
    pair = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    a, b = pair // 10 ** digits, pair % 10 ** digits
    total = a + b
    powers = 10 ** torch.arange(digits - 1, -1, -1)
    columns = [(a[:, None] // powers) % 10, (b[:, None] // powers) % 10,
               (total[:, None] // 10 ** torch.arange(digits + 1)) % 10]
    tokens = torch.cat(columns, dim=1)
    return SequenceSet(f"{digits}-digit addition", tokens[test_samples:].clone(), tokens[:test_samples].clone(),
                       vocab_size=10, answer_start=2 * digits)


def load(name: str, *, digits: int, test_samples: int) -> SequenceSet:
    if name == "addition":
        return addition(digits, test_samples)
    raise CdmpiError(f"unknown sequence dataset {name!r}; the sequence problem takes: addition")
