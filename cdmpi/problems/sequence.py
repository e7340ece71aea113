"""Next-token prediction with a small GPT (cdmpi.nets.gpt) on a synthetic sequence task (cdmpi.sequences)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .classifier import EVAL_BATCH, ModuleShard


class SequenceShard(ModuleShard):
    """Worker i's GPT and its part of the training sequences; worker 0 also holds the test problems. The loss
    is the cross-entropy of the answer's tokens (the prompt is given, not predicted)."""

    def __init__(self, module, train, *, answer_start: int, n_workers: int, weight_decay: float, seed: int,
                 index: int, test=None, dtype, device):
        super().__init__(module, n_workers=n_workers, weight_decay=weight_decay, seed=seed, index=index,
                         dtype=dtype, device=device)
        self.tokens = train.to(device)
        self.test = None if test is None else test.to(device)
        self.answer_start = answer_start

    @property
    def n_samples(self) -> int:
        return self.tokens.shape[0]

    def _answer_loss(self, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self.module(tokens[:, :-1])[:, self.answer_start - 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, self.answer_start:].reshape(-1),
                               reduction=reduction)

    def _loss(self, rows: torch.Tensor) -> torch.Tensor:
        self.step += 1
        return self._answer_loss(self.tokens[rows])

    @torch.no_grad()
    def test_values(self, x: torch.Tensor) -> dict | None:
        """{"loss": mean cross-entropy of the answers' tokens (teacher-forced), "accuracy": the share of test
        problems whose greedily generated answer is exact}, on the worker that holds the test set."""
        if self.test is None:
            return None
        self.bind(x)
        self.module.eval()
        loss_sum, exact = 0.0, 0
        for start in range(0, len(self.test), EVAL_BATCH):
            tokens = self.test[start:start + EVAL_BATCH]
            loss_sum += float(self._answer_loss(tokens, "sum").double())
            answer = self.module.greedy(tokens[:, :self.answer_start], tokens.shape[1] - self.answer_start)
            exact += int((answer == tokens[:, self.answer_start:]).all(dim=1).sum())
        count = len(self.test)
        return {"loss": loss_sum / (count * (self.test.shape[1] - self.answer_start)), "accuracy": exact / count}
