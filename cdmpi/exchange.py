"""One step's traffic, between the workers' gradients and their update: encode, exchange, aggregate.

The local workers encode their upload frames into `upload_frames(step)` first (the frames then tell whether
each gradient was finite, for its control header). Star topology (the paper's Algorithm 1): every worker's
message is the 40-byte control header followed by its upload frame; the server gathers the n messages (Gather), decides from the headers, aggregates the
frames into the download frame and broadcasts it behind the decision's header (Bcast).

Sharded topology: worker s serves slice s of the vector. The headers go to every rank first (one small
Allgather, rank 0 included, so every rank makes the same decision); then slice s of every upload frame
goes to worker s (Alltoallv), each worker aggregates its slice, and the slices of the download frame go
to every worker (Allgatherv). Rank 0 takes no frames.

Frame buffers are made once per frame size (onebit-adam changes size after its warm-up) and reused.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import algorithms, compress
from .control import HEADER_NBYTES, Decision, Flag, Header, pack_headers, unpack_headers
from .timing import PhaseTimer

H = HEADER_NBYTES


class FrameExchange:
    def __init__(self, transport, algorithm: algorithms.Algorithm, setting: algorithms.Setting, *,
                 topology: str, frame_device: torch.device, server_device: torch.device,
                 worker_device: torch.device, n_local: int, timer: PhaseTimer):
        self.transport = transport
        self.algorithm = algorithm
        self.setting = setting
        self.sharded = topology == "sharded"
        self.frame_device = frame_device
        self.server_device = server_device
        self.n_local = n_local
        self.timer = timer
        self.server = None  # star: the algorithm's server, on the server's process
        self.slice_servers: dict[int, object] = {}  # sharded: slice index -> its server, on the worker
        if self.sharded:
            self.slice_servers = {s: algorithm.server(algorithms.slice_setting(setting, s), worker_device)
                                  for s in transport.slices_served(setting.n_workers)}
        elif transport.is_server:
            self.server = algorithm.server(setting, server_device)
        self._buffers: dict[tuple, torch.Tensor] = {}

    def frames(self, step: int) -> tuple[compress.Compressor, compress.Compressor]:
        """The compressors of step `step`'s (up, down) frames; every process knows them."""
        return self.algorithm.worker.frames(self.setting, step)

    def _buffer(self, name: str, shape: tuple, device) -> torch.Tensor:
        key = (name, shape, str(device))
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.zeros(shape, dtype=torch.uint8, device=device)
        return buf

    def _upload_buffer(self, step: int) -> torch.Tensor:
        """(n_local, bytes per message): star messages are the control header, then the frame."""
        up_c = self.frames(step)[0]
        width = up_c.frame_nbytes + (0 if self.sharded else H)
        return self._buffer("up", (self.n_local, width), self.frame_device)

    def upload_frames(self, step: int) -> list[torch.Tensor]:
        """The rows the local workers encode step `step`'s upload frames into, in place, before `run`."""
        up = self._upload_buffer(step)
        return [up[i] if self.sharded else up[i, H:] for i in range(self.n_local)]

    def run(self, step: int, headers: Sequence[Header], stop: bool,
            decide: Callable[[list[Header], bool], Decision]) -> tuple[Decision, torch.Tensor]:
        """One step, once the local workers have encoded into `upload_frames(step)`: `headers[i]` belongs to
        this process's i-th worker; `stop` is this process's stop request. Returns the decision and the
        download frame (valid unless the decision is DONE or ABORT)."""
        if self.sharded:
            return self._sharded(step, headers, stop, decide)
        return self._star(step, headers, stop, decide)

    def _star(self, step, headers, stop, decide):
        down_c = self.frames(step)[1]
        timer, transport = self.timer, self.transport
        up = self._upload_buffer(step)
        down = self._buffer("down", (H + down_c.frame_nbytes,), self.frame_device)
        if self.n_local:
            up[:, :H].copy_(pack_headers(headers))
        messages = transport.gather_frames(up)
        timer.lap("gather")
        decision = None
        if transport.is_server:
            decision = decide(unpack_headers(messages), stop)
            down[:H].copy_(pack_headers([Header(decision.flags, step)])[0])
            if not decision.flags & (Flag.DONE | Flag.ABORT | Flag.SKIP):
                self._aggregate(messages[:, H:], down[H:])
        timer.lap("aggregate")
        transport.broadcast(down)
        timer.lap("broadcast")
        if decision is None:
            decision = Decision(unpack_headers(down[None])[0].flags)
        return decision, down[H:]

    def _aggregate(self, up_frames: torch.Tensor, down_frame: torch.Tensor) -> None:
        """The server's step, on its own device (frames may live elsewhere, e.g. in-process on a GPU)."""
        frames, out = up_frames, down_frame
        if frames.device != self.server_device:
            frames = up_frames.to(self.server_device)
        if down_frame.device != self.server_device:
            out = self._buffer("server-down", tuple(down_frame.shape), self.server_device)
        self.server.aggregate(frames, out)
        if out is not down_frame:
            down_frame.copy_(out)

    def _sharded(self, step, headers, stop, decide):
        up_c, down_c = self.frames(step)
        timer, transport = self.timer, self.transport
        rows = ([Header(Flag.STOP if stop else Flag.NONE, step)] if transport.is_server else []) + list(headers)
        table = unpack_headers(transport.gather_control(pack_headers(rows)))  # server first, then worker i
        decision = decide(table[1:], Flag.STOP in table[0].flags)
        timer.lap("gather")
        down = self._buffer("down", (down_c.frame_nbytes,), self.frame_device)
        if decision.flags & (Flag.DONE | Flag.ABORT | Flag.SKIP) or not self.n_local:
            return decision, down
        parts = transport.scatter_slices(self._upload_buffer(step), up_c.slice_nbytes)
        timer.lap("gather")
        offsets = down_c.offsets
        for s, slice_server in self.slice_servers.items():
            slice_server.aggregate(parts[s], down[offsets[s]:offsets[s + 1]])
        timer.lap("aggregate")
        transport.allgather_slices(down, down_c.slice_nbytes)
        timer.lap("broadcast")
        return decision, down
