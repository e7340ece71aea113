"""Bad input ends every rank with one line naming the cause and a non-zero exit, never a hang.

Each message is checked in process, through the command's main(); one MPI job per kind of failure (the
config, the data, the world, the output) shows that every rank ends with that one line."""

import pytest

from conftest import SMALL_CONFIG, run_cdmpi, run_main, run_python, subprocess_env, write_config

RANKS = 3


def assert_clean_failure(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("cdmpi: error")]
    assert len(errors) == 1, result.stderr  # one message, from rank 0, not one per rank
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stderr


def bad_libsvm(tmp_path):
    bad = tmp_path / "bad.svm"
    bad.write_text("+1 1:0.5 3:1.0\n-1 2:0.25\n+1 2:oops 4:1\n-1 1:1\n")
    return bad


@pytest.mark.parametrize("case", ["missing file", "unknown key", "unknown key in --set", "wrong type",
                                  "missing dataset", "malformed LibSVM line", "existing output"])
def test_bad_input_is_one_line(tmp_path, small_config, case):
    out = tmp_path / "run.h5"
    env = None
    if case == "missing file":
        args, fragments = [tmp_path / "nope.toml"], ["config file not found", "nope.toml"]
    elif case == "unknown key":
        cfg = write_config(tmp_path / "c.toml", SMALL_CONFIG.replace("lr = 0.01", "lr = 0.01\nlearning_rate = 1"))
        args, fragments = [cfg], ["unknown key optim.learning_rate"]
    elif case == "unknown key in --set":
        args, fragments = [small_config, "--set", "run.stepz=4"], ["unknown key run.stepz"]
    elif case == "wrong type":
        cfg = write_config(tmp_path / "c.toml", SMALL_CONFIG.replace("steps = 30", 'steps = "many"'))
        args, fragments = [cfg], ["run.steps must be int", "'many'"]
    elif case == "missing dataset":
        env = subprocess_env(CDMPI_DATA_DIR=tmp_path, CDMPI_CACHE_DIR=tmp_path / "cache", CDMPI_OFFLINE=1)
        args, fragments = [small_config, "--set", "data.dataset=a9a"], ["'a9a'", "CDMPI_DATA_DIR"]
    elif case == "malformed LibSVM line":
        args, fragments = [small_config, "--set", f'data.dataset="{bad_libsvm(tmp_path)}"'], \
            ["malformed LibSVM file", "line 3"]
    else:
        out.write_bytes(b"precious")
        args, fragments = [small_config], ["exists", "--overwrite"]
    result = run_main(["train", *args, "--backend", "local", "--out", out, "--quiet"], env=env)
    assert_clean_failure(result, *fragments)
    assert out.read_bytes() == b"precious" if case == "existing output" else not out.exists()


@pytest.mark.parametrize("args, fragment", [
    (["--set", "optim.lr=-1"], "optim.lr must be > 0"),
    (["--set", "compress.name=zip"], "unknown compressor 'zip'"),
    (["--set", "optim.algorithm=sgd"], "unknown algorithm 'sgd'"),
    (["--set", "run.dtype=float16"], "run.dtype"),
    (["--set", "data.dataset=nosuch"], "unknown dataset 'nosuch'"),
])
def test_bad_values_in_process(small_config, tmp_path, args, fragment):
    result = run_main(["train", small_config, "--backend", "local", "--out", tmp_path / "r.h5", *args])
    assert_clean_failure(result, fragment)
    assert not (tmp_path / "r.h5").exists()


# ---- under mpiexec: every rank ends, one line in all -----------------------------------------------------

@pytest.mark.mpi
def test_a_config_error_under_mpi(tmp_path):
    cfg = write_config(tmp_path / "c.toml", SMALL_CONFIG.replace("lr = 0.01", "lr = 0.01\nlearning_rate = 1"))
    result = run_cdmpi(["train", cfg, "--quiet"], ranks=RANKS)
    assert_clean_failure(result, "unknown key optim.learning_rate")


@pytest.mark.mpi
def test_a_data_error_under_mpi(tmp_path, small_config):
    """Every rank reads the data: the one line is still one."""
    result = run_cdmpi(["train", small_config, "--set", f'data.dataset="{bad_libsvm(tmp_path)}"', "--quiet"],
                       ranks=RANKS)
    assert_clean_failure(result, "malformed LibSVM file", "line 3")


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, args, fragments", [
    (1, [], ["at least 2 ranks", "world size 1"]),
    (RANKS, ["--workers", 4], ["4 workers asked for, but the world size 3 holds 1 server + 2 workers"]),
])
def test_a_world_that_does_not_fit_under_mpi(small_config, ranks, args, fragments):
    result = run_cdmpi(["train", small_config, *args, "--quiet"], ranks=ranks)
    assert_clean_failure(result, *fragments)


@pytest.mark.mpi
def test_an_existing_output_under_mpi(tmp_path, small_config):
    out = tmp_path / "run.h5"
    out.write_bytes(b"precious")
    result = run_cdmpi(["train", small_config, "--out", out, "--quiet"], ranks=RANKS)
    assert_clean_failure(result, "exists", "--overwrite")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("out", ["/proc/cdmpi-test/x.h5", "/proc/x.h5"])
def test_an_output_that_cannot_be_made_in_process(small_config, out):
    assert_clean_failure(run_main(["train", small_config, "--backend", "local", "--out", out]), "cannot")


@pytest.mark.mpi
def test_an_output_that_cannot_be_made_under_mpi(small_config, tmp_path):
    """Rank 0 cannot make the lock or the file: every rank ends with exit 2 and one line, no rank left
    waiting (cdmpi train and a script of your own through cdmpi.launch)."""
    assert_clean_failure(run_cdmpi(["train", small_config, "--out", "/proc/x.h5"], ranks=RANKS, timeout=120),
                         "cannot write /proc/x.h5.lock")
    own = run_python(["examples/own_model.py", "--out", "/proc/x.h5", "--epochs", "1"], ranks=RANKS, timeout=180)
    assert own.returncode == 2 and "cannot write /proc/x.h5.lock" in own.stderr, own.stderr
    assert "Traceback" not in own.stderr
