"""CD-Adam against an independent float64 NumPy transcription of Algorithm 1 (written here, importing
nothing of the package's algorithm), on a random nonconvex logistic regression with 4 workers."""

import numpy as np
import pytest
import torch

from cdmpi import config, metrics, train
from cdmpi.transport import LocalTransport

N_WORKERS, STEPS, D, SAMPLES = 4, 60, 23, 301
LR, BETA1, BETA2, NU, LAM = 0.02, 0.9, 0.99, 1e-8, 0.1


def scaled_sign(x):
    """C(x) = ||x||_1 sign(x) / d with sign(0) = +1; the scale travels as fp32 on the wire."""
    scale = np.float64(np.float32(np.abs(x).sum() / x.size))
    return np.where(x >= 0, 1.0, -1.0) * scale


def two_level_sign(x):
    """Two fp32 scales: the mean |x_j| of the coordinates below ||x||_1 / d and of those from it on."""
    high = np.abs(x) >= np.abs(x).sum() / x.size
    s_high = np.float64(np.float32(np.abs(x[high]).mean()))
    s_low = np.float64(np.float32(np.abs(x[~high]).mean())) if (~high).any() else 0.0
    return np.where(x >= 0, 1.0, -1.0) * np.where(high, s_high, s_low)


def fp32(x):
    """The warm-up's frames: x as fp32 on the wire."""
    return x.astype(np.float32).astype(np.float64)


def blocks_of(compressor, size):
    """The compressor applied to each block of `size` coordinates on its own."""
    return lambda x: np.concatenate([compressor(x[lo:lo + size]) for lo in range(0, x.size, size)])


def local_gradient(a, y, x):
    """grad f_i(x): mean logistic-loss gradient over the shard plus the nonconvex regulariser's."""
    margin = y * (a @ x)
    return a.T @ (-y / (1.0 + np.exp(margin))) / len(y) + LAM * 2 * x / (1 + x * x) ** 2


def objective(a, y, x):
    loss = np.mean(np.log1p(np.exp(-y * (a @ x)))) + LAM * np.sum(x * x / (1 + x * x))
    grad = a.T @ (-y / (1.0 + np.exp(y * (a @ x)))) / len(y) + LAM * 2 * x / (1 + x * x) ** 2
    return loss, grad


def algorithm_1(a, y, steps, compressor=scaled_sign, warmup=0):
    """x_T, and per step t = 0..T: f and ||grad f||^2 of the paper's (3.1), f = (1/n) sum_i f_i, and of the
    mean over all rows (7.1), which differ here: the parts have 76, 75, 75 and 75 rows. The first `warmup`
    steps send fp32 frames (compress.warmup_steps; 0 in Algorithm 1)."""
    parts = np.array_split(np.arange(len(y)), N_WORKERS)  # n contiguous parts
    x = np.zeros(D)
    g_hat_i = [compressor(np.zeros(D)) for _ in range(N_WORKERS)]  # line 1
    g_hat = np.mean(g_hat_i, axis=0)
    g_tilde = compressor(g_hat)
    m, v, v_hat = np.zeros(D), np.zeros(D), np.zeros(D)
    metrics_31, metrics_all = [], []
    for t in range(steps + 1):
        parts_f = [objective(a[rows], y[rows], x) for rows in parts]
        loss = np.mean([f for f, _ in parts_f])
        grad = np.mean([g for _, g in parts_f], axis=0)
        metrics_31.append((loss, grad @ grad))
        loss, grad = objective(a, y, x)
        metrics_all.append((loss, grad @ grad))
        if t == steps:
            break
        compress = fp32 if t < warmup else compressor
        c_i = []
        for i, rows in enumerate(parts):  # lines 4-6 on each worker
            g = local_gradient(a[rows], y[rows], x)
            c_i.append(compress(g - g_hat_i[i]))
            g_hat_i[i] = g_hat_i[i] + c_i[-1]
        g_hat = g_hat + sum(c_i) / N_WORKERS  # line 8
        c = compress(g_hat - g_tilde)  # line 9
        g_tilde = g_tilde + c  # lines 10 and 12
        m = BETA1 * m + (1 - BETA1) * g_tilde  # lines 13-16
        v = BETA2 * v + (1 - BETA2) * g_tilde ** 2
        v_hat = np.maximum(v_hat, v)
        x = x - LR * m / np.sqrt(v_hat + NU)
    return x, np.array(metrics_31), np.array(metrics_all)


def write_libsvm(path, a, y):
    with open(path, "w") as fh:
        for row, label in zip(a, y):
            fh.write(f"{int(label)} " + " ".join(f"{j + 1}:{float(v)!r}" for j, v in enumerate(row)) + "\n")


# (compress config, the transcription's compressor, warm-up steps, one frame's bytes after the warm-up): the
# paper's Algorithm 1, then the options of docs/algorithms.md ("Options beyond the paper").
VARIANTS = {
    "algorithm_1": ({"name": "scaled_sign"}, scaled_sign, 0, 4 + (D + 7) // 8),
    "block_8": ({"name": "scaled_sign", "block": 8}, blocks_of(scaled_sign, 8), 0, 3 * 4 + (D + 7) // 8),
    "two_level_sign": ({"name": "two_level_sign"}, two_level_sign, 0, 8 + 2 * ((D + 7) // 8)),
    "two_level_sign_block_16": ({"name": "two_level_sign", "block": 16}, blocks_of(two_level_sign, 16), 0,
                                2 * 8 + 2 * ((D + 7) // 8)),
    "warmup_7": ({"name": "scaled_sign", "warmup_steps": 7}, scaled_sign, 7, 4 + (D + 7) // 8),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cdadam_matches_float64_transcription(tmp_path, variant):
    compress_cfg, compressor, warmup, frame_bytes = VARIANTS[variant]
    rng = np.random.default_rng(42)
    a = rng.standard_normal((SAMPLES, D)) * rng.uniform(0.1, 3.0, D)  # uneven feature scales
    y = np.where(a @ rng.standard_normal(D) + rng.standard_normal(SAMPLES) > 0, 1.0, -1.0)
    write_libsvm(tmp_path / "data.svm", a, y)
    cfg = config.from_dict({
        "run": {"steps": STEPS, "workers": N_WORKERS, "dtype": "float64", "log_every": 1, "seed": 0},
        "data": {"dataset": str(tmp_path / "data.svm"), "n_features": D},
        "problem": {"reg": LAM},
        "optim": {"algorithm": "cdadam", "lr": LR, "beta1": BETA1, "beta2": BETA2, "nu": NU},
        "compress": compress_cfg,
    })
    training = train.build(cfg, LocalTransport(N_WORKERS), out=tmp_path / "run.h5")
    training.run()
    x_ref, of_31, of_all = algorithm_1(a, y, STEPS, compressor, warmup)

    workers = training.engine.workers
    x_pkg = workers[0].params.numpy()
    assert np.abs(x_ref).max() > 1e-2, "the run moved away from x_1 = 0"
    np.testing.assert_allclose(x_pkg, x_ref, rtol=1e-10, atol=1e-12)
    for worker in workers[1:]:
        assert torch.equal(worker.params, workers[0].params)
    run = metrics.read(tmp_path / "run.h5")
    np.testing.assert_allclose(run["train"]["loss"], of_31[:, 0], rtol=1e-10)
    np.testing.assert_allclose(run["train"]["grad_norm_sq"], of_31[:, 1], rtol=1e-8)
    np.testing.assert_allclose(run["train"]["loss_all_rows"], of_all[:, 0], rtol=1e-10)
    np.testing.assert_allclose(run["train"]["grad_norm_sq_all_rows"], of_all[:, 1], rtol=1e-8)
    assert np.abs(of_31[:, 1] - of_all[:, 1]).max() > 1e-6 * of_all[0, 1], "the two objectives differ here"
    assert of_31[-1, 1] < of_31[0, 1] / 5, "the reference itself converges"
    np.testing.assert_array_equal(run["train"]["step"], np.arange(STEPS + 1))
    steps = np.arange(STEPS + 1)  # bits before step t: the warm-up's fp32 frames (32 D bits), then the others
    frame_bits = 32 * D * np.minimum(steps, warmup) + 8 * frame_bytes * np.maximum(steps - warmup, 0)
    np.testing.assert_array_equal(run["train"]["bits_up"], N_WORKERS * frame_bits)
    np.testing.assert_array_equal(run["train"]["bits_down"], N_WORKERS * frame_bits)
