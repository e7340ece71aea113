"""comm.wait: how ranks wait in collectives. The sleeping wait adds a barrier before each collective, which
every rank must agree on; it changes timing only, never the bits."""

import numpy as np
import pytest

from cdmpi import metrics

from conftest import run_cdmpi, run_main


def _run(config, out, *sets, ranks=None):
    backend = ["--backend", "local", "--workers", 3] if ranks is None else []
    result = run_cdmpi(["train", config, "--set", "run.steps=12", *sets, *backend, "--out", out, "--quiet"],
                       ranks=ranks, timeout=180)
    assert result.returncode == 0, result.stderr
    return metrics.read(out)


@pytest.mark.mpi
@pytest.mark.parametrize("topology", ["star", "sharded"])
def test_sleeping_wait_gives_the_same_bits(tmp_path, small_config, topology):
    sets = ["--set", f'comm.topology="{topology}"', "--set", "checkpoint.check_every=3"]
    local = _run(small_config, tmp_path / "local.h5", *sets)
    slept = _run(small_config, tmp_path / "sleep.h5", *sets, "--set", 'comm.wait="sleep"', ranks=4)
    assert slept["attrs"]["comm_wait"] == "sleep"
    for column in ("loss", "grad_norm_sq", "bits_up"):
        np.testing.assert_array_equal(local["train"][column], slept["train"][column])
    np.testing.assert_array_equal(local["final"]["params"], slept["final"]["params"])


@pytest.mark.mpi
def test_auto_spins_for_short_vectors(tmp_path, small_config):
    """d = 20 makes latency-bound steps, where sleeping costs more than it frees: auto keeps MPI's spin."""
    run = _run(small_config, tmp_path / "auto.h5", ranks=4)
    assert run["attrs"]["comm_wait"] == "spin"


def test_bad_wait_is_a_clear_error(tmp_path, small_config):
    result = run_main(["train", small_config, "--set", 'comm.wait="nap"', "--backend", "local",
                        "--out", tmp_path / "x.h5", "--quiet"])
    assert result.returncode == 2
    assert "comm.wait must be 'auto', 'spin' or 'sleep', got 'nap'" in result.stderr
