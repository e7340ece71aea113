"""Distributed algorithms as worker and server steps over flat parameter vectors.

A worker step is split in two: ``encode(grad, up_frame)`` writes the upload frame, and
``update(params, down_frame, lr)`` applies the server's frame. A server step is
``aggregate(up_frames, down_frame)``. Frames are uint8 tensors; nothing here knows about MPI.
The classes keep the state; the math of the model update is the free function ``amsgrad_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compress import Compressor
from .config import OptimConfig
from .errors import CdmpiError
from .markov import MarkovMean, MarkovSequence


def amsgrad_(params, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, lr, beta1, beta2, nu) -> None:
    """Algorithm 1 lines 13-16, in place: m, v, v_hat = max(v_hat, v), x -= lr m / sqrt(v_hat + nu)."""
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    params.addcdiv_(exp_avg, max_exp_avg_sq.add(nu).sqrt_(), value=-lr)


class AmsgradState:
    """m, v and v_hat of one worker's local AMSGrad (every worker holds an identical copy)."""

    def __init__(self, d: int, dtype, device, optim: OptimConfig):
        self.optim = optim
        self.exp_avg = torch.zeros(d, dtype=dtype, device=device)
        self.exp_avg_sq = torch.zeros(d, dtype=dtype, device=device)
        self.max_exp_avg_sq = torch.zeros(d, dtype=dtype, device=device)

    def step(self, params, grad, lr: float) -> None:
        amsgrad_(params, grad, self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq,
                 lr=lr, beta1=self.optim.beta1, beta2=self.optim.beta2, nu=self.optim.nu)

    def state_dict(self) -> dict:
        return {k: getattr(self, k).clone() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}

    def load_state_dict(self, state: dict) -> None:
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            getattr(self, k).copy_(state[k])


@dataclass(frozen=True)
class Setting:
    """What every worker and the server of one run agree on."""

    d: int
    n_workers: int
    up: Compressor  # worker -> server
    down: Compressor  # server -> worker
    optim: OptimConfig
    dtype: torch.dtype
    seed: int


class CDAdamWorker:
    """Algorithm 1 on worker i: lines 5-6 (encode) and 12-16 (update)."""

    def __init__(self, s: Setting, worker_index: int, device="cpu"):
        self.g_hat = MarkovSequence(s.up, s.dtype, device, s.seed, stream=worker_index + 1)
        self.g_tilde = MarkovSequence(s.down, s.dtype, device, s.seed, stream=0)
        self.amsgrad = AmsgradState(s.d, s.dtype, device, s.optim)
        self.up_nbytes = s.up.frame_nbytes
        self.down_nbytes = s.down.frame_nbytes

    def encode(self, grad: torch.Tensor, up_frame: torch.Tensor) -> None:
        self.g_hat.push(grad, up_frame)  # c_i = C(g_i - g_hat_i); g_hat_i += c_i

    def update(self, params: torch.Tensor, down_frame: torch.Tensor, lr: float) -> None:
        self.g_tilde.receive(down_frame)  # g_tilde += c
        self.amsgrad.step(params, self.g_tilde.value, lr)

    def state_dict(self) -> dict:
        return {"g_hat": self.g_hat.state_dict(), "g_tilde": self.g_tilde.state_dict(),
                "amsgrad": self.amsgrad.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.g_hat.load_state_dict(state["g_hat"])
        self.g_tilde.load_state_dict(state["g_tilde"])
        self.amsgrad.load_state_dict(state["amsgrad"])


class CDAdamServer:
    """Algorithm 1 on the server: lines 8-10."""

    def __init__(self, s: Setting, device="cpu"):
        self.g_hat = MarkovMean(s.up, s.n_workers, s.dtype, device, s.seed)
        self.g_tilde = MarkovSequence(s.down, s.dtype, device, s.seed, stream=0)
        self.up_nbytes = s.up.frame_nbytes
        self.down_nbytes = s.down.frame_nbytes

    def aggregate(self, up_frames: torch.Tensor, down_frame: torch.Tensor) -> None:
        self.g_hat.receive_all(up_frames)  # g_hat += (1/n) sum_i c_i
        self.g_tilde.push(self.g_hat.value, down_frame)  # c = C(g_hat - g_tilde); g_tilde += c

    def state_dict(self) -> dict:
        return {"g_hat": self.g_hat.state_dict(), "g_tilde": self.g_tilde.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.g_hat.load_state_dict(state["g_hat"])
        self.g_tilde.load_state_dict(state["g_tilde"])


@dataclass(frozen=True)
class Algorithm:
    name: str
    worker: type
    server: type
    compressors: tuple[str, ...]  # the compressors it makes sense with
    description: str


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a for a in (
        Algorithm("cdadam", CDAdamWorker, CDAdamServer, ("scaled_sign", "topk", "randk", "identity"),
                  "CD-Adam (Algorithm 1): Markov-compressed both ways, AMSGrad on the workers"),
    )
}


def get(name: str, compressor: str) -> Algorithm:
    algorithm = ALGORITHMS.get(name)
    if algorithm is None:
        raise CdmpiError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    if compressor not in algorithm.compressors:
        raise CdmpiError(f"algorithm {name!r} does not work with compressor {compressor!r}; "
                         f"it takes {', '.join(algorithm.compressors)}")
    return algorithm
