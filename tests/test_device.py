"""The device paths. On CPU-only machines these run on the CPU; `CDMPI_TEST_DEVICE=cuda` (bench/gpu_check.sh)
runs them on the GPU, where a missing CUDA device is a failure, not a skip."""

import os

import numpy as np
import pytest
import torch

from cdmpi import compress, devices, metrics, wire

from cdmpi.errors import CdmpiError

from conftest import SMALL_CONFIG, run_cdmpi, run_main, write_config
from test_compress import expected_c

DEVICE = os.environ.get("CDMPI_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def device():
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail("CDMPI_TEST_DEVICE asks for CUDA, but torch sees no CUDA device")
    return torch.device(DEVICE)


@pytest.mark.parametrize("d", [1, 8, 13, 1000, 4099])
def test_sign_bits_are_packed_on_the_device_like_np_packbits(device, d):
    x = torch.randn(d, generator=torch.Generator().manual_seed(d)).to(device)
    x[::7] = 0.0  # sign(0) = +1
    out = torch.empty(wire.sign_nbytes(d), dtype=torch.uint8, device=device)
    wire.pack_signs(x, out)
    assert out.device.type == device.type
    expected = np.packbits((x.cpu().numpy() >= 0).astype(np.uint8), bitorder="big")
    np.testing.assert_array_equal(out.cpu().numpy(), expected)
    np.testing.assert_array_equal(wire.unpack_signs(out, d, torch.float32).cpu().numpy(),
                                  np.where(x.cpu().numpy() >= 0, 1.0, -1.0))


@pytest.mark.parametrize("name", sorted(compress.COMPRESSORS))
def test_a_frame_decodes_the_same_on_the_device_and_on_the_host(device, name):
    c = compress.make(name, 1001, ratio=0.05)
    x = torch.randn(1001, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    frame = c.new_frame()
    c.encode(x, frame, key=9)
    on_device = c.decode(frame.to(device), torch.float64, key=9)
    assert on_device.device.type == device.type
    np.testing.assert_array_equal(on_device.cpu().numpy(), expected_c(name, x.numpy(), getattr(c, "k", 1001), 9))


def test_worker_device_follows_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto", local_rank=3) == torch.device("cpu")
    with pytest.raises(CdmpiError, match="no CUDA device"):
        devices.resolve("cuda", local_rank=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a node with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [devices.resolve("auto", local_rank=r) for r in range(4)] == [torch.device(f"cuda:{i}") for i in (0, 1, 0, 1)]
    assert devices.resolve("cuda:1", local_rank=0) == torch.device("cuda:1")
    with pytest.raises(CdmpiError, match="does not exist"):
        devices.resolve("cuda:5", local_rank=0)


@pytest.mark.mpi
def test_direct_and_staged_frames_agree_under_mpi(tmp_path, device):
    """Workers on DEVICE: in-process, MPI with frames staged through host buffers, and MPI with the default
    path (direct for host frames, or for device frames when MPI is CUDA-aware) give the same bits."""
    cfg = write_config(tmp_path / "small.toml", SMALL_CONFIG + f'\n[comm]\nworker_device = "{device.type}"\n')
    outs = {k: tmp_path / f"{k}.h5" for k in ("local", "staged", "auto")}
    r = run_main(["train", cfg, "--backend", "local", "--set", "run.workers=2", "--out", outs["local"], "--quiet"])
    assert r.returncode == 0, r.stderr
    for key, value in (("staged", "false"), ("auto", "auto")):
        r = run_cdmpi(["train", cfg, "--set", f"comm.cuda_aware={value}", "--out", outs[key], "--quiet"], ranks=3)
        assert r.returncode == 0, r.stderr
    runs = {k: metrics.read(v) for k, v in outs.items()}
    assert runs["staged"]["attrs"]["comm_path"] == "staged"
    assert runs["auto"]["attrs"]["comm_path"] != "staged" or device.type == "cuda"  # host frames go direct
    for column in ("loss", "grad_norm_sq", "bits_up"):
        np.testing.assert_array_equal(runs["local"]["train"][column], runs["staged"]["train"][column])
        np.testing.assert_array_equal(runs["local"]["train"][column], runs["auto"]["train"][column])
