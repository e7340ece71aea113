"""Every algorithm under MPI against in-process: bit-identical metrics, including onebit-adam, whose frame
size changes when its warm-up ends (the loop sizes its buffers per step)."""

import numpy as np
import pytest

from cdmpi import algorithms, metrics

from conftest import run_cdmpi, run_main

pytestmark = pytest.mark.mpi  # every test here starts mpiexec

OTHERS = [name for name in algorithms.ALGORITHMS if name != "cdadam"]  # cdadam: test_mpi_vs_local.py
CASES = [(name, "auto") for name in OTHERS] + [("onebit-adam", "randk")]  # randk: keys shared across ranks


@pytest.mark.parametrize("name,compressor", CASES)
def test_mpi_matches_local_for_every_algorithm(tmp_path, small_config, name, compressor):
    sets = ["--set", f'optim.algorithm="{name}"', "--set", "run.steps=12", "--set", "optim.warmup_steps=5",
            "--set", f'compress.name="{compressor}"']
    local, mpi = tmp_path / "local.h5", tmp_path / "mpi.h5"
    r1 = run_main(["train", small_config, *sets, "--backend", "local", "--workers", 2, "--out", local,
                    "--quiet"])
    assert r1.returncode == 0, r1.stderr
    r2 = run_cdmpi(["train", small_config, *sets, "--out", mpi, "--quiet"], ranks=3)
    assert r2.returncode == 0, r2.stderr
    a, b = metrics.read(local), metrics.read(mpi)
    assert a["attrs"]["algorithm"] == b["attrs"]["algorithm"] == name
    assert b["attrs"]["backend"] == "mpi" and b["attrs"]["world_size"] == 3
    for column in ("step", "loss", "grad_norm_sq", "bits_up", "bits_down"):
        np.testing.assert_array_equal(a["train"][column], b["train"][column])
    assert a["train"]["loss"][-1] != a["train"]["loss"][0]  # it trained
    if (name, compressor) == ("onebit-adam", "auto"):
        d = 20  # 2 workers x (5 fp32 frames of 4d bytes + 7 scaled-sign frames of 4 + ceil(d/8) bytes)
        assert a["train"]["bits_up"][-1] == 8 * 2 * (5 * 4 * d + 7 * (4 + (d + 7) // 8))
        assert (b["attrs"]["warmup_up_frame_nbytes"], b["attrs"]["up_frame_nbytes"]) == (4 * d, 4 + (d + 7) // 8)
