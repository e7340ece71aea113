"""Wall time of the phases of a step, summed over the run on each process (one perf_counter per phase)."""

from __future__ import annotations

import time
from collections import deque

import torch

# compute: local gradients (and metric shares on log steps); encode: upload frames; gather: the frames to
# the server; aggregate: the server's decode, aggregate and re-compress; broadcast: its frame to the
# workers; update: decode and optimizer step on the workers; metrics: gathering and writing metric rows;
# checkpoint: the x-checksum agreement and checkpoint writing between steps.
# In the sharded topology gather is the Alltoallv, aggregate each worker's slice and broadcast the Allgatherv.
PHASES = ("compute", "encode", "gather", "aggregate", "broadcast", "update", "metrics", "checkpoint")


# Steps whose phase times are kept one by one, for medians (the sums cover the whole run).
KEEP_STEPS = 4096


class PhaseTimer:
    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0  # optimizer steps timed
        self._last = time.perf_counter()
        self._at_step = [0.0] * len(PHASES)  # the sums when the last step ended
        self._recent: deque[list[float]] = deque(maxlen=KEEP_STEPS)  # each step's seconds per phase

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap (or start) to phase."""
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def end_step(self) -> None:
        """An optimizer step ended: its seconds per phase (since the last end) join the recent steps."""
        now = [self.seconds[p] for p in PHASES]
        self._recent.append([a - b for a, b in zip(now, self._at_step)])
        self._at_step = now
        self.steps += 1

    def medians(self) -> torch.Tensor:
        """float64 medians over the last KEEP_STEPS steps: each phase's, then the whole step's (the sum of
        its phases), in PHASES order + 1; zeros before the first step."""
        if not self._recent:
            return torch.zeros(len(PHASES) + 1, dtype=torch.float64)
        rows = torch.tensor(list(self._recent), dtype=torch.float64)
        rows = torch.cat([rows, rows.sum(1, keepdim=True)], 1)
        return rows.median(0).values  # torch's median of an even count is the lower of the two middle values

    def per_step(self) -> torch.Tensor:
        """float64 seconds per optimizer step, in PHASES order."""
        return torch.tensor([self.seconds[p] for p in PHASES], dtype=torch.float64) / max(1, self.steps)
