"""MPI against in-process: the same config and seed give bit-identical metrics and parameters."""

import numpy as np
import pytest

from cdmpi import metrics

from conftest import run_cdmpi, run_main

pytestmark = pytest.mark.mpi  # every test here starts mpiexec


def test_mpi_matches_local_bit_for_bit(tmp_path, small_config):
    local = tmp_path / "local.h5"
    mpi = tmp_path / "mpi.h5"
    r1 = run_main(["train", small_config, "--backend", "local", "--workers", 4, "--out", local, "--quiet"])
    assert r1.returncode == 0, r1.stderr
    r2 = run_cdmpi(["train", small_config, "--out", mpi, "--quiet"], ranks=5)
    assert r2.returncode == 0, r2.stderr
    a, b = metrics.read(local), metrics.read(mpi)
    assert a["attrs"]["backend"] == "local" and b["attrs"]["backend"] == "mpi"
    assert b["attrs"]["world_size"] == 5
    for column in ("step", "loss", "grad_norm_sq", "bits_up", "bits_down"):
        np.testing.assert_array_equal(a["train"][column], b["train"][column])
    assert a["train"]["loss"].shape == (31,)
    np.testing.assert_array_equal(a["final"]["params"], b["final"]["params"])
    assert np.abs(a["final"]["params"]).sum() > 0
