"""Shared test helpers: `cdmpi` in this process (cli), or in a subprocess under mpiexec or not (run_cdmpi),
with a timeout that only catches hangs.

Every timeout here is multiplied by CDMPI_TEST_TIMEOUT_SCALE (default 1): raise it on a slow or crowded
machine. No test asserts how long anything takes.

Markers (registered in pytest.ini): `mpi` for tests that start mpiexec (run_cdmpi and start_mpi refuse to
otherwise), `slurm` for sbatch jobs, `slow` for the few long in-process ones. `make test-fast` runs the rest.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_LIBSVM = REPO.parent / "shared" / "data" / "libsvm"
TIMEOUT_SCALE = float(os.environ.get("CDMPI_TEST_TIMEOUT_SCALE", "1"))
_CURRENT: list = [None]  # the test being set up or run (see pytest_runtest_setup)


def scaled(seconds: float) -> float:
    """A hang detector's limit: generous, and longer on a machine that says it is slow."""
    return seconds * TIMEOUT_SCALE


def pytest_runtest_setup(item):  # before any fixture of the test, module-scoped ones included
    _CURRENT[0] = item


def pytest_runtest_teardown(item):
    _CURRENT[0] = None


def require_marker(name: str, what: str) -> None:
    """Fail a test that launches `what` without the marker that lets `pytest -m "not NAME"` leave it out."""
    node = _CURRENT[0]
    if node is not None and node.get_closest_marker(name) is None:
        pytest.fail(f"{node.nodeid} starts {what}: mark it @pytest.mark.{name}")


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


def run_python(python_args, *, ranks: int | None = None, timeout: float = 300, env: dict | None = None, cwd=None,
               mpiexec_args=()) -> subprocess.CompletedProcess:
    """`python PYTHON_ARGS`, under `mpiexec [MPIEXEC_ARGS] -n RANKS` when ranks is given. A hang fails the
    test."""
    cmd = [sys.executable, *map(str, python_args)]
    timeout = scaled(timeout)
    if ranks is not None:
        require_marker("mpi", "mpiexec")
        mpiexec = mpiexec_path()
        if mpiexec is None:
            pytest.fail("mpiexec not found: install the mpich extra (pip install -e '.[mpich]')")
        cmd = [mpiexec, *map(str, mpiexec_args), "-n", str(ranks), *cmd]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                              env=env or subprocess_env())
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\nstdout: {err.stdout}\nstderr: {err.stderr}")


def run_cdmpi(args, **kwargs) -> subprocess.CompletedProcess:
    """`python -m cdmpi ARGS` in a subprocess (see run_python); run_main() runs it in this process."""
    return run_python(["-m", "cdmpi", *args], **kwargs)


def run_main(args, *, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cdmpi ARGS` in this process, through the same main() as the command: returncode, stdout, stderr, as
    run_cdmpi gives them, without starting an interpreter and torch. For everything that runs in one
    process (errors, reports, in-process training); `env`, as for run_cdmpi, is the whole environment."""
    from cdmpi import cli as cdmpi_cli

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    handler = signal.getsignal(signal.SIGTERM)  # main() installs its own
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update({k: str(v) for k, v in env.items()})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cdmpi_cli.main([str(a) for a in args])
            except SystemExit as exit_:  # argparse: --help, usage errors
                code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        signal.signal(signal.SIGTERM, handler)
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["cdmpi", *map(str, args)], code, out.getvalue(), err.getvalue())


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


# ---- jobs that tests signal or kill -------------------------------------------------------------------

def start_mpi(python_args, ranks: int, **env) -> subprocess.Popen:
    """`mpiexec -n RANKS python PYTHON_ARGS` in its own session (so the whole job can be signalled), with
    stdout and stderr captured."""
    require_marker("mpi", "mpiexec")
    cmd = [mpiexec_path(), "-n", str(ranks), sys.executable, *map(str, python_args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(**env), start_new_session=True, cwd=REPO)


def wait_for(predicate, job: subprocess.Popen, timeout: float = 300):
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while not predicate():
        if job.poll() is not None:
            pytest.fail(f"the job ended (rc {job.returncode}) before the test could act: {job.communicate()}")
        if time.monotonic() > deadline:
            os.killpg(job.pid, signal.SIGKILL)
            pytest.fail(f"gave up waiting after {timeout}s")
        time.sleep(0.05)


def finish(job: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """The job's exit code and stderr; a job still running after `timeout` seconds fails the test."""
    timeout = scaled(timeout)
    try:
        _, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        _, err = job.communicate()
        pytest.fail(f"the job did not end within {timeout}s; stderr: {err}")
    return job.returncode, err


def rank_pid(job: subprocess.Popen, rank: int) -> int:
    """The pid of one MPI rank of the job: a descendant of mpiexec with PMI_RANK=rank in its environment."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = [job.pid]
    while todo:
        pid = todo.pop()
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            environ = []
        if f"PMI_RANK={rank}".encode() in environ:
            return pid
        todo.extend(children.get(pid, []))
    pytest.fail(f"rank {rank} of the job not found")
