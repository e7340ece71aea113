"""The byte format of frames: packed sign bits and little-endian fp32/int32 fields.

Sign bits use the order of ``np.packbits(bits, bitorder="big")``: coordinate j lives in byte j // 8 at
bit 7 - j % 8 (the most significant bit first). A set bit means x_j >= 0 (so sign(0) = +1); the padding
bits of the last byte are zero. All multi-byte fields are little-endian, the native order of every
platform cdmpi runs on.
"""

from __future__ import annotations

import sys

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
