"""Every algorithm against an independent float64 NumPy transcription of its equations.

The transcriptions below do not import cdmpi's algorithms, compressors or memories. They round to float32
exactly where the wire does: the scale of scaled sign, the values of top-k and every identity frame. Both
sides run 4 workers for 60 steps on the same nonconvex least-squares gradients and must agree to 1e-10.
"""

import numpy as np
import pytest
import torch

import cdmpi
from cdmpi import algorithms, metrics
from cdmpi.config import OptimConfig

N_WORKERS, D, ROWS, STEPS, SEED = 4, 21, 30, 60, 5
OPTIM = OptimConfig(beta1=0.9, beta2=0.99, nu=1e-8, warmup_steps=20)
LR = 0.02
K = 5  # top-k


def make_problem():
    rng = np.random.default_rng(11)
    a = rng.standard_normal((N_WORKERS, ROWS, D))
    b = rng.standard_normal((N_WORKERS, ROWS))
    x0 = rng.standard_normal(D)
    return a, b, x0


def local_grad(a, b, x):
    """Gradient of (1/2m)||A x - b||^2 + 0.1 sum x^2/(1+x^2): the problem, shared by both sides."""
    return a.T @ (a @ x - b) / a.shape[0] + 0.1 * 2 * x / (1 + x * x) ** 2


# ---- the transcription -------------------------------------------------------------------------------

def f32(x):
    return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


def scaled_sign(x):
    scale = f32(np.abs(x).sum() / x.size)  # the fp32 scale on the wire
    return np.where(x >= 0, 1.0, -1.0) * scale


def top_k(x):
    out = np.zeros_like(x)
    keep = np.argsort(-np.abs(x), kind="stable")[:K]
    out[keep] = f32(x[keep])
    return out


COMPRESS = {"scaled_sign": scaled_sign, "topk": top_k, "identity": f32}


def mean(values):
    total = np.zeros(D)
    for v in values:  # in worker order, as the server sums
        total = total + v
    return total / len(values)


class Amsgrad:
    def __init__(self):
        self.m, self.v, self.v_hat = np.zeros(D), np.zeros(D), np.zeros(D)

    def step(self, x, g):
        b1, b2 = OPTIM.beta1, OPTIM.beta2
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        self.v_hat = np.maximum(self.v_hat, self.v)
        return x - LR * self.m / np.sqrt(self.v_hat + OPTIM.nu)


def reference(name, compressor, a, b, x0):
    """x_t for t = 1..STEPS (every worker holds the same x)."""
    C = COMPRESS[compressor]
    x = x0.copy()
    xs = []
    opt = Amsgrad()
    g_hat_i = [np.zeros(D) for _ in range(N_WORKERS)]  # Markov states: C(0) = 0
    g_hat, g_tilde = np.zeros(D), np.zeros(D)
    e_i = [np.zeros(D) for _ in range(N_WORKERS)]  # error-feedback memories
    e_s = np.zeros(D)
    m, v = np.zeros(D), np.zeros(D)  # 1-bit Adam
    for t in range(STEPS):
        g = [local_grad(a[i], b[i], x) for i in range(N_WORKERS)]
        if name in ("cdadam", "ef21"):  # Algorithm 1 lines 5-12
            c = [C(g[i] - g_hat_i[i]) for i in range(N_WORKERS)]
            g_hat_i = [g_hat_i[i] + c[i] for i in range(N_WORKERS)]
            total = np.zeros(D)
            for ci in c:
                total = total + ci
            g_hat = g_hat + total / N_WORKERS
            g_tilde = g_tilde + C(g_hat - g_tilde)
            x = opt.step(x, g_tilde) if name == "cdadam" else x - LR * g_tilde
        elif name in ("amsgrad", "amsgrad-naive"):
            x = opt.step(x, C(mean([C(gi) for gi in g])))
        elif name == "amsgrad-ef":
            c = []
            for i in range(N_WORKERS):
                p = g[i] + e_i[i]
                c.append(C(p))
                e_i[i] = p - c[-1]
            q = mean(c) + e_s
            sent = C(q)
            e_s = q - sent
            x = opt.step(x, sent)
        elif name == "onebit-adam":
            b1, b2 = OPTIM.beta1, OPTIM.beta2
            if t < OPTIM.warmup_steps:  # uncompressed Adam, fp32 frames both ways
                gbar = f32(mean([f32(gi) for gi in g]))
                m = b1 * m + (1 - b1) * gbar
                v = b2 * v + (1 - b2) * gbar * gbar
            else:  # v frozen; momentum compressed with error feedback at workers and server
                c = []
                for i in range(N_WORKERS):
                    p = (m * b1 + g[i] * (1 - b1)) + e_i[i]
                    c.append(C(p))
                    e_i[i] = p - c[-1]
                q = mean(c) + e_s
                m = C(q)
                e_s = q - m
            x = x - LR * m / (np.sqrt(v) + OPTIM.nu)
        else:
            raise AssertionError(name)
        xs.append(x)
    return np.array(xs)


def expected_nbytes(compressor):
    return {"scaled_sign": 4 + (D + 7) // 8, "topk": 8 * K, "identity": 4 * D}[compressor]


# ---- the package: the shipped engine, driven by a plain loop through cdmpi.launch ---------------------

class Vector(torch.nn.Module):
    """x itself as the model: the loop sets its gradient to the problem's."""

    def __init__(self, x0):
        super().__init__()
        self.x = torch.nn.Parameter(torch.tensor(x0))


def package(name, compressor, a, b, x0, *, steps=STEPS, out=None, resume=None, settings=None):
    """x_t for t = 1..steps from N_WORKERS in-process workers (every worker's copy checked equal), and the
    upload frame size of each step (from the metrics file's bits, when `out` is given)."""
    def loop(run):
        model = Vector(x0)
        opt = run.optimizer(model, algorithm=name, compressor=compressor, lr=LR, betas=(OPTIM.beta1, OPTIM.beta2),
                            eps=OPTIM.nu, warmup_steps=OPTIM.warmup_steps, k=K)
        path = []
        for _ in run.steps(steps):
            model.x.grad.copy_(torch.from_numpy(local_grad(a[run.worker], b[run.worker], model.x.detach().numpy())))
            run.log()
            opt.step()
            path.append(model.x.detach().numpy().copy())
        return np.array(path)

    paths = cdmpi.launch(loop, workers=N_WORKERS, out=out, resume=resume, quiet=True,
                         settings={"run.seed": SEED, "checkpoint.every": 0, **(settings or {})})
    for other in paths[1:]:
        np.testing.assert_array_equal(other, paths[0])  # every worker holds the same model
    up_sizes = None
    if out is not None:
        bits = metrics.read(out)["train"]["bits_up"]
        up_sizes = (np.diff(bits) // (8 * N_WORKERS)).tolist()
    return paths[0], up_sizes


CASES = [("cdadam", "scaled_sign"), ("cdadam", "topk"), ("amsgrad", "identity"),
         ("amsgrad-ef", "scaled_sign"), ("amsgrad-ef", "topk"), ("amsgrad-naive", "scaled_sign"),
         ("ef21", "topk"), ("ef21", "scaled_sign"), ("onebit-adam", "scaled_sign"), ("onebit-adam", "topk")]


@pytest.mark.parametrize("name,compressor", CASES)
def test_matches_float64_transcription(tmp_path, name, compressor):
    a, b, x0 = make_problem()
    want = reference(name, compressor, a, b, x0)
    got, up_sizes = package(name, compressor, a, b, x0, out=tmp_path / "run.h5")
    assert np.abs(want[-1] - x0).max() > 1e-2  # the model really moved
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    if name == "onebit-adam":
        w = OPTIM.warmup_steps
        assert up_sizes == [4 * D] * w + [expected_nbytes(compressor)] * (STEPS - 1 - w)
    else:
        assert set(up_sizes) == {expected_nbytes(compressor)} and len(up_sizes) == STEPS - 1


def test_naive_and_error_feedback_really_differ():
    """Guards the transcription itself: memory must change the trajectory."""
    a, b, x0 = make_problem()
    naive = reference("amsgrad-naive", "scaled_sign", a, b, x0)
    ef = reference("amsgrad-ef", "scaled_sign", a, b, x0)
    assert np.abs(naive[-1] - ef[-1]).max() > 1e-4


@pytest.mark.parametrize("name,compressor", [("amsgrad", "scaled_sign"), ("amsgrad-ef", "identity"),
                                             ("onebit-adam", "identity"), ("ef21", "bogus")])
def test_nonsense_combination_is_a_clear_error(name, compressor):
    from cdmpi.errors import CdmpiError

    with pytest.raises(CdmpiError, match=f"{name}.*{compressor}|unknown compressor '{compressor}'"):
        algorithms.get(name, compressor)


@pytest.mark.parametrize("name", list(algorithms.ALGORITHMS))
def test_auto_picks_the_default_compressor(name):
    want = {"amsgrad": "identity", "ef21": "topk"}.get(name, "scaled_sign")
    assert algorithms.compressor_for(name, "auto") == want


@pytest.mark.parametrize("name,compressor", [*CASES, ("amsgrad-ef", "randk"), ("onebit-adam", "randk"),
                                             ("cdadam", "randk")])
def test_checkpoint_resume_is_bit_exact(tmp_path, name, compressor):
    """Stop after 25 steps (onebit-adam: past its warm-up) with the run's checkpoint, resume to 40: the same
    bits as 40 steps in one go. Covers the error memories, the stream counters and the warm-up step, on
    every rank's side (the server's too)."""
    a, b, x0 = make_problem()
    straight, _ = package(name, compressor, a, b, x0, steps=40)
    first, _ = package(name, compressor, a, b, x0, steps=25, out=tmp_path / "run.h5")
    rest, _ = package(name, compressor, a, b, x0, steps=40, out=tmp_path / "run.h5",  # on from the end of 25
                      resume=str(tmp_path / "run.ckpt" / "step-000000025"))
    assert len(rest) == 15
    np.testing.assert_array_equal(np.concatenate([first, rest]), straight)
    assert not np.array_equal(straight[-1], x0)
