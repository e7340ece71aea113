"""The byte format of frames: packed sign bits and little-endian fp32/int32 fields.

Sign bits use the order of ``np.packbits(bits, bitorder="big")``: coordinate j lives in byte j // 8 at
bit 7 - j % 8 (the most significant bit first). A set bit means x_j >= 0 (so sign(0) = +1); the padding
bits of the last byte are zero. All multi-byte fields are little-endian, the native order of every
platform cdmpi runs on.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import numpy as np
import torch

if sys.byteorder != "little":  # the fp32 views below would silently change the wire format
    raise ImportError("cdmpi's wire format needs a little-endian host")

# (b0 + b1<<8 + ... + b7<<56) * MAGIC puts b0<<7 | b1<<6 | ... | b7 into the top byte when every b is 0/1:
# one multiply packs eight coordinates. Written as the int64 with the same bits as 0x8040201008040201.
_PACK_MAGIC = 0x8040201008040201 - (1 << 64)

_SIGN_TABLES: dict[tuple, torch.Tensor] = {}

# Long vectors are packed and unpacked CHUNK coordinates at a time, so that the temporaries of one
# chunk (bools, int64 words, decoded values) stay in cache: memory sees one read of x, not five passes.
CHUNK = 1 << 16
_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(name: str, dtype: torch.dtype, device, size: int = CHUNK) -> torch.Tensor:
    """A reusable buffer of at least `size` elements (one per name, dtype and device; single-threaded).
    Pass device as tensor.device: it is the cache key as given."""
    key = (name, dtype, device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < size:
        buf = _SCRATCH[key] = torch.empty(max(size, CHUNK), dtype=dtype, device=device)
    return buf


def chunks(d: int):
    """(lo, hi) coordinate ranges of CHUNK (a multiple of 8, so byte ranges are lo // 8 .. ceil(hi / 8))."""
    return ((lo, min(d, lo + CHUNK)) for lo in range(0, d, CHUNK))


def sign_nbytes(d: int) -> int:
    return (d + 7) // 8


# --- Optional compiled kernels (numba) for contiguous CPU tensors ---------------------------------------
# Each does in one loop what the torch path does in several kernels per chunk, with the same IEEE
# operations in the same order, so both paths give the same bits (tests/test_compiled_kernels.py compares them).
# Without numba, with CDMPI_NUMBA=0, for other devices, or below NUMBA_MIN_D coordinates (where numba's
# import and cache load, about half a second of CPU per process, would cost more than it saves) the torch
# path runs. USE_NUMBA = False forces the torch path in this process.
USE_NUMBA = os.environ.get("CDMPI_NUMBA", "1") != "0"
NUMBA_MIN_D = 1 << 15
_FLOATS = (torch.float32, torch.float64)
_MAGIC_U = np.uint64(0x8040201008040201)  # _PACK_MAGIC as an unsigned NumPy word
_SPREAD = np.uint64(0x0101010101010101)  # byte * _SPREAD copies the byte into all eight bytes of a word
_BIT_OF_BYTE = np.uint64(0x0102040810204080)  # byte k of the word keeps bit 7 - k of the byte
_HIGH_7 = np.uint64(0x7F7F7F7F7F7F7F7F)  # + this carries a nonzero byte into its bit 7
_FLAG_BLOCK = 4096  # coordinates per block of the expand-then-add loops: flags and sums stay in L1
_kernels = None  # namespace of the compiled kernels; False once numba is known to be missing


def _k_flags(x, flags):
    """flags[j] = x[j] >= 0 as 0/1 bytes (a loop LLVM vectorizes; NaN -> 0 as in torch.ge)."""
    for j in range(x.size):
        flags[j] = x[j] >= 0


def _k_fold(flags, n, out):
    """out[b] = flags 8b .. 8b+7 packed MSB first, by the multiply of the torch path (flags n.. zeroed)."""
    for j in range(n, out.size * 8):
        flags[j] = 0
    words = flags[:out.size * 8].view(np.uint64)
    for b in range(out.size):
        out[b] = (words[b] * _MAGIC_U) >> np.uint64(56)


def _k_pack(x, out, flags):
    """out = the packed bits of x >= 0, flags.size coordinates (a multiple of 8) at a time."""
    block = flags.size
    for lo in range(0, x.size, block):
        hi = min(x.size, lo + block)
        _k_flags(x[lo:hi], flags)
        _k_fold(flags, hi - lo, out[lo // 8:(hi + 7) // 8])


def _k_pack_abs(x, out, flags, absx):
    """_k_pack of one chunk, and absx[:x.size] = |x| (exact, the values torch.abs makes)."""
    for j in range(x.size):
        v = x[j]
        absx[j] = abs(v)
        flags[j] = v >= 0
    _k_fold(flags, x.size, out)


def _k_pack_abs_diff(target, state, out, flags, absx):
    """_k_pack_abs of target - state: one IEEE subtraction, as torch.sub's target + (-1) * state."""
    for j in range(target.size):
        v = target[j] - state[j]
        absx[j] = abs(v)
        flags[j] = v >= 0
    _k_fold(flags, target.size, out)


def _k_scale(partials, d, out):
    """out[0] = fp32((((p0 + p1) + p2) + ...) / d) in the dtype of partials: the torch path's 0-d ops."""
    l1 = partials[0]
    for i in range(1, partials.size):
        l1 = l1 + partials[i]
    out[0] = l1 / d


def _k_expand(packed, flags):
    """flags[8b + k] = bit 7 - k of packed[b] as a 0/1 byte, eight at a time through one uint64."""
    words = flags[:packed.size * 8].view(np.uint64)
    for b in range(packed.size):
        w = (np.uint64(packed[b]) * _SPREAD) & _BIT_OF_BYTE
        words[b] = ((w + _HIGH_7) >> np.uint64(7)) & _SPREAD


def _k_add_signs(packed, scale, acc, flags):
    """acc[j] += scale * sign_j. scale * +-1 is exact, so this is addcmul_'s single rounding of acc +- scale."""
    block = flags.size
    for lo in range(0, acc.size, block):
        m = min(block, acc.size - lo)
        _k_expand(packed[lo // 8:(lo + m + 7) // 8], flags)
        a = acc[lo:lo + m]
        for j in range(m):
            a[j] += scale if flags[j] else -scale


def _k_unpack(packed, out, flags):
    """out[j] = +-1 from the bits (the sign table's values)."""
    block = flags.size
    for lo in range(0, out.size, block):
        m = min(block, out.size - lo)
        _k_expand(packed[lo // 8:(lo + m + 7) // 8], flags)
        o = out[lo:lo + m]
        for j in range(m):
            o[j] = 1.0 if flags[j] else -1.0


def _k_sum_signs(frames, lo_byte, scales, part, flags):
    """part[j] = sum over the rows i of frames, in order and from 0.0, of scales[i] * sign_ij, for the
    part.size coordinates whose sign bytes start at column lo_byte: the torch path's addcmul_ loop."""
    block = flags.size // 2
    f0 = flags[:block]
    f1 = flags[block:2 * block]
    for lo in range(0, part.size, block):  # a block of part stays in L1 while every row is added
        m = min(block, part.size - lo)
        p = part[lo:lo + m]
        for j in range(m):
            p[j] = 0.0
        b0 = lo_byte + lo // 8
        b1 = b0 + (m + 7) // 8
        i = 0
        while i + 1 < frames.shape[0]:  # two rows per pass over p: (p + row i) + row i+1, the same order
            s = scales[i]
            t = scales[i + 1]
            _k_expand(frames[i, b0:b1], f0)
            _k_expand(frames[i + 1, b0:b1], f1)
            for j in range(m):
                p[j] = (p[j] + (s if f0[j] else -s)) + (t if f1[j] else -t)
            i += 2
        if i < frames.shape[0]:
            s = scales[i]
            _k_expand(frames[i, b0:b1], f0)
            for j in range(m):
                p[j] += s if f0[j] else -s


def _compile():
    """The kernels, compiled on first use (numba caches them on disk for the next process)."""
    global _kernels, _k_flags, _k_fold, _k_expand
    try:
        import numba
    except ImportError:
        _kernels = False
        return
    jit = numba.njit(cache=True, nogil=True)
    # The helpers first: the kernels call them through these module globals, resolved when they compile.
    _k_flags, _k_fold, _k_expand = jit(_k_flags), jit(_k_fold), jit(_k_expand)
    _kernels = SimpleNamespace(pack=jit(_k_pack), pack_abs=jit(_k_pack_abs), pack_abs_diff=jit(_k_pack_abs_diff),
                               scale=jit(_k_scale), add_signs=jit(_k_add_signs), unpack=jit(_k_unpack),
                               sum_signs=jit(_k_sum_signs))


def compiled(d: int, *tensors: torch.Tensor):
    """The compiled kernels if they may run on these tensors at length d, else None. They take CPU tensors
    whose rows are contiguous: 1-D vectors, and row-strided 2-D frames such as the star server's
    messages[:, H:] (the frames behind their control words), as they lie, without a copy."""
    if not USE_NUMBA or d < NUMBA_MIN_D:
        return None
    for t in tensors:
        if not (t.is_cpu and (t.is_contiguous() or t.stride(-1) == 1)):
            return None
    if _kernels is None:
        _compile()
    return _kernels or None


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a NumPy array (shared, no copy)."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


_NP_SCRATCH: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}


def scratch_cpu(name: str, dtype: torch.dtype, size: int = CHUNK) -> tuple[torch.Tensor, np.ndarray]:
    """A CPU scratch(name, ...) buffer and its NumPy view, exactly `size` long (cached: the kernels' calls
    are a few microseconds, so lookups must not cost more)."""
    key = (name, dtype, size)
    hit = _NP_SCRATCH.get(key)
    if hit is None:
        buf = scratch(name, dtype, torch.device("cpu"), size)[:size]
        hit = _NP_SCRATCH[key] = (buf, buf.numpy())
    return hit


def pack_signs_chunk(x: torch.Tensor, out: torch.Tensor) -> None:
    """pack_signs for at most CHUNK coordinates, through cached scratch buffers."""
    d = x.numel()
    nbytes = sign_nbytes(d)
    bits = scratch("bits", torch.bool, x.device)[:nbytes * 8]
    if d % 8:
        bits[d:].zero_()  # padding bits are zero
    torch.ge(x, 0, out=bits[:d])
    words = scratch("words", torch.int64, x.device, CHUNK // 8)[:nbytes]
    torch.mul(bits.view(torch.int64), _PACK_MAGIC, out=words)
    out.copy_(words.view(torch.uint8)[7::8])  # the top byte of each little-endian int64 holds the 8 bits


def pack_signs(x: torch.Tensor, out: torch.Tensor) -> None:
    """Write the sign bits of the 1-D tensor x (x_j >= 0 -> 1) into the uint8 tensor out."""
    d = x.numel()
    nbytes = sign_nbytes(d)
    if out.numel() != nbytes or out.dtype != torch.uint8:
        raise ValueError(f"pack_signs: out must be {nbytes} uint8, got {out.numel()} {out.dtype}")
    k = compiled(d, x, out) if x.dtype in _FLOATS else None
    if k is not None:
        k.pack(as_numpy(x), as_numpy(out), scratch_cpu("flags", torch.uint8)[1])
        return
    for lo, hi in chunks(d):
        pack_signs_chunk(x[lo:hi], out[lo // 8:(hi + 7) // 8])


def sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8) table: row b holds the eight +-1 values that byte b encodes."""
    key = (dtype, device)
    table = _SIGN_TABLES.get(key)
    if table is None:
        byte = torch.arange(256).unsqueeze(1)
        bits = torch.bitwise_and(torch.bitwise_right_shift(byte, torch.arange(7, -1, -1)), 1)
        table = (bits * 2 - 1).to(dtype=dtype, device=device).contiguous()
        _SIGN_TABLES[key] = table
    return table


def unpack_signs(packed: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
    """The +-1 vector of length d that pack_signs encoded into packed."""
    k = compiled(d, packed) if dtype in _FLOATS else None
    if k is not None:
        out = torch.empty(d, dtype=dtype)
        k.unpack(as_numpy(packed), as_numpy(out), scratch_cpu("flags", torch.uint8, _FLAG_BLOCK)[1])
        return out
    table = sign_table(dtype, packed.device)
    return table.index_select(0, packed.to(torch.int32)).view(-1)[:d]


def lookup_chunk(table: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n values table encodes in the bytes `packed` (a chunk), in a scratch buffer."""
    nbytes = packed.numel()
    index = scratch("index", torch.int64, packed.device, CHUNK // 8)[:nbytes]
    index.copy_(packed)
    values = scratch("values", table.dtype, packed.device)[:nbytes * 8]
    torch.index_select(table, 0, index, out=values.view(nbytes, 8))
    return values[:n]


def add_scaled_signs_(packed: torch.Tensor, scale: torch.Tensor, acc: torch.Tensor) -> None:
    """acc += scale * signs(packed), chunk by chunk (scale * +-1 is exact, so this is acc +- scale)."""
    k = compiled(acc.numel(), packed, acc) if acc.dtype in _FLOATS else None
    if k is not None:
        scale = as_numpy(scale.to(acc.dtype).reshape(-1))[0]
        k.add_signs(as_numpy(packed), scale, as_numpy(acc), scratch_cpu("flags", torch.uint8, _FLAG_BLOCK)[1])
        return
    table = sign_table(acc.dtype, acc.device)
    scale = scale.to(acc.dtype)
    for lo, hi in chunks(acc.numel()):
        acc[lo:hi].addcmul_(lookup_chunk(table, packed[lo // 8:(hi + 7) // 8], hi - lo), scale)


def _read(frame: torch.Tensor, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    raw = frame[offset:offset + 4 * count]
    if (raw.storage_offset() % 4) != 0:  # rows of a (n, nbytes) buffer need not be 4-byte aligned
        raw = raw.clone()
    return raw.view(dtype)


def _write(frame: torch.Tensor, offset: int, values: torch.Tensor, dtype: torch.dtype) -> None:
    values = values.reshape(-1).to(dtype)
    frame[offset:offset + 4 * values.numel()].copy_(values.view(torch.uint8))


def read_f32(frame: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """count little-endian float32 values at byte offset of a uint8 frame."""
    return _read(frame, offset, count, torch.float32)


def write_f32(frame: torch.Tensor, offset: int, values: torch.Tensor) -> None:
    _write(frame, offset, values, torch.float32)


def read_i32(frame: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    return _read(frame, offset, count, torch.int32)


def write_i32(frame: torch.Tensor, offset: int, values: torch.Tensor) -> None:
    _write(frame, offset, values, torch.int32)
