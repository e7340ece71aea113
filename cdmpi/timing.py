"""Wall time of the phases of a step, summed over the run on each process (one perf_counter per phase)."""

from __future__ import annotations

import time

import torch

# compute: local gradients (and metric shares on log steps); encode: upload frames; gather: the frames to
# the server; aggregate: the server's decode, aggregate and re-compress; broadcast: its frame to the
# workers; update: decode and optimizer step on the workers; metrics: gathering and writing metric rows;
# checkpoint: the x-checksum agreement and checkpoint writing between steps.
# In the sharded topology gather is the Alltoallv, aggregate each worker's slice and broadcast the Allgatherv.
PHASES = ("compute", "encode", "gather", "aggregate", "broadcast", "update", "metrics", "checkpoint")


class PhaseTimer:
    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0  # optimizer steps timed
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap (or start) to phase."""
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def per_step(self) -> torch.Tensor:
        """float64 seconds per optimizer step, in PHASES order."""
        return torch.tensor([self.seconds[p] for p in PHASES], dtype=torch.float64) / max(1, self.steps)
