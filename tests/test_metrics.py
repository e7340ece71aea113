"""The HDF5 metrics file: layout, buffered flushes, crash loses at most flush_every rows, report."""

import json
import re

import h5py
import numpy as np
import pytest

from cdmpi import metrics
from cdmpi.errors import CdmpiError

from conftest import run_main


def row(step):
    return {"step": step, "loss": 1.0 / (step + 1), "grad_norm_sq": 2.0 / (step + 1), "bits_up": 10 * step,
            "bits_down": 20 * step, "wall_time": 0.1 * step}


def test_rows_are_flushed_every_k_and_survive_without_close(tmp_path):
    path = tmp_path / "m.h5"
    writer = metrics.MetricsWriter(path, {"algorithm": "cdadam"}, flush_every=4)
    for step in range(11):
        writer.append("train", row(step))
    # No close(): a crash now loses only the 3 buffered rows; the file is readable.
    run = metrics.read(path)
    np.testing.assert_array_equal(run["train"]["step"], np.arange(8))
    writer.close()
    run = metrics.read(path)
    np.testing.assert_array_equal(run["train"]["step"], np.arange(11))
    assert run["attrs"]["algorithm"] == "cdadam" and run["attrs"]["format_version"] == metrics.FORMAT_VERSION
    with h5py.File(path) as fh:
        assert fh["train/bits_up"].dtype == np.int64 and fh["train/bits_up"].attrs["units"] == "bits"


def test_steps_must_increase(tmp_path):
    writer = metrics.MetricsWriter(tmp_path / "m.h5", {})
    writer.append("train", row(3))
    with pytest.raises(ValueError, match="increase"):
        writer.append("train", row(3))


def test_reader_errors(tmp_path):
    with pytest.raises(CdmpiError, match="not found"):
        metrics.read(tmp_path / "none.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(CdmpiError, match="cannot read"):
        metrics.read(tmp_path / "junk.h5", retry_seconds=0.1)


def test_train_writes_documented_attributes_and_report(tmp_path, small_config):
    out = tmp_path / "run.h5"
    result = run_main(["train", small_config, "--backend", "local", "--out", out, "--quiet"])
    assert result.returncode == 0, result.stderr
    run = metrics.read(out)
    for key in ("config", "algorithm", "compressor", "n_workers", "dim", "world_size", "backend",
                "mpi_library", "cdmpi_version", "created"):
        assert key in run["attrs"], key
    assert run["attrs"]["config"]["optim"]["lr"] == 0.01
    lengths = {len(v) for v in run["train"].values()}
    assert lengths == {31}
    np.testing.assert_array_equal(run["train"]["step"], np.arange(31))
    # d = 20: a scaled-sign frame is a 4-byte scale and 3 sign bytes, up from 4 workers and down to them
    np.testing.assert_array_equal(run["train"]["bits_up"], np.arange(31) * 4 * (4 + 3) * 8)
    np.testing.assert_array_equal(run["train"]["bits_down"], np.arange(31) * 4 * (4 + 3) * 8)
    as_json = json.loads(run_main(["report", out, "--json"]).stdout)[0]
    assert as_json["steps"] == 30 and as_json["workers"] == 4 and as_json["bits_total"] == 2 * 30 * 4 * 7 * 8
    assert as_json["min_grad_norm_sq"] == run["train"]["grad_norm_sq"].min()
    assert as_json["final_grad_norm_sq"] == run["train"]["grad_norm_sq"][-1]
    table = run_main(["report", out])
    assert table.returncode == 0
    assert re.search(r"^\S+run\.h5\s+cdadam\s+scaled_sign\s+star\s+4\s+0.01\s+30\s", table.stdout, re.M), table.stdout
    bad = run_main(["report", tmp_path / "missing.h5"])
    assert bad.returncode == 2 and "metrics file not found" in bad.stderr
