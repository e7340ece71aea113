"""The transformer workload: the addition task's tokens, its exact-match evaluation, and a few steps of the
GPT through `cdmpi train` and through the own-model example, in process and under mpiexec, with the same bits."""

import numpy as np
import pytest
import torch
from torch import nn

from cdmpi import metrics, sequences
from cdmpi.nets.gpt import GPT, gpt
from cdmpi.problems.sequence import SequenceShard

from conftest import REPO, run_main, run_python

CONFIG = REPO / "configs" / "transformer" / "addition.toml"


def digits_of(n: int, width: int) -> list[int]:
    return [int(c) for c in str(n).zfill(width)]


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_addition_tokens_are_the_sums(digits):
    task = sequences.addition(digits, test_samples=17)
    tokens = torch.cat([task.test, task.train]).tolist()
    assert len(tokens) == 10 ** (2 * digits) and len(task.test) == 17
    assert task.answer_start == 2 * digits and task.block_size == 3 * digits
    seen = set()
    for row in tokens:
        a = int("".join(map(str, row[:digits])))
        b = int("".join(map(str, row[digits:2 * digits])))
        assert row[2 * digits:] == digits_of(a + b, digits + 1)[::-1]  # least significant digit first
        seen.add((a, b))
    assert len(seen) == 10 ** (2 * digits)  # every pair once
    again = sequences.addition(digits, test_samples=17)
    assert torch.equal(again.test, task.test)  # the split does not depend on anything a run sets


class Oracle(nn.Module):
    """Next-token logits that point at the true next digit of a sum, except (wrong_when_a_even) the last
    digit of problems whose a is even."""

    def __init__(self, digits, wrong_when_a_even=False):
        super().__init__()
        self.digits, self.wrong = digits, wrong_when_a_even
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        n = self.digits
        out = torch.zeros(*tokens.shape, 10)
        for r, row in enumerate(tokens.tolist()):
            a = int("".join(map(str, row[:n])))
            b = int("".join(map(str, row[n:2 * n])))
            answer = digits_of(a + b, n + 1)[::-1]
            for pos in range(2 * n - 1, len(row)):
                k = pos - (2 * n - 1)
                digit = answer[k]
                if self.wrong and a % 2 == 0 and k == n:
                    digit = (digit + 1) % 10
                out[r, pos, digit] = 1.0
        return out + 0 * self.weight

    greedy = GPT.greedy  # the evaluation's own decoding, on the oracle's logits


@pytest.mark.parametrize("wrong", [False, True])
def test_exact_match_counts_whole_answers(wrong):
    task = sequences.addition(2, test_samples=200)
    shard = SequenceShard(Oracle(2, wrong), task.train[:64], answer_start=task.answer_start, n_workers=1,
                          weight_decay=0.0, seed=0, index=0, test=task.test, dtype=torch.float32, device="cpu")
    values = shard.test_values(torch.zeros(1))
    a = task.test[:, 0] * 10 + task.test[:, 1]
    expected = int((a % 2 == 1).sum()) / len(a) if wrong else 1.0
    assert values["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert 0 < expected <= 1


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = gpt("gpt_nano", 10, 6)
    tokens = torch.randint(0, 10, (3, 6))
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 10
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=0)  # a position sees no later token
    assert not torch.equal(a[:, 4:], b[:, 4:])
    assert sum(p.numel() for p in model.parameters()) == 86160  # minGPT's gpt-nano shape, block size 6


STEPS = ["--set", "run.steps=6", "--set", "run.eval_every=3", "--set", "data.test_samples=100"]


@pytest.mark.mpi
@pytest.mark.parametrize("options", [[], ["--set", 'compress.name="two_level_sign"', "--set", "compress.block=512",
                                          "--set", "compress.warmup_steps=2", "--set", 'comm.topology="sharded"']])
def test_cdmpi_train_gpt_in_process_equals_mpi(tmp_path, options):
    local, mpi = tmp_path / "local.h5", tmp_path / "mpi.h5"
    r1 = run_main(["train", CONFIG, *STEPS, *options, "--backend", "local", "--out", local, "--quiet"])
    assert r1.returncode == 0, r1.stderr
    r2 = run_python(["-m", "cdmpi", "train", CONFIG, *STEPS, *options, "--out", mpi, "--quiet"], ranks=3)
    assert r2.returncode == 0, r2.stderr
    a, b = metrics.read(local), metrics.read(mpi)
    assert b["attrs"]["backend"] == "mpi"
    for group, columns in (("train", ("step", "loss", "grad_norm_sq", "bits_up", "bits_down")),
                           ("eval", ("step", "accuracy", "loss"))):
        for column in columns:
            np.testing.assert_array_equal(a[group][column], b[group][column])
    np.testing.assert_array_equal(a["eval"]["step"], [0, 3, 6])
    np.testing.assert_array_equal(a["final"]["params"], b["final"]["params"])
    assert a["attrs"]["dim"] == 86160
    assert np.all(np.diff(a["train"]["loss"][:3]) != 0)  # the model moves


@pytest.mark.mpi
def test_transformer_example_in_process_equals_mpi(tmp_path):
    args = [REPO / "examples" / "transformer.py", "--steps", "5", "--eval-every", "2"]
    r1 = run_python([*args, "--out", tmp_path / "local.h5", "--workers", "2"])
    assert r1.returncode == 0, r1.stderr
    assert "exact-match" in r1.stdout
    r2 = run_python([*args, "--out", tmp_path / "mpi.h5"], ranks=3)
    assert r2.returncode == 0, r2.stderr
    a, b = metrics.read(tmp_path / "local.h5"), metrics.read(tmp_path / "mpi.h5")
    for group in ("train", "eval"):
        for column in set(a[group]) - {"wall_time"}:
            np.testing.assert_array_equal(a[group][column], b[group][column])
    np.testing.assert_array_equal(a["eval"]["step"], [0, 2, 4, 5])
    np.testing.assert_array_equal(a["final"]["params"], b["final"]["params"])


def test_reports_tell_the_compression_options_apart(tmp_path):
    """compress.block and compress.warmup_steps make other methods of the same compressor: the report's
    compressor column names them, and --best keeps one run of each."""
    from cdmpi import analysis

    paths = []
    for name, sets in (("plain", []), ("block", ["--set", "compress.block=64"]),
                       ("warm", ["--set", "compress.warmup_steps=2", "--set", "compress.block=64"])):
        paths.append(tmp_path / f"{name}.h5")
        r = run_main(["train", CONFIG, "--set", "run.steps=4", "--set", "run.eval_every=2", "--set",
                      "data.test_samples=50", *sets, "--backend", "local", "--out", paths[-1], "--quiet"])
        assert r.returncode == 0, r.stderr
    rows = [analysis.summarize(p) for p in paths]
    assert [row["compressor"] for row in rows] == ["scaled_sign", "scaled_sign/64", "scaled_sign/64+warmup2"]
    assert len(analysis.best(rows)) == 3
    r = run_main(["report", *paths])
    assert "scaled_sign/64+warmup2" in r.stdout and r.returncode == 0


def test_best_by_a_plotted_accuracy_keeps_the_highest():
    from cdmpi import analysis

    rows = [{"dataset": "addition", "algorithm": "cdadam", "compressor": "scaled_sign", "lr": lr,
             "final_grad_norm_sq": g, "last": {"eval/accuracy": acc}}
            for lr, g, acc in ((0.001, 1.0, 0.9), (0.003, 0.5, 0.2))]
    assert analysis.best(rows)[0]["lr"] == 0.003  # by grad_norm_sq, as ever
    assert analysis.best(rows, analysis.best_by_default("accuracy"))[0]["lr"] == 0.001
    assert analysis.best_by_default("loss") == ("loss", "min") and analysis.best_by_default("grad_norm_sq") is None
