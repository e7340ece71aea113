"""Step 3: networks, the CIFAR-10 reader, flat parameters, samplers, augmentation, and a WRN-16-4 run
under MPI that must match the in-process backend bit for bit."""

import pickle
import tarfile

import numpy as np
import pytest
import torch

from cdmpi import catalog, config, images, metrics, nets, train
from cdmpi.errors import CdmpiError
from cdmpi.problems.classifier import flatten_
from cdmpi.problems.sampling import EpochSampler

from conftest import REPO, run_cdmpi, run_main, write_config


def test_network_parameter_counts():
    # ResNet-18 and VGG-16-BN as in kuangliu/pytorch-cifar; WRN-16-4 as in Zagoruyko & Komodakis.
    counts = {name: nets.n_params(make()) for name, make in nets.NETWORKS.items() if name != "small_cnn"}
    assert counts == {"resnet18": 11_173_962, "vgg16": 14_728_266, "wrn16_4": 2_748_890}


def test_networks_map_cifar_images_to_ten_logits():
    x = torch.zeros(1, 3, 32, 32)
    for name in ("resnet18", "vgg16", "wrn16_4"):
        assert nets.NETWORKS[name]()(x).shape == (1, 10)


def _batch(n, seed):
    rng = np.random.default_rng(seed)
    # The real files are Python 2 pickles of a dict with byte-string keys and a (n, 3072) uint8 array.
    return {b"batch_label": b"batch", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"img%d.png" % i for i in range(n)]}


def write_cifar_folder(root):
    folder = root / images.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    batches = {name: _batch(3, i) for i, name in enumerate(images.CIFAR10_TRAIN + (images.CIFAR10_TEST,))}
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [b"c%d" % i for i in range(10)], b"num_cases_per_batch": 3, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, batches


def test_cifar_folder_in_the_real_format(tmp_path, monkeypatch):
    folder, batches = write_cifar_folder(tmp_path)
    monkeypatch.setenv("CDMPI_DATA_DIR", str(tmp_path))
    ds = images.locate_cifar10(allow_download=False)
    assert ds.train_images.shape == (15, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.classes == 10
    first = batches["data_batch_1"][b"data"]
    # Row layout of the real format: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    c, y, x = 2, 5, 17
    assert int(ds.train_images[1, c, y, x]) == int(first[1, c * 1024 + y * 32 + x])
    last = batches["data_batch_5"]
    assert ds.train_labels[-3:].tolist() == last[b"labels"]
    assert ds.test_labels.tolist() == batches["test_batch"][b"labels"]


def test_cifar_archive_is_checked_then_read_in_place(tmp_path):
    folder, batches = write_cifar_folder(tmp_path / "src")
    archive = tmp_path / images.CIFAR10_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=images.CIFAR10_FOLDER)
    with pytest.raises(CdmpiError, match="sha256"):
        images.read_cifar10_archive(archive)  # a tiny archive is not the official one
    from cdmpi.data import sha256_of

    ds = images.read_cifar10_archive(archive, sha256=sha256_of(archive))
    assert ds.test_labels.tolist() == batches["test_batch"][b"labels"]


class _Hostile:
    def __reduce__(self):
        return (open, ("/tmp/cdmpi-hostile-pickle-ran", "w"))


def test_cifar_reader_refuses_arbitrary_objects(tmp_path):
    raw = pickle.dumps({b"data": _Hostile(), b"labels": []}, protocol=2)
    with pytest.raises(CdmpiError, match="refusing to load"):
        images.read_batch(raw, "evil")
    from pathlib import Path

    assert not Path("/tmp/cdmpi-hostile-pickle-ran").exists()


def test_rank_0_prefetches_the_cifar_archive_once(tmp_path, monkeypatch):
    """data.prefetch (rank 0, before the other ranks build) downloads the archive into the cache; with the
    archive there it downloads nothing, and with $CDMPI_DATA_DIR holding the data it never looks."""
    from cdmpi import data

    calls = []

    def fake_fetch(url, dest, sha256, name, timeout=60.0):
        calls.append((url, dest))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"archive")
        return dest

    monkeypatch.setattr(data, "fetch", fake_fetch)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))
    data.prefetch("cifar10")
    data.prefetch("cifar10")
    assert [c[0] for c in calls] == [images.CIFAR10_URL]
    assert calls[0][1] == tmp_path / "cache" / "cifar10" / images.CIFAR10_ARCHIVE
    (tmp_path / "data" / images.CIFAR10_FOLDER).mkdir(parents=True)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "data"))
    calls[0][1].unlink()  # no archive in the cache now: only $CDMPI_DATA_DIR holds the data
    data.prefetch("cifar10")
    assert len(calls) == 1
    assert images.cifar10_source() == tmp_path / "data" / images.CIFAR10_FOLDER


def test_module_parameters_are_views_into_the_flat_vector():
    torch.manual_seed(0)
    model = nets.NETWORKS["small_cnn"]()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    grad = torch.zeros_like(flat)
    flatten_(model.parameters(), flat, grad)
    x = torch.randn(3, 1, 8, 8)
    before = model(x).detach().clone()
    flat.mul_(0.5)  # what an optimiser does to x reaches the network with no copy
    assert not torch.equal(before, model(x))
    model(x).sum().backward()
    assert grad.abs().sum() > 0
    assert torch.equal(grad, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))


def test_epoch_sampler_covers_each_epoch_and_resumes():
    a = EpochSampler(10, 3, seed=4, index=1)
    epoch0 = torch.cat([a.next() for _ in range(3)])
    assert len(set(epoch0.tolist())) == 9  # without replacement; the last partial batch is dropped
    a.next()
    state = a.state_dict()
    rest = [a.next() for _ in range(4)]
    b = EpochSampler(10, 3, seed=4, index=1)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, [b.next() for _ in range(4)]))


def test_augment_is_a_padded_crop_or_its_mirror():
    batch = torch.rand(5, 3, 6, 6)
    out = images.augment(batch, torch.Generator().manual_seed(3), pad=2)
    padded = torch.nn.functional.pad(batch, (2, 2, 2, 2))
    for i in range(5):
        crops = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)


def test_lr_schedule_divides_at_milestone_epochs():
    cfg = config.from_dict({"run": {"epochs": 10}, "optim": {"lr": 1.0, "lr_milestones": [5, 8]}})
    assert [train.lr_at(t, cfg, 4) for t in (0, 19, 20, 31, 32)] == [1.0, 1.0, 0.1, 0.1, pytest.approx(0.01)]


@pytest.mark.parametrize("override,message", [
    ("comm.cuda_aware='maybe'", "comm.cuda_aware"), ("optim.lr_milestones=[5]", "need run.epochs"),
    ("problem.model='resnet50'", "unknown model"), ("data.dataset='mnist'", "unknown image dataset"),
])
def test_bad_classifier_settings_give_one_line_errors(tmp_path, override, message):
    cfg = write_config(tmp_path / "c.toml", WRN_CONFIG)
    r = run_main(["train", cfg, "--backend", "local", "--set", override, "--out", tmp_path / "x.h5", "--quiet"])
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


WRN_CONFIG = """
[run]
steps = 3
workers = 2
dtype = "float32"
seed = 1
[data]
dataset = "synthetic_images"
samples = 16
test_samples = 8
image_size = 8
batch_size = 4
[problem]
name = "classifier"
model = "wrn16_4"
[optim]
lr = 1e-3
weight_decay = 5e-4
"""


@pytest.mark.mpi
def test_wrn16_4_under_mpi_matches_in_process_bit_for_bit(tmp_path):
    cfg = write_config(tmp_path / "wrn.toml", WRN_CONFIG)
    local, mpi = tmp_path / "local.h5", tmp_path / "mpi.h5"
    r1 = run_main(["train", cfg, "--backend", "local", "--out", local, "--quiet"])
    assert r1.returncode == 0, r1.stderr
    # cuda_aware = false stages every frame through host buffers: the path GPUs without CUDA-aware MPI take.
    r2 = run_cdmpi(["train", cfg, "--set", "comm.cuda_aware=false", "--out", mpi, "--quiet"], ranks=3, timeout=180)
    assert r2.returncode == 0, r2.stderr
    a, b = metrics.read(local), metrics.read(mpi)
    assert b["attrs"]["backend"] == "mpi" and b["attrs"]["comm_path"] == "staged"
    assert a["attrs"]["dim"] == 2_748_890  # WRN-16-4, 3 channels, 10 classes
    for column in ("step", "loss", "grad_norm_sq", "bits_up", "bits_down"):
        np.testing.assert_array_equal(a["train"][column], b["train"][column])
    for column in ("step", "epoch", "loss", "accuracy"):
        np.testing.assert_array_equal(a["eval"][column], b["eval"][column])
    assert a["eval"]["step"].tolist() == [0, 2, 3]  # start, each epoch (2 steps of 4 of 8 images), end
    assert np.all(np.isfinite(a["train"]["loss"]))


def test_cifar10_configs_hold_the_section_7_2_setup():
    from pathlib import Path

    files = sorted(Path(REPO / "configs" / "cifar10").glob("*.toml"))
    assert len(files) == 12
    for path in files:
        cfg = config.load(path)
        assert (cfg.run.workers, cfg.run.epochs, cfg.data.batch_size) == (8, 100, 128)
        assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay) == (0.9, 0.99, 5e-4)
        assert cfg.optim.lr_milestones == (50, 75) and cfg.optim.lr_gamma == 0.1
        assert cfg.optim.lr == (0.1 if cfg.optim.algorithm == "ef21" else 1e-4)
        if cfg.optim.algorithm == "ef21":
            assert catalog.compressor_for("ef21", cfg.compress.name) == "topk" and cfg.compress.ratio == 0.016
        if cfg.optim.algorithm == "onebit-adam":
            assert cfg.optim.warmup_steps == 13 * (50_000 // 8 // 128)  # 13 epochs


def test_training_row_is_mean_minibatch_loss_and_mean_squared_gradient_norm(tmp_path):
    """Row 0 of a run, against the README's definition computed here with plain autograd."""
    import torch.nn.functional as F

    from cdmpi.transport import LocalTransport

    cfg = config.from_dict({"run": {"steps": 1, "workers": 2, "dtype": "float32", "seed": 4},
                            "data": {"dataset": "digits", "batch_size": 16, "augment": False},
                            "problem": {"name": "classifier", "model": "small_cnn"},
                            "optim": {"weight_decay": 0.01}})
    train.build(cfg, LocalTransport(2), out=tmp_path / "run.h5").run()
    row = metrics.read(tmp_path / "run.h5")["train"]
    ds = images.digits(seed=4)
    bounds = [(0, len(ds.train_labels) // 2), (len(ds.train_labels) // 2, len(ds.train_labels))]
    losses, norms = [], []
    for i, (lo, hi) in enumerate(bounds):
        torch.manual_seed(4)
        model = nets.NETWORKS["small_cnn"]()
        rows = EpochSampler(hi - lo, 16, seed=4, index=i).next()
        x = (ds.train_images[lo:hi][rows] - ds.mean[0]) / ds.std[0]
        loss = F.cross_entropy(model(x), ds.train_labels[lo:hi][rows])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        g = torch.cat([gr.reshape(-1) for gr in grads]) + 0.01 * torch.nn.utils.parameters_to_vector(
            model.parameters()).detach()
        losses.append(loss.item())
        norms.append(float(g.double().pow(2).sum()))
    assert row["step"][0] == 0
    assert float(row["loss"][0]) == pytest.approx(np.mean(losses), rel=1e-5)
    assert float(row["grad_norm_sq"][0]) == pytest.approx(np.mean(norms), rel=1e-4)
