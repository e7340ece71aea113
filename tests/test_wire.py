"""The packed sign format against np.packbits, and fp32 fields at unaligned offsets."""

import numpy as np
import pytest
import torch

from cdmpi import wire


@pytest.mark.parametrize("d", [1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pack_signs_matches_np_packbits(d, dtype):
    rng = np.random.default_rng(d)
    x = torch.as_tensor(rng.standard_normal(d), dtype=dtype)
    x[:: 3] = 0.0  # sign(0) = +1
    x[1:: 5] = -0.0  # -0.0 >= 0 too
    out = torch.empty(wire.sign_nbytes(d), dtype=torch.uint8)
    wire.pack_signs(x, out)
    expected = np.packbits((x.numpy() >= 0).astype(np.uint8), bitorder="big")
    np.testing.assert_array_equal(out.numpy(), expected)
    assert out.numel() == (d + 7) // 8


def test_every_byte_value_round_trips():
    bits = np.unpackbits(np.arange(256, dtype=np.uint8))  # all 256 patterns, 2048 coordinates
    x = torch.as_tensor(np.where(bits == 1, 1.0, -1.0))
    out = torch.empty(256, dtype=torch.uint8)
    wire.pack_signs(x, out)
    np.testing.assert_array_equal(out.numpy(), np.arange(256))
    assert torch.equal(wire.unpack_signs(out, 2048, torch.float64), x)


def test_padding_bits_are_zero():
    out = torch.empty(2, dtype=torch.uint8)
    wire.pack_signs(torch.ones(9), out)
    assert out.tolist() == [0xFF, 0x80]


def test_unpack_inverts_pack():
    x = torch.randn(1001, dtype=torch.float64)
    out = torch.empty(wire.sign_nbytes(1001), dtype=torch.uint8)
    wire.pack_signs(x, out)
    assert torch.equal(wire.unpack_signs(out, 1001, torch.float64), torch.where(x >= 0, 1.0, -1.0).double())


def test_pack_rejects_wrong_buffer():
    with pytest.raises(ValueError):
        wire.pack_signs(torch.ones(9), torch.empty(1, dtype=torch.uint8))


def test_f32_fields_at_unaligned_offsets():
    buf = torch.zeros(3, 11, dtype=torch.uint8)  # rows start at byte 0, 11, 22
    for row in range(3):
        wire.write_f32(buf[row], 0, torch.tensor(1.5 + row))
        wire.write_i32(buf[row], 4, torch.tensor([-7, row], dtype=torch.int32)[:1])
    raw = buf.numpy().tobytes()
    for row in range(3):
        assert np.frombuffer(raw[11 * row: 11 * row + 4], "<f4")[0] == 1.5 + row
        assert wire.read_f32(buf[row], 0, 1).item() == 1.5 + row
        assert wire.read_i32(buf[row], 4, 1).item() == -7
