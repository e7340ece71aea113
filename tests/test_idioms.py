"""The loops people really write (tests/idioms.py, and the README's example as printed) keep cdmpi's
promises: stopped by SIGTERM mid-run and resumed, in process and under mpiexec, each gives the rows and
final parameters of its uninterrupted in-process run, bit for bit; and every row is there, at its step."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cdmpi import metrics

from conftest import REPO, run_python, subprocess_env

IDIOMS = REPO / "tests" / "idioms.py"
STEPS = 12
STOP_AT = 6  # every process sends itself SIGTERM as this step begins
EXIT_STOPPED = 75
NAMES = ["dataloader", "cosine", "onecycle", "trainer", "frozen_bn", "param_groups", "generator", "loader", "amp"]


def assert_same_run(path, reference) -> None:
    run = metrics.read(path)
    for group in ("train", "eval"):
        ours, theirs = run.get(group) or {}, reference.get(group) or {}
        assert sorted(ours) == sorted(theirs), group
        for column in theirs:
            if column != "wall_time":
                np.testing.assert_array_equal(ours[column], theirs[column], err_msg=f"{group}/{column}")
    np.testing.assert_array_equal(run["final"]["params"], reference["final"]["params"])


def stopped_and_resumed(args, out, ranks=None) -> None:
    r = run_python([*args, "--out", out], ranks=ranks, env=subprocess_env(CDMPI_TEST_SIGTERM_AT=STOP_AT))
    assert r.returncode == EXIT_STOPPED, r.stderr
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", r.stderr)  # the signal arrives as step STOP_AT begins
    assert stopped and STOP_AT < int(stopped.group(1)) < STEPS, r.stderr
    r = run_python([*args, "--out", out, "--resume", "auto"], ranks=ranks)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idioms")
    runs = {}
    for name in NAMES:
        r = run_python([IDIOMS, name, "--out", folder / f"{name}.h5"])
        assert r.returncode == 0, r.stderr
        runs[name] = metrics.read(folder / f"{name}.h5")
        assert runs[name]["train"]["step"].tolist() == list(range(STEPS)), name  # row 0 there, none shifted
    return runs


@pytest.mark.parametrize("name", NAMES)
def test_idiom_stopped_and_resumed_in_process_is_the_uninterrupted_run(tmp_path, references, name):
    out = tmp_path / "run.h5"
    stopped_and_resumed([IDIOMS, name, "--every", "4"], out)
    assert_same_run(out, references[name])


@pytest.mark.mpi
@pytest.mark.parametrize("name", NAMES)
def test_idiom_under_mpiexec_stopped_and_resumed_is_the_in_process_run(tmp_path, references, name):
    out = tmp_path / "run.h5"
    stopped_and_resumed([IDIOMS, name], out, ranks=3)
    assert_same_run(out, references[name])


def test_rows_are_at_their_steps(references):
    """Each loop's row of step t holds what its body logged at step t."""
    cosine = references["cosine"]["train"]  # lr logged after sched.step(): the rate of step t + 1
    assert np.allclose(cosine["lr"], [0.005 * (1 + np.cos(np.pi * (t + 1) / STEPS)) for t in range(STEPS)])
    onecycle = references["onecycle"]["train"]
    assert len(set(onecycle["beta1"].tolist())) > 3  # cycle_momentum moved beta1
    amp = references["amp"]["train"]  # worker 1 overflowed at steps 3 and 8: both scalers halved there
    assert amp["scale"][3] == amp["scale"][2] / 2 and amp["scale"][8] == amp["scale"][7] / 2


@pytest.mark.mpi
def test_the_readme_example_gives_the_same_bits_in_process_and_under_mpiexec_and_resumes(tmp_path):
    """The README's own-model example, exactly as printed (it writes runs/mine.h5 in its folder)."""
    text = (REPO / "README.md").read_text()
    code = re.search(r"## Your own model\n.*?```python\n(.*?)```", text, re.S).group(1)
    steps = int(re.search(r"run\.steps\((\d+)\)", code).group(1))
    local = tmp_path / "local"
    local.mkdir()
    (local / "mine.py").write_text(code)
    r = run_python([local / "mine.py"], cwd=local)
    assert r.returncode == 0, r.stderr
    reference = metrics.read(local / "runs" / "mine.h5")
    assert reference["train"]["step"].tolist() == list(range(steps))
    stop = tmp_path / "mpi"
    stop.mkdir()
    (stop / "mine.py").write_text(code)
    r = run_python([stop / "mine.py"], cwd=stop, ranks=5, env=subprocess_env(CDMPI_TEST_SIGTERM_AT=steps // 2))
    assert r.returncode == EXIT_STOPPED, r.stderr
    r = run_python([stop / "mine.py"], cwd=stop, ranks=5)  # resume="auto", as printed
    assert r.returncode == 0, r.stderr
    assert_same_run(stop / "runs" / "mine.h5", reference)
