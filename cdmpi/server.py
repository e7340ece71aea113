"""The server: aggregates upload frames into the download frame, counts bits, records metrics."""

from __future__ import annotations

import time

import torch


class ServerRuntime:
    def __init__(self, algorithm_server, n_workers: int, writer=None):
        self.algorithm = algorithm_server
        self.n_workers = n_workers
        self.writer = writer
        self.bits_up = 0
        self.bits_down = 0
        self.start_time = time.perf_counter()
        self.last_row: dict | None = None

    def aggregate(self, up_frames: torch.Tensor, down_frame: torch.Tensor) -> None:
        self.algorithm.aggregate(up_frames, down_frame)
        # Counted from the buffers handed to the transport: n frames up, and each worker's copy down.
        self.bits_up += 8 * up_frames.numel()
        self.bits_down += 8 * down_frame.numel() * self.n_workers

    def record(self, step: int, shares: torch.Tensor) -> dict:
        """shares: (n, 1 + d) float64, worker i's share of [f, grad f]; summed in worker order."""
        total = shares[0].clone()
        for i in range(1, shares.shape[0]):
            total += shares[i]
        grad = total[1:]
        row = {"step": step, "loss": float(total[0]), "grad_norm_sq": float(torch.dot(grad, grad)),
               "bits_up": self.bits_up, "bits_down": self.bits_down,
               "wall_time": time.perf_counter() - self.start_time}
        if self.writer is not None:
            self.writer.append("train", row)
        self.last_row = row
        return row

    def state_dict(self) -> dict:
        return {"algorithm": self.algorithm.state_dict(), "bits_up": self.bits_up, "bits_down": self.bits_down,
                "wall_time": time.perf_counter() - self.start_time}

    def load_state_dict(self, state: dict) -> None:
        self.algorithm.load_state_dict(state["algorithm"])
        self.bits_up = int(state["bits_up"])
        self.bits_down = int(state["bits_down"])
        self.start_time = time.perf_counter() - float(state["wall_time"])  # wall_time continues
