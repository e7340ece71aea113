"""Datasets: LibSVM files found by name (data folder, cache, or download with sha256 check), user files
by path, and a seeded synthetic set; contiguous equal shards, one per worker."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CdmpiError

DATA_DIR_ENV = "CDMPI_DATA_DIR"
CACHE_DIR_ENV = "CDMPI_CACHE_DIR"
OFFLINE_ENV = "CDMPI_OFFLINE"  # set to 1 to never download (compute nodes without internet)
LIBSVM_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/{name}"

# sha256 of the LIBSVM originals (plain text, as served).
LIBSVM_SHA256 = {
    "phishing": "0cf66ef36604c393da9359b2e5d894a2df8aee31fd184633cefa138add2ef08a",
    "mushrooms": "f39a4eb628dc61a7d43760815b061c9e497aa728ce1ad8bde57a09ef6043b538",
    "a9a": "f5d5ffd8d865ff41328e7ee043e4b020816914ff6843ff15b98905ddbedce906",
    "a9a.t": "1f448a153f0320399a7e40836eb207655b0bde0f21fc941cc472193daa9f5de9",
    "w8a": "6a9fa8fd5f524303240a5db07d4b3d4a51e8b7b4b20a914105d8e3e8c81640f2",
    "w8a.t": "618929ecb01bebb841daec4cae4aa07b97832d29b08652452775598929547fde",
}


@dataclass(frozen=True)
class Dataset:
    name: str
    features: object  # scipy.sparse CSR matrix (n_samples, n_features) or a dense ndarray
    labels: np.ndarray  # float64, +-1
    source: str  # the file it came from, or "synthetic"
    sha256: str | None = None  # of the file it came from

    @property
    def n_samples(self) -> int:
        return self.features.shape[0]

    @property
    def n_features(self) -> int:
        return self.features.shape[1]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "cdmpi") / "libsvm"


def _checked(path: Path, name: str) -> Path:
    actual = sha256_of(path)
    if actual != LIBSVM_SHA256[name]:
        raise CdmpiError(f"dataset file {path} has sha256 {actual[:12]}..., expected "
                         f"{LIBSVM_SHA256[name][:12]}... for {name}; remove or replace it")
    return path


def fetch(url: str, dest: Path, sha256: str, name: str, timeout: float = 60.0) -> Path:
    """Download url into dest atomically; keep it only if its sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, tmp)
        except OSError as err:
            os.unlink(tmp.name)
            raise CdmpiError(
                f"dataset {name!r} is not in ${DATA_DIR_ENV} ({os.environ.get(DATA_DIR_ENV) or 'unset'}) "
                f"nor in the cache {dest.parent}, and downloading {url} failed ({err}). Offline? Put the "
                f"file in a folder and set {DATA_DIR_ENV} to that folder.") from None
    tmp_path = Path(tmp.name)
    if sha256_of(tmp_path) != sha256:
        tmp_path.unlink()
        raise CdmpiError(f"downloaded {url} does not match its sha256; not kept")
    os.replace(tmp_path, dest)
    return dest


def download(name: str, dest: Path, timeout: float = 60.0) -> Path:
    """Fetch a LIBSVM file into dest, atomically, and check its sha256."""
    return fetch(LIBSVM_URL.format(name=name), dest, LIBSVM_SHA256[name], name, timeout)


def locate(name: str, allow_download: bool = True) -> Path:
    """The checked local file of a known LIBSVM dataset, downloading it into the cache if needed."""
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir and (Path(data_dir) / name).is_file():
        return _checked(Path(data_dir) / name, name)
    cached = cache_dir() / name
    if cached.is_file():
        return _checked(cached, name)
    if not allow_download or os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise CdmpiError(f"dataset {name!r} is not in ${DATA_DIR_ENV} ({data_dir or 'unset'}) nor in the "
                         f"cache {cached.parent}, and downloads are off; put the LIBSVM file in a folder "
                         f"and set {DATA_DIR_ENV} to that folder")
    return download(name, cached)


_TOKEN = re.compile(r"^\d+:[^:\s]+$")


def _first_bad_line(path: Path) -> str:
    """Name the first line a LibSVM reader would reject (only called after a parse failure)."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            line = raw.split(b"#", 1)[0].decode(errors="replace").split()
            if not line:
                continue
            try:
                float(line[0])
                for token in line[1:]:
                    if not _TOKEN.match(token) or int(token.split(":")[0]) < 1:
                        raise ValueError(token)
                    float(token.split(":")[1])
            except ValueError:
                return f"line {number}: {raw[:80].decode(errors='replace').rstrip()!r}"
    return "no single bad line found"


def _first_nonfinite(path: Path) -> str:
    """Name the first line with a nan or inf label or feature value (only called once one is known)."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            tokens = raw.split(b"#", 1)[0].decode(errors="replace").split()
            values = tokens[:1] + [t.split(":", 1)[-1] for t in tokens[1:]]
            try:
                if not all(np.isfinite(float(v)) for v in values):
                    return f"line {number}: {raw[:80].decode(errors='replace').rstrip()!r}"
            except ValueError:
                continue
    return "no single line found"


def _to_pm1(labels: np.ndarray, source: str) -> np.ndarray:
    values = np.unique(labels)
    if len(values) != 2:
        raise CdmpiError(f"{source}: binary classification needs exactly two label values, "
                         f"found {len(values)}: {values[:5].tolist()}")
    return np.where(labels == values[1], 1.0, -1.0)  # the larger label is +1 (0/1, 1/2, -1/+1)


def read_libsvm(path: Path, n_features: int = 0, name: str | None = None, sha256: str | None = None) -> Dataset:
    from sklearn.datasets import load_svmlight_file

    path = Path(path)
    if not path.is_file():
        raise CdmpiError(f"dataset file not found: {path}")
    try:
        features, labels = load_svmlight_file(str(path), n_features=n_features or None, dtype=np.float64)
    except (ValueError, UnicodeDecodeError) as err:
        if "n_features" in str(err):
            raise CdmpiError(f"{path}: {err} (data.n_features = {n_features})") from None
        raise CdmpiError(f"malformed LibSVM file {path}: {_first_bad_line(path)} ({err})") from None
    if features.shape[0] == 0:
        raise CdmpiError(f"LibSVM file {path} holds no samples")
    if not (np.isfinite(features.data).all() and np.isfinite(labels).all()):
        raise CdmpiError(f"LibSVM file {path} holds a value that is not a finite number: {_first_nonfinite(path)}")
    return Dataset(name or path.name, features.tocsr(), _to_pm1(labels, str(path)), str(path),
                   sha256 or sha256_of(path))


def synthetic(samples: int, features: int, seed: int) -> Dataset:
    """Gaussian features, labels from a random hyperplane with 10% of them flipped."""
    rng = np.random.default_rng([seed, 7])
    a = rng.standard_normal((samples, features))
    y = np.sign(a @ rng.standard_normal(features) + 1e-12)
    y[rng.random(samples) < 0.1] *= -1
    return Dataset("synthetic", a, y, "synthetic")


def load(dataset: str, *, n_features: int = 0, samples: int = 2000, features: int = 50, seed: int = 0,
         allow_download: bool = True) -> Dataset:
    if dataset == "synthetic":
        if samples < 1 or features < 1:
            raise CdmpiError("synthetic data needs data.samples >= 1 and data.features >= 1")
        return synthetic(samples, features, seed)
    if dataset in LIBSVM_SHA256:
        return read_libsvm(locate(dataset, allow_download), n_features, dataset, LIBSVM_SHA256[dataset])
    if "/" in dataset or Path(dataset).exists():
        return read_libsvm(Path(dataset), n_features)
    raise CdmpiError(f"unknown dataset {dataset!r}: use one of {', '.join(LIBSVM_SHA256)}, "
                     f"'synthetic', or a path to a LibSVM file")


def prefetch(dataset: str) -> None:
    """Make a known dataset local (download and check it) before the other ranks read it."""
    if dataset in LIBSVM_SHA256:
        locate(dataset)
    elif dataset == "cifar10":
        from . import images  # images imports this module

        images.cifar10_source()


def shard_bounds(n_samples: int, n_workers: int) -> list[tuple[int, int]]:
    """n contiguous parts whose sizes differ by at most one (np.array_split's rule)."""
    if n_samples < n_workers:
        raise CdmpiError(f"{n_samples} samples cannot be split over {n_workers} workers")
    edges = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(n_samples), n_workers)])
    return [(int(edges[i]), int(edges[i + 1])) for i in range(n_workers)]
