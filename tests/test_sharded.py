"""The sharded topology: worker s serves slice s of the vector, one compressor per slice.

Checked here: the sliced frame against np.packbits and per-slice scales; every algorithm with sliced
compressors against the float64 transcription of test_reference_algorithms (its C applied slice by slice);
the MPI backend (Alltoallv + Allgatherv) against the in-process backend, bit for bit; the frame bytes each
rank receives against the formula; and a checkpoint of a sharded run resumed on the other backend.
"""

import numpy as np
import pytest
import torch

import test_reference_algorithms as ref
from cdmpi import compress, metrics
from cdmpi.control import HEADER_NBYTES
from cdmpi.errors import CdmpiError

from conftest import finish, rank_pid, run_cdmpi, run_main, wait_for

SLICES = 4


def bounds(d, n_slices=SLICES):
    return [s * d // n_slices for s in range(n_slices + 1)]


# ---- the compressor ----------------------------------------------------------------------------------

@pytest.mark.parametrize("d,n_slices", [(21, 4), (100_003, 7), (8, 8), (65_536 * 2 + 5, 3)])
def test_sliced_scaled_sign_frame_is_each_slices_scale_and_packbits(d, n_slices):
    x = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    x[::17] = 0.0  # sign(0) = +1
    sliced = compress.Sliced.make("scaled_sign", d, n_slices)
    frame = sliced.new_frame()
    sliced.encode(x, frame)
    xs = x.numpy()
    cuts = bounds(d, n_slices)
    expected = []
    for lo, hi in zip(cuts, cuts[1:]):
        scale = np.float32(np.abs(xs[lo:hi]).sum() / (hi - lo))
        expected.append(np.frombuffer(scale.tobytes(), np.uint8))
        expected.append(np.packbits(xs[lo:hi] >= 0))
    np.testing.assert_array_equal(frame.numpy(), np.concatenate(expected))
    assert sliced.slice_nbytes == [4 + (hi - lo + 7) // 8 for lo, hi in zip(cuts, cuts[1:])]
    decoded = sliced.decode(frame, torch.float64).numpy()
    for lo, hi in zip(cuts, cuts[1:]):  # a per-slice scale: |decoded| is constant on each slice only
        assert np.unique(np.abs(decoded[lo:hi])).size == 1


@pytest.mark.parametrize("name", ["scaled_sign", "topk", "identity"])
def test_one_slice_is_the_plain_compressor(name):
    d = 300
    x = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain, sliced = compress.make(name, d, k=7), compress.Sliced.make(name, d, 1, k=7)
    a, b = plain.new_frame(), sliced.new_frame()
    plain.encode(x, a)
    sliced.encode(x, b)
    assert torch.equal(a, b)


def test_sliced_identity_frame_is_the_identity_frame():
    """onebit-adam's warm-up frames: the sharded and the star layout of fp32 values coincide."""
    x = torch.randn(1001, dtype=torch.float64)
    a, b = compress.Identity(1001).new_frame(), compress.Sliced.make("identity", 1001, 6).new_frame()
    compress.Identity(1001).encode(x, a)
    compress.Sliced.make("identity", 1001, 6).encode(x, b)
    assert torch.equal(a, b)


def test_slice_of_sees_the_same_frames_and_keys_as_the_whole():
    """The rank serving slice s decodes exactly the worker's slice s, random-k keys included."""
    d, key = 403, compress.stream_key(9, 2, 5)
    sliced = compress.Sliced.make("randk", d, 5, ratio=0.1)
    x = torch.randn(d, dtype=torch.float64)
    frame = sliced.new_frame()
    sliced.encode(x, frame, key)
    whole = sliced.decode(frame, torch.float64, key)
    chosen = []
    for s in range(5):
        part = sliced.slice_of(s)
        lo, hi = sliced.offsets[s], sliced.offsets[s + 1]
        got = part.decode(frame[lo:hi], torch.float64, key)
        assert torch.equal(got, whole[sliced.bounds[s]:sliced.bounds[s + 1]])
        chosen.append(set(torch.nonzero(got).flatten().tolist()))
    assert len({frozenset(c) for c in chosen}) > 1  # the slices draw their own indices


@pytest.mark.parametrize("name", ["scaled_sign", "topk"])
def test_sliced_is_a_contraction_with_the_smallest_slice_pi(name):
    """Assumption 4.1 for C_S: ||C_S(x) - x||^2 <= (1 - pi) ||x||^2 with pi = min over slices."""
    d = 1000
    sliced = compress.Sliced.make(name, d, 7, ratio=0.05)
    assert sliced.contraction() == min(1 / (hi - lo) if name == "scaled_sign" else
                                       round(0.05 * (hi - lo)) / (hi - lo) for lo, hi in zip(sliced.bounds, sliced.bounds[1:]))
    for seed in range(20):
        x = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) ** 3
        err = float(((sliced(x) - x) ** 2).sum())
        assert err <= (1 - sliced.contraction()) * float((x ** 2).sum()) * (1 + 1e-6)
        assert err > 0


def test_too_many_slices_is_a_clear_error():
    with pytest.raises(CdmpiError, match="cannot cut d = 3 coordinates into 4"):
        compress.Sliced.make("scaled_sign", 3, 4)


# ---- every algorithm against the float64 transcription -------------------------------------------------

def sliced_reference_compressors(monkeypatch):
    """test_reference_algorithms' C, applied to each of SLICES slices on its own (top-k: k per slice)."""
    cuts = bounds(ref.D)
    sizes = [hi - lo for lo, hi in zip(cuts, cuts[1:])]

    def per_slice(c_of_size):
        def c(x):
            return np.concatenate([c_of_size(x[lo:hi], hi - lo) for lo, hi in zip(cuts, cuts[1:])])
        return c

    def top_k(x, size):
        k = max(1, round(ref.K * size / ref.D))
        out = np.zeros_like(x)
        keep = np.argsort(-np.abs(x), kind="stable")[:k]
        out[keep] = ref.f32(x[keep])
        return out

    monkeypatch.setitem(ref.COMPRESS, "scaled_sign", per_slice(lambda x, size: ref.scaled_sign(x)))
    monkeypatch.setitem(ref.COMPRESS, "topk", per_slice(top_k))
    return sizes


@pytest.mark.parametrize("name,compressor", [c for c in ref.CASES if c[1] != "identity"])
def test_sharded_matches_float64_transcription(monkeypatch, name, compressor):
    sliced_reference_compressors(monkeypatch)
    a, b, x0 = ref.make_problem()
    want = ref.reference(name, compressor, a, b, x0)
    got, _ = ref.package(name, compressor, a, b, x0, settings={"comm.topology": "sharded"})
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_sharded_really_changes_the_compressor(monkeypatch):
    """Guards the test above: one scale per slice gives another trajectory than one scale in all."""
    a, b, x0 = ref.make_problem()
    star = ref.reference("cdadam", "scaled_sign", a, b, x0)
    sliced_reference_compressors(monkeypatch)
    sharded = ref.reference("cdadam", "scaled_sign", a, b, x0)
    assert np.abs(star[-1] - sharded[-1]).max() > 1e-6


# ---- the whole system: MPI against in-process, bytes, checkpoints -------------------------------------

SHARDED = ["--set", 'comm.topology="sharded"']


def _train(config, out, *args, ranks=None, workers=None):
    backend = ["--backend", "local", "--workers", workers] if ranks is None else []
    result = run_cdmpi(["train", config, *SHARDED, *args, *backend, "--out", out, "--quiet"], ranks=ranks,
                       timeout=180)
    assert result.returncode == 0, result.stderr
    return metrics.read(out)


@pytest.mark.parametrize("name,compressor,workers", [("cdadam", "scaled_sign", 4), ("onebit-adam", "auto", 2),
                                                     ("amsgrad-ef", "randk", 2), ("ef21", "topk", 2)])
@pytest.mark.mpi
def test_sharded_mpi_matches_local(tmp_path, small_config, name, compressor, workers):
    sets = ["--set", f'optim.algorithm="{name}"', "--set", f'compress.name="{compressor}"',
            "--set", "run.steps=12", "--set", "optim.warmup_steps=5"]
    local = _train(small_config, tmp_path / "local.h5", *sets, workers=workers)
    mpi = _train(small_config, tmp_path / "mpi.h5", *sets, ranks=workers + 1)
    assert mpi["attrs"]["topology"] == "sharded" and mpi["attrs"]["backend"] == "mpi"
    for column in ("loss", "grad_norm_sq", "bits_up", "bits_down"):
        np.testing.assert_array_equal(local["train"][column], mpi["train"][column])
    np.testing.assert_array_equal(local["final"]["params"], mpi["final"]["params"])
    assert local["train"]["loss"][-1] != local["train"]["loss"][0]
    if name == "cdadam":  # d = 20 in 4 slices of 5: 4 scales and 4 sign bytes per frame
        d, up = 20, 4 * (4 + 1)
        assert mpi["attrs"]["up_frame_nbytes"] == up
        np.testing.assert_array_equal(np.diff(mpi["train"]["bits_up"]), 8 * workers * up)
        # Bytes each rank received per step: every rank the control words of the 4 others
        # (Allgather); worker s also slice s from the 3 others (Alltoallv) and the 3 other slices of the down
        # frame (Allgatherv).
        control = 4 * HEADER_NBYTES
        np.testing.assert_array_equal(mpi["comm"]["inbound_nbytes_per_step"],
                                      [control] + [control + 3 * 5 + 3 * 5] * 4)
        assert mpi["attrs"]["dim"] == d


@pytest.mark.mpi
def test_sharded_staged_path_matches_local(tmp_path, small_config):
    """comm.cuda_aware = false copies frames through host staging buffers (the path of GPU workers under an
    MPI that is not CUDA-aware); with CPU frames the same code runs here and must give the same bits."""
    sets = ["--set", "run.steps=8", "--set", 'comm.cuda_aware="false"']
    local = _train(small_config, tmp_path / "local.h5", *sets, workers=3)
    mpi = _train(small_config, tmp_path / "mpi.h5", *sets, ranks=4)
    assert "staged" in mpi["attrs"]["comm_path"]
    np.testing.assert_array_equal(local["train"]["loss"], mpi["train"]["loss"])
    np.testing.assert_array_equal(local["final"]["params"], mpi["final"]["params"])


@pytest.mark.mpi
def test_star_inbound_bytes_are_n_messages_at_rank_0(tmp_path, small_config):
    out = tmp_path / "star.h5"
    result = run_cdmpi(["train", small_config, "--set", "run.steps=4", "--out", out, "--quiet"], ranks=4)
    assert result.returncode == 0, result.stderr
    got = metrics.read(out)["comm"]["inbound_nbytes_per_step"]
    message = HEADER_NBYTES + 4 + (20 + 7) // 8  # control word, one scale, d = 20 sign bits
    np.testing.assert_array_equal(got, [3 * message, message, message, message])


@pytest.mark.mpi
def test_sharded_checkpoint_resumes_on_the_other_backend(tmp_path, small_config):
    """10 steps in process with a checkpoint, then MPI resumes to 20 (the slice servers' files are named
    by slice, not by rank): the same rows and parameters as 20 steps in one go."""
    straight = _train(small_config, tmp_path / "straight.h5", "--set", "run.steps=20", workers=2)
    first = tmp_path / "split.h5"
    _train(small_config, first, "--set", "run.steps=10", workers=2)
    assert sorted(p.name for p in (tmp_path / "split.ckpt").glob("step-*/*.pt")) == \
        ["server.pt", "slice-0000.pt", "slice-0001.pt", "worker-0000.pt", "worker-0001.pt"]
    resumed = _train(small_config, first, "--set", "run.steps=20", "--resume", "auto", ranks=3)
    assert list(resumed["attrs"]["resumed_at_steps"]) == [10]
    for column in ("step", "loss", "grad_norm_sq", "bits_up", "bits_down"):
        np.testing.assert_array_equal(straight["train"][column], resumed["train"][column])
    np.testing.assert_array_equal(straight["final"]["params"], resumed["final"]["params"])


def test_sharded_with_more_workers_than_coordinates_is_a_clear_error(tmp_path, small_config):
    result = run_main(["train", small_config, *SHARDED, "--backend", "local", "--workers", 25,
                        "--out", tmp_path / "x.h5", "--quiet"])
    assert result.returncode == 2
    assert "d = 20 is less than the 25 workers" in result.stderr
    assert not (tmp_path / "x.h5").exists()


def test_unknown_topology_is_a_clear_error(tmp_path, small_config):
    result = run_main(["train", small_config, "--set", 'comm.topology="ring"', "--backend", "local",
                        "--out", tmp_path / "x.h5", "--quiet"])
    assert result.returncode == 2
    assert "comm.topology must be 'star' or 'sharded', got 'ring'" in result.stderr


def test_report_best_keeps_the_topologies_apart():
    """A sweep over both topologies: `report --best` picks a best run per topology, not one for both."""
    from cdmpi import analysis

    rows = [{"dataset": "w8a", "algorithm": "cdadam", "compressor": "scaled_sign", "topology": topology,
             "final_grad_norm_sq": value, "lr": 0.01, "file": f"{topology}.h5"}
            for topology, value in (("star", 1e-3), ("sharded", 2e-3))]
    assert [r["topology"] for r in analysis.best(rows)] == ["star", "sharded"]


# ---- faults: the sharded exchange must neither hang nor lose state ---------------------------------------

@pytest.mark.mpi
def test_sharded_sigterm_stops_with_a_checkpoint_and_resumes_bit_exactly(tmp_path, small_config):
    import os
    import re
    import signal

    import test_reliability as rel

    sets = ["--set", "run.steps=40", "--set", "checkpoint.every=0", "--set", "checkpoint.check_every=4"]
    straight = _train(small_config, tmp_path / "straight.h5", *sets, workers=3)
    out = tmp_path / "run.h5"
    job = rel.start_mpi_job(["train", small_config, *SHARDED, *sets, "--out", out, "--quiet"],
                            CDMPI_TEST_STEP_SLEEP=0.1)
    wait_for(lambda: out.exists() and metrics.read(out)["train"]["step"].size > 0, job)
    os.kill(rank_pid(job, 2), signal.SIGTERM)  # one worker; the others learn it at the next step
    rc, err = finish(job, timeout=120)
    assert rc == rel.EXIT_STOPPED, err
    step = int(re.search(r"stopped by SIGTERM at step (\d+);", err).group(1))
    assert 0 < step < 40
    resumed = _train(small_config, out, *sets, "--resume", "auto", ranks=4)
    for column in ("step", "loss", "grad_norm_sq", "bits_up", "bits_down"):
        np.testing.assert_array_equal(straight["train"][column], resumed["train"][column])
    np.testing.assert_array_equal(straight["final"]["params"], resumed["final"]["params"])


@pytest.mark.mpi
def test_sharded_worker_killed_mid_exchange_ends_the_job(tmp_path, small_config):
    """A worker that dies leaves the others inside Alltoallv/Allgatherv: the job must still end, fast."""
    import os
    import signal

    import test_reliability as rel

    out = tmp_path / "run.h5"
    job = rel.start_mpi_job(["train", small_config, *SHARDED, "--set", "run.steps=400", "--out", out, "--quiet"],
                            CDMPI_TEST_STEP_SLEEP=0.05)
    wait_for(lambda: out.exists() and metrics.read(out)["train"]["step"].size > 0, job)
    os.kill(rank_pid(job, 2), signal.SIGKILL)
    rc, _ = finish(job, timeout=120)  # a hang fails here
    assert rc != 0
