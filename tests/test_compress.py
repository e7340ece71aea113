"""Compressors: frames round-trip bit for bit, frame sizes, and Assumption 4.1."""

import numpy as np
import pytest
import torch

from cdmpi import compress
from cdmpi.errors import CdmpiError

D_VALUES = [1, 5, 8, 113, 1000]


def make(name, d):
    return compress.make(name, d, ratio=0.1)


def expected_c(name: str, x: np.ndarray, k: int, key: int) -> np.ndarray:
    """C(x) from the definitions, in numpy: what a frame must decode to."""
    d = x.size
    if name == "scaled_sign":  # ||x||_1 / d, rounded to fp32 for the wire, times sign with sign(0) = +1
        return np.where(x >= 0, 1.0, -1.0) * np.float64(np.float32(np.abs(x).sum() / d))
    if name == "two_level_sign":  # the group means of |x_j| below and from ||x||_1 / d on, each rounded to fp32
        high = np.abs(x) >= np.abs(x).sum() / d
        s_high = np.float64(np.float32(np.abs(x[high]).mean()))
        s_low = np.float64(np.float32(np.abs(x[~high]).mean())) if (~high).any() else 0.0
        return np.where(x >= 0, 1.0, -1.0) * np.where(high, s_high, s_low)
    if name == "identity":
        return x.astype(np.float32).astype(np.float64)
    if name == "topk":  # the k largest magnitudes (no ties in these draws)
        kept = np.argsort(-np.abs(x), kind="stable")[:k]
    else:  # randk: the first k of the permutation that the shared key seeds
        kept = torch.randperm(d, generator=torch.Generator().manual_seed(key))[:k].numpy()
    out = np.zeros(d)
    out[kept] = x[kept].astype(np.float32)
    return out


@pytest.mark.parametrize("name", list(compress.COMPRESSORS))
@pytest.mark.parametrize("d", D_VALUES)
def test_a_frame_decodes_to_the_compressor_of_its_definition(name, d):
    c = make(name, d)
    x = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    expected = expected_c(name, x.numpy(), getattr(c, "k", d), key=11)
    frame = c.new_frame()
    c.encode(x, frame, key=11)
    np.testing.assert_array_equal(c.decode(frame, torch.float64, key=11).numpy(), expected)
    np.testing.assert_array_equal(c(x, key=11).numpy(), expected)
    acc = torch.ones(d, dtype=torch.float64)
    c.decode_add_(frame, acc, key=11)  # the server's fused path
    np.testing.assert_array_equal(acc.numpy(), 1.0 + expected)


def test_scaled_sign_values_and_frame():
    d = 13
    x = torch.tensor([3.0, -1.0, 0.0, 2.5, -0.5, 1, 1, 1, -2, 0, 0, 4, -7], dtype=torch.float64)
    c = compress.make("scaled_sign", d)
    assert c.frame_nbytes == 4 + 2
    frame = c.new_frame()
    c.encode(x, frame)
    scale = np.float32(np.abs(x.numpy()).sum() / d)
    assert np.frombuffer(frame.numpy()[:4].tobytes(), "<f4")[0] == scale
    np.testing.assert_array_equal(frame.numpy()[4:], np.packbits(x.numpy() >= 0))
    expected = np.where(x.numpy() >= 0, 1.0, -1.0) * np.float64(scale)
    np.testing.assert_array_equal(c(x).numpy(), expected)


def test_sparse_frames_hold_fp32_values_and_indices():
    x = torch.tensor([0.1, -5.0, 0.3, 4.0, -0.2], dtype=torch.float64)
    top = compress.make("topk", 5, k=2)
    assert top.frame_nbytes == 16
    np.testing.assert_array_equal(top(x).numpy(), np.float32([0, -5.0, 0, 4.0, 0]))
    rand = compress.make("randk", 5, k=2)
    assert rand.frame_nbytes == 8  # the indices never travel
    kept = rand(x, key=5).numpy()
    assert (kept != 0).sum() == 2
    np.testing.assert_array_equal(kept[kept != 0], np.float32(x.numpy()[kept != 0]))
    assert compress.make("identity", 5).frame_nbytes == 20


@pytest.mark.parametrize("name", list(compress.COMPRESSORS))
@pytest.mark.parametrize("d", D_VALUES)
def test_assumption_4_1(name, d):
    """||C(x) - x||^2 <= (1 - pi) ||x||^2 for every draw (scaled sign, top-k, identity), and on average
    over keys for random-k. fp32 rounding on the wire adds at most a relative 2^-23 per coordinate."""
    c = make(name, d)
    pi = c.contraction()
    assert 0 < pi <= 1
    gen = torch.Generator().manual_seed(100 + d)
    for trial in range(20):
        x = torch.randn(d, dtype=torch.float64, generator=gen) * 10 ** (trial % 5 - 2)
        norm_sq = float(x @ x)
        slack = 1e-12 * norm_sq + 2 * (2 ** -23) ** 2 * norm_sq
        if name == "randk":
            errors = []
            for key in range(400):
                kept = c(x, key=key)
                assert int((kept != 0).sum()) == c.k  # exactly k coordinates, each x_j itself (in fp32)
                err = float(((kept - x) ** 2).sum())
                assert err == pytest.approx(norm_sq - float((x[kept != 0] ** 2).sum()), rel=1e-6, abs=slack)
                errors.append(err)
            # E = (1 - k/d) ||x||^2 exactly: the mean of 400 draws lies within 4 standard errors of it
            assert np.mean(errors) <= (1 - pi) * norm_sq + 4 * np.std(errors) / np.sqrt(len(errors)) + slack
        else:
            err = float(((c(x) - x) ** 2).sum())
            assert err <= (1 - pi) * norm_sq + slack


def test_scaled_sign_pi_is_tight_for_one_hot():
    d = 64
    x = torch.zeros(d, dtype=torch.float64)
    x[3] = 2.0  # ||x||_1^2 = ||x||^2: the worst case pi = 1/d is attained
    c = compress.make("scaled_sign", d)
    err = float(((c(x) - x) ** 2).sum())
    assert err == pytest.approx((1 - 1 / d) * 4.0, rel=1e-12)


def test_scaled_sign_of_zero_is_zero():
    c = compress.make("scaled_sign", 9)
    assert torch.equal(c(torch.zeros(9, dtype=torch.float64)), torch.zeros(9, dtype=torch.float64))


def test_unknown_compressor_and_bad_k():
    with pytest.raises(CdmpiError, match="unknown compressor 'nope'"):
        compress.make("nope", 4)
    with pytest.raises(CdmpiError, match="k must be in"):
        compress.make("topk", 4, k=5)


def test_topk_rejects_out_of_range_index():
    c = compress.make("topk", 4, k=1)
    frame = c.new_frame()
    c.encode(torch.tensor([0.0, 0, 3, 0]), frame)
    frame[4:8] = torch.tensor([99], dtype=torch.int32).view(torch.uint8)
    with pytest.raises(CdmpiError, match="outside"):
        c.decode(frame, torch.float32)


def scaled_sign_frame(x: np.ndarray) -> bytes:
    """The wire bytes of scaled sign, written from the format: fp32 ||x||_1 / d, then np.packbits(x >= 0)."""
    return np.float32(np.abs(x).sum() / x.size).tobytes() + np.packbits(x >= 0).tobytes()


@pytest.mark.parametrize("d", [5, 8, 113, 1000])
def test_two_level_sign_frame_format(d):
    """8 + 2 ceil(d/8) bytes: fp32 s_low, fp32 s_high, the sign bits, the group bits (|x_j| >= mean |x|)."""
    x = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(d)) * 3
    c = compress.make("two_level_sign", d)
    frame = c.new_frame()
    c.encode(x, frame)
    assert frame.numel() == c.frame_nbytes == 8 + 2 * ((d + 7) // 8)
    a = x.numpy()
    high = np.abs(a) >= np.abs(a).sum() / d
    expected = (np.float32(np.abs(a[~high]).mean() if (~high).any() else 0.0).tobytes()
                + np.float32(np.abs(a[high]).mean()).tobytes() + np.packbits(a >= 0).tobytes()
                + np.packbits(high).tobytes())
    assert frame.numpy().tobytes() == expected
    assert 0 < high.sum() < d or d < 8  # both groups hold coordinates: the test sees two scales


def test_two_level_sign_never_worse_than_scaled_sign():
    gen = torch.Generator().manual_seed(3)
    for d in (7, 64, 999):
        x = torch.randn(d, dtype=torch.float64, generator=gen) ** 3  # heavy-tailed magnitudes
        two, one = compress.make("two_level_sign", d), compress.make("scaled_sign", d)
        err_two, err_one = float(((two(x) - x) ** 2).sum()), float(((one(x) - x) ** 2).sum())
        assert err_two <= err_one * (1 + 1e-6)
        assert err_two < 0.9 * err_one  # and much better on heavy tails


@pytest.mark.parametrize("name", ["scaled_sign", "two_level_sign"])
@pytest.mark.parametrize("d, block", [(20, 8), (23, 8), (1000, 128), (1000, 999), (5, 8)])
def test_block_scales(name, d, block):
    """compress.block: the vector cut into blocks of `block` coordinates (the last shorter), each block
    compressed as a vector of its own; the frame holds every block's scales, then the bits of all d
    coordinates: 4 (scaled sign) or 8 (two-level) bytes a block, plus 1 or 2 bits a coordinate."""
    x = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(d + block)) ** 3
    c = compress.make(name, d, block=block)
    bounds = [*range(0, d, block), d] if block < d else [0, d]
    parts = [x.numpy()[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    per_block, bits = {"scaled_sign": (4, 1), "two_level_sign": (8, 2)}[name]
    assert c.frame_nbytes == per_block * len(parts) + bits * ((d + 7) // 8)
    frame = c.new_frame()
    c.encode(x, frame)
    a = x.numpy()
    expected = np.concatenate([expected_c(name, part, 0, 0) for part in parts])
    np.testing.assert_array_equal(c.decode(frame, torch.float64).numpy(), expected)
    if name == "scaled_sign":
        scales = np.float32([np.abs(part).sum() / part.size for part in parts])
        assert frame.numpy().tobytes() == scales.tobytes() + np.packbits(a >= 0).tobytes()
    else:
        high = np.concatenate([np.abs(part) >= np.abs(part).sum() / part.size for part in parts])
        assert frame.numpy()[-2 * ((d + 7) // 8):].tobytes() == np.packbits(a >= 0).tobytes() + np.packbits(high).tobytes()
    acc = torch.zeros(d, dtype=torch.float64)
    c.add_sum_(torch.stack([frame, frame]), acc, [0, 0], alpha=0.5)  # the server's sum of frames
    np.testing.assert_array_equal(acc.numpy(), expected)
    for part in parts:  # the error within each block is at most (1 - 1/d_b) of its norm
        assert c.contraction() <= 1 / len(part) + 1e-15


def test_block_applies_to_sign_compressors_only():
    with pytest.raises(CdmpiError, match="compress.block applies to scaled_sign and two_level_sign"):
        compress.make("topk", 100, block=10)
