"""The chunked hot paths (vectors longer than wire.CHUNK): packing against np.packbits, the server's
table-driven sum of n frames, and whole CD-Adam runs on the quadratic problem against an independent
float64 NumPy transcription of Algorithm 1 (written here, importing nothing of the algorithm)."""

import numpy as np
import pytest
import torch

from cdmpi import compress, config, metrics, train, wire
from cdmpi.transport import LocalTransport

D = 2 * wire.CHUNK + 13  # three chunks, the last one ragged


def test_pack_signs_across_chunks_matches_np_packbits():
    x = torch.randn(D, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    x[wire.CHUNK - 1: wire.CHUNK + 1] = 0.0
    x[7::97] = -0.0
    out = torch.empty(wire.sign_nbytes(D), dtype=torch.uint8)
    wire.pack_signs(x, out)
    np.testing.assert_array_equal(out.numpy(), np.packbits((x.numpy() >= 0).astype(np.uint8), bitorder="big"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_server_sum_of_frames_matches_float64_reference(dtype):
    n = 5
    c = compress.make("scaled_sign", D)
    xs = [np.random.default_rng(i).standard_normal(D) * (i + 1) for i in range(n)]
    frames = torch.zeros(n, c.frame_nbytes, dtype=torch.uint8)
    for i, x in enumerate(xs):
        c.encode(torch.as_tensor(x, dtype=dtype), frames[i])
        np.testing.assert_array_equal(frames[i, 4:].numpy(), np.packbits(x >= 0, bitorder="big"))
    acc = torch.full((D,), 0.25, dtype=dtype)
    c.add_sum_(frames, acc, [0] * n, alpha=1.0 / n)
    scales = [np.float64(np.float32(np.abs(x.astype(np.float64)).sum() / D)) for x in xs]
    expected = 0.25 + sum(np.where(x >= 0, s, -s) for x, s in zip(xs, scales)) / n
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(acc.numpy(), expected, rtol=tol, atol=tol)


def test_markov_step_equals_encode_then_decode_add_bit_for_bit():
    c = compress.make("scaled_sign", D)
    target = torch.randn(D, dtype=torch.float64)
    state = torch.randn(D, dtype=torch.float64)
    fused_state, frame = state.clone(), c.new_frame()
    c.encode_delta_(target, fused_state, frame)
    plain_frame = c.new_frame()
    c.encode(target - state, plain_frame)
    c.decode_add_(plain_frame, state)
    assert torch.equal(frame, plain_frame)
    assert torch.equal(fused_state, state)


def scaled_sign(x):
    return np.where(x >= 0, 1.0, -1.0) * np.float64(np.float32(np.abs(x).sum() / x.size))


def test_cdadam_on_quadratic_across_chunks_matches_float64_transcription(tmp_path):
    n, steps, lr, b1, b2, nu = 3, 4, 0.01, 0.9, 0.99, 1e-8
    cfg = config.from_dict({"run": {"steps": steps, "workers": n, "dtype": "float64", "log_every": 1},
                            "problem": {"name": "quadratic", "dim": D},
                            "optim": {"algorithm": "cdadam", "lr": lr, "beta1": b1, "beta2": b2, "nu": nu},
                            "compress": {"name": "scaled_sign"}})
    training = train.build(cfg, LocalTransport(n), out=tmp_path / "q.h5")
    centers = [training.drivers[i].shard.center.numpy().copy() for i in range(n)]
    training.run()
    run = metrics.read(tmp_path / "q.h5")

    x = np.zeros(D)  # Algorithm 1 with grad f_i(x) = x - c_i
    g_hat_i = [scaled_sign(np.zeros(D)) for _ in range(n)]
    g_hat = np.mean(g_hat_i, axis=0)
    g_tilde = scaled_sign(g_hat)
    m, v, v_hat = np.zeros(D), np.zeros(D), np.zeros(D)
    for t in range(steps + 1):
        g = x - np.mean(centers, axis=0)
        np.testing.assert_allclose(run["train"]["grad_norm_sq"][t], g @ g, rtol=1e-10)
        if t == steps:
            break
        deltas = [scaled_sign(x - c - g_hat_i[i]) for i, c in enumerate(centers)]
        g_hat_i = [gh + dl for gh, dl in zip(g_hat_i, deltas)]
        g_hat = g_hat + np.mean(deltas, axis=0)
        g_tilde = g_tilde + scaled_sign(g_hat - g_tilde)
        m = b1 * m + (1 - b1) * g_tilde
        v = b2 * v + (1 - b2) * g_tilde ** 2
        v_hat = np.maximum(v_hat, v)
        x = x - lr * m / np.sqrt(v_hat + nu)
    np.testing.assert_allclose(run["final"]["params"], x, rtol=1e-10, atol=1e-12)
    for phase in ("compute", "encode", "aggregate", "update"):
        assert run["timing"][f"worker_{phase}"].shape == (n,)
