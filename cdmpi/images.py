"""Image datasets for the classifier problem: CIFAR-10 (the official python archive, parsed without
torchvision), scikit-learn's 8x8 digits, and seeded synthetic images; batch augmentation with torch ops."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data
from .errors import CdmpiError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
# sha256 of the official archive (170,498,071 bytes), as Keras pins it in keras/datasets/cifar10.py
# (get_file(..., file_hash=...)); the md5 that the CIFAR page lists, c58f30108f718f92721af3b95e74349a,
# belongs to the same file.
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ImageSet:
    name: str
    train_images: torch.Tensor  # (N, C, H, W) uint8 or float32 in [0, 1]
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: tuple[float, ...]  # per channel, applied after scaling to [0, 1]
    std: tuple[float, ...]
    classes: int
    source: str


class _BatchUnpickler(pickle.Unpickler):
    """Only what a CIFAR batch holds: a dict of bytes, lists and one uint8 ndarray. Anything else is refused,
    so a tampered file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2 (str -> bytes; runs nothing else)
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def read_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 3, 32, 32) uint8, labels (n,) int64) of one CIFAR-10 python batch."""
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # a corrupt or hostile file: say which, never run it
        raise CdmpiError(f"{where} is not a CIFAR-10 batch: {err}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise CdmpiError(f"{where} is not a CIFAR-10 batch (no data/labels entries)")
    images, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072 or len(labels) != len(images):
        raise CdmpiError(f"{where}: expected uint8 data of shape (n, 3072) and n labels, got {images.dtype} "
                         f"{images.shape} and {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CdmpiError(f"{where}: labels must be in 0..9")
    return images.reshape(-1, 3, 32, 32), labels


def _read_members(read, where: str) -> ImageSet:
    meta = _BatchUnpickler(io.BytesIO(read("batches.meta")), encoding="bytes").load()
    classes = len(meta.get(b"label_names", [])) or 10
    parts = [read_batch(read(name), f"{where}/{name}") for name in CIFAR10_TRAIN]
    test = read_batch(read(CIFAR10_TEST), f"{where}/{CIFAR10_TEST}")
    return ImageSet("cifar10", torch.from_numpy(np.concatenate([p[0] for p in parts])),
                    torch.from_numpy(np.concatenate([p[1] for p in parts])), torch.from_numpy(test[0]),
                    torch.from_numpy(test[1]), CIFAR10_MEAN, CIFAR10_STD, classes, where)


def read_cifar10_folder(folder: Path) -> ImageSet:
    def read(name):
        path = folder / name
        if not path.is_file():
            raise CdmpiError(f"CIFAR-10 folder {folder} lacks {name}")
        return path.read_bytes()
    return _read_members(read, str(folder))


def read_cifar10_archive(path: Path, sha256: str = CIFAR10_SHA256) -> ImageSet:
    """The official archive, checked against its sha256 and read in place (nothing is extracted)."""
    actual = data.sha256_of(path)
    if actual != sha256:
        raise CdmpiError(f"{path} has sha256 {actual[:12]}..., expected {sha256[:12]}... for the CIFAR-10 "
                         f"python archive; remove or replace it")
    with tarfile.open(path, "r:gz") as tar:
        def read(name):
            try:
                return tar.extractfile(f"{CIFAR10_FOLDER}/{name}").read()
            except (KeyError, AttributeError):
                raise CdmpiError(f"{path} lacks {CIFAR10_FOLDER}/{name}") from None
        return _read_members(read, str(path))


def cifar10_source(allow_download: bool = True) -> Path:
    """Where CIFAR-10 is read from: $CDMPI_DATA_DIR/cifar-10-batches-py/ or .../cifar-10-python.tar.gz, else
    the cached archive, downloaded first if missing. Rank 0 calls this before the others read, so a
    download happens once, not once per rank."""
    data_dir = os.environ.get(data.DATA_DIR_ENV)
    if data_dir:
        if (Path(data_dir) / CIFAR10_FOLDER).is_dir():
            return Path(data_dir) / CIFAR10_FOLDER
        if (Path(data_dir) / CIFAR10_ARCHIVE).is_file():
            return Path(data_dir) / CIFAR10_ARCHIVE
    cached = data.cache_dir().parent / "cifar10" / CIFAR10_ARCHIVE
    if not cached.is_file():
        if not allow_download:
            raise CdmpiError(f"CIFAR-10 is not in ${data.DATA_DIR_ENV} ({data_dir or 'unset'}) nor in {cached}")
        data.fetch(CIFAR10_URL, cached, CIFAR10_SHA256, "cifar10", timeout=600.0)
    return cached


def locate_cifar10(allow_download: bool = True) -> ImageSet:
    source = cifar10_source(allow_download)
    return read_cifar10_folder(source) if source.is_dir() else read_cifar10_archive(source)


def digits(seed: int) -> ImageSet:
    """scikit-learn's 8x8 digits (1797 images), a seeded 80/20 split, pixel values 0..16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng([seed, 11]).permutation(len(labels)))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    mean, std = float(images[train].mean()), float(images[train].std())
    return ImageSet("digits", images[train], labels[train], images[test], labels[test], (mean,), (std,), 10,
                    "sklearn.datasets.load_digits")


def synthetic_images(samples: int, test_samples: int, size: int, seed: int, channels: int = 3,
                     classes: int = 10) -> ImageSet:
    """Uint8 noise images whose class shifts one channel's brightness, so there is something to learn."""
    if samples < 1 or test_samples < 1 or size < 4:
        raise CdmpiError("synthetic_images needs data.samples >= 1, data.test_samples >= 1, data.image_size >= 4")
    rng = np.random.default_rng([seed, 13])
    def make(n):
        labels = rng.integers(0, classes, n)
        pixels = rng.integers(0, 160, (n, channels, size, size)) + (labels * 9)[:, None, None, None]
        return torch.from_numpy(pixels.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))
    train, test = make(samples), make(test_samples)
    return ImageSet("synthetic_images", *train, *test, (0.5,) * channels, (0.25,) * channels, classes,
                    "synthetic")


def load(name: str, *, seed: int, samples: int, test_samples: int, image_size: int) -> ImageSet:
    if name == "cifar10":
        return locate_cifar10()
    if name == "digits":
        return digits(seed)
    if name == "synthetic_images":
        return synthetic_images(samples, test_samples, image_size, seed)
    raise CdmpiError(f"unknown image dataset {name!r}; the classifier problem takes cifar10, digits or "
                     f"synthetic_images")


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def augment(batch: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by `pad` and a random horizontal flip, per image, on batch's device."""
    n, _, h, w = batch.shape
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(batch.device)  # (n, h)
    cols = dx[:, None] + torch.arange(w)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(batch.device)  # (n, w)
    index = torch.arange(n, device=batch.device)[:, None, None, None]
    chans = torch.arange(batch.shape[1], device=batch.device)[None, :, None, None]
    return padded[index, chans, rows[:, None, :, None], cols[:, None, None, :]]
