"""Compressors C(x) with their byte encoders and decoders. No state, no I/O.

For every compressor, ``decode(encode(x))`` *is* C(x): the value a receiver reconstructs from the bytes is
the definition, so sender and receiver hold bit-identical copies. Values travel as fp32, whatever the
compute dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from . import wire
from .catalog import BLOCKED
from .errors import CdmpiError


class Compressor:
    """A pure compressor over flat vectors of length d."""

    name = ""
    keyed = False  # True if encode/decode use the shared key (random-k); others ignore it

    def __init__(self, d: int):
        self.d = d

    @property
    def frame_nbytes(self) -> int:
        raise NotImplementedError

    def contraction(self) -> float:
        """pi of Assumption 4.1: ||C(x) - x||^2 <= (1 - pi) ||x||^2 (in expectation for random-k)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, frame: torch.Tensor, key: int = 0) -> bool | None:
        """Write C(x) into frame. Returns whether every coordinate of x was finite where the encoder learns it
        on its way through x (scaled sign: from the partial sums of ||x||_1), else None."""
        raise NotImplementedError

    def decode(self, frame: torch.Tensor, dtype: torch.dtype, key: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def decode_add_(self, frame: torch.Tensor, acc: torch.Tensor, key: int = 0) -> None:
        """acc += C(x) from its frame."""
        acc.add_(self.decode(frame, acc.dtype, key))

    def add_sum_(self, frames: torch.Tensor, acc: torch.Tensor, keys, alpha: float = 1.0) -> None:
        """acc += alpha * S with S = sum_i C_i over the rows of frames, summed in row order."""
        total = torch.zeros_like(acc)
        for frame, key in zip(frames, keys):
            self.decode_add_(frame, total, key)
        acc.add_(total, alpha=alpha)

    def encode_delta_(self, target: torch.Tensor, state: torch.Tensor, frame: torch.Tensor,
                      key: int = 0) -> bool | None:
        """One Markov step: write C(target - state) into frame, then state += the decoded frame. Returns what
        encode returns, of target - state."""
        finite = self.encode(target - state, frame, key)
        self.decode_add_(frame, state, key)
        return finite

    def __call__(self, x: torch.Tensor, key: int = 0) -> torch.Tensor:
        frame = torch.empty(self.frame_nbytes, dtype=torch.uint8, device=x.device)
        self.encode(x, frame, key)
        return self.decode(frame, x.dtype, key)

    def new_frame(self, device="cpu") -> torch.Tensor:
        return torch.zeros(self.frame_nbytes, dtype=torch.uint8, device=device)


class ScaledSign(Compressor):
    """C(x) = ||x||_1 sign(x) / d, sign(0) = +1. Frame: fp32 scale, then ceil(d/8) sign bytes."""

    name = "scaled_sign"

    @property
    def frame_nbytes(self) -> int:
        return 4 + wire.sign_nbytes(self.d)

    def contraction(self) -> float:
        # ||C(x)-x||^2 = ||x||^2 - ||x||_1^2/d and ||x||_1^2 >= ||x||^2, so pi = 1/d in the worst case.
        return 1.0 / self.d

    # The hot paths run chunk by chunk (wire.CHUNK): ||x||_1 and the sign bits in one pass over x, and
    # the n frames of the server summed chunk by chunk through the sign table, never as n dense vectors.

    def _pack(self, x: torch.Tensor, signs: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Pack the sign bits of x (coordinates lo..hi) into signs; return ||x||_1 of the chunk (0-d)."""
        wire.pack_signs_chunk(x, signs[lo // 8:(hi + 7) // 8])
        return torch.abs(x, out=wire.scratch("abs", x.dtype, x.device)[:hi - lo]).sum()

    def _pack_all(self, x_of, frame) -> bool:
        """Frame = fp32 ||x||_1 / d, then the signs; x_of(lo, hi) gives the chunk of x. Returns whether
        ||x||_1 is finite (a sum of |x_j| is inf or nan exactly when some x_j is, or when it overflows)."""
        signs = frame[4:]
        l1 = None
        for lo, hi in wire.chunks(self.d):
            part = self._pack(x_of(lo, hi), signs, lo, hi)
            l1 = part if l1 is None else l1 + part
        wire.write_f32(frame, 0, l1 / self.d)
        return bool(torch.isfinite(l1))

    def _pack_compiled(self, k, frame, x, state=None) -> bool:
        """_pack_all through the compiled kernels (of x - state if state is given): the signs and |x| of a
        chunk in one loop, ||x||_1 of the chunk by torch's own sum (as the torch path), the scale by the same float ops."""
        fr = wire.as_numpy(frame)
        x_np = wire.as_numpy(x)
        state_np = None if state is None else wire.as_numpy(state)
        absx, absx_np = wire.scratch_cpu("abs", x.dtype)
        flags = wire.scratch_cpu("flags", torch.uint8)[1]
        plans = self.__dict__.setdefault("_plans", {})  # made once per dtype: Python costs show at d = 1e5
        plan = plans.get(x.dtype)
        if plan is None:  # the chunk ranges with their views of |x|, and the buffers of the scale
            plan = plans[x.dtype] = (
                [(lo, hi, absx if hi - lo == wire.CHUNK else absx[:hi - lo]) for lo, hi in wire.chunks(self.d)],
                np.empty(len(range(0, self.d, wire.CHUNK)), dtype=x_np.dtype), x_np.dtype.type(self.d),
                np.empty(1, dtype=np.float32))
        ranges, partials, d, scale = plan
        for c, (lo, hi, absx) in enumerate(ranges):
            signs = fr[4 + lo // 8:4 + (hi + 7) // 8]
            if state_np is None:
                k.pack_abs(x_np[lo:hi], signs, flags, absx_np)
            else:
                k.pack_abs_diff(x_np[lo:hi], state_np[lo:hi], signs, flags, absx_np)
            partials[c] = absx.sum().item()
        k.scale(partials, d, scale)
        fr[:4] = scale.view(np.uint8)
        return bool(np.isfinite(partials).all())  # what _pack_all returns, from the chunks' sums

    def encode(self, x, frame, key=0):
        k = wire.compiled(self.d, x, frame) if x.dtype in (torch.float32, torch.float64) else None
        if k is not None:
            return self._pack_compiled(k, frame, x)
        return self._pack_all(lambda lo, hi: x[lo:hi], frame)

    def encode_delta_(self, target, state, frame, key=0):
        k = (wire.compiled(self.d, target, state, frame)
             if target.dtype == state.dtype and state.dtype in (torch.float32, torch.float64) else None)
        if k is not None:
            finite = self._pack_compiled(k, frame, target, state)
        else:
            diff = wire.scratch("diff", state.dtype, state.device)
            finite = self._pack_all(lambda lo, hi: torch.sub(target[lo:hi], state[lo:hi], out=diff[:hi - lo]), frame)
        self.decode_add_(frame, state)
        return finite

    def decode(self, frame, dtype, key=0):
        scale = wire.read_f32(frame, 0, 1).to(dtype)
        return wire.unpack_signs(frame[4:], self.d, dtype) * scale

    def decode_add_(self, frame, acc, key=0):
        wire.add_scaled_signs_(frame[4:], wire.read_f32(frame, 0, 1), acc)

    def add_sum_(self, frames, acc, keys, alpha=1.0):
        k = wire.compiled(self.d, frames, acc) if acc.dtype in (torch.float32, torch.float64) and len(frames) else None
        if k is not None:  # the same sums of +-scale_i from 0.0 in worker order, one compiled loop per chunk
            fr = wire.as_numpy(frames)
            scales = fr[:, :4].copy().view(np.float32).reshape(-1).astype(wire.as_numpy(acc).dtype)
            total, total_np = wire.scratch_cpu("total", acc.dtype)
            flags = wire.scratch_cpu("flags", torch.uint8, 2 * wire._FLAG_BLOCK)[1]
            for lo, hi in wire.chunks(self.d):
                k.sum_signs(fr, 4 + lo // 8, scales, total_np[:hi - lo], flags)
                acc[lo:hi].add_(total if hi - lo == wire.CHUNK else total[:hi - lo], alpha=alpha)
            return
        scales = [wire.read_f32(frame, 0, 1).to(acc.dtype) for frame in frames]
        table = wire.sign_table(acc.dtype, acc.device)
        signs = frames[:, 4:]
        total = wire.scratch("total", acc.dtype, acc.device)
        for lo, hi in wire.chunks(self.d):
            packed = signs[:, lo // 8:(hi + 7) // 8]
            part = total[:hi - lo].zero_()
            for i, scale in enumerate(scales):
                part.addcmul_(wire.lookup_chunk(table, packed[i], hi - lo), scale)
            acc[lo:hi].add_(part, alpha=alpha)


class _Blocks:
    """Coordinates cut into blocks of `block` (the last may be shorter): per-block sums, and per-block
    values spread back over the coordinates."""

    def __init__(self, d: int, block: int):
        self.d = d
        self.block = block if 0 < block < d else d
        self.count = -(-d // self.block)
        self.sizes = torch.full((self.count,), self.block, dtype=torch.int64)
        self.sizes[-1] = d - (self.count - 1) * self.block

    def sums(self, v: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(self.count * self.block, dtype=v.dtype, device=v.device)
        padded[:self.d] = v
        return padded.view(self.count, self.block).sum(1)

    def spread(self, per_block: torch.Tensor) -> torch.Tensor:
        return per_block.repeat_interleave(self.block)[:self.d]


class BlockScaledSign(Compressor):
    """Scaled sign with one scale per block of coordinates (compress.block): C(x)_j = ||x_b||_1 / d_b
    sign(x_j) for j in block b. Frame: the blocks' fp32 scales, then ceil(d/8) sign bytes."""

    name = "scaled_sign"

    def __init__(self, d: int, block: int):
        super().__init__(d)
        self.blocks = _Blocks(d, block)

    @property
    def frame_nbytes(self) -> int:
        return 4 * self.blocks.count + wire.sign_nbytes(self.d)

    def contraction(self) -> float:
        return 1.0 / self.blocks.block  # per block as scaled sign's 1/d_b

    def encode(self, x, frame, key=0):
        sums = self.blocks.sums(x.abs())
        wire.write_f32(frame, 0, sums / self.blocks.sizes.to(sums))
        wire.pack_signs(x, frame[4 * self.blocks.count:])
        return bool(torch.isfinite(sums).all())

    def decode(self, frame, dtype, key=0):
        scales = wire.read_f32(frame, 0, self.blocks.count).to(dtype)
        return wire.unpack_signs(frame[4 * self.blocks.count:], self.d, dtype) * self.blocks.spread(scales)


class TwoLevelSign(Compressor):
    """Two bits a coordinate: its sign, and whether |x_j| >= ||x||_1 / d (the high group). Each group sends
    one fp32 scale, the mean |x_j| over the group, so C(x)_j = sign(x_j) * (s_high or s_low). Scaled sign is
    this with both scales equal to ||x||_1 / d, and the group means are the best two scales for the groups,
    so the error is never larger than scaled sign's (up to the fp32 rounding of the scales). With block > 0
    each block of coordinates has its own threshold and two scales.
    Frame: the blocks' fp32 s_low, their fp32 s_high, ceil(d/8) sign bytes, ceil(d/8) group bytes (1: high)."""

    name = "two_level_sign"

    def __init__(self, d: int, block: int = 0):
        super().__init__(d)
        self.blocks = _Blocks(d, block)

    @property
    def frame_nbytes(self) -> int:
        return 8 * self.blocks.count + 2 * wire.sign_nbytes(self.d)

    def contraction(self) -> float:
        return 1.0 / self.blocks.block  # at least scaled sign's

    def encode(self, x, frame, key=0):
        blocks, count = self.blocks, self.blocks.count
        magnitude = x.abs()
        l1 = blocks.sums(magnitude)
        sizes = blocks.sizes.to(l1)
        high = magnitude >= blocks.spread(l1 / sizes)
        count_high = blocks.sums(high.to(l1.dtype))
        sum_high = blocks.sums(torch.where(high, magnitude, 0))
        s_high = sum_high / count_high  # never 0 coordinates: the largest |x_j| of a block is at least its mean
        s_low = (l1 - sum_high) / (sizes - count_high).clamp(min=1)
        wire.write_f32(frame, 0, torch.cat([s_low, s_high]))
        signs, nbytes = 8 * count, wire.sign_nbytes(self.d)
        wire.pack_signs(x, frame[signs:signs + nbytes])
        wire.pack_signs(torch.where(high, 1.0, -1.0).to(x.dtype), frame[signs + nbytes:])
        return bool(torch.isfinite(l1).all())

    def decode(self, frame, dtype, key=0):
        blocks, count, nbytes = self.blocks, self.blocks.count, wire.sign_nbytes(self.d)
        scales = wire.read_f32(frame, 0, 2 * count).to(dtype)
        high = wire.unpack_signs(frame[8 * count + nbytes:], self.d, dtype) > 0
        levels = torch.where(high, blocks.spread(scales[count:]), blocks.spread(scales[:count]))
        return wire.unpack_signs(frame[8 * count:8 * count + nbytes], self.d, dtype) * levels


class _Sparse(Compressor):
    """k coordinates; the frame holds their fp32 values (and, for top-k, their int32 indices)."""

    def __init__(self, d: int, k: int):
        super().__init__(d)
        if not 1 <= k <= d:
            raise CdmpiError(f"{self.name}: k must be in [1, d={d}], got {k}")
        self.k = k

    def contraction(self) -> float:
        return self.k / self.d

    def _scatter(self, values, indices, dtype):
        out = torch.zeros(self.d, dtype=dtype, device=values.device)
        out.index_copy_(0, indices.long(), values.to(dtype))
        return out


class TopK(_Sparse):
    name = "topk"

    @property
    def frame_nbytes(self) -> int:
        return 8 * self.k

    def encode(self, x, frame, key=0):
        indices = torch.topk(x.abs(), self.k, sorted=False).indices
        wire.write_f32(frame, 0, x[indices])
        wire.write_i32(frame, 4 * self.k, indices)

    def decode(self, frame, dtype, key=0):
        indices = wire.read_i32(frame, 4 * self.k, self.k)
        if self.k and (int(indices.min()) < 0 or int(indices.max()) >= self.d):
            raise CdmpiError(f"topk frame holds an index outside [0, {self.d})")
        return self._scatter(wire.read_f32(frame, 0, self.k), indices, dtype)


class RandK(_Sparse):
    """k coordinates chosen by a generator seeded with key, which sender and receiver share."""

    name = "randk"
    keyed = True

    @property
    def frame_nbytes(self) -> int:
        return 4 * self.k

    def indices(self, key: int, device) -> torch.Tensor:
        generator = torch.Generator().manual_seed(key)
        return torch.randperm(self.d, generator=generator)[: self.k].to(device)

    def encode(self, x, frame, key=0):
        wire.write_f32(frame, 0, x[self.indices(key, x.device)])

    def decode(self, frame, dtype, key=0):
        return self._scatter(wire.read_f32(frame, 0, self.k), self.indices(key, frame.device), dtype)


class Identity(Compressor):
    name = "identity"

    @property
    def frame_nbytes(self) -> int:
        return 4 * self.d

    def contraction(self) -> float:
        return 1.0

    def encode(self, x, frame, key=0):
        wire.write_f32(frame, 0, x)

    def decode(self, frame, dtype, key=0):
        return wire.read_f32(frame, 0, self.d).to(dtype)


COMPRESSORS: dict[str, type[Compressor]] = {c.name: c for c in (ScaledSign, TwoLevelSign, TopK, RandK, Identity)}


def make(name: str, d: int, *, ratio: float = 0.016, k: int = 0, block: int = 0) -> Compressor:
    """The compressor `name` over d coordinates. block > 0 (scaled sign, two-level sign): the scales of each
    block of `block` consecutive coordinates (the last may be shorter) are its own."""
    cls = COMPRESSORS.get(name)
    if cls is None:
        raise CdmpiError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)}")
    if block:
        if name not in BLOCKED:
            raise CdmpiError(f"compress.block applies to {' and '.join(BLOCKED)}, not {name!r}")
        if block < d:
            return TwoLevelSign(d, block) if name == "two_level_sign" else BlockScaledSign(d, block)
    if issubclass(cls, _Sparse):
        return cls(d, k if k > 0 else max(1, min(d, round(ratio * d))))
    return cls(d)


def all_finite(results: list[bool | None]) -> bool | None:
    """The encode result of a frame made of parts: False if a part saw a non-finite value, True if every
    part knows it saw none, else None."""
    if False in results:
        return False
    return True if all(r is True for r in results) else None


# ---- the sharded server's compressor: one compressor per slice ------------------------------------------

def slice_bounds(d: int, n_slices: int) -> list[int]:
    """Coordinates bounds[s] .. bounds[s + 1] form slice s; slice sizes differ by at most one."""
    if not 1 <= n_slices <= d:
        raise CdmpiError(f"cannot cut d = {d} coordinates into {n_slices} non-empty slices")
    return [s * d // n_slices for s in range(n_slices + 1)]


def slice_key(key: int, index: int) -> int:
    """The key of slice `index` of a frame with key `key` (random-k: each slice draws its own indices)."""
    return stream_key(key, index, 0)


class Sliced(Compressor):
    """C applied to each slice of x on its own: C_S(x) = (C(x_1), ..., C(x_S)).

    This is the sharded server's compressor: slice s is served by one rank, which sees only that slice's
    frame. For scaled sign every slice carries its own fp32 scale ||x_s||_1 / d_s (S scales instead of one);
    for top-k every slice keeps its share k_s of the k coordinates. Still a contraction: pi = min_s pi_s.
    The frame is the slices' frames one after the other, so slice s is bytes offsets[s] .. offsets[s + 1].
    """

    def __init__(self, parts: list[Compressor], bounds: list[int]):
        super().__init__(bounds[-1])
        self.parts = parts
        self.bounds = bounds
        self.name = parts[0].name
        self.keyed = parts[0].keyed
        self.offsets = [0]
        for part in parts:
            self.offsets.append(self.offsets[-1] + part.frame_nbytes)

    @classmethod
    def make(cls, name: str, d: int, n_slices: int, *, ratio: float = 0.016, k: int = 0, block: int = 0) -> "Sliced":
        """`make(name, d_s, ...)` per slice; an explicit k is shared out in proportion to slice size, and
        blocks start again at each slice's start."""
        bounds = slice_bounds(d, n_slices)
        sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
        parts = [make(name, size, ratio=ratio, k=max(1, round(k * size / d)) if k > 0 else 0, block=block)
                 for size in sizes]
        return cls(parts, bounds)

    @property
    def frame_nbytes(self) -> int:
        return self.offsets[-1]

    @property
    def slice_nbytes(self) -> list[int]:
        return [part.frame_nbytes for part in self.parts]

    def contraction(self) -> float:
        return min(part.contraction() for part in self.parts)

    def _slices(self, key: int | None = None):
        """(slice index, its compressor, coordinate slice, byte slice, its key) for every slice."""
        for s, part in enumerate(self.parts):
            yield (s, part, slice(self.bounds[s], self.bounds[s + 1]), slice(self.offsets[s], self.offsets[s + 1]),
                   slice_key(key, s) if self.keyed and key is not None else 0)

    def encode(self, x, frame, key=0):
        return all_finite([part.encode(x[coords], frame[nbytes], k) for _, part, coords, nbytes, k in self._slices(key)])

    def decode(self, frame, dtype, key=0):
        out = torch.empty(self.d, dtype=dtype, device=frame.device)
        for _, part, coords, nbytes, k in self._slices(key):
            out[coords] = part.decode(frame[nbytes], dtype, k)
        return out

    def decode_add_(self, frame, acc, key=0):
        for _, part, coords, nbytes, k in self._slices(key):
            part.decode_add_(frame[nbytes], acc[coords], k)

    def add_sum_(self, frames, acc, keys, alpha=1.0):
        keys = list(keys)
        for s, part, coords, nbytes, _ in self._slices():
            part.add_sum_(frames[:, nbytes], acc[coords], [slice_key(k, s) if self.keyed else 0 for k in keys], alpha)

    def encode_delta_(self, target, state, frame, key=0):
        return all_finite([part.encode_delta_(target[coords], state[coords], frame[nbytes], k)
                           for _, part, coords, nbytes, k in self._slices(key)])

    def slice_of(self, index: int) -> "SliceOf":
        return SliceOf(self, index)


class SliceOf(Compressor):
    """Slice `index` of a Sliced compressor, as the rank serving that slice sees it: frames of the slice
    only, keyed by the whole frame's key, so both ends derive the same per-slice key."""

    def __init__(self, sliced: Sliced, index: int):
        self.part = sliced.parts[index]
        super().__init__(self.part.d)
        self.index = index
        self.name = self.part.name
        self.keyed = self.part.keyed

    @property
    def frame_nbytes(self) -> int:
        return self.part.frame_nbytes

    def contraction(self) -> float:
        return self.part.contraction()

    def _key(self, key: int) -> int:
        return slice_key(key, self.index) if self.keyed else 0

    def encode(self, x, frame, key=0):
        return self.part.encode(x, frame, self._key(key))

    def decode(self, frame, dtype, key=0):
        return self.part.decode(frame, dtype, self._key(key))

    def decode_add_(self, frame, acc, key=0):
        self.part.decode_add_(frame, acc, self._key(key))

    def add_sum_(self, frames, acc, keys, alpha=1.0):
        self.part.add_sum_(frames, acc, [self._key(k) for k in keys], alpha)

    def encode_delta_(self, target, state, frame, key=0):
        return self.part.encode_delta_(target, state, frame, self._key(key))


def stream_key(seed: int, stream: int, step: int) -> int:
    """The shared seed of one frame (random-k): a stream is 0 for the server, i + 1 for worker i."""
    return int(np.random.SeedSequence([seed, stream, step]).generate_state(1, np.uint64)[0] >> 1)


def frame_key(compressor: Compressor, seed: int, stream: int, step: int) -> int:
    """stream_key for compressors that use it, else 0: a SeedSequence costs more than a sign frame."""
    return stream_key(seed, stream, step) if compressor.keyed else 0
