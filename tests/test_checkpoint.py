"""Checkpoint bookkeeping and the metrics file's resume, in process (no MPI): quick checks of the pieces
the whole-system tests in test_reliability.py rely on."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from cdmpi import algorithms, checkpoint, cli, config, metrics, train
from cdmpi.errors import CdmpiError
from cdmpi.transport import LocalTransport

from conftest import REPO, SMALL_CONFIG, run_main

MUSHROOMS = REPO / "configs" / "logreg" / "mushrooms.toml"


def test_config_hash_ignores_only_the_keys_that_may_change():
    base = config.from_dict({})
    same = [config.from_dict({}, [o]) for o in ("run.steps=7", "run.threads=3", "run.flush_every=2",
                                                 "run.log_every=5", "run.workers=9", "checkpoint.every=3",
                                                 "checkpoint.keep=0", "checkpoint.dir='x'")]
    assert {checkpoint.config_hash(c) for c in same} == {checkpoint.config_hash(base)}
    for override in ("run.seed=1", "optim.lr=0.1", "compress.name='topk'", "data.batch_size=4", "run.dtype='float32'"):
        assert checkpoint.config_hash(config.from_dict({}, [override])) != checkpoint.config_hash(base), override


def test_checkpoint_root_sits_next_to_the_metrics_file(tmp_path):
    cfg = config.from_dict({})
    assert checkpoint.root_for(cfg, tmp_path / "RUN.h5") == tmp_path / "RUN.ckpt"
    moved = config.from_dict({}, [f"checkpoint.dir='{tmp_path / 'elsewhere'}'"])
    assert checkpoint.root_for(moved, tmp_path / "RUN.h5") == tmp_path / "elsewhere"


def test_unfinished_and_damaged_checkpoints(tmp_path):
    (tmp_path / "step-000000030.tmp").mkdir()  # a write that never finished
    (tmp_path / "step-000000010").mkdir()
    (tmp_path / "step-000000020").mkdir()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000000020", "step-000000010"]
    with pytest.raises(CdmpiError, match="manifest.json not found"):
        checkpoint.validate(tmp_path / "step-000000010")
    manifest = tmp_path / "step-000000020" / "manifest.json"
    manifest.write_text('{"format_version": 1, "step": 20, "fi')
    with pytest.raises(CdmpiError, match=f"manifest {manifest} is corrupt"):
        checkpoint.validate(manifest.parent)
    with pytest.raises(CdmpiError, match=f"manifest {manifest} is corrupt: 'n_workers, world_size"):
        manifest.write_text(json.dumps({"format_version": checkpoint.FORMAT_VERSION, "step": 20, "files": {}}))
        checkpoint.validate(manifest.parent)
    cfg = config.from_dict({"run": {"workers": 1}})
    manifest.write_text(json.dumps({"format_version": checkpoint.FORMAT_VERSION, "step": 20, "n_workers": 1,
                                    "world_size": 1, "backend": "local", "d": 50, "config": cfg.to_dict(),
                                    "config_hash": checkpoint.config_hash(cfg),
                                    "files": {"server.pt": {"nbytes": 3, "sha256": "0" * 64}}}))
    (manifest.parent / "server.pt").write_bytes(b"abc")
    with pytest.raises(CdmpiError, match="server.pt is corrupt: its sha256"):
        checkpoint.validate(manifest.parent)
    engine = train.build(cfg, LocalTransport(1)).engine
    with pytest.raises(CdmpiError, match="no valid checkpoint found"):
        engine.resume(str(tmp_path), tmp_path)
    warnings = []
    assert engine.resume("auto", tmp_path, warnings.append) is None
    assert len(warnings) == 2


def _writer(path, **kw):
    return metrics.MetricsWriter(path, {"config": "{}"}, flush_every=2, **kw)


def _row(step):
    return {"step": step, "loss": float(step), "grad_norm_sq": 0.0, "bits_up": step, "bits_down": step,
            "wall_time": 0.0}


def test_metrics_resume_drops_rows_at_and_after_the_checkpoint(tmp_path):
    path = tmp_path / "m.h5"
    w = _writer(path)
    for step in range(7):
        w.append("train", _row(step))
    w.close()
    w = _writer(path, resume_step=4)
    with pytest.raises(ValueError, match="steps must increase"):
        w.append("train", _row(3))
    for step in range(4, 9):
        w.append("train", _row(step))
    w.close()
    data = metrics.read(path)
    np.testing.assert_array_equal(data["train"]["step"], np.arange(9))
    np.testing.assert_array_equal(data["train"]["loss"], np.arange(9.0))
    assert list(data["attrs"]["resumed_at_steps"]) == [4]
    with pytest.raises(CdmpiError, match="not found"):
        _writer(tmp_path / "missing.h5", resume_step=4)


def test_a_failed_flush_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "m.h5"
    w = _writer(path)
    w.append("train", _row(0))
    w.append("train", _row(1))  # flushed
    w.append("train", {**_row(2), "loss": "not a number"})
    with pytest.raises(ValueError):
        w.append("train", _row(3))  # this flush fails: a value is not a number
    assert {name: len(v) for name, v in metrics.read(path)["train"].items()} == dict.fromkeys(metrics.TRAIN_COLUMNS, 2)


@pytest.mark.parametrize("name", sorted(algorithms.ALGORITHMS))
def test_every_algorithm_resumes_bit_exactly_in_process(tmp_path, name, capsys):
    """T steps == T/2 steps + a resume to T, for every registered algorithm and its default compressor
    (its whole state, error-feedback memories included, must be in its state_dict)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(SMALL_CONFIG)
    common = ["train", str(cfg), "--backend", "local", "--workers", "3", "--quiet",
              "--set", f"optim.algorithm='{name}'",
              "--set", f"compress.name='{algorithms.ALGORITHMS[name].compressors[0]}'",
              "--set", "checkpoint.every=4", "--set", "data.batch_size=5",
              "--set", "optim.warmup_steps=6"]  # onebit-adam freezes its variance before the resume point
    full, half = tmp_path / "full.h5", tmp_path / "half.h5"
    assert cli.main([*common, "--out", str(full), "--set", "run.steps=16"]) == 0
    assert cli.main([*common, "--out", str(half), "--set", "run.steps=8"]) == 0
    assert cli.main([*common, "--out", str(half), "--set", "run.steps=16", "--resume", "auto"]) == 0
    assert list(metrics.read(half)["attrs"]["resumed_at_steps"]) == [8]
    a, b = metrics.read(full)["train"], metrics.read(half)["train"]
    for column in ("step", "loss", "grad_norm_sq", "bits_up", "bits_down"):
        np.testing.assert_array_equal(a[column], b[column], err_msg=column)
    for i in range(3):
        x, y = (torch.load(checkpoint.step_dir(out.with_suffix(".ckpt"), 16) / f"worker-{i:04d}.pt",
                           weights_only=True)["state"] for out in (full, half))
        assert torch.equal(x["params"], y["params"])


def test_resume_refuses_rows_changed_since_the_checkpoint_and_names_another_version(tmp_path):
    """A resume carries the metrics file's rows on: it checks them against the sha256 its checkpoint
    recorded, and says so when the checkpoint was written by other cdmpi code."""
    out = tmp_path / "run.h5"
    base = ["train", MUSHROOMS, "--backend", "local", "--workers", 2, "--set", "run.steps=30",
            "--set", "checkpoint.every=10", "--out", out, "--quiet"]
    assert run_main(base).returncode == 0
    manifests = sorted(out.with_suffix(".ckpt").glob("step-*/manifest.json"))
    assert manifests and all(json.loads(m.read_text())["metrics_sha256"] for m in manifests)
    latest = manifests[-1]
    manifest = json.loads(latest.read_text())
    manifest["git_commit"] = "0123456789ab"
    latest.write_text(json.dumps(manifest))
    resumed = run_main(base + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "written by cdmpi" in resumed.stderr and "0123456789ab" in resumed.stderr
    with h5py.File(out, "r+") as fh:
        fh["train/loss"][1] += 1.0  # an edited value before the checkpoint's step
    changed = run_main(base + ["--resume", "auto"])
    assert changed.returncode == 2 and "not the ones the checkpoint's run wrote" in changed.stderr, changed.stderr
