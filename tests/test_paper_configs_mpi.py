"""The paper's configuration under a real 21-rank MPI job (20 workers), shortened to a few steps."""

import numpy as np

from cdmpi import metrics

from conftest import REPO, SHARED_LIBSVM, run_cdmpi

import pytest


@pytest.mark.skipif(not (SHARED_LIBSVM / "a9a").exists(), reason="no shared LIBSVM folder")
def test_a9a_with_20_workers_counts_bits_exactly(tmp_path):
    out = tmp_path / "a9a.h5"
    result = run_cdmpi(["train", REPO / "configs/logreg/a9a.toml", "--out", out, "--set", "run.steps=12",
                        "--quiet"], ranks=21, timeout=300)
    assert result.returncode == 0, result.stderr
    run = metrics.read(out)
    d = run["attrs"]["dim"]
    assert d == 123 and run["attrs"]["n_workers"] == 20 and run["attrs"]["world_size"] == 21
    per_step = 20 * 8 * (4 + -(-d // 8))
    np.testing.assert_array_equal(np.diff(run["train"]["bits_up"]), per_step)
    np.testing.assert_array_equal(np.diff(run["train"]["bits_down"]), per_step)
    assert run["train"]["grad_norm_sq"][-1] < run["train"]["grad_norm_sq"][0]
    report = run_cdmpi(["report", out, "--json"])
    assert report.returncode == 0 and '"algorithm": "cdadam"' in report.stdout
