"""The optional compiled (numba) kernels of the scaled-sign hot paths against the torch path: the same
bits for every output, special values included. Both paths run in this process, switched through
wire.USE_NUMBA and wire.NUMBA_MIN_D."""

import numpy as np
import pytest
import torch

from cdmpi import compress, wire

pytest.importorskip("numba")

SIZES = [1, 7, 8, 9, 65, 4099, wire.CHUNK - 1, wire.CHUNK, wire.CHUNK + 1, 2 * wire.CHUNK + 13]
DTYPES = [torch.float32, torch.float64]


def special_vector(d, dtype, seed):
    """Gaussian values with zeros of both signs, subnormals, infinities and extremes sprinkled in."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(d)
    info = np.finfo(np.float32 if dtype == torch.float32 else np.float64)
    specials = [0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal, info.tiny / 3, -info.tiny / 3,
                info.max, -info.max, np.inf, -np.inf, info.tiny, -info.tiny]
    for i, v in enumerate(specials):
        x[i::len(specials) + 5] = v
    return torch.as_tensor(x, dtype=dtype)


def both_paths(monkeypatch, fn):
    """fn() with the torch path, then with the compiled one for every length (NUMBA_MIN_D = 1)."""
    monkeypatch.setattr(wire, "USE_NUMBA", False)
    torch_out = fn()
    monkeypatch.setattr(wire, "USE_NUMBA", True)
    monkeypatch.setattr(wire, "NUMBA_MIN_D", 1)
    assert wire.compiled(8, torch.zeros(1)) is not None
    return torch_out, fn()


def assert_same_bits(a, b):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same_bits(u, v)
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.numpy().tobytes() == b.numpy().tobytes()


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_and_unpack_match_np_packbits_on_both_paths(monkeypatch, d, dtype):
    x = special_vector(d, dtype, d)
    if d > 2:
        x[2] = float("nan")  # NaN >= 0 is False: bit 0 on both paths (unreachable in training)
    expected = np.packbits(x.numpy() >= 0, bitorder="big")

    def run():
        out = torch.empty(wire.sign_nbytes(d), dtype=torch.uint8)
        wire.pack_signs(x, out)
        np.testing.assert_array_equal(out.numpy(), expected)
        chunk = torch.empty(wire.sign_nbytes(min(d, wire.CHUNK)), dtype=torch.uint8)
        wire.pack_signs_chunk(x[:wire.CHUNK], chunk)
        np.testing.assert_array_equal(chunk.numpy(), expected[:chunk.numel()])
        signs = wire.unpack_signs(out, d, dtype)
        np.testing.assert_array_equal(signs.numpy(), np.where(x.numpy() >= 0, 1.0, -1.0))
        return [out, signs]

    assert_same_bits(*both_paths(monkeypatch, run))


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_sign_paths_give_the_same_bits(monkeypatch, d, dtype):
    c = compress.make("scaled_sign", d)
    x = special_vector(d, dtype, d + 1)
    x = torch.where(torch.isinf(x), torch.zeros_like(x), x) / 4  # finite, as training keeps gradients
    target = torch.randn(d, dtype=dtype, generator=torch.Generator().manual_seed(d))
    state0 = torch.randn(d, dtype=dtype, generator=torch.Generator().manual_seed(d + 2)) * 0.3

    def run():
        frame = c.new_frame()
        c.encode(x, frame)
        acc = torch.full((d,), 0.25, dtype=dtype)
        c.decode_add_(frame, acc)
        state = state0.clone()
        delta = c.new_frame()
        c.encode_delta_(target, state, delta)
        return [frame, c.decode(frame, dtype), acc, delta, state]

    assert_same_bits(*both_paths(monkeypatch, run))


@pytest.mark.parametrize("n", [1, 2, 3, 6])
@pytest.mark.parametrize("d", [9, 4099, wire.CHUNK + 1, 2 * wire.CHUNK + 13])
@pytest.mark.parametrize("dtype", DTYPES)
def test_server_sum_paths_give_the_same_bits(monkeypatch, n, d, dtype):
    c = compress.make("scaled_sign", d)
    frames = torch.zeros(n, c.frame_nbytes, dtype=torch.uint8)
    for i in range(n):
        scale = 10.0 ** (i % 5 - 2)  # scales of different magnitudes: every addition rounds
        c.encode(torch.randn(d, dtype=dtype, generator=torch.Generator().manual_seed(i)) * scale, frames[i])
    acc0 = torch.randn(d, dtype=dtype, generator=torch.Generator().manual_seed(99))

    def run():
        acc = acc0.clone()
        c.add_sum_(frames, acc, [0] * n, alpha=1.0 / n)
        return acc

    assert_same_bits(*both_paths(monkeypatch, run))


def test_zero_vector_gives_zero_scale_and_all_ones(monkeypatch):
    d = wire.CHUNK + 3
    c = compress.make("scaled_sign", d)

    def run():
        frame = c.new_frame()
        c.encode(-torch.zeros(d), frame)
        acc = -torch.zeros(d)
        c.add_sum_(torch.stack([frame, frame]), acc, [0, 0], alpha=0.5)
        return [frame, acc]

    torch_out, compiled_out = both_paths(monkeypatch, run)
    assert_same_bits(torch_out, compiled_out)
    assert compiled_out[0][:4].tolist() == [0, 0, 0, 0] and (compiled_out[0][4:-1] == 255).all()


@pytest.mark.parametrize("n", [1, 3])
def test_row_strided_frames_take_the_compiled_path_with_the_same_bits(monkeypatch, n):
    """The star server sums messages[:, H:], the frames behind their control words: rows of a wider buffer.
    The kernels take them as they lie (no copy) and give the bits of the contiguous frames."""
    d, header = wire.CHUNK + 77, 40
    c = compress.make("scaled_sign", d)
    messages = torch.zeros(n, header + c.frame_nbytes, dtype=torch.uint8)
    for i in range(n):
        c.encode(torch.randn(d, generator=torch.Generator().manual_seed(i)), messages[i, header:])
    strided = messages[:, header:]
    assert n == 1 or not strided.is_contiguous()
    assert wire.compiled(d, strided) is not None
    acc0 = torch.randn(d, generator=torch.Generator().manual_seed(5))
    acc_strided, acc_contiguous = acc0.clone(), acc0.clone()
    c.add_sum_(strided, acc_strided, [0] * n, alpha=1.0 / n)
    monkeypatch.setattr(wire, "USE_NUMBA", False)
    c.add_sum_(strided.contiguous(), acc_contiguous, [0] * n, alpha=1.0 / n)
    assert torch.equal(acc_strided, acc_contiguous)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("d", [100, 3 * wire.CHUNK + 5])
def test_scaled_sign_encode_reports_a_non_finite_coordinate(monkeypatch, bad, d):
    """The encoder's answer replaces a separate isfinite pass over the gradient: on both paths it is True for
    a finite vector and False when any coordinate is nan or +-inf."""
    c = compress.make("scaled_sign", d)
    for use_numba in (True, False):
        monkeypatch.setattr(wire, "USE_NUMBA", use_numba)
        x = torch.randn(d, generator=torch.Generator().manual_seed(1))
        assert c.encode(x, c.new_frame()) is True
        state = torch.zeros(d)
        assert c.encode_delta_(x, state, c.new_frame()) is True
        x[d // 2 + 1] = bad
        assert c.encode(x, c.new_frame()) is False
        assert c.encode_delta_(x, torch.zeros(d), c.new_frame()) is False
