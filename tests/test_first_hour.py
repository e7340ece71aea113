"""A new user's first hour: data found or named precisely, a demo that runs offline, errors before torch,
progress that shows under mpiexec, a watcher, and the surprises a first user met, each a clean error."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from cdmpi import catalog, compress, metrics

from conftest import REPO, finish, run_cdmpi, run_main, scaled, subprocess_env, wait_for

MUSHROOMS = REPO / "configs" / "logreg" / "mushrooms.toml"


def offline_env(tmp_path, **extra) -> dict:
    """No data folder, an empty cache, no downloads: a fresh machine without network."""
    env = subprocess_env(CDMPI_CACHE_DIR=tmp_path / "cache", CDMPI_OFFLINE=1, **extra)
    env.pop("CDMPI_DATA_DIR", None)
    return env


def test_the_demo_dataset_ships_with_cdmpi(tmp_path):
    out = tmp_path / "demo.h5"
    r = run_main(["train", MUSHROOMS, "--backend", "local", "--workers", 4, "--set", "run.steps=5",
                   "--out", out, "--quiet"], env=offline_env(tmp_path))
    assert r.returncode == 0, r.stderr
    run = metrics.read(out)
    assert run["attrs"]["data_sha256"] == "f39a4eb628dc61a7d43760815b061c9e497aa728ce1ad8bde57a09ef6043b538"
    assert (tmp_path / "cache" / "libsvm" / "mushrooms").is_file()  # unpacked once, checked
    attrs = run["attrs"]
    assert attrs["data_path"].endswith("mushrooms")
    # Provenance, and a config that lists only what applies to a logreg run of scaled sign.
    assert attrs["config"]["problem"] == {"name": "logreg", "reg": 0.1, "init_scale": 0.0}
    assert "ratio" not in attrs["config"]["compress"] and "epochs" not in attrs["config"]["run"]
    assert attrs["config"]["optim"]["lr"] == 0.005 and attrs["config"]["run"]["steps"] == 5
    assert attrs["versions"]["torch"] == torch.__version__ and attrs["versions"]["h5py"] == h5py.__version__
    assert attrs["hosts"] and all(host == socket.gethostname() for host in attrs["hosts"])
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=REPO, capture_output=True, text=True)
        assert head.returncode == 0 and len(head.stdout.strip()) == 7, head.stderr
        assert head.stdout.strip() in attrs["git_commit"]


def test_a_missing_dataset_is_named_with_where_it_was_looked_for_and_what_to_do(tmp_path):
    r = run_main(["train", REPO / "configs" / "logreg" / "a9a.toml", "--backend", "local", "--out",
                   tmp_path / "a.h5"], env=offline_env(tmp_path))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    for part in ("dataset 'a9a' (file name 'a9a')", "$CDMPI_DATA_DIR (unset)", str(tmp_path / "cache" / "libsvm"),
                 "cdmpi data add FILE", "--set data.dataset=/path/to/file"):
        assert part in err[0], err[0]


def test_cdmpi_data_lists_and_adds_with_the_checksum(tmp_path):
    env = offline_env(tmp_path)
    listing = run_main(["data"], env=env)
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"^a9a\s+missing", listing.stdout, re.M) and re.search(r"^mushrooms\s+bundled", listing.stdout,
                                                                          re.M)
    fake = tmp_path / "a9a"
    fake.write_text("+1 1:1\n-1 2:1\n")
    refused = run_main(["data", "add", fake], env=env)
    assert refused.returncode == 2 and "none of the known datasets" in refused.stderr
    named = run_main(["data", "add", fake, "a9a"], env=env)
    assert named.returncode == 2 and "not a9a's" in named.stderr
    assert not (tmp_path / "cache" / "libsvm" / "a9a").exists()
    real = REPO.parent / "shared" / "data" / "libsvm" / "phishing"
    if real.is_file():
        added = run_main(["data", "add", real], env=env)
        assert added.returncode == 0 and "is phishing" in added.stdout, added.stderr
        assert re.search(r"^phishing\s+\S+/cache/libsvm/phishing", run_main(["data"], env=env).stdout, re.M)


def imported_modules(args, env) -> set[str]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "cdmpi", *map(str, args)], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=scaled(120))
    return {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}, r


@pytest.mark.parametrize("args,code", [(["--help"], 0), (["train", "--help"], 0), (["train", "nosuch.toml"], 2),
                                       (["train", MUSHROOMS, "--set", "optim.lr=-1"], 2),
                                       (["train", MUSHROOMS, "--set", "optim.algorithm='sgd'"], 2)])
def test_help_and_config_errors_do_not_import_torch_or_mpi(args, code):
    modules, r = imported_modules(args, subprocess_env())
    assert r.returncode == code, r.stderr
    assert not {"torch", "mpi4py", "h5py", "numba"} & modules, sorted(modules & {"torch", "mpi4py", "h5py", "numba"})


def test_readers_import_neither_torch_nor_mpi(tmp_path):
    out = tmp_path / "r.h5"
    assert run_main(["train", MUSHROOMS, "--backend", "local", "--workers", 2, "--set", "run.steps=10",
                     "--out", out]).returncode == 0
    for args in (["report", out], ["project", out], ["watch", out], ["plot", out, "--out", tmp_path / "p.png"]):
        modules, r = imported_modules(args, subprocess_env())
        assert r.returncode == 0, r.stderr
        assert not {"torch", "mpi4py", "numba"} & modules, (args[0], sorted(modules & {"torch", "mpi4py", "numba"}))


def test_catalog_names_the_compressors_that_cdmpi_compress_implements():
    assert tuple(compress.COMPRESSORS) == catalog.COMPRESSORS


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    r = run_main(["train", MUSHROOMS, "--backend", "local", "--workers", 2, "--set", "run.steps=300",
                   "--set", "run.progress_every=0.2", "--out", tmp_path / "p.h5"],
                  env=subprocess_env(CDMPI_TEST_STEP_SLEEP=0.005))
    assert r.returncode == 0, r.stderr
    lines = re.findall(r"cdmpi: step (\d+)/300 \(\d+%\), ETA \S+, \S+ steps/s, loss \S+, grad_norm_sq \S+, bits \S+",
                       r.stderr)
    assert len(lines) >= 2 and lines == sorted(lines, key=int), r.stderr


def test_watch_follows_a_running_job_to_its_end(tmp_path):
    out = tmp_path / "w.h5"
    job = subprocess.Popen([sys.executable, "-m", "cdmpi", "train", str(MUSHROOMS), "--backend", "local", "--workers",
                            "2", "--set", "run.steps=200", "--out", str(out), "--quiet"], env=subprocess_env(
                                CDMPI_TEST_STEP_SLEEP=0.01), cwd=REPO, stderr=subprocess.PIPE, text=True)
    watcher = run_main(["watch", out, "--interval", "0.2"])
    assert watcher.returncode == 0, watcher.stderr
    run = metrics.read(out)
    assert f"run {run['attrs']['run_id']}, created {run['attrs']['created']}" in watcher.stdout
    # the last line is the file's last row, the one cdmpi report shows
    last = {k: run["train"][k][-1] for k in ("step", "loss", "grad_norm_sq")}
    assert (f"finished after 200 steps; last row, step {last['step']}: loss {last['loss']:.6g}, "
            f"grad_norm_sq {last['grad_norm_sq']:.6g}") in watcher.stdout, watcher.stdout
    report = run_main(["report", out, "--json"])
    assert json.loads(report.stdout)[0]["final_grad_norm_sq"] == last["grad_norm_sq"]
    rc, err = finish(job, timeout=120)
    assert rc == 0, err


def test_watch_started_on_an_overwrite_follows_the_new_run(tmp_path):
    """Started while `--overwrite` replaces a finished file, watch waits for the new run's file (the lock
    names its writer) instead of reporting the old run's end."""
    out = tmp_path / "w.h5"
    base = [sys.executable, "-m", "cdmpi", "train", str(MUSHROOMS), "--backend", "local", "--workers", "2",
            "--out", str(out), "--quiet"]
    assert subprocess.run(base + ["--set", "run.steps=20"], env=subprocess_env(), cwd=REPO).returncode == 0
    old = metrics.read(out)["attrs"]["run_id"]
    job = subprocess.Popen(base + ["--set", "run.steps=150", "--overwrite"], env=subprocess_env(
        CDMPI_TEST_STEP_SLEEP=0.01), cwd=REPO, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: Path(str(out) + ".lock").exists(), job)
    watcher = run_main(["watch", out, "--interval", "0.1"])
    assert finish(job, timeout=120)[0] == 0
    new = metrics.read(out)["attrs"]["run_id"]
    assert watcher.returncode == 0 and new != old
    assert f"run {new}" in watcher.stdout and old not in watcher.stdout, watcher.stdout
    assert "finished after 150 steps" in watcher.stdout


def test_watch_of_a_finished_file_shows_no_speed(tmp_path):
    out = tmp_path / "w.h5"
    assert run_main(["train", MUSHROOMS, "--backend", "local", "--workers", 2, "--set", "run.steps=30",
                     "--out", out]).returncode == 0
    watcher = run_main(["watch", out])
    assert watcher.returncode == 0 and "finished after 30 steps" in watcher.stdout
    assert "step/s" not in watcher.stdout + watcher.stderr


def test_watch_says_when_a_run_ends_without_finishing(tmp_path):
    out = tmp_path / "w.h5"
    job = subprocess.Popen([sys.executable, "-m", "cdmpi", "train", str(MUSHROOMS), "--backend", "local", "--workers",
                            "2", "--set", "run.steps=100000", "--out", str(out), "--quiet"], env=subprocess_env(
                                CDMPI_TEST_STEP_SLEEP=0.01), cwd=REPO, stderr=subprocess.PIPE, text=True)
    watcher = subprocess.Popen([sys.executable, "-m", "cdmpi", "watch", str(out), "--interval", "0.2"],
                               env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for(lambda: out.exists() and metrics.read(out)["train"]["step"].size > 0, job)
    job.terminate()  # SIGTERM: the run stops with a checkpoint, exit 75
    assert finish(job, timeout=120)[0] == 75
    out_text, err_text = watcher.communicate(timeout=scaled(120))
    assert watcher.returncode == 1, err_text
    assert "the run ended without finishing" in out_text and "--resume auto" in out_text


# ---- the surprises a first user met ------------------------------------------------------------------

@pytest.mark.parametrize("sets,message", [
    (["data.n_features=200000000"], "needs about"),
    (["run.epochs=2"], "run.steps = 1000 and run.epochs = 2 are both set"),
])
def test_surprising_settings_are_one_line_errors(tmp_path, sets, message):
    args = [a for kv in sets for a in ("--set", kv)]
    r = run_main(["train", MUSHROOMS, "--backend", "local", *args, "--out", tmp_path / "x.h5"])
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_steps_and_epochs_together_are_an_error(tmp_path):
    r = run_main(["train", REPO / "configs" / "digits" / "small_cnn.toml", "--set", "run.steps=5",
                   "--out", tmp_path / "x.h5"])
    assert r.returncode == 2 and "run.steps = 5 and run.epochs = 60 are both set" in r.stderr


def test_out_must_be_hdf5(tmp_path):
    r = run_main(["train", MUSHROOMS, "--backend", "local", "--out", tmp_path / "result.txt"])
    assert r.returncode == 2 and "name it .h5 or .hdf5" in r.stderr
    assert not (tmp_path / "result.txt").exists()


@pytest.mark.mpi
def test_backend_local_under_mpiexec_is_refused_once(tmp_path):
    r = run_cdmpi(["train", MUSHROOMS, "--backend", "local", "--out", tmp_path / "x.h5"], ranks=3)
    assert r.returncode == 2
    assert r.stderr.count("cdmpi: error") == 1 and "3 separate runs racing on one output" in r.stderr
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("algorithm,compressor", [("ef21", "topk"), ("amsgrad", "identity"),
                                                  ("amsgrad-ef", "scaled_sign")])
def test_the_paper_configs_give_each_algorithm_its_own_compressor(tmp_path, algorithm, compressor):
    out = tmp_path / "x.h5"
    r = run_main(["train", MUSHROOMS, "--backend", "local", "--workers", 2, "--set", f"optim.algorithm='{algorithm}'",
                   "--set", "run.steps=3", "--out", out, "--quiet"])
    assert r.returncode == 0, r.stderr
    assert metrics.read(out)["attrs"]["compressor"] == compressor
