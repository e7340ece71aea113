"""Bad input ends every rank with one line naming the cause and a non-zero exit, never a hang."""

import pytest

from conftest import SMALL_CONFIG, run_cdmpi, subprocess_env, write_config

RANKS = 3
TIMEOUT = 60  # a guard against hangs; launching 3 Python ranks alone takes a few seconds here


def assert_clean_failure(result, *fragments):
    assert result.returncode != 0, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("cdmpi: error")]
    assert len(errors) == 1, result.stderr  # one message, from rank 0, not one per rank
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stderr


def test_missing_config_file(tmp_path):
    result = run_cdmpi(["train", tmp_path / "nope.toml", "--quiet"], ranks=RANKS, timeout=TIMEOUT)
    assert_clean_failure(result, "config file not found", "nope.toml")


def test_unknown_key(tmp_path):
    cfg = write_config(tmp_path / "c.toml", SMALL_CONFIG.replace("lr = 0.01", "lr = 0.01\nlearning_rate = 1"))
    result = run_cdmpi(["train", cfg, "--quiet"], ranks=RANKS, timeout=TIMEOUT)
    assert_clean_failure(result, "unknown key optim.learning_rate")


def test_unknown_key_in_override(small_config):
    result = run_cdmpi(["train", small_config, "--set", "run.stepz=4", "--quiet"], ranks=RANKS, timeout=TIMEOUT)
    assert_clean_failure(result, "unknown key run.stepz")


def test_wrong_type(tmp_path):
    cfg = write_config(tmp_path / "c.toml", SMALL_CONFIG.replace("steps = 30", 'steps = "many"'))
    result = run_cdmpi(["train", cfg, "--quiet"], ranks=RANKS, timeout=TIMEOUT)
    assert_clean_failure(result, "run.steps must be int", "'many'")


def test_missing_dataset_offline(tmp_path, small_config):
    env = subprocess_env(CDMPI_DATA_DIR=tmp_path, CDMPI_CACHE_DIR=tmp_path / "cache", CDMPI_OFFLINE=1)
    result = run_cdmpi(["train", small_config, "--set", "data.dataset=a9a", "--quiet"], ranks=RANKS,
                       timeout=TIMEOUT, env=env)
    assert_clean_failure(result, "'a9a'", "CDMPI_DATA_DIR")


def test_malformed_libsvm_line(tmp_path, small_config):
    bad = tmp_path / "bad.svm"
    bad.write_text("+1 1:0.5 3:1.0\n-1 2:0.25\n+1 2:oops 4:1\n-1 1:1\n")
    result = run_cdmpi(["train", small_config, "--set", f'data.dataset="{bad}"', "--quiet"], ranks=RANKS,
                       timeout=TIMEOUT)
    assert_clean_failure(result, "malformed LibSVM file", "line 3")


def test_world_of_one_rank(small_config):
    result = run_cdmpi(["train", small_config, "--quiet"], ranks=1, timeout=TIMEOUT)
    assert_clean_failure(result, "at least 2 ranks", "world size 1")


def test_workers_disagree_with_world(small_config):
    result = run_cdmpi(["train", small_config, "--workers", 4, "--quiet"], ranks=RANKS, timeout=TIMEOUT)
    assert_clean_failure(result, "4 workers asked for, but the world size 3 holds 1 server + 2 workers")


def test_existing_output_is_not_overwritten(tmp_path, small_config):
    out = tmp_path / "run.h5"
    out.write_bytes(b"precious")
    result = run_cdmpi(["train", small_config, "--out", out, "--quiet"], ranks=RANKS, timeout=TIMEOUT)
    assert_clean_failure(result, "exists", "--overwrite")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("args, fragment", [
    (["--set", "optim.lr=-1"], "optim.lr must be > 0"),
    (["--set", "compress.name=zip"], "unknown compressor 'zip'"),
    (["--set", "optim.algorithm=sgd"], "unknown algorithm 'sgd'"),
    (["--set", "run.dtype=float16"], "run.dtype"),
    (["--set", "data.dataset=nosuch"], "unknown dataset 'nosuch'"),
])
def test_bad_values_in_process(small_config, tmp_path, args, fragment):
    result = run_cdmpi(["train", small_config, "--backend", "local", "--out", tmp_path / "r.h5", *args],
                       timeout=TIMEOUT)
    assert_clean_failure(result, fragment)
    assert not (tmp_path / "r.h5").exists()
