"""Files that are not whole cdmpi metrics files: every reader (report, plot, project, watch) ends at once
with exit 2 and one line, follows no link, and reads no more than the file holds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from cdmpi import metrics
from conftest import REPO, run_cdmpi, run_main, subprocess_env, wait_for

MUSHROOMS_CONFIG = REPO / "configs" / "logreg" / "mushrooms.toml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "run.h5"
    result = run_main(["train", MUSHROOMS_CONFIG, "--backend", "local", "--workers", 2, "--set", "run.steps=20",
                       "--out", out, "--quiet"])
    assert result.returncode == 0, result.stderr
    return out


def one_line_exit_2(result):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("command", [["report"], ["plot", "--out", "p.png"], ["project"], ["watch", "--wait", "5"]])
def test_a_truncated_file_is_refused_at_once(tmp_path, finished, command):
    cut = tmp_path / "cut.h5"
    data = finished.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    args = [command[0], cut, *[tmp_path / a if a.endswith(".png") else a for a in command[1:]]]
    result = run_cdmpi(args, timeout=60)  # a hang fails here
    one_line_exit_2(result)
    assert "truncated" in result.stderr or "not" in result.stderr


def _hostile(tmp_path, finished, case):
    path = tmp_path / f"{case}.h5"
    if case == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        return path
    if case == "empty":
        path.write_bytes(b"")
        return path
    path.write_bytes(finished.read_bytes())
    with h5py.File(path, "r+") as fh:
        if case == "no train":
            del fh["train"]
        elif case == "string column":
            del fh["train/loss"]
            fh["train/loss"] = np.array([b"a"] * len(fh["train/step"]))
        elif case == "2-D column":
            del fh["train/loss"]
            fh["train/loss"] = np.zeros((len(fh["train/step"]), 2))
        elif case == "dangling link":
            fh["train/ghost"] = h5py.SoftLink("/nowhere")
        elif case == "external link":
            fh["train/loss_elsewhere"] = h5py.ExternalLink(str(finished), "/train/loss")
        elif case == "huge declared rows":
            del fh["train/loss"]
            fh["train"].create_dataset("loss", shape=(40_000_000,), dtype="f8", chunks=(1024,))
        elif case == "bad config json":
            fh.attrs["config"] = "{not json"
    return path


@pytest.mark.parametrize("case", ["random bytes", "empty", "no train", "string column", "2-D column",
                                  "dangling link", "external link", "huge declared rows", "bad config json"])
def test_hostile_files_are_one_line(tmp_path, finished, case):
    path = _hostile(tmp_path, finished, case)
    one_line_exit_2(run_main(["report", path]))
    one_line_exit_2(run_main(["project", path]))
    if case != "bad config json":  # watch reads no config: it follows the rows, which are whole
        one_line_exit_2(run_main(["watch", path, "--wait", "2"]))


def test_a_reader_holding_the_file_open_sees_the_run_to_its_end(tmp_path):
    """The pattern docs/metrics.md shows: one SWMR reader that keeps the file open and refreshes. The
    end-of-run arrays are allocated with the file, so their first write changes nothing under the reader,
    and it reads the last row and final/steps."""
    out = tmp_path / "live.h5"
    job = subprocess.Popen([sys.executable, "-m", "cdmpi", "train", str(MUSHROOMS_CONFIG), "--backend", "local",
                            "--workers", "2", "--set", "run.steps=120", "--set", "run.flush_every=5", "--out",
                            str(out), "--quiet"], env=subprocess_env(CDMPI_TEST_STEP_SLEEP=0.01), cwd=REPO)
    wait_for(lambda: out.exists() and metrics.read(out)["train"]["step"].size > 0, job)
    with h5py.File(out, "r", swmr=True, locking=False) as fh:
        step, final = fh["train/step"], fh["final/steps"]
        while job.poll() is None:
            step.refresh()
            final.refresh()
            time.sleep(0.05)
        step.refresh()
        final.refresh()
        assert final[0] == 120 and step[-1] == 120
    assert job.wait() == 0


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
def test_a_full_disk_leaves_no_half_written_rows(tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("could not mount a tmpfs here")
    try:
        out = disk / "run.h5"
        # the file (about 400 kB when made) fills the disk after about 10,000 rows
        result = run_cdmpi(["train", MUSHROOMS_CONFIG, "--backend", "local", "--workers", 2, "--set",
                            "run.steps=100000", "--set", "run.flush_every=200", "--set", "checkpoint.every=0",
                            "--set", "run.log_every=1", "--out", out, "--quiet"], timeout=600)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "cannot write metrics file" in result.stderr and "No space left on device" in result.stderr
        run = metrics.read(out)
        train = run["train"]
        assert (train["bits_up"][1:] > 0).all() and np.isfinite(train["wall_time"]).all()
        assert not list(disk.rglob("*.part"))
    finally:
        subprocess.run(["umount", str(disk)])
