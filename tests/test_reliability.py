"""Checkpoints, bit-exact resume, faults that end every rank, crash-safe metrics.

Every MPI job runs under mpiexec in a subprocess with a timeout, with 4 ranks (server + 3 workers). The
reference for "the same result" is an uninterrupted in-process run of the same config: the in-process
backend is bit-identical to MPI (tests/test_mpi_vs_local.py), and the checkpoint files are named by role,
so both backends write comparable files.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from cdmpi import checkpoint, cli, metrics

from conftest import finish, rank_pid, run_cdmpi, run_main, start_mpi, subprocess_env, wait_for, write_config

RANKS = 4  # server + 3 workers
WORKERS = RANKS - 1
STEPS = 60
COLUMNS = ("step", "loss", "grad_norm_sq", "bits_up", "bits_down")
EXIT_STOPPED = 75

# Minibatches and random-k exercise the sampler state and the Markov frame counters on resume.
CONFIG = f"""
[run]
steps = {STEPS}
workers = {WORKERS}
log_every = 1
flush_every = 4
seed = 5

[data]
dataset = "synthetic"
samples = 300
features = 16
batch_size = 8

[problem]
init_scale = 0.5

[optim]
lr = 0.01

[compress]
name = "randk"
ratio = 0.25

[checkpoint]
every = 10
keep = 0
check_every = 5
"""


@pytest.fixture
def cfg_path(tmp_path) -> Path:
    return write_config(tmp_path / "rel.toml", CONFIG)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def reference_run(tmp_path_factory) -> dict:
    """An uninterrupted in-process run of CONFIG: its metrics rows and every worker's final x."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp / "rel.toml", CONFIG)
    out = tmp / "ref.h5"
    r = run_main(["train", cfg, "--backend", "local", "--out", out, "--quiet"])
    assert r.returncode == 0, r.stderr
    return {"rows": metrics.read(out)["train"], "x": final_params(out.with_suffix(".ckpt"), STEPS)}


def final_params(root: Path, step: int) -> list[torch.Tensor]:
    path = checkpoint.step_dir(root, step)
    checkpoint.validate(path)
    return [torch.load(path / f"worker-{i:04d}.pt", weights_only=True)["state"]["params"] for i in range(WORKERS)]


def assert_same_run(out: Path, reference) -> None:
    rows = metrics.read(out)["train"]
    assert np.all(np.diff(rows["step"]) > 0), "steps must stay unique and increasing"
    for column in COLUMNS:
        np.testing.assert_array_equal(rows[column], reference["rows"][column], err_msg=column)
    for mine, theirs in zip(final_params(out.with_suffix(".ckpt"), STEPS), reference["x"]):
        assert torch.equal(mine, theirs)  # bit for bit


def start_mpi_job(args, **env):
    """`cdmpi ARGS` under mpiexec -n RANKS, in its own session."""
    return start_mpi(["-m", "cdmpi", *map(str, args)], RANKS, **env)


def has_checkpoint(root: Path, step: int | None = None):
    return lambda: any(step is None or p.name == checkpoint.step_dir(root, step).name
                       for p in checkpoint.list_checkpoints(root))


# ---- 1. bit-exact resume -------------------------------------------------------------------------------

@pytest.mark.mpi
def test_half_run_resumed_equals_full_run(tmp_path, cfg_path, reference):
    out = tmp_path / "run.h5"
    r1 = run_cdmpi(["train", cfg_path, "--out", out, "--quiet", "--set", f"run.steps={STEPS // 2}"], ranks=RANKS)
    assert r1.returncode == 0, r1.stderr
    assert metrics.read(out)["train"]["step"][-1] == STEPS // 2  # this row is recomputed on resume
    r2 = run_cdmpi(["train", cfg_path, "--out", out, "--quiet", "--resume", "auto"], ranks=RANKS)
    assert r2.returncode == 0, r2.stderr
    assert_same_run(out, reference)
    assert list(metrics.read(out)["attrs"]["resumed_at_steps"]) == [STEPS // 2]


# ---- 2. SIGKILL of one worker, then resume ---------------------------------------------------------------

@pytest.mark.mpi
def test_worker_killed_then_resumed_equals_uninterrupted_run(tmp_path, cfg_path, reference):
    out = tmp_path / "run.h5"
    root = out.with_suffix(".ckpt")
    job = start_mpi_job(["train", cfg_path, "--out", out, "--quiet"], CDMPI_TEST_STEP_SLEEP=0.1)
    wait_for(has_checkpoint(root), job)
    os.kill(rank_pid(job, 2), signal.SIGKILL)
    rc, err = finish(job, timeout=120)  # MPICH's mpiexec ends the other ranks
    assert rc != 0
    assert metrics.read(out)["train"]["step"].size > 0
    newest = checkpoint.list_checkpoints(root)[0]
    checkpoint.validate(newest)  # intact
    assert int(newest.name.split("-")[1]) < STEPS
    r = run_cdmpi(["train", cfg_path, "--out", out, "--quiet", "--resume", "auto"], ranks=RANKS)
    assert r.returncode == 0, r.stderr
    assert_same_run(out, reference)


# ---- 3. a truncated checkpoint ---------------------------------------------------------------------------

def run_30_steps_then_damage(tmp_path, cfg_path, name: str, damage) -> tuple[Path, Path]:
    """(metrics file, damaged file): 30 in-process steps, then damage(bytes) rewrites one file of the newest
    checkpoint (step 30; step 20 stays intact)."""
    out = tmp_path / "run.h5"
    r = run_main(["train", cfg_path, "--backend", "local", "--out", out, "--quiet", "--set", "run.steps=30"])
    assert r.returncode == 0, r.stderr
    damaged = checkpoint.step_dir(out.with_suffix(".ckpt"), 30) / name
    damaged.write_bytes(damage(damaged.read_bytes()))
    return out, damaged


def assert_auto_falls_back_to_step_20(cfg_path, out, damaged, reference) -> None:
    r = run_cdmpi(["train", cfg_path, "--out", out, "--resume", "auto"], ranks=RANKS)
    assert r.returncode == 0, r.stderr
    assert str(damaged) in r.stderr and "trying an older checkpoint" in r.stderr
    assert "resuming from checkpoint step 20" in r.stderr
    assert_same_run(out, reference)


@pytest.mark.mpi
def test_truncated_checkpoint_is_named_and_auto_falls_back(tmp_path, cfg_path, reference):
    out, damaged = run_30_steps_then_damage(tmp_path, cfg_path, "worker-0001.pt", lambda data: data[:100])

    r = run_main(["train", cfg_path, "--backend", "local", "--out", out, "--quiet", "--resume", damaged.parent])
    assert r.returncode == 2
    assert str(damaged) in r.stderr and "truncated" in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr  # one clear line, no traceback
    assert_auto_falls_back_to_step_20(cfg_path, out, damaged, reference)


@pytest.mark.mpi
def test_corrupt_file_is_caught_by_the_rank_that_loads_it(tmp_path, cfg_path, reference):
    """Same size, one flipped byte: only the sha256 tells, and the worker rank that owns the file checks it
    (the server checks sizes). Named when the checkpoint is given; auto falls back to the previous one."""
    def flip_a_byte(data: bytes) -> bytes:
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
        return bytes(data)

    out, damaged = run_30_steps_then_damage(tmp_path, cfg_path, "worker-0002.pt", flip_a_byte)

    r = run_cdmpi(["train", cfg_path, "--out", out, "--quiet", "--resume", damaged.parent], ranks=RANKS)
    assert r.returncode == 2
    assert f"cdmpi: error: checkpoint file {damaged} is corrupt: its sha256 differs" in r.stderr, r.stderr
    assert_auto_falls_back_to_step_20(cfg_path, out, damaged, reference)


def test_resume_refuses_other_world_size_dimension_and_config(tmp_path, cfg_path, capsys):
    out = tmp_path / "run.h5"
    train = ["train", str(cfg_path), "--backend", "local", "--out", str(out), "--quiet"]
    assert cli.main([*train, "--set", "run.steps=10"]) == 0  # in process: these are quick
    cases = {
        ("--workers", "2"): r"written by a run with 3 workers .*this run has 2 workers",
        ("--set", "data.features=17"): r"dimension d = 16; this run's problem has d = 17",
        ("--set", "optim.lr=0.02"): r"different config \(optim\.lr: 0\.01 -> 0\.02\)",
    }
    capsys.readouterr()
    for extra, pattern in cases.items():
        assert cli.main([*train, "--resume", "auto", *extra]) == 2
        assert re.search(pattern, capsys.readouterr().err)
    # a fresh start must not silently mix with the old run's checkpoints
    assert cli.main([*train[:4], "--out", str(tmp_path / "other.h5"),
                     "--set", f"checkpoint.dir='{out.with_suffix('.ckpt')}'"]) == 2
    assert "--resume auto" in capsys.readouterr().err
    # and a changed run.steps is fine
    assert cli.main([*train, "--resume", "auto", "--set", "run.steps=12"]) == 0
    assert metrics.read(out)["train"]["step"][-1] == 12


# ---- 4. SIGTERM ------------------------------------------------------------------------------------------

@pytest.mark.mpi
def test_sigterm_on_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path, cfg_path):
    out = tmp_path / "run.h5"
    root = out.with_suffix(".ckpt")
    job = start_mpi_job(["train", cfg_path, "--out", out, "--quiet", "--set", "checkpoint.every=0"],
                        CDMPI_TEST_STEP_SLEEP=0.1)
    wait_for(lambda: out.exists() and metrics.read(out)["train"]["step"].size > 0, job)
    os.kill(rank_pid(job, 3), signal.SIGTERM)  # one worker only: the others learn it at the next step
    rc, err = finish(job, timeout=120)
    assert rc == EXIT_STOPPED, err
    match = re.search(r"stopped by SIGTERM at step (\d+); checkpoint (\S+);", err)
    assert match, err
    step, path = int(match.group(1)), Path(match.group(2))
    assert 0 < step < STEPS
    assert path == checkpoint.step_dir(root, step)
    assert checkpoint.validate(path)["step"] == step
    assert metrics.read(out)["train"]["step"][-1] == step - 1  # every row before the checkpoint is on disk


@pytest.mark.mpi
@pytest.mark.parametrize("second", ["mpiexec", "rank"])
def test_a_second_sigterm_after_the_stop_keeps_exit_75(tmp_path, cfg_path, second):
    """SIGTERM to mpiexec, then, while the ranks finish (checkpoint written, MPI_Finalize waiting), a
    second one to mpiexec or to a rank: the status stays 75. Unpaced, twice each. (Python gives SIGTERM
    its default action back at shutdown; a rank that got it in MPI_Finalize ended with 15.)"""
    for trial in range(2):
        out = tmp_path / f"run{trial}.h5"
        job = start_mpi_job(["train", cfg_path, "--out", out, "--quiet", "--set", "run.steps=100000",
                             "--set", "checkpoint.every=0"])
        wait_for(lambda: out.exists() and metrics.read(out)["train"]["step"].size > 2, job)
        os.kill(job.pid, signal.SIGTERM)
        wait_for(lambda: any(out.with_suffix(".ckpt").glob("step-*[0-9]")), job)  # the stop's checkpoint
        os.kill(job.pid if second == "mpiexec" else rank_pid(job, 2), signal.SIGTERM)
        rc, err = finish(job, timeout=120)
        assert rc == EXIT_STOPPED, (trial, rc, err)


@pytest.mark.mpi
def test_sigterm_to_every_rank_during_start_up_stops_with_75(tmp_path, cfg_path):
    """As SLURM signals every task of a step: while the ranks still import and set up, unpaced, twice. Each
    rank is signalled once it catches SIGTERM (/proc's SigCgt), the command's first act: a signal before
    the interpreter runs that line ends a rank as SIGTERM's default action does."""
    for trial in range(2):
        out = tmp_path / f"run{trial}.h5"
        job = start_mpi_job(["train", cfg_path, "--out", out, "--quiet", "--set", "run.steps=100000"])
        pids = {}

        def every_rank_started():
            for rank in range(RANKS):
                if rank not in pids:
                    try:
                        pid = rank_pid(job, rank)
                        status = Path(f"/proc/{pid}/status").read_text()
                    except (pytest.fail.Exception, OSError):
                        return False
                    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), 16)
                    if not caught & (1 << (signal.SIGTERM - 1)):
                        return False
                    pids[rank] = pid
            return True

        wait_for(every_rank_started, job)
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)
        rc, err = finish(job, timeout=120)
        assert rc == EXIT_STOPPED and "stopped by SIGTERM at step" in err, (trial, rc, err)


@pytest.mark.mpi
def test_sigint_to_mpiexec_ends_the_job_at_once(tmp_path, cfg_path):
    """Ctrl-C: every rank, waiting in a collective or not, ends with the job, not when a watchdog fires."""
    out = tmp_path / "run.h5"
    job = start_mpi_job(["train", cfg_path, "--out", out, "--quiet", "--set", "run.steps=100000",
                         "--set", "comm.timeout=600"], CDMPI_TEST_STEP_SLEEP=0.05)
    wait_for(lambda: out.exists() and metrics.read(out)["train"]["step"].size > 0, job)
    os.kill(job.pid, signal.SIGINT)
    rc, err = finish(job, timeout=60)  # the watchdog would act after 600 s
    assert rc != 0 and "interrupted" in err, (rc, err)


# ---- 5. divergence ---------------------------------------------------------------------------------------

@pytest.mark.mpi
def test_diverging_run_stops_naming_step_and_rank(tmp_path, cfg_path):
    out = tmp_path / "run.h5"
    r = run_cdmpi(["train", cfg_path, "--out", out, "--quiet", "--set", "optim.lr=1e308",
                   "--set", "checkpoint.every=1"], ranks=RANKS, timeout=60)
    assert r.returncode != 0
    found = re.search(r"non-finite (gradient|loss or gradient|x) at step (\d+) (on|from) worker \d+ \(rank \d+\)",
                      r.stderr)
    assert found, r.stderr
    # Every step is a log step here, so the server sees it in the metric shares and stops with its rows
    # on disk, up to the step before.
    assert metrics.read(out)["train"]["step"][-1] == int(found.group(2)) - 1
    kept = checkpoint.list_checkpoints(out.with_suffix(".ckpt"))
    named = re.search(r"the last checkpoint, (\S+), holds the last good state", r.stderr)
    assert kept and named and Path(named.group(1)) == kept[0], r.stderr
    for path in kept:  # only good states were kept, none past the failing step
        assert int(path.name.split("-")[1]) <= int(found.group(2))
        checkpoint.validate(path)
        for i in range(WORKERS):
            assert torch.isfinite(torch.load(path / f"worker-{i:04d}.pt", weights_only=True)["state"]["params"]).all()


# ---- 6. checksum of x ------------------------------------------------------------------------------------

@pytest.mark.mpi
def test_perturbed_copy_of_x_is_caught_by_the_checksum(tmp_path, cfg_path):
    out = tmp_path / "run.h5"
    r = run_cdmpi(["train", cfg_path, "--out", out, "--quiet"], ranks=RANKS, timeout=60,
                  env=subprocess_env(CDMPI_TEST_PERTURB_X="1:7"))
    assert r.returncode == 1, r.stderr
    assert "copies of x differ at step 10: worker 1 (rank 2) disagree(s) with the other 2 worker(s)" in r.stderr
    assert [p.name for p in checkpoint.list_checkpoints(out.with_suffix(".ckpt"))] == []  # step 10 not saved


# ---- 7. SIGKILL of the whole job -------------------------------------------------------------------------

@pytest.mark.mpi
def test_metrics_file_readable_after_sigkill_of_the_whole_job(tmp_path, cfg_path, reference):
    out = tmp_path / "run.h5"
    root = out.with_suffix(".ckpt")
    job = start_mpi_job(["train", cfg_path, "--out", out, "--quiet", "--set", "run.flush_every=3"],
                        CDMPI_TEST_STEP_SLEEP=0.1)
    wait_for(has_checkpoint(root, 20), job)
    os.killpg(job.pid, signal.SIGKILL)
    finish(job, timeout=120)
    rows = metrics.read(out)["train"]
    n = rows["step"].size
    assert n >= 20  # every row before the step-20 checkpoint was flushed when it was written
    for column in COLUMNS:  # and the rows are exactly those of the uninterrupted run
        np.testing.assert_array_equal(rows[column], reference["rows"][column][:n], err_msg=column)
    assert metrics.read(out)["attrs"]["config"]["run"]["steps"] == STEPS
