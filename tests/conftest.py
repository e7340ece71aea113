"""Shared test helpers: launch `cdmpi` in a subprocess (under mpiexec or not) with a timeout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_LIBSVM = REPO.parent / "shared" / "data" / "libsvm"


def mpiexec_path() -> str | None:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    if "CDMPI_DATA_DIR" not in env and SHARED_LIBSVM.is_dir():
        env["CDMPI_DATA_DIR"] = str(SHARED_LIBSVM)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cdmpi(args, *, ranks: int | None = None, timeout: float = 120, env: dict | None = None,
              cwd=None) -> subprocess.CompletedProcess:
    """`python -m cdmpi ARGS`, under `mpiexec -n RANKS` when ranks is given. A hang fails the test."""
    cmd = [sys.executable, "-m", "cdmpi", *map(str, args)]
    if ranks is not None:
        mpiexec = mpiexec_path()
        if mpiexec is None:
            pytest.fail("mpiexec not found: install the mpich extra (pip install -e '.[mpich]')")
        cmd = [mpiexec, "-n", str(ranks), *cmd]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                              env=env or subprocess_env())
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\nstdout: {err.stdout}\nstderr: {err.stderr}")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SMALL_CONFIG = """
[run]
steps = 30
workers = 4
dtype = "float64"
log_every = 1
flush_every = 7
seed = 3

[data]
dataset = "synthetic"
samples = 400
features = 20

[problem]
reg = 0.1
init_scale = 0.5

[optim]
algorithm = "cdadam"
lr = 0.01

[compress]
name = "scaled_sign"
"""


@pytest.fixture
def small_config(tmp_path) -> Path:
    return write_config(tmp_path / "small.toml", SMALL_CONFIG)
