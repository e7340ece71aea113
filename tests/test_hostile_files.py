"""Files that are not whole cdmpi metrics files: every reader (report, plot, project, watch) ends at once
with exit 2 and one line, follows no link, and reads no more than the file holds."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import REPO, run_cdmpi, run_main

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
