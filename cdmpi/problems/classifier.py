"""Image classification with a network from cdmpi.nets (Section 7.2).

The algorithms update a flat parameter vector x. Each worker's module has its parameters (and their
gradients) re-pointed to views into x (and into one flat gradient buffer), so x *is* the model: no copies
between the optimiser and the network. BatchNorm running statistics are buffers, not parameters: they
stay local to each worker and never travel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import images as imagesets
from ..optimizer import flatten_
from .sampling import EpochSampler, seed_key

EVAL_BATCH = 1000


class ModuleShard:
    """Worker i's torch module over its part of the training data: the minibatch gradient at x (the module's
    parameters are views into x), and the BatchNorm buffers as the worker's own state. Subclasses say how a
    batch of rows gives the loss (`_loss`) and what the test set measures (`test_values`)."""

    def __init__(self, module: nn.Module, *, n_workers: int, weight_decay: float, seed: int, index: int, dtype,
                 device):
        self.module = module.to(device=device, dtype=dtype)
        self.n_workers, self.weight_decay = n_workers, weight_decay
        self.seed, self.index, self.dtype, self.device = seed, index, dtype, device
        self.d = sum(p.numel() for p in self.module.parameters())
        self.flat_grad = torch.zeros(self.d, dtype=dtype, device=device)
        self._bound = None
        self.step = 0  # batches drawn; keys the augmentation so a resume repeats it

    @property
    def n_samples(self) -> int:
        raise NotImplementedError

    def _loss(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, x: torch.Tensor) -> None:
        if self._bound is not x:
            flatten_(self.module.parameters(), x, self.flat_grad)
            self._bound = x

    def sampler(self, batch_size: int, seed: int, index: int) -> EpochSampler:
        return EpochSampler(self.n_samples, batch_size, seed, index)

    def evaluate(self, x: torch.Tensor, rows: torch.Tensor, want_share: bool = False):
        """(g_i, shares): the minibatch gradient plus weight_decay * x, and the shares {"loss": loss / n,
        "grad_norm_sq": ||g_i||^2 / n}, which add up to the means over the workers."""
        self.bind(x)
        self.module.train()
        self.flat_grad.zero_()
        loss = self._loss(rows)
        loss.backward()
        grad = self.flat_grad
        if self.weight_decay:
            grad.add_(x, alpha=self.weight_decay)
        share = None
        if want_share:
            share = torch.stack([loss.detach().double(), torch.dot(grad, grad).double()]) / self.n_workers
            share = {"loss": share[0], "grad_norm_sq": share[1]}
        return grad, share

    def state_dict(self) -> dict:
        buffers = {k: v.clone() for k, v in self.module.state_dict().items() if "running" in k or "batches" in k}
        return {"step": self.step, "buffers": buffers}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.module.load_state_dict(state["buffers"], strict=False)


class ImageShard(ModuleShard):
    """Worker i's network, its part of the training images and (worker 0 only) the test set."""

    def __init__(self, module: nn.Module, train_images, train_labels, *, mean, std, augment: bool,
                 n_workers: int, weight_decay: float, seed: int, index: int, test=None, dtype, device):
        super().__init__(module, n_workers=n_workers, weight_decay=weight_decay, seed=seed, index=index,
                         dtype=dtype, device=device)
        self.images, self.labels = train_images.to(device), train_labels.to(device)
        self.test = None if test is None else (test[0].to(device), test[1].to(device))
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, dtype=dtype, device=device).view(shape)
        self.std = torch.tensor(std, dtype=dtype, device=device).view(shape)
        self.augment = augment

    @property
    def n_samples(self) -> int:
        return self.images.shape[0]

    def _inputs(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        x = imagesets.to_float(images).to(self.dtype)
        if augment:
            x = imagesets.augment(x, torch.Generator().manual_seed(seed_key(self.seed, 3, self.index, self.step)))
        return (x - self.mean) / self.std

    def _loss(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.module(self._inputs(self.images[rows], self.augment))
        self.step += 1
        return F.cross_entropy(logits, self.labels[rows])

    @torch.no_grad()
    def test_values(self, x: torch.Tensor) -> dict | None:
        """{"loss": mean cross-entropy, "accuracy"} over the whole test set (eval mode: this worker's BN
        statistics), on the worker that holds it; None on the others."""
        if self.test is None:
            return None
        out = torch.zeros(3, dtype=torch.float64)
        self.bind(x)
        self.module.eval()
        images, labels = self.test
        for start in range(0, len(labels), EVAL_BATCH):
            logits = self.module(self._inputs(images[start:start + EVAL_BATCH], False))
            target = labels[start:start + EVAL_BATCH]
            out[0] += float(F.cross_entropy(logits.double(), target, reduction="sum"))
            out[1] += float((logits.argmax(1) == target).sum())
        out[2] = len(labels)
        loss_sum, correct, count = (float(v) for v in out)
        return {"loss": loss_sum / count, "accuracy": correct / count}
