"""The server: aggregates upload frames into the download frame, counts bits, records metrics."""

from __future__ import annotations

import time

import torch

from .problems.classifier import TRAIN_SHARE


class ServerRuntime:
    """Rank 0's part of a run: the algorithm's server in the star topology (None in the sharded one, whose
    slice servers live on the workers), the bit counters and the metrics file."""

    def __init__(self, algorithm_server, n_workers: int, writer=None, *, share_layout: str = "gradient",
                 steps_per_epoch: int = 0, device="cpu"):
        self.algorithm = algorithm_server
        self.n_workers = n_workers
        self.writer = writer
        self.share_layout = share_layout
        self.steps_per_epoch = steps_per_epoch
        self.device = torch.device(device)
        self._down: dict[int, torch.Tensor] = {}  # server-side copies of down frames, by size
        self.bits_up = 0
        self.bits_down = 0
        self.start_time = time.perf_counter()
        self.last_row: dict | None = None
        self.last_eval: dict | None = None

    def aggregate(self, up_frames: torch.Tensor, down_frame: torch.Tensor) -> None:
        """up_frames and down_frame may live elsewhere than the server's device (in-process runs)."""
        frames = up_frames.to(self.device)
        out = down_frame
        if down_frame.device != self.device:
            out = self._down.setdefault(down_frame.numel(), torch.empty_like(down_frame, device=self.device))
        self.algorithm.aggregate(frames, out)
        if out is not down_frame:
            down_frame.copy_(out)
        # Counted from the buffers handed to the transport: n frames up, and each worker's copy down.
        self.count_bits(up_frames.numel(), down_frame.numel())

    def count_bits(self, up_nbytes: int, down_nbytes: int) -> None:
        """One step's traffic: up_nbytes from all workers together, a down frame of down_nbytes to each."""
        self.bits_up += 8 * up_nbytes
        self.bits_down += 8 * down_nbytes * self.n_workers

    def record(self, step: int, shares: torch.Tensor, evaluate: bool = False) -> dict:
        """shares: (n, width) float64, summed in worker order. Layout "gradient": worker i's share of
        [f, grad f]. Layout "norms": [loss / n, ||g_i||^2 / n], then on evaluation steps the test-set sums."""
        total = shares[0].clone()
        for i in range(1, shares.shape[0]):
            total += shares[i]
        if self.share_layout == "gradient":
            grad_norm_sq = float(torch.dot(total[1:], total[1:]))
        else:
            grad_norm_sq = float(total[1])
        row = {"step": step, "loss": float(total[0]), "grad_norm_sq": grad_norm_sq,
               "bits_up": self.bits_up, "bits_down": self.bits_down,
               "wall_time": time.perf_counter() - self.start_time}
        if self.writer is not None:
            self.writer.append("train", row)
        self.last_row = row
        if evaluate:
            loss_sum, correct, count = (float(v) for v in total[TRAIN_SHARE:TRAIN_SHARE + 3])
            self.last_eval = {"step": step, "epoch": step / self.steps_per_epoch, "loss": loss_sum / count,
                              "accuracy": correct / count, "bits_up": self.bits_up, "bits_down": self.bits_down}
            if self.writer is not None:
                self.writer.append("eval", self.last_eval)
        return row

    def state_dict(self) -> dict:
        # algorithm is None in the sharded topology: the slice servers' states are files of their own
        return {"algorithm": self.algorithm.state_dict() if self.algorithm else {}, "bits_up": self.bits_up,
                "bits_down": self.bits_down, "wall_time": time.perf_counter() - self.start_time}

    def load_state_dict(self, state: dict) -> None:
        if self.algorithm is not None:
            self.algorithm.load_state_dict(state["algorithm"])
        self.bits_up = int(state["bits_up"])
        self.bits_down = int(state["bits_down"])
        self.start_time = time.perf_counter() - float(state["wall_time"])  # wall_time continues
