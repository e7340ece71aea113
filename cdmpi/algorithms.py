"""Distributed algorithms as worker and server steps over flat parameter vectors.

A worker step is split in two: ``encode(grad, up_frame)`` writes the upload frame, and
``update(params, down_frame, lr)`` applies the server's frame. A server step is
``aggregate(up_frames, down_frame)``. Frames are uint8 tensors; nothing here knows about MPI.
The classes keep the state; the math of the model update is the free function ``amsgrad_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import catalog, compress, wire
from .compress import Compressor, Identity
from .config import OptimConfig
from .errors import CdmpiError
from .markov import ErrorFeedback, FrameReader, MarkovMean, MarkovSequence, mean_of_frames
from .stepsize import StepSize, betas_of, each_range


def amsgrad_(params, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, lr, beta1, beta2, nu) -> None:
    """Algorithm 1 lines 13-16, in place: m, v, v_hat = max(v_hat, v), x -= lr m / sqrt(v_hat + nu).
    Elementwise, so it runs chunk by chunk: the five vectors are read and written once while each
    chunk's intermediates stay in cache."""
    denom = wire.scratch("amsgrad_denom", params.dtype, params.device)
    d = params.numel()
    if d <= wire.CHUNK:  # one chunk: skip the slicing
        _amsgrad_chunk_(params, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, denom[:d], lr, beta1, beta2, nu)
        return
    for lo, hi in wire.chunks(d):
        _amsgrad_chunk_(params[lo:hi], grad[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi], max_exp_avg_sq[lo:hi],
                        denom[:hi - lo], lr, beta1, beta2, nu)


def _amsgrad_chunk_(x, g, m, v, v_hat, denom, lr, beta1, beta2, nu) -> None:
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    torch.maximum(v_hat, v, out=v_hat)
    x.addcdiv_(m, torch.add(v_hat, nu, out=denom).sqrt_(), value=-lr)


class AmsgradState:
    """m, v and v_hat of one worker's local AMSGrad (every worker holds an identical copy)."""

    def __init__(self, d: int, dtype, device, optim: OptimConfig):
        self.optim = optim
        self.exp_avg = torch.zeros(d, dtype=dtype, device=device)
        self.exp_avg_sq = torch.zeros(d, dtype=dtype, device=device)
        self.max_exp_avg_sq = torch.zeros(d, dtype=dtype, device=device)

    def step(self, params, grad, lr: float | StepSize) -> None:
        beta1, beta2 = betas_of(lr, self.optim.beta1, self.optim.beta2)
        for part, rate in each_range(params, lr):
            amsgrad_(params[part], grad[part], self.exp_avg[part], self.exp_avg_sq[part], self.max_exp_avg_sq[part],
                     lr=rate, beta1=beta1, beta2=beta2, nu=self.optim.nu)

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
    full: Compressor | None = None  # fp32 frames (the warm-ups); None: Identity(d)
    warmup: int = 0  # cdadam, ef21: steps with fp32 frames both ways before the compressed ones

    def identity(self) -> Compressor:
        return self.full if self.full is not None else Identity(self.d)


def make_setting(compressor: str, d: int, n_workers: int, optim: OptimConfig, dtype: torch.dtype, seed: int, *,
                 topology: str = "star", ratio: float = 0.016, k: int = 0, block: int = 0, warmup: int = 0) -> Setting:
    """The workers' setting. star: one compressor over the whole vector. sharded: one per slice
    (compress.Sliced), one slice per worker."""
    if topology != "sharded":
        up, down = (compress.make(compressor, d, ratio=ratio, k=k, block=block) for _ in range(2))
        return Setting(d, n_workers, up, down, optim, dtype, seed, warmup=warmup)
    if d < n_workers:
        raise CdmpiError(f"comm.topology = 'sharded' cuts the vector into one slice per worker, but d = {d} "
                         f"is less than the {n_workers} workers; use comm.topology = 'star'")
    up, down = (compress.Sliced.make(compressor, d, n_workers, ratio=ratio, k=k, block=block) for _ in range(2))
    return Setting(d, n_workers, up, down, optim, dtype, seed, compress.Sliced.make("identity", d, n_workers),
                   warmup=warmup)


def slice_setting(s: Setting, index: int) -> Setting:
    """What the server of slice `index` of a sharded setting sees: that slice's compressors and dimension."""
    up = s.up.slice_of(index)
    return Setting(up.d, s.n_workers, up, s.down.slice_of(index), s.optim, s.dtype, s.seed, s.full.slice_of(index),
                   s.warmup)


def same_frames(s: Setting, step: int) -> tuple[Compressor, Compressor]:
    """(up, down) compressors of the frames of step `step`: the same every step for most algorithms."""
    return s.up, s.down


def warm_frames(s: Setting, step: int) -> tuple[Compressor, Compressor]:
    """Markov algorithms: fp32 frames both ways for the first s.warmup steps (each sequence then equals its
    target up to fp32 rounding), the compressed ones after them."""
    return (s.identity(), s.identity()) if step < s.warmup else (s.up, s.down)


class MarkovWorker:
    """A worker with Markov sequences both ways (Algorithm 1 lines 5-6 and 12); `step_` uses g_tilde."""

    frames = staticmethod(warm_frames)
    moments: tuple[str, ...] = ()  # the state keys an optimizer warm start takes over (not the sequences)

    def __init__(self, s: Setting, worker_index: int, device="cpu"):
        self.setting = s
        self.g_hat = MarkovSequence(s.up, s.dtype, device, s.seed, stream=worker_index + 1)
        self.g_tilde = MarkovSequence(s.down, s.dtype, device, s.seed, stream=0)

    def encode(self, grad: torch.Tensor, up_frame: torch.Tensor) -> bool | None:
        """Writes the upload frame; returns whether grad was finite where the encoder learns it, else None."""
        up = warm_frames(self.setting, self.g_hat.count)[0]  # the sequence has taken one frame a step
        return self.g_hat.push(grad, up_frame, up)  # c_i = C(g_i - g_hat_i); g_hat_i += c_i

    def update(self, params: torch.Tensor, down_frame: torch.Tensor, lr: float | StepSize) -> None:
        self.g_tilde.receive(down_frame, warm_frames(self.setting, self.g_tilde.count)[1])  # g_tilde += c
        self.step_(params, self.g_tilde.value, lr)

    def step_(self, params, direction, lr: float | StepSize) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"g_hat": self.g_hat.state_dict(), "g_tilde": self.g_tilde.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.g_hat.load_state_dict(state["g_hat"])
        self.g_tilde.load_state_dict(state["g_tilde"])


class CDAdamWorker(MarkovWorker):
    """Algorithm 1 on worker i: lines 5-6 (encode) and 12-16 (update)."""

    moments = ("amsgrad",)

    def __init__(self, s: Setting, worker_index: int, device="cpu"):
        super().__init__(s, worker_index, device)
        self.amsgrad = AmsgradState(s.d, s.dtype, device, s.optim)

    def step_(self, params, direction, lr: float | StepSize) -> None:
        self.amsgrad.step(params, direction, lr)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "amsgrad": self.amsgrad.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.amsgrad.load_state_dict(state["amsgrad"])


class EF21Worker(MarkovWorker):
    """EF21 (Richtarik et al. 2021) with Markov compression both ways, as the paper's Section 7.2 extends
    it: the same frames as CD-Adam, then plain SGD x -= lr g_tilde."""

    def step_(self, params, direction, lr: float | StepSize) -> None:
        for part, rate in each_range(params, lr):
            params[part].add_(direction[part], alpha=-rate)


class CDAdamServer:
    """Algorithm 1 on the server: lines 8-10 (also EF21's server)."""

    def __init__(self, s: Setting, device="cpu"):
        self.setting = s
        self.g_hat = MarkovMean(s.up, s.n_workers, s.dtype, device, s.seed)
        self.g_tilde = MarkovSequence(s.down, s.dtype, device, s.seed, stream=0)

    def aggregate(self, up_frames: torch.Tensor, down_frame: torch.Tensor) -> None:
        up, down = warm_frames(self.setting, self.g_hat.count)
        self.g_hat.receive_all(up_frames, up)  # g_hat += (1/n) sum_i c_i
        self.g_tilde.push(self.g_hat.value, down_frame, down)  # c = C(g_hat - g_tilde); g_tilde += c

    def state_dict(self) -> dict:
        return {"g_hat": self.g_hat.state_dict(), "g_tilde": self.g_tilde.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.g_hat.load_state_dict(state["g_hat"])
        self.g_tilde.load_state_dict(state["g_tilde"])


class DirectAmsgradWorker:
    """AMSGrad on the decoded server frame, the paper's Section 4 strategies. The worker sends
    C(g_i + e_i) and keeps e_i with error feedback, or sends C(g_i) without it (naive compression);
    with the identity compressor and no memory this is uncompressed distributed AMSGrad (Section 3)."""

    error_feedback = False
    frames = staticmethod(same_frames)
    moments = ("amsgrad",)

    def __init__(self, s: Setting, worker_index: int, device="cpu"):
        self.sender = ErrorFeedback(s.up, s.dtype, device, s.seed, worker_index + 1, self.error_feedback)
        self.reader = FrameReader(s.down, s.dtype, s.seed, stream=0)
        self.amsgrad = AmsgradState(s.d, s.dtype, device, s.optim)

    def encode(self, grad: torch.Tensor, up_frame: torch.Tensor) -> bool | None:
        return self.sender.push(grad, up_frame)

    def update(self, params: torch.Tensor, down_frame: torch.Tensor, lr: float | StepSize) -> None:
        self.amsgrad.step(params, self.reader.read(down_frame), lr)

    def state_dict(self) -> dict:
        return {"sender": self.sender.state_dict(), "reader": self.reader.state_dict(),
                "amsgrad": self.amsgrad.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sender.load_state_dict(state["sender"])
        self.reader.load_state_dict(state["reader"])
        self.amsgrad.load_state_dict(state["amsgrad"])


class DirectServer:
    """Averages the n decoded frames q = (1/n) sum_i C_i and sends C(q + e) (with error feedback) or C(q)."""

    error_feedback = False

    def __init__(self, s: Setting, device="cpu"):
        self.up = s.up
        self.dtype = s.dtype
        self.seed = s.seed
        self.sender = ErrorFeedback(s.down, s.dtype, device, s.seed, 0, self.error_feedback)

    def aggregate(self, up_frames: torch.Tensor, down_frame: torch.Tensor) -> None:
        mean = mean_of_frames(self.up, up_frames, self.dtype, self.seed, self.sender.count)
        self.sender.push(mean, down_frame)

    def state_dict(self) -> dict:
        return {"sender": self.sender.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sender.load_state_dict(state["sender"])


class EFAmsgradWorker(DirectAmsgradWorker):
    error_feedback = True


class EFServer(DirectServer):
    error_feedback = True


def frozen_adam_(params, exp_avg, exp_avg_sq, *, lr, eps) -> None:
    """x -= lr m / (sqrt(v) + eps): DeepSpeed OnebitAdam's update (no bias correction, eps outside)."""
    params.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr)


class _OnebitWarmup:
    """Frame sizes of 1-bit Adam: fp32 (identity) frames during the warm-up, compressed ones after it."""

    @staticmethod
    def frames(s: Setting, step: int) -> tuple[Compressor, Compressor]:
        return (s.identity(), s.identity()) if step < s.optim.warmup_steps else (s.up, s.down)

    @property
    def warm(self) -> bool:
        return self.step < self.optim.warmup_steps


class OnebitAdamWorker(_OnebitWarmup):
    """1-bit Adam (Tang et al. 2021) as DeepSpeed's OnebitAdam runs it. For the first W = warmup_steps
    steps: uncompressed Adam on the averaged gradient (fp32 frames both ways). Afterwards v is frozen; the
    worker sends its local momentum m_i = beta1 m + (1 - beta1) g_i through error feedback, the server
    sends the error-fed compressed mean, and every worker takes that as m."""

    moments = ("exp_avg", "exp_avg_sq")

    def __init__(self, s: Setting, worker_index: int, device="cpu"):
        self.optim = s.optim
        self.up = s.up
        self.full = s.identity()
        self.sender = ErrorFeedback(s.up, s.dtype, device, s.seed, worker_index + 1)
        self.reader = FrameReader(s.down, s.dtype, s.seed, stream=0)
        self.full_reader = FrameReader(self.full, s.dtype, s.seed, stream=0)
        self.down = s.down
        self.exp_avg = torch.zeros(s.d, dtype=s.dtype, device=device)
        self.exp_avg_sq = torch.zeros(s.d, dtype=s.dtype, device=device)
        self.step = 0

    def encode(self, grad: torch.Tensor, up_frame: torch.Tensor) -> bool | None:
        if self.warm:
            return self.full.encode(grad, up_frame)
        b1 = self.optim.beta1
        return self.sender.push(self.exp_avg * b1 + grad * (1.0 - b1), up_frame)

    def update(self, params: torch.Tensor, down_frame: torch.Tensor, lr: float | StepSize) -> None:
        o = self.optim
        if self.warm:
            grad = self.full_reader.read(down_frame)
            self.exp_avg.mul_(o.beta1).add_(grad, alpha=1.0 - o.beta1)
            self.exp_avg_sq.mul_(o.beta2).addcmul_(grad, grad, value=1.0 - o.beta2)
        else:
            self.exp_avg.copy_(self.reader.read(down_frame))
        for part, rate in each_range(params, lr):
            frozen_adam_(params[part], self.exp_avg[part], self.exp_avg_sq[part], lr=rate, eps=o.nu)
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone(),
                "sender": self.sender.state_dict(), "reader": self.reader.state_dict(),
                "full_reader": self.full_reader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.sender.load_state_dict(state["sender"])
        self.reader.load_state_dict(state["reader"])
        self.full_reader.load_state_dict(state["full_reader"])


class OnebitAdamServer(_OnebitWarmup):
    """Averages fp32 gradients during the warm-up, then error-fed compressed momenta."""

    def __init__(self, s: Setting, device="cpu"):
        self.optim = s.optim
        self.up = s.up
        self.down = s.down
        self.full = s.identity()
        self.dtype = s.dtype
        self.seed = s.seed
        self.sender = ErrorFeedback(s.down, s.dtype, device, s.seed, 0)
        self.step = 0

    def aggregate(self, up_frames: torch.Tensor, down_frame: torch.Tensor) -> None:
        if self.warm:
            self.full.encode(mean_of_frames(self.full, up_frames, self.dtype, self.seed, self.step), down_frame)
        else:
            mean = mean_of_frames(self.up, up_frames, self.dtype, self.seed, self.sender.count)
            self.sender.push(mean, down_frame)
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "sender": self.sender.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.sender.load_state_dict(state["sender"])


@dataclass(frozen=True)
class Algorithm:
    name: str
    worker: type
    server: type
    compressors: tuple[str, ...]  # the compressors it makes sense with; the first is its default
    description: str


_CODE = {"cdadam": (CDAdamWorker, CDAdamServer), "amsgrad": (DirectAmsgradWorker, DirectServer),
         "amsgrad-ef": (EFAmsgradWorker, EFServer), "amsgrad-naive": (DirectAmsgradWorker, DirectServer),
         "ef21": (EF21Worker, CDAdamServer), "onebit-adam": (OnebitAdamWorker, OnebitAdamServer)}
ALGORITHMS: dict[str, Algorithm] = {name: Algorithm(name, *_CODE[name], info.compressors, info.description)
                                    for name, info in catalog.ALGORITHMS.items()}


def get(name: str, compressor: str) -> Algorithm:
    catalog.check(name, compressor)
    return ALGORITHMS[name]


compressor_for = catalog.compressor_for
