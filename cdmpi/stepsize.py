"""The step size of one update: one learning rate for the whole flat vector, or one per range of it.

`torch.optim` param groups map onto ranges of cdmpi's single flat parameter vector. Each range has its
learning rate and, AdamW-style, its decoupled weight decay x <- x (1 - lr * wd), applied before the
algorithm's update. The algorithms' updates are elementwise, so running them range by range gives, for
equal learning rates, the same bits as one call over the whole vector. Pure math; no MPI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class StepSize:
    """ranges: (lo, hi, lr, decoupled weight decay) covering 0..d in order; betas: the step's (beta1,
    beta2) where a scheduler moves them (OneCycleLR, CyclicLR), else None (the run's own)."""

    ranges: tuple[tuple[int, int, float, float], ...]
    betas: tuple[float, float] | None = None

    def __float__(self) -> float:
        """The first range's learning rate (the one the workers' control words compare)."""
        return float(self.ranges[0][2])


def each_range(params, lr: "float | StepSize") -> Iterator[tuple[slice, float]]:
    """(slice of the vector, its learning rate), after applying each range's decoupled decay to params."""
    if not isinstance(lr, StepSize):
        yield slice(None), lr
        return
    for lo, hi, rate, decay in lr.ranges:
        if decay:
            params[lo:hi].mul_(1.0 - rate * decay)
        yield slice(lo, hi), rate


def betas_of(lr: "float | StepSize", beta1: float, beta2: float) -> tuple[float, float]:
    return lr.betas if isinstance(lr, StepSize) and lr.betas is not None else (beta1, beta2)
