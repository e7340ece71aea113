"""Markov compression sequences (Richtarik et al. 2021) and error-feedback memory.

A Markov sequence is w_hat_0 = C(w_0), w_hat_t = w_hat_{t-1} + C(w_t - w_hat_{t-1}). Only C(...) travels,
so both ends keep a copy of w_hat and update it from the same decoded bytes: the copies never drift.
"""

from __future__ import annotations

import torch

from .compress import Compressor, frame_key


class MarkovSequence:
    """One end of a Markov sequence. `stream` names the sender (0: server, i + 1: worker i)."""

    def __init__(self, compressor: Compressor, dtype: torch.dtype, device, seed: int, stream: int):
        self.compressor = compressor
        self.seed = seed
        self.stream = stream
        self.count = 0  # frames applied; both ends advance it in lockstep (random-k keys use it)
        self.value = compressor(torch.zeros(compressor.d, dtype=dtype, device=device), self._key(compressor))

    def _key(self, compressor: Compressor) -> int:
        return frame_key(compressor, self.seed, self.stream, self.count)

    def push(self, target: torch.Tensor, frame: torch.Tensor, compressor: Compressor | None = None) -> bool | None:
        """Sender: write C(target - w_hat) into frame, then advance w_hat from those bytes (C: the sequence's
        compressor, or this frame's, e.g. a warm-up's fp32 frames). Returns what the compressor's encode
        returns (whether target - w_hat was finite, where it knows)."""
        c = compressor or self.compressor
        finite = c.encode_delta_(target, self.value, frame, self._key(c))
        self.count += 1
        return finite

    def receive(self, frame: torch.Tensor, compressor: Compressor | None = None) -> None:
        """Receiver (and sender): w_hat += the decoded frame."""
        c = compressor or self.compressor
        c.decode_add_(frame, self.value, self._key(c))
        self.count += 1

    def state_dict(self) -> dict:
        return {"value": self.value.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.value.copy_(state["value"])
        self.count = int(state["count"])


class MarkovMean:
    """The server's g_hat = mean over workers of their Markov sequences, advanced by their n frames."""

    def __init__(self, compressor: Compressor, n_workers: int, dtype: torch.dtype, device, seed: int):
        self.compressor = compressor
        self.n_workers = n_workers
        self.seed = seed
        self.count = 0
        self.value = compressor(torch.zeros(compressor.d, dtype=dtype, device=device),
                                frame_key(compressor, seed, 1, 0))

    def receive_all(self, frames: torch.Tensor, compressor: Compressor | None = None) -> None:
        """frames: (n, nbytes), row i from worker i. g_hat += (1/n) sum_i C_i, summed in worker order."""
        c = compressor or self.compressor
        keys = [frame_key(c, self.seed, i + 1, self.count) for i in range(self.n_workers)]
        c.add_sum_(frames, self.value, keys, alpha=1.0 / self.n_workers)
        self.count += 1

    def state_dict(self) -> dict:
        return {"value": self.value.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.value.copy_(state["value"])
        self.count = int(state["count"])


class ErrorFeedback:
    """A sender with error-feedback memory (Karimireddy et al. 2019): p = target + e, send C(p), e = p - C(p).

    With ``memory=False`` it sends C(target) and keeps no error (naive compression). `stream` names the
    sender as in MarkovSequence; `count` advances once per frame so random-k keys match the receiver's.
    """

    def __init__(self, compressor: Compressor, dtype: torch.dtype, device, seed: int, stream: int,
                 memory: bool = True):
        self.compressor = compressor
        self.seed = seed
        self.stream = stream
        self.memory = memory
        self.count = 0
        self.error = torch.zeros(compressor.d, dtype=dtype, device=device)

    def push(self, target: torch.Tensor, frame: torch.Tensor) -> bool | None:
        """Write C(target + e) into frame (e = 0 without memory); returns what the compressor's encode
        returns (whether target + e was finite, where it knows)."""
        key = frame_key(self.compressor, self.seed, self.stream, self.count)
        p = target + self.error if self.memory else target
        finite = self.compressor.encode(p, frame, key)
        if self.memory:
            torch.sub(p, self.compressor.decode(frame, p.dtype, key), out=self.error)  # the error the next frame carries back
        self.count += 1
        return finite

    def state_dict(self) -> dict:
        return {"error": self.error.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.error.copy_(state["error"])
        self.count = int(state["count"])


class FrameReader:
    """The receiving end of a stream without memory: decodes frame number `count` of sender `stream`."""

    def __init__(self, compressor: Compressor, dtype: torch.dtype, seed: int, stream: int):
        self.compressor = compressor
        self.dtype = dtype
        self.seed = seed
        self.stream = stream
        self.count = 0

    def read(self, frame: torch.Tensor) -> torch.Tensor:
        key = frame_key(self.compressor, self.seed, self.stream, self.count)
        value = self.compressor.decode(frame, self.dtype, key)
        self.count += 1
        return value

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])


def mean_of_frames(compressor: Compressor, frames: torch.Tensor, dtype: torch.dtype, seed: int,
                   count: int) -> torch.Tensor:
    """(1/n) sum_i C_i over the n rows of frames (row i from worker i, its frame number `count`),
    summed in worker order so every backend gets the same bits."""
    total = torch.zeros(compressor.d, dtype=dtype, device=frames.device)
    compressor.add_sum_(frames, total, [frame_key(compressor, seed, i + 1, count) for i in range(frames.shape[0])])
    return total.div_(frames.shape[0])
