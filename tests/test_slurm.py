"""The SLURM templates in slurm/, submitted to a real SLURM cluster.

The cluster tests run only when CDMPI_SLURM_TESTS=1 says a cluster is up (`slurm/local_cluster.sh start`
makes a single-node one; `.ci/run` does that where it is root). The guard tests need no cluster.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from cdmpi import metrics

from conftest import REPO, SMALL_CONFIG, run_main, scaled, subprocess_env, write_config

SLURM = REPO / "slurm"
ENABLED = os.environ.get("CDMPI_SLURM_TESTS") == "1"
_skip_without_cluster = pytest.mark.skipif(
    not ENABLED, reason="no SLURM cluster: set CDMPI_SLURM_TESTS=1 after `slurm/local_cluster.sh start` "
                        "(.ci/run does this where it is root and can install Debian's slurm packages)")


def needs_cluster(test):
    """A test that submits real sbatch jobs: marked slurm, and skipped (saying why) without a cluster."""
    return pytest.mark.slurm(_skip_without_cluster(test))


ROWS = ("step", "loss", "grad_norm_sq", "bits_up", "bits_down")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")
WORKERS = 2  # 3 tasks: CI has 2 cores, so jobs are submitted with --overcommit


def small_config(path: Path, **sections: str) -> Path:
    """SMALL_CONFIG with 2 workers, plus extra TOML tables."""
    text = SMALL_CONFIG.replace("workers = 4", f"workers = {WORKERS}")
    return write_config(path, text + "".join(f"\n[{name}]\n{body}\n" for name, body in sections.items()))


def slurm_env(**extra) -> dict:
    return subprocess_env(PYTHON=sys.executable, **extra)


def shell(args, *, env=None, timeout=120, cwd=REPO) -> subprocess.CompletedProcess:
    timeout = scaled(timeout)
    try:
        return subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env=env or slurm_env())
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"timed out after {timeout}s: {args}\nstdout: {err.stdout}\nstderr: {err.stderr}")


def sbatch_wait(script: str, sbatch_args, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    """`sbatch --wait` under a unique job name; a job still running at the timeout is cancelled."""
    timeout = scaled(timeout)
    name = f"cdmpi-test-{uuid.uuid4().hex[:8]}"
    cmd = ["sbatch", "--wait", "--overcommit", f"--job-name={name}", *map(str, sbatch_args), SLURM / script]
    try:
        return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env=env)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], timeout=30)
        pytest.fail(f"SLURM job {name} did not finish in {timeout}s: {' '.join(map(str, cmd))}")


def job_fields(job_id: str) -> list[dict]:
    """`scontrol show job` as one dict per job or array task (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                         timeout=30).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def submit(script: str, sbatch_args, env: dict) -> str:
    r = shell(["sbatch", "--parsable", "--overcommit", f"--job-name=cdmpi-test-{script.split('.')[0]}",
               *sbatch_args, SLURM / script], env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def wait_done(job_id: str, timeout: float = 240) -> list[dict]:
    """Poll until the job (every task of an array) has ended; cancel it and fail at the timeout.
    (`sbatch --wait` polls with growing intervals, up to 32 s, which would triple these tests' time.)"""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job_id)
        if fields and all(f.get("JobState") in ENDED for f in fields):
            return fields
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], timeout=30)
            pytest.fail(f"SLURM job {job_id} did not finish in {timeout}s: {fields}")
        time.sleep(0.5)


def local_run(config: Path, out: Path, *overrides: str) -> dict:
    sets = [arg for kv in overrides for arg in ("--set", kv)]
    r = run_main(["train", config, "--backend", "local", "--workers", WORKERS, "--out", out, "--quiet", *sets])
    assert r.returncode == 0, r.stderr
    return metrics.read(out)


def assert_same_rows(a: dict, b: dict) -> None:
    for column in ROWS:
        np.testing.assert_array_equal(a["train"][column], b["train"][column], err_msg=column)


def final_params(ckpt_root: Path, step: int) -> list[torch.Tensor]:
    """Every worker's parameters x from the checkpoint written at the end of the run (read without unpickling)."""
    step_dir = ckpt_root / f"step-{step:09d}"
    files = sorted(step_dir.glob("worker-*.pt"))
    assert len(files) == WORKERS, f"{step_dir}: {files}"
    return [torch.load(f, weights_only=True)["state"]["params"] for f in files]


@pytest.fixture(scope="module")
def cluster():
    if not ENABLED:
        pytest.skip("CDMPI_SLURM_TESTS is not 1")
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    states = r.stdout.split()
    if r.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        pytest.fail(f"CDMPI_SLURM_TESTS=1 but no SLURM node is up (sinfo: {r.stdout.strip()} {r.stderr.strip()}); "
                    f"run slurm/local_cluster.sh start")


# Guards: need no cluster.

@pytest.mark.parametrize("script", ["train.sbatch", "sweep.sbatch"])
def test_batch_scripts_refuse_to_run_outside_sbatch(script):
    env = {k: v for k, v in slurm_env().items() if not k.startswith("SLURM_")}
    r = shell(["bash", SLURM / script], env=env)
    assert r.returncode == 2
    assert "not inside a SLURM job" in r.stderr and "sbatch" in r.stderr


@pytest.mark.parametrize("script", ["reproduce_logreg.sh", "reproduce_cifar10.sh"])
def test_submit_scripts_refuse_without_sbatch(script, tmp_path):
    env = {k: v for k, v in slurm_env().items() if not k.startswith("SLURM_")}
    env["PATH"] = "/usr/local/nonexistent"  # no sbatch anywhere; bash itself is run by path
    r = shell(["/bin/bash", SLURM / script], env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert "sbatch not found" in r.stderr


def test_every_script_is_strict_and_documented():
    for path in sorted(SLURM.glob("*.s*")):
        lines = path.read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash", path
        assert lines[1].startswith("# "), f"{path}: no header comment"
        assert "set -euo pipefail" in lines, path
        assert shell(["bash", "-n", path]).returncode == 0, f"{path}: syntax error"
        usage = shell(["bash", path, "--help"])
        assert usage.returncode == 0 and usage.stdout.startswith(lines[1][2:]), f"{path} --help: {usage}"


def test_reproduce_logreg_grid_is_the_papers(tmp_path):
    env = slurm_env(DRY_RUN=1, OUT_DIR=tmp_path)
    r = shell(["bash", SLURM / "reproduce_logreg.sh"], env=env)
    assert r.returncode == 0, r.stderr
    assert "--array=1-80%" in r.stdout and "--ntasks=21" in r.stdout
    runs = [line.split() for line in (tmp_path / "grid.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    lrs = {f"{0.001 + 0.002 * i:.3f}" for i in range(5)}  # Section 7.1: from 0.001 in steps of 0.002
    expected = {(a, lr, ds) for a in ("cdadam", "amsgrad", "amsgrad-ef", "amsgrad-naive") for lr in lrs
                for ds in ("phishing", "mushrooms", "a9a", "w8a")}
    assert {tuple(run[:3]) for run in runs} == expected and len(runs) == len(expected)
    assert all(run[3:] == (["compress.name=identity"] if run[0] == "amsgrad" else []) for run in runs)


# Against the cluster.

@needs_cluster
def test_train_sbatch_matches_in_process_run(cluster, tmp_path):
    config = small_config(tmp_path / "small.toml")
    out = tmp_path / "results" / "run.h5"
    env = slurm_env(CONFIG=config, OUT=out, SET="optim.lr=0.02")
    r = sbatch_wait("train.sbatch", [f"--ntasks={WORKERS + 1}", f"--output={tmp_path}/slurm-%j.out"], env)
    log = out.with_suffix(".log")
    assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{log.read_text() if log.exists() else 'no log'}"
    assert "finished 30 steps" in log.read_text()
    run = metrics.read(out)
    assert run["attrs"]["backend"] == "mpi" and run["attrs"]["world_size"] == WORKERS + 1
    assert run["attrs"]["config"]["optim"]["lr"] == 0.02
    assert_same_rows(run, local_run(config, tmp_path / "local.h5", "optim.lr=0.02"))
    assert (out.parent / "run.ckpt" / "step-000000030").is_dir()  # checkpoints live next to the results


@needs_cluster
def test_train_sbatch_rejects_a_worker_count_that_does_not_fit(cluster, tmp_path):
    config = small_config(tmp_path / "small.toml")
    out = tmp_path / "run.h5"
    job = submit("train.sbatch", [f"--ntasks={WORKERS + 1}", f"--output={tmp_path}/slurm-%j.out"],
                 slurm_env(CONFIG=config, OUT=out, WORKERS=WORKERS + 2))
    [fields] = wait_done(job, timeout=240)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", fields
    assert f"WORKERS={WORKERS + 2} needs --ntasks={WORKERS + 3}" in out.with_suffix(".log").read_text()
    assert not out.exists()


@needs_cluster
def test_sweep_array_runs_every_grid_line(cluster, tmp_path):
    config = small_config(tmp_path / "small.toml")
    grid = tmp_path / "grid.txt"
    grid.write_text("# algorithm lr dataset [key=value ...]\ncdadam 0.01 synthetic\n\n"
                    "cdadam 0.003 synthetic run.seed=5\n")
    env = slurm_env(GRID=grid, CONFIG=config, OUT_DIR=tmp_path / "sweep")
    job = submit("sweep.sbatch", ["--array=1-2", f"--ntasks={WORKERS + 1}", f"--output={tmp_path}/slurm-%A_%a.out"],
                 env)
    tasks = wait_done(job, timeout=300)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["1", "2"], tasks
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks), \
        "".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*")))
    losses = []
    for lr, extra in (("0.01", ()), ("0.003", ("run.seed=5",))):
        run = metrics.read(tmp_path / "sweep" / "synthetic" / f"cdadam-lr{lr}.h5")
        assert run["attrs"]["config"]["optim"]["lr"] == float(lr)
        assert_same_rows(run, local_run(config, tmp_path / f"local-{lr}.h5", f"optim.lr={lr}", *extra))
        losses.append(run["train"]["loss"][-1])
    assert len(set(losses)) == 2


# How a running job is interrupted: an administrator's (or a preempting job's) requeue, which SLURM
# carries out itself, and the time-limit warning of --signal=B:TERM@120, which reaches only the batch
# shell (`scancel --batch --signal=TERM` sends exactly that), after which train.sbatch requeues the job.
INTERRUPTIONS = {"scontrol requeue": ["scontrol", "requeue"],
                 "time-limit SIGTERM": ["scancel", "--batch", "--signal=TERM"]}


@needs_cluster
@pytest.mark.parametrize("interruption", INTERRUPTIONS)
def test_interrupted_job_resumes_from_its_checkpoint_bit_exactly(cluster, tmp_path, interruption):
    steps = 300
    config = small_config(tmp_path / "long.toml", checkpoint="every = 20\nkeep = 0")
    sets = f"run.steps={steps} run.log_every=5 run.flush_every=20"
    out = tmp_path / "run.h5"
    ckpt = out.with_suffix(".ckpt")
    # The test-only hook makes each step last >= 20 ms, so the job is still running when it is requeued
    # on any machine; it changes no numbers.
    env = slurm_env(CONFIG=config, OUT=out, SET=sets, CDMPI_TEST_STEP_SLEEP=0.02)
    job = submit("train.sbatch", [f"--ntasks={WORKERS + 1}", f"--output={tmp_path}/slurm-%j.out"], env)
    deadline = time.monotonic() + scaled(240)
    while not (ckpt / "step-000000040").is_dir():  # mid-run: a checkpoint is on disk, most steps are not
        [fields] = job_fields(job)
        if time.monotonic() > deadline or fields["JobState"] not in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job], timeout=30)
            pytest.fail(f"job {job} wrote no checkpoint of step 40: {fields}")
        time.sleep(0.1)
    assert shell([*INTERRUPTIONS[interruption], job]).returncode == 0
    [fields] = wait_done(job)
    log = out.with_suffix(".log").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", f"{fields}\n{log}"
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", log)
    assert stopped, log
    assert 40 <= int(stopped.group(1)) < steps
    if interruption == "time-limit SIGTERM":
        assert "restart 0] SIGTERM: asking cdmpi to checkpoint and stop" in log
        assert "restart 0] stopped with exit code 75; requeueing to resume from the checkpoint" in log
    assert "restart 1] cdmpi exited with code 0" in log and f"finished {steps} steps" in log

    reference = tmp_path / "reference.h5"
    expected = local_run(config, reference, *sets.split())
    assert_same_rows(metrics.read(out), expected)
    for resumed, uninterrupted in zip(final_params(ckpt, steps), final_params(reference.with_suffix(".ckpt"), steps)):
        assert torch.equal(resumed, uninterrupted)


@needs_cluster
def test_own_script_requeued_mid_run_resumes_to_the_same_final_parameters(cluster, tmp_path):
    """slurm/train.sbatch with SCRIPT=examples/own_model.py (a user's loop under cdmpi.launch), requeued
    once a checkpoint is on disk: the job ends as an uninterrupted in-process run of the script does."""
    epochs, steps = 4, 88  # 2 workers: 22 steps per epoch
    script = REPO / "examples" / "own_model.py"
    out = tmp_path / "own.h5"
    ckpt = out.with_suffix(".ckpt")
    env = slurm_env(SCRIPT=script, ARGS=f"--epochs {epochs}", OUT=out, CDMPI_TEST_STEP_SLEEP=0.05)
    job = submit("train.sbatch", [f"--ntasks={WORKERS + 1}", f"--output={tmp_path}/slurm-%j.out"], env)
    deadline = time.monotonic() + scaled(240)
    while not (ckpt / "step-000000020").is_dir():  # the script checkpoints every 20 steps
        [fields] = job_fields(job)
        if time.monotonic() > deadline or fields["JobState"] not in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job], timeout=30)
            pytest.fail(f"job {job} wrote no checkpoint of step 20: {fields}")
        time.sleep(0.1)
    assert shell(["scontrol", "requeue", job]).returncode == 0
    [fields] = wait_done(job)
    log = out.with_suffix(".log").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", f"{fields}\n{log}"
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", log)
    assert stopped and 20 <= int(stopped.group(1)) < steps, log
    assert "restart 1] cdmpi exited with code 0" in log and f"finished {steps} steps" in log

    reference = tmp_path / "reference.h5"
    r = shell([sys.executable, script, "--out", reference, "--epochs", epochs, "--workers", WORKERS], timeout=300)
    assert r.returncode == 0, r.stderr
    run, expected = metrics.read(out), metrics.read(reference)
    assert list(run["attrs"]["resumed_at_steps"]) == [int(stopped.group(1))]
    for group in ("train", "eval"):
        for column in expected[group]:
            if column != "wall_time":
                np.testing.assert_array_equal(run[group][column], expected[group][column], err_msg=column)
    np.testing.assert_array_equal(run["final"]["params"], expected["final"]["params"])


@needs_cluster
def test_a_sigterm_before_cdmpi_is_imported_still_requeues_the_job(cluster, tmp_path):
    """The time-limit warning reaches the ranks while they start (before `import cdmpi` could take SIGTERM):
    they end with SIGTERM's status instead of 75, and train.sbatch requeues the job all the same; the second
    start trains to the end."""
    out = tmp_path / "slow.h5"
    marker = tmp_path / "started"
    env = slurm_env(SCRIPT=REPO / "tests" / "slow_start.py", OUT=out, CDMPI_TEST_SLOW_START_MARKER=marker)
    job = submit("train.sbatch", [f"--ntasks={WORKERS + 1}", f"--output={tmp_path}/slurm-%j.out"], env)
    deadline = time.monotonic() + scaled(240)
    while len(list(tmp_path.glob("started.*"))) < WORKERS + 1:  # every rank is in its slow start
        [fields] = job_fields(job)
        if time.monotonic() > deadline or fields["JobState"] not in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job], timeout=30)
            pytest.fail(f"job {job} did not start: {fields}")
        time.sleep(0.1)
    assert shell(["scancel", "--batch", "--signal=TERM", job]).returncode == 0
    [fields] = wait_done(job)
    log = out.with_suffix(".log").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", f"{fields}\n{log}"
    assert re.search(r"restart 0\] stopped with exit code (143|15); requeueing", log), log
    assert "restart 1] cdmpi exited with code 0" in log and "finished 20 steps" in log
    assert metrics.read(out)["train"]["step"].tolist() == list(range(20))
