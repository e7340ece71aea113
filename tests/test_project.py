"""The quadratic benchmark problem under mpiexec (bytes per step, timing, bit-identity with the
in-process backend), and `cdmpi project` against the model written out here."""

import json

import h5py
import numpy as np
import pytest

from cdmpi.control import HEADER_NBYTES

from conftest import run_cdmpi, run_main

pytestmark = pytest.mark.mpi  # every test here starts mpiexec

D, N, STEPS = 1001, 2, 6

QUADRATIC = f"""
[run]
steps = {STEPS}
workers = {N}
dtype = "float32"
log_every = 3

[problem]
name = "quadratic"
dim = {D}

[optim]
algorithm = "cdadam"
lr = 0.01

[compress]
name = "scaled_sign"
"""


def test_quadratic_mpi_bytes_timing_and_projection(tmp_path):
    cfg = tmp_path / "q.toml"
    cfg.write_text(QUADRATIC)
    mpi, local = tmp_path / "mpi.h5", tmp_path / "local.h5"
    result = run_cdmpi(["train", cfg, "--backend", "mpi", "--out", mpi, "--quiet"], ranks=N + 1, timeout=120)
    assert result.returncode == 0, result.stderr
    result = run_main(["train", cfg, "--backend", "local", "--out", local, "--quiet"])
    assert result.returncode == 0, result.stderr
    with h5py.File(mpi) as fh, h5py.File(local) as fl:
        np.testing.assert_array_equal(fh["final/params"][()], fl["final/params"][()])
        frame = 4 + (D + 7) // 8
        assert fh["train/bits_up"][-1] == 8 * N * frame * STEPS
        assert fh["train/bits_down"][-1] == 8 * N * frame * STEPS
        t = {k: fh["timing"][k][()] for k in fh["timing"]}
        # rows at steps 0, 3 and 6: the metric bytes rank 0 receives on a logged step, over the 6 steps
        metrics_bytes = fh["comm/metrics_inbound_nbytes_per_logged_step"][0] * 3 / STEPS
        assert len(fh["train/step"]) == 3 and metrics_bytes > N * (8 + 4 * D) * 3 / STEPS  # f_i float64, g_i float32
        assert t["worker_compute"].shape == (N,) and t["server_aggregate"].shape == (1,)
        assert all(np.isfinite(v).all() and (v >= 0).all() for v in t.values())  # a time, never negative

    result = run_main(["project", mpi, "--bandwidth", "1,100", "--latency", "1e-5", "--json"])
    assert result.returncode == 0, result.stderr
    star, ring = json.loads(result.stdout)
    per_step = 2 * N * (HEADER_NBYTES + frame)  # messages up and down through rank 0's link
    fixed = t["worker_compute"].mean() + t["worker_encode"].mean() + t["server_aggregate"][0] + t["worker_update"].mean()
    for gbit in (1, 100):
        expected = fixed + 2e-5 + (per_step + metrics_bytes) * 8 / (gbit * 1e9)
        np.testing.assert_allclose(star[f"{gbit} Gbit/s ms"], 1e3 * expected, rtol=1e-9)
        expected_ring = (t["worker_compute"].mean() + t["worker_update"].mean() + 2 * (N - 1) * 1e-5
                         + (2 * (N - 1) / N * 4 * D + metrics_bytes) * 8 / (gbit * 1e9))
        np.testing.assert_allclose(ring[f"{gbit} Gbit/s ms"], 1e3 * expected_ring, rtol=1e-9)

    bad = run_main(["project", mpi, "--bandwidth", "ten"])
    assert bad.returncode == 2 and "--bandwidth" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_projection_of_a_sharded_run_uses_the_busiest_workers_bytes(tmp_path):
    """The sharded model: the busiest link is a worker's, carrying the inbound bytes the run measured,
    the aggregate is the workers' slice work, and each collective costs n - 1 latencies."""
    cfg = tmp_path / "q.toml"
    cfg.write_text(QUADRATIC)
    mpi = tmp_path / "sharded.h5"
    result = run_cdmpi(["train", cfg, "--set", 'comm.topology="sharded"', "--out", mpi, "--quiet"],
                       ranks=N + 1, timeout=120)
    assert result.returncode == 0, result.stderr
    with h5py.File(mpi) as fh:
        inbound = fh["comm/inbound_nbytes_per_step"][()]
        metrics_bytes = fh["comm/metrics_inbound_nbytes_per_logged_step"][0] * 3 / STEPS  # 3 rows in 6 steps
        t = {k: fh["timing"][k][()] for k in fh["timing"]}
    slices = [4 + (500 + 7) // 8, 4 + (501 + 7) // 8]  # d = 1001 in two slices
    # every rank receives the 2 other ranks' control words; worker s also its own slice of the other worker's
    # up frame and the other slice of the down frame
    control = 2 * HEADER_NBYTES
    assert inbound.tolist() == [control, control + slices[0] + slices[1], control + slices[1] + slices[0]]
    result = run_main(["project", mpi, "--bandwidth", "10", "--latency", "1e-5", "--json"])
    assert result.returncode == 0, result.stderr
    sharded, _ = json.loads(result.stdout)
    assert sharded["model"] == "sharded (as measured)" and sharded["link_bytes"] == inbound.max()
    fixed = (t["worker_compute"].mean() + t["worker_encode"].mean() + t["worker_aggregate"].mean()
             + t["worker_update"].mean())
    expected = fixed + 2 * (N - 1) * 1e-5 + (inbound.max() + metrics_bytes) * 8 / 10e9
    np.testing.assert_allclose(sharded["10 Gbit/s ms"], 1e3 * expected, rtol=1e-9)
