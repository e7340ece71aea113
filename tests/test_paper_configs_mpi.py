"""The paper's configuration under a real 21-rank MPI job (20 workers), shortened to a few steps."""

import numpy as np
import pytest

from cdmpi import metrics

from conftest import REPO, run_cdmpi, run_main

pytestmark = pytest.mark.mpi  # every test here starts mpiexec


def test_mushrooms_with_20_workers_counts_bits_exactly(tmp_path):
    out = tmp_path / "mushrooms.h5"
    result = run_cdmpi(["train", REPO / "configs/logreg/mushrooms.toml", "--out", out, "--set", "run.steps=12",
                        "--quiet"], ranks=21)
    assert result.returncode == 0, result.stderr
    run = metrics.read(out)
    d = run["attrs"]["dim"]
    assert d == 112 and run["attrs"]["n_workers"] == 20 and run["attrs"]["world_size"] == 21
    per_step = 20 * 8 * (4 + -(-d // 8))  # a 4-byte scale and d sign bits, up from and down to 20 workers
    np.testing.assert_array_equal(np.diff(run["train"]["bits_up"]), per_step)
    np.testing.assert_array_equal(np.diff(run["train"]["bits_down"]), per_step)
    assert run["train"]["grad_norm_sq"][-1] < run["train"]["grad_norm_sq"][0]
    report = run_main(["report", out, "--json"])
    assert report.returncode == 0 and '"algorithm": "cdadam"' in report.stdout
