"""Runs you can trust: one writer per output, metrics readable while the run goes on, resume that checks
what it continues, no silent stall, bad numbers refused.

MPI jobs run under mpiexec with 4 ranks (server + 3 workers) and the config of test_reliability; its
uninterrupted in-process run is the reference for "the same result".
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cdmpi import checkpoint, cli, metrics

from conftest import REPO, finish, rank_pid, run_cdmpi, run_main, scaled, subprocess_env, wait_for, write_config
from test_reliability import CONFIG, RANKS, assert_same_run, reference_run, start_mpi_job


@pytest.fixture
def cfg_path(tmp_path) -> Path:
    return write_config(tmp_path / "rel.toml", CONFIG)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted in-process run of test_reliability's config."""
    return reference_run(tmp_path_factory)


def has_rows(out: Path, count: int = 1):
    return lambda: out.exists() and metrics.read(out)["train"]["step"].size >= count


# ---- the metrics file is read while the run goes on -------------------------------------------------------

@pytest.mark.mpi
def test_a_reader_holding_the_file_never_fails_the_run(tmp_path, cfg_path, reference):
    """A reader opens the running job's file again and again, holding it 0.5 s each time, as h5py with
    swmr=True does; the run ends with exit 0, no read fails, and the rows are the reference's."""
    out = tmp_path / "run.h5"
    job = start_mpi_job(["train", cfg_path, "--out", out, "--quiet", "--set", "run.flush_every=2"],
                        CDMPI_TEST_STEP_SLEEP=0.1)
    wait_for(lambda: out.exists(), job)
    failures, reads, seen = [], 0, []
    deadline = time.monotonic() + scaled(300)
    while job.poll() is None and time.monotonic() < deadline:
        try:
            with h5py.File(out, "r", swmr=True) as fh:
                steps = fh["train/step"]
                steps.refresh()
                seen.append(steps.shape[0])
                time.sleep(0.5)
            reads += 1
        except Exception as err:  # noqa: BLE001 - every failure counts
            failures.append(repr(err))
    rc, err = finish(job, timeout=120)
    assert rc == 0, err
    assert failures == [] and reads >= 1, failures
    assert seen == sorted(seen) and seen[-1] > seen[0]  # the reader saw the rows grow
    assert_same_run(out, reference)


@pytest.mark.mpi
def test_after_sigkill_of_the_whole_job_the_file_opens_and_the_stale_lock_does_not_block_resume(
        tmp_path, cfg_path, reference):
    out = tmp_path / "run.h5"
    job = start_mpi_job(["train", cfg_path, "--out", out, "--quiet"], CDMPI_TEST_STEP_SLEEP=0.05)
    wait_for(lambda: (out.with_suffix(".ckpt") / "step-000000020").is_dir(), job)
    os.killpg(job.pid, signal.SIGKILL)
    finish(job, timeout=120)
    assert Path(str(out) + ".lock").exists()  # left behind; its flock died with the process
    rows = metrics.read(out)["train"]
    assert rows["step"].size >= 20
    for column in ("step", "loss", "grad_norm_sq", "bits_up"):
        np.testing.assert_array_equal(rows[column], reference["rows"][column][:rows["step"].size])
    newest = checkpoint.list_checkpoints(out.with_suffix(".ckpt"))[0]
    r = run_cdmpi(["train", cfg_path, "--out", out, "--quiet", "--resume", "auto"], ranks=RANKS)
    assert r.returncode == 0, r.stderr
    assert list(metrics.read(out)["attrs"]["resumed_at_steps"]) == [int(newest.name.split("-")[1])]
    assert_same_run(out, reference)
    assert not Path(str(out) + ".lock").exists()


# ---- one writer per run ---------------------------------------------------------------------------------

@pytest.mark.mpi
def test_a_second_job_on_a_running_jobs_output_changes_nothing(tmp_path, cfg_path, reference):
    """Three second jobs (plain, --overwrite, --resume auto --overwrite) on the output of one running job:
    each exits 2 naming the holder, and the first job ends as an undisturbed run."""
    out = tmp_path / "run.h5"
    job = start_mpi_job(["train", cfg_path, "--out", out, "--quiet"], CDMPI_TEST_STEP_SLEEP=0.05)
    wait_for(lambda: (out.with_suffix(".ckpt") / "step-000000010").is_dir(), job)
    ranks = [rank_pid(job, rank) for rank in range(RANKS)]
    for pid in ranks:  # the first job holds its output however long the second ones take to start
        os.kill(pid, signal.SIGSTOP)
    try:
        # one under mpiexec (every rank must end), the other two in one process (the same lock, cheaper)
        seconds = {"": run_cdmpi(["train", cfg_path, "--out", out, "--quiet"], ranks=RANKS, timeout=180)}
        for extra in (["--overwrite"], ["--resume", "auto", "--overwrite"]):
            seconds[" ".join(extra)] = run_main(["train", cfg_path, "--backend", "local", "--out", out, "--quiet",
                                                 *extra])
        # another output whose checkpoints share the folder (run.hdf5 -> run.ckpt): its --overwrite would
        # delete the running job's checkpoints
        sibling = run_main(["train", cfg_path, "--backend", "local", "--out", out.with_suffix(".hdf5"), "--quiet",
                            "--overwrite"])
    finally:
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
    assert sibling.returncode == 2 and sibling.stderr.count("cdmpi: error") == 1, sibling.stderr
    assert f"checkpoint folder {out.with_suffix('.ckpt')} is in use by another run" in sibling.stderr, sibling.stderr
    for extra, second in seconds.items():
        assert second.returncode == 2, (extra, second.stderr)
        assert f"{out} is in use by another run (host" in second.stderr and "pid" in second.stderr, second.stderr
        assert second.stderr.count("cdmpi: error") == 1, (extra, second.stderr)
    rc, err = finish(job, timeout=120)
    assert rc == 0, err
    assert_same_run(out, reference)


def test_a_stale_lock_of_the_same_slurm_job_is_taken_over_and_another_jobs_is_not(tmp_path, cfg_path):
    """A network filesystem may keep the flock of a node that died: a requeued run of the same SLURM job id
    on another node takes it over; a run of another job id does not."""
    out = tmp_path / "run.h5"
    lock = Path(str(out) + ".lock")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'host': 'node-that-died', 'pid': 1, "
        "'job': '4242', 'started': 'then'}).encode()); print('held', flush=True); time.sleep(600)"), str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        train = ["train", cfg_path, "--backend", "local", "--out", out, "--quiet", "--set", "run.steps=5"]
        other = run_main(train, env=subprocess_env(SLURM_JOB_ID="77"))
        assert other.returncode == 2 and "host node-that-died, pid 1, started then, SLURM job 4242" in other.stderr
        assert not out.exists()
        same = run_main(train, env=subprocess_env(SLURM_JOB_ID="4242"))
        assert same.returncode == 0, same.stderr
    finally:
        holder.kill()


# ---- resume checks what it continues ------------------------------------------------------------------

def test_resume_refuses_changed_data_and_a_metrics_file_of_another_run(tmp_path, cfg_path, capsys):
    data = tmp_path / "data.svm"
    rng = np.random.default_rng(0)
    lines = [f"{rng.choice([-1, 1])} " + " ".join(f"{j + 1}:{v:.3f}" for j, v in enumerate(rng.standard_normal(6)))
             for _ in range(60)]
    data.write_text("\n".join(lines) + "\n")
    train = ["train", str(cfg_path), "--backend", "local", "--quiet", "--set", f"data.dataset='{data}'",
             "--set", "data.batch_size=0", "--set", "run.steps=10"]
    out = tmp_path / "run.h5"
    assert cli.main([*train, "--out", str(out)]) == 0
    data.write_text("\n".join(lines[::-1]) + "\n")  # the same rows, shuffled: another file
    capsys.readouterr()
    assert cli.main([*train, "--out", str(out), "--resume", "auto", "--set", "run.steps=20"]) == 2
    err = capsys.readouterr().err
    assert f"the data file {data} changed since checkpoint" in err and err.count("\n") == 1, err
    data.write_text("\n".join(lines) + "\n")

    other = tmp_path / "other.h5"
    assert cli.main([*train, "--out", str(other)]) == 0  # another run: its own run id
    shutil.copy(other, out)
    capsys.readouterr()
    assert cli.main([*train, "--out", str(out), "--resume", "auto", "--set", "run.steps=20"]) == 2
    assert f"metrics file {out} holds the rows of another run" in capsys.readouterr().err


def test_resume_refuses_a_metrics_file_with_missing_rows(tmp_path, cfg_path, capsys):
    out = tmp_path / "run.h5"
    train = ["train", str(cfg_path), "--backend", "local", "--quiet", "--out", str(out)]
    assert cli.main([*train, "--set", "run.steps=20"]) == 0
    saved = metrics.read(out)
    with h5py.File(out, "r+") as fh:  # an older copy of the file: fewer rows than the checkpoint's run wrote
        for ds in fh["train"].values():
            ds.resize((10,))
    capsys.readouterr()
    assert cli.main([*train, "--resume", "auto", "--set", "run.steps=30"]) == 2
    err = capsys.readouterr().err
    assert f"metrics file {out} has 10 rows before step 20, but the checkpoint's run had written 20" in err, err
    assert saved["attrs"]["run_id"]


def test_after_a_fallback_past_a_damaged_checkpoint_the_fresh_ones_survive_prune(tmp_path, cfg_path, reference,
                                                                                  capsys):
    """keep = 1: the resumed run's new checkpoint must not be pruned in favour of the damaged newer one."""
    out = tmp_path / "run.h5"
    train = ["train", str(cfg_path), "--backend", "local", "--quiet", "--out", str(out)]
    assert cli.main([*train, "--set", "run.steps=30"]) == 0  # checkpoints 10, 20, 30 (keep = 0)
    damaged = checkpoint.step_dir(out.with_suffix(".ckpt"), 30) / "worker-0001.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert cli.main([*train, "--resume", "auto", "--set", "checkpoint.keep=1", "--set", "run.steps=40"]) == 0
    err = capsys.readouterr().err
    assert "trying an older checkpoint" in err and "removed" in err
    assert [p.name for p in checkpoint.list_checkpoints(out.with_suffix(".ckpt"))] == ["step-000000040"]
    assert cli.main([*train, "--resume", "auto", "--set", "run.steps=60"]) == 0  # the next resume works
    rows = metrics.read(out)["train"]
    np.testing.assert_array_equal(rows["loss"], reference["rows"]["loss"])


def test_when_every_checkpoint_is_damaged_resume_auto_says_so(tmp_path, cfg_path, capsys):
    out = tmp_path / "run.h5"
    train = ["train", str(cfg_path), "--backend", "local", "--quiet", "--out", str(out)]
    assert cli.main([*train, "--set", "run.steps=20"]) == 0
    for path in checkpoint.list_checkpoints(out.with_suffix(".ckpt")):
        (path / "server.pt").write_bytes(b"broken")
    capsys.readouterr()
    assert cli.main([*train, "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "could be resumed" in err and "--overwrite" in err and "pass --resume auto" not in err, err
    assert cli.main([*train, "--resume", "auto", "--overwrite", "--set", "run.steps=5"]) == 0  # starts over


# ---- SIGTERM during start-up -----------------------------------------------------------------------------

def catches_sigterm(pid: int) -> bool:
    try:
        caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", Path(f"/proc/{pid}/status").read_text()).group(1), 16)
    except (OSError, AttributeError):
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def test_sigterm_during_start_up_ends_with_exit_75(tmp_path, cfg_path):
    """The signal arrives while cdmpi imports torch and loads data: the run stops at its first step with a
    checkpoint, exit status 75, and a resume runs it to the end."""
    out = tmp_path / "run.h5"
    job = subprocess.Popen([sys.executable, "-m", "cdmpi", "train", str(cfg_path), "--backend", "local", "--out",
                            str(out), "--quiet"], stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
    deadline = time.monotonic() + scaled(120)
    while not catches_sigterm(job.pid):  # cdmpi installs its handler before its imports
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.005)
    job.send_signal(signal.SIGTERM)
    rc, err = finish(job, timeout=120)
    assert rc == 75, err
    assert "stopped by SIGTERM at step 1" in err
    r = run_main(["train", cfg_path, "--backend", "local", "--out", out, "--quiet", "--resume", "auto"])
    assert r.returncode == 0, r.stderr


# ---- no silent stall ---------------------------------------------------------------------------------

@pytest.mark.mpi
def test_a_stopped_worker_ends_the_job_naming_it(tmp_path, cfg_path):
    out = tmp_path / "run.h5"
    job = start_mpi_job(["train", cfg_path, "--out", out, "--quiet", "--set", "comm.timeout=5",
                         "--set", "run.steps=100000"], CDMPI_TEST_STEP_SLEEP=0.02)
    wait_for(has_rows(out, 5), job)
    stopped = rank_pid(job, 2)
    os.kill(stopped, signal.SIGSTOP)
    try:
        rc, err = finish(job, timeout=120)  # a hang fails here; the watchdog acts after 5 s
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert rc != 0
    # rank 0 waits in whichever collective rank 2 was stopped before: the frames' Gather, or a checkpoint's gather
    found = re.search(r"cdmpi: error: no progress for \d+ s at step (\d+) \(comm.timeout = 5 s; rank 0 waits in "
                      r"(Gatherv?|gather|Allgather|allgather)\): rank 2 did not answer \(stopped or hung\)", err)
    assert found, err


@pytest.mark.mpi
def test_a_worker_stopped_in_the_set_up_ends_the_job_naming_it(tmp_path, cfg_path):
    """SIGSTOP before the engine exists (rank 2 stops itself as the set-up begins): the watchdog runs from
    there, so the others do not wait for it for ever."""
    out = tmp_path / "run.h5"
    job = start_mpi_job(["train", cfg_path, "--out", out, "--quiet", "--set", "comm.timeout=5"],
                        CDMPI_TEST_STOP_IN_SETUP=2)
    rc, err = finish(job, timeout=120)  # a hang fails here; the watchdog acts after 5 s
    assert rc != 0
    assert re.search(r"cdmpi: error: no progress for \d+ s at step 0 \(comm.timeout = 5 s; rank 0 waits in "
                     r"\w+\): rank 2 did not answer \(stopped or hung\)", err), err


# ---- bad numbers are bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_config_values_are_refused(cfg_path, capsys, value):
    assert cli.main(["train", str(cfg_path), "--backend", "local", "--set", f"optim.lr={value}"]) == 2
    err = capsys.readouterr().err
    assert f"config: optim.lr must be a finite number, got {float(value)!r}" in err and err.count("\n") == 1


@pytest.mark.parametrize("line", ["+1 1:0.5 2:nan", "inf 1:0.5", "-1 3:-inf"])
def test_non_finite_libsvm_values_are_refused_naming_the_line(tmp_path, cfg_path, capsys, line):
    data = tmp_path / "bad.svm"
    data.write_text("+1 1:0.25 2:1\n-1 1:0.5\n" + line + "\n+1 2:2\n")
    assert cli.main(["train", str(cfg_path), "--backend", "local", "--set", f"data.dataset='{data}'",
                     "--out", str(tmp_path / "run.h5")]) == 2
    err = capsys.readouterr().err
    assert f"LibSVM file {data} holds a value that is not a finite number: line 3: {line!r}" in err, err
    assert not (tmp_path / "run.h5").exists()
