"""Your own model (cdmpi.launch): a plain PyTorch loop gets metrics, checkpoints, bit-exact resume, SIGTERM
and the fault checks, in process and under mpiexec, with the same bits.

The whole-script tests run examples/own_model.py, as a user does; the in-process tests call cdmpi.launch
directly with small loops.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

import numpy as np
import pytest
import torch

import cdmpi
from cdmpi import metrics

from conftest import REPO, finish, mpiexec_path, rank_pid, run_main, run_python, start_mpi, wait_for

OWN_MODEL = REPO / "examples" / "own_model.py"
WORKERS = 3
EPOCHS = 3  # 3 workers: 1,438 training images, 14 steps of 32 per epoch
STEPS = 42
EXIT_STOPPED = 75


def assert_same_run(path, reference) -> None:
    """Every metrics row (but the wall time) and the final parameters, bit for bit."""
    run = metrics.read(path)
    for group in ("train", "eval"):
        assert sorted(run[group]) == sorted(reference[group]), group
        for column in reference[group]:
            if column != "wall_time":
                np.testing.assert_array_equal(run[group][column], reference[group][column], err_msg=column)
    np.testing.assert_array_equal(run["final"]["params"], reference["final"]["params"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """examples/own_model.py uninterrupted, its workers in one process."""
    out = tmp_path_factory.mktemp("reference") / "ref.h5"
    r = run_python([OWN_MODEL, "--out", out, "--epochs", EPOCHS, "--workers", WORKERS])
    assert r.returncode == 0, r.stderr
    run = metrics.read(out)
    assert run["train"]["step"].tolist() == list(range(STEPS))  # the script logs each step's loss
    assert run["eval"]["step"].tolist() == [0, 14, 28, 42] and run["eval"]["accuracy"][-1] > 0.3
    assert set(run["train"]) >= {"loss", "lr", "grad_norm_sq", "bits_up", "bits_down"}
    return run


@pytest.mark.mpi
def test_own_model_under_mpiexec_is_the_in_process_run_and_reports_accuracy(tmp_path, reference):
    out = tmp_path / "A.h5"
    r = run_python([OWN_MODEL, "--out", out, "--epochs", EPOCHS], ranks=WORKERS + 1)
    assert r.returncode == 0, r.stderr
    assert f"finished {STEPS} steps" in r.stderr
    run = metrics.read(out)
    assert run["attrs"]["backend"] == "mpi" and run["attrs"]["problem"].startswith("own model Net")
    assert_same_run(out, reference)
    lr = run["train"]["lr"]  # MultiStepLR drops the rate 10x after 2 of the 3 epochs
    assert set(lr[:28]) == {3e-3} and np.allclose(lr[28:], 3e-4)
    report = run_main(["report", out])
    assert report.returncode == 0, report.stderr
    header, row = report.stdout.splitlines()
    assert "test_accuracy" in header.split()
    assert f"{run['eval']['accuracy'][-1]:.4f}" in row.split()
    plot = run_main(["plot", out, "--x", "bits", "--y", "loss", "--out", tmp_path / "loss.png"])
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.mpi
def test_sigterm_on_every_rank_ends_in_a_checkpoint_and_resumes_bit_exactly(tmp_path, reference):
    out = tmp_path / "run.h5"
    job = start_mpi([OWN_MODEL, "--out", out, "--epochs", EPOCHS], WORKERS + 1, CDMPI_TEST_STEP_SLEEP=0.1)
    wait_for(lambda: out.exists() and metrics.read(out)["train"]["step"].size >= 5, job)
    for rank in range(WORKERS + 1):
        os.kill(rank_pid(job, rank), signal.SIGTERM)
    rc, err = finish(job, timeout=120)
    assert rc == EXIT_STOPPED, err
    step = int(re.search(r"stopped by SIGTERM at step (\d+); checkpoint \S+step-0+\1;", err).group(1))
    assert 5 <= step < STEPS
    assert (out.with_suffix(".ckpt") / f"step-{step:09d}").is_dir()
    r = run_python([OWN_MODEL, "--out", out, "--epochs", EPOCHS, "--resume", "auto"], ranks=WORKERS + 1)
    assert r.returncode == 0, r.stderr
    assert f"resuming from checkpoint step {step}" in r.stderr
    assert_same_run(out, reference)
    assert list(metrics.read(out)["attrs"]["resumed_at_steps"]) == [step]


@pytest.mark.mpi
def test_killed_worker_ends_the_job_and_the_last_checkpoint_resumes_bit_exactly(tmp_path, reference):
    out = tmp_path / "run.h5"
    ckpt = out.with_suffix(".ckpt")
    job = start_mpi([OWN_MODEL, "--out", out, "--epochs", EPOCHS], WORKERS + 1, CDMPI_TEST_STEP_SLEEP=0.1)
    wait_for(lambda: (ckpt / "step-000000020").is_dir(), job)  # the script checkpoints every 20 steps
    os.kill(rank_pid(job, 2), signal.SIGKILL)
    rc, _ = finish(job, timeout=120)  # the others must not hang
    assert rc != 0
    r = run_python([OWN_MODEL, "--out", out, "--epochs", EPOCHS, "--resume", "auto"], ranks=WORKERS + 1)
    assert r.returncode == 0, r.stderr
    assert re.search(r"resuming from checkpoint step (20|40)", r.stderr), r.stderr
    assert_same_run(out, reference)


@pytest.mark.mpi
@pytest.mark.parametrize("topology", ["star", "sharded"])
def test_custom_model_example_in_process_and_under_mpiexec(tmp_path, topology):
    """The short example runs as typed, with and without a launcher; both workers end with the same
    parameters, which the in-process run reproduces exactly."""
    sharded = ["--sharded"] if topology == "sharded" else []
    example = REPO / "examples" / "custom_model.py"
    local = run_python([example, *sharded])
    assert local.returncode == 0, local.stderr
    hydra = "HYDRA" in subprocess.run([mpiexec_path(), "--version"], capture_output=True, text=True).stdout
    # Ranks writing to one pipe can splice lines: with MPICH's Hydra, one output file per rank.
    per_rank = ["-outfile-pattern", tmp_path / "out.%r.txt"] if hydra else []
    r = run_python([example, *sharded], ranks=3, mpiexec_args=per_rank, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    stdout = "".join(p.read_text() for p in sorted(tmp_path.glob("out.*.txt"))) if hydra else r.stdout
    found = re.findall(r"worker (\d) step (\d+) loss (\S+) params (\S+)", stdout)
    final = {w: (float(loss), params) for w, step, loss, params in found if step == "199"}
    first = {w: float(loss) for w, step, loss, params in found if step == "0"}
    assert set(final) == {"0", "1"}, stdout
    assert final["0"][1] == final["1"][1]  # both workers hold the same parameters
    assert all(final[w][0] < 0.5 * first[w] for w in final)
    assert sorted(re.findall(r"worker \d step 199 loss \S+ params \S+", local.stdout)) == \
        sorted(re.findall(r"worker \d step 199 loss \S+ params \S+", stdout))


# ---- in process: cdmpi.launch called here ----------------------------------------------------------------

def small_loop(steps=8, *, log=True, scheduler=False, zero_grad="optimizer", **options):
    """A least-squares model, `steps` steps; returns every worker's final parameters."""
    def loop(run):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 1).double()
        opt = run.optimizer(model, **{"lr": 0.05, **options})
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if scheduler else None
        data = torch.Generator().manual_seed(run.worker)
        for _ in run.steps(steps):
            x = torch.randn(16, 6, generator=data, dtype=torch.float64)
            loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
            (model.zero_grad if zero_grad == "model" else opt.zero_grad)()
            loss.backward()
            if log:
                run.log(loss=loss.item(), lr=opt.param_groups[0]["lr"])
            opt.step()
            if sched is not None:
                sched.step()
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    return loop


def test_in_process_workers_hold_the_same_model_and_the_lr_follows_a_scheduler(tmp_path):
    out = tmp_path / "run.h5"
    params = cdmpi.launch(small_loop(9, scheduler=True), workers=3, out=out, quiet=True)
    assert len(params) == 3 and all(torch.equal(p, params[0]) for p in params)
    rows = metrics.read(out)["train"]
    assert rows["lr"].tolist() == [0.05] * 3 + [0.025] * 3 + [0.0125] * 3
    assert np.all(np.diff(rows["bits_up"]) == 3 * 8 * (4 + 1))  # 3 workers, d = 7: a scale and one sign byte
    assert rows["loss"][-1] < rows["loss"][0]


def test_model_zero_grad_that_sets_grads_to_none_gives_the_same_steps():
    """torch's default zero_grad sets .grad to None; backward then makes new tensors, which step() takes."""
    a = cdmpi.launch(small_loop(5, log=False), workers=2, quiet=True)
    b = cdmpi.launch(small_loop(5, log=False, zero_grad="model"), workers=2, quiet=True)
    assert torch.equal(a[0], b[0])


def test_optimizer_state_dict_round_trip_is_a_warm_start(tmp_path):
    saved = {}

    def first(run):
        model = torch.nn.Linear(4, 1).double()
        opt = run.optimizer(model, lr=0.1)
        for _ in range(3):
            model(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
            opt.step()
            opt.zero_grad()
        saved[run.worker] = opt.state_dict()

    def second(run):
        model = torch.nn.Linear(4, 1).double()
        opt = run.optimizer(model, lr=0.5)
        opt.load_state_dict(saved[run.worker])
        state = opt.state_dict()
        assert opt.param_groups[0]["lr"] == 0.1
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):  # AMSGrad's moments came over
            assert torch.equal(state["state"][0]["algorithm"]["amsgrad"][key],
                               saved[run.worker]["state"][0]["algorithm"]["amsgrad"][key])
        # the compression sequences pair with the server's, which starts afresh: they stay fresh
        assert state["state"][0]["algorithm"]["g_hat"]["count"] == 0

    cdmpi.launch(first, workers=2, quiet=True)
    assert saved[0]["state"][0]["step"] == 3 and saved[0]["state"][0]["algorithm"]["g_hat"]["count"] == 3
    cdmpi.launch(second, workers=2, quiet=True)


@pytest.mark.parametrize("options,message", [
    ({"lr": -1}, "optimizer: lr must be > 0, got -1.0"),
    ({"betas": (0.9, 1.5)}, "optimizer: betas[1] must be in [0, 1), got 1.5"),
    ({"algorithm": "sgd"}, "unknown algorithm 'sgd'"),
    ({"momentum": 0.9}, "unknown optimizer option 'momentum'"),
])
def test_bad_optimizer_options_are_one_line_errors(capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        cdmpi.launch(small_loop(**options), workers=2, quiet=True)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_bad_settings_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cdmpi.launch(small_loop(), workers=2, settings={"optim.lr": 0.1}, quiet=True)
    assert exit_info.value.code == 2
    assert "'optim.lr' does not apply to your own loop (give optimizer options to run.optimizer())" in \
        capsys.readouterr().err


def test_workers_that_take_different_numbers_of_steps_are_stopped(capsys):
    def loop(run):
        model = torch.nn.Linear(3, 1).double()
        opt = run.optimizer(model)
        for _ in range(4 + run.worker):
            model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
            opt.step()

    with pytest.raises(SystemExit) as exit_info:
        cdmpi.launch(loop, workers=2, quiet=True)
    assert exit_info.value.code == 1
    assert "worker 0 (rank 0) finished at step 4 while worker 1 (rank 0) went on" in capsys.readouterr().err


def test_an_exception_in_one_in_process_worker_ends_the_run(capsys):
    def loop(run):
        model = torch.nn.Linear(3, 1).double()
        opt = run.optimizer(model)
        for step in range(10):
            if run.worker == 1 and step == 2:
                raise RuntimeError("data loader broke")
            model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
            opt.step()

    with pytest.raises(SystemExit) as exit_info:
        cdmpi.launch(loop, workers=3, quiet=True)
    assert exit_info.value.code == 1
    assert "RuntimeError: data loader broke" in capsys.readouterr().err


LOOP_SCRIPT = """
import sys, torch, cdmpi
def loop(run):
    model = torch.nn.Linear(3, 1).double()
    opt = run.optimizer(model, lr=float(sys.argv[1]))
    for step in range(1000):
        if run.worker == 1 and step == 3:
            raise RuntimeError("worker 1 fails")
        model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
        opt.step()
cdmpi.launch(loop, out=sys.argv[2])
"""


@pytest.mark.mpi
def test_under_mpiexec_bad_options_exit_2_on_every_rank_with_one_line(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP_SCRIPT)
    r = run_python([script, "-1", tmp_path / "run.h5"], ranks=3, timeout=120)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert errors == ["cdmpi: error: optimizer: lr must be > 0, got -1.0"], r.stderr
    assert not (tmp_path / "run.h5").exists()


@pytest.mark.mpi
def test_under_mpiexec_a_worker_exception_ends_every_rank(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP_SCRIPT)
    r = run_python([script, "0.01", tmp_path / "run.h5"], ranks=3, timeout=120)  # a hang fails here
    assert r.returncode != 0
    assert "cdmpi: error on rank 2: RuntimeError: worker 1 fails" in r.stderr
