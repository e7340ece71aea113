"""Datasets: LibSVM files found by name (data folder, cache, or download with sha256 check), user files
by path, and a seeded synthetic set; contiguous equal shards, one per worker."""

from __future__ import annotations

import gzip
import hashlib
import os
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


def _not_found(name: str, why: str) -> CdmpiError:
    data_dir = os.environ.get(DATA_DIR_ENV)
    return CdmpiError(
        f"dataset {name!r} (file name {name!r}) is not in ${DATA_DIR_ENV} ({data_dir or 'unset'}) nor in the cache "
        f"{cache_dir()}, and {why}. Put the LIBSVM file there with `cdmpi data add FILE`, set {DATA_DIR_ENV} to "
        f"the folder that holds it, or train on the file itself with --set data.dataset=/path/to/file "
        f"(`cdmpi data` lists where each dataset is looked for)")


def fetch(url: str, dest: Path, sha256: str, name: str, timeout: float = 60.0) -> Path:
    """Download url into dest atomically; keep it only if its sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, tmp)
        except OSError as err:
            os.unlink(tmp.name)
            raise _not_found(name, f"downloading {url} failed ({err})") from None
    tmp_path = Path(tmp.name)
    if sha256_of(tmp_path) != sha256:
        tmp_path.unlink()
        raise CdmpiError(f"downloaded {url} does not match its sha256; not kept")
    os.replace(tmp_path, dest)
    return dest


def download(name: str, dest: Path, timeout: float = 60.0) -> Path:
    """Fetch a LIBSVM file into dest, atomically, and check its sha256."""
    return fetch(LIBSVM_URL.format(name=name), dest, LIBSVM_SHA256[name], name, timeout)


# Shipped with the package (gzip), so that the demo runs offline: mushrooms, from the LIBSVM page
# (https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary.html#mushrooms), which made it from the UCI
# Mushroom data set (Schlimmer, 1987; UCI Machine Learning Repository, CC BY 4.0). cdmpi/datasets/README.md.
BUNDLED = {"mushrooms": Path(__file__).with_name("datasets") / "mushrooms.gz"}


def _install(name: str, source: Path, dest: Path, opener=open) -> Path:
    """Copy source (opened with opener) into dest atomically, keeping it only if its sha256 is name's. The
    file is readable by everyone (a cache may be shared); a full or read-only cache is one error, and no
    temporary file is left behind."""
    tmp_path = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as tmp:
            tmp_path = Path(tmp.name)
            with opener(source, "rb") as fh:
                shutil.copyfileobj(fh, tmp)
        actual = sha256_of(tmp_path)
        if actual != LIBSVM_SHA256[name]:
            raise CdmpiError(f"{source} has sha256 {actual[:12]}..., not {name}'s ({LIBSVM_SHA256[name][:12]}...)")
        os.chmod(tmp_path, 0o644)  # mkstemp makes files 0600: others sharing the cache could not read them
        os.replace(tmp_path, dest)
        tmp_path = None
        return dest
    except OSError as err:
        raise CdmpiError(f"cannot write {dest} (the data cache, ${CACHE_DIR_ENV} to move it): "
                         f"{err.strerror or err}") from None
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def where(name: str) -> Path | None:
    """The local file of a known dataset if there is one ($CDMPI_DATA_DIR, then the cache), unchecked."""
    data_dir = os.environ.get(DATA_DIR_ENV)
    for folder in ([Path(data_dir)] if data_dir else []) + [cache_dir()]:
        if (folder / name).is_file():
            return folder / name
    return None


def locate(name: str, allow_download: bool = True) -> Path:
    """The checked local file of a known LIBSVM dataset: from $CDMPI_DATA_DIR, the cache, the package's own
    copy (unpacked into the cache), or downloaded into the cache."""
    found = where(name)
    if found is not None:
        return _checked(found, name)
    cached = cache_dir() / name
    if name in BUNDLED:
        return _install(name, BUNDLED[name], cached, gzip.open)
    if not allow_download or os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise _not_found(name, f"downloads are off (${OFFLINE_ENV})")
    return download(name, cached)


def add(path: Path, name: str | None = None) -> tuple[str, Path]:
    """`cdmpi data add`: a known dataset's file into the cache, after checking its sha256. The name is the
    one given, else the dataset whose sha256 the file has."""
    path = Path(path)
    if not path.is_file():
        raise CdmpiError(f"cdmpi data add: {path} is not a file")
    if name is None:
        digest = sha256_of(path)
        name = next((n for n, sha in LIBSVM_SHA256.items() if sha == digest), None)
        if name is None:
            raise CdmpiError(f"{path} is none of the known datasets ({', '.join(LIBSVM_SHA256)}): its sha256 "
                             f"{digest[:12]}... matches none of theirs; train on it with "
                             f"--set data.dataset={path}")
    elif name not in LIBSVM_SHA256:
        raise CdmpiError(f"cdmpi data add: unknown dataset {name!r}; the known ones are {', '.join(LIBSVM_SHA256)}")
    return name, _install(name, path, cache_dir() / name)


def status() -> list[dict]:
    """`cdmpi data`: every known dataset, the file name looked for, and where it is (if anywhere)."""
    rows = []
    for name in LIBSVM_SHA256:
        found = where(name)
        state = str(found) if found else "bundled with cdmpi (unpacked on first use)" if name in BUNDLED else \
            "missing (downloaded on first use unless offline)"
        rows.append({"dataset": name, "file name": name, "where": state})
    return rows


def _to_pm1(labels: np.ndarray, source: str) -> np.ndarray:
    values = np.unique(labels)
    if len(values) != 2:
        raise CdmpiError(f"{source}: binary classification needs exactly two label values, "
                         f"found {len(values)}: {values[:5].tolist()}")
    return np.where(labels == values[1], 1.0, -1.0)  # the larger label is +1 (0/1, 1/2, -1/+1)


def _quote(raw: bytes) -> str:
    return repr(raw[:80].decode(errors="replace").rstrip())


MAX_FEATURE_INDEX = 2 ** 31 - 1  # a dense shard of more features would not fit any machine anyway


def read_libsvm(path: Path, n_features: int = 0, name: str | None = None, sha256: str | None = None) -> Dataset:
    """A LibSVM file ("label index:value ...", '#' comments, qid ignored) as a CSR matrix and +-1 labels.
    Indices are one-based, as LIBSVM's tools write them: an index 0 is refused rather than read as a
    zero-based file (which would shift every feature of every row). Written out here because importing
    scikit-learn's reader took 1.6 s in every rank."""
    import scipy.sparse

    path = Path(path)
    if not path.is_file():
        raise CdmpiError(f"dataset file not found: {path}")
    labels, values, indices, indptr = [], [], [], [0]
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            tokens = raw.split(b"#", 1)[0].split()
            if not tokens:
                continue
            pairs = [token for token in tokens[1:] if not token.startswith(b"qid:")]
            fields = b" ".join(pairs).replace(b":", b" ").split()
            try:
                if len(fields) != 2 * len(pairs) or b"_" in raw:  # one ':' per pair; Python alone reads 1_0 as 10
                    raise ValueError
                label = float(tokens[0])
                row_indices = list(map(int, fields[0::2]))
                row_values = list(map(float, fields[1::2]))
            except ValueError:
                raise CdmpiError(f"malformed LibSVM file {path}: line {number}: {_quote(raw)}") from None
            if any(b >= a for a, b in zip(row_indices[1:], row_indices)) or (row_indices and row_indices[0] < 1):
                raise CdmpiError(f"malformed LibSVM file {path}: line {number}: {_quote(raw)} (feature indices "
                                 f"must be increasing and start at 1)")
            if row_indices and row_indices[-1] > MAX_FEATURE_INDEX:
                raise CdmpiError(f"LibSVM file {path}: line {number}: feature index {row_indices[-1]} is larger "
                                 f"than cdmpi reads ({MAX_FEATURE_INDEX})")
            if not (np.isfinite(label) and np.isfinite(row_values).all()):
                raise CdmpiError(f"LibSVM file {path} holds a value that is not a finite number: line {number}: "
                                 f"{_quote(raw)}")
            labels.append(label)
            values += row_values
            indices += row_indices
            indptr.append(len(indices))
    if not labels:
        raise CdmpiError(f"LibSVM file {path} holds no samples")
    columns = np.asarray(indices, dtype=np.int64)
    columns -= 1  # one-based
    needed = int(columns.max()) + 1 if columns.size else 0
    if n_features and needed > n_features:
        raise CdmpiError(f"{path} has features up to index {needed} but data.n_features = {n_features}")
    features = scipy.sparse.csr_matrix((np.asarray(values, dtype=np.float64), columns, np.asarray(indptr)),
                                       shape=(len(labels), n_features or needed))
    return Dataset(name or path.name, features, _to_pm1(np.asarray(labels), str(path)), str(path),
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


def check_available(dataset: str) -> None:
    """Before torch and MPI start: a dataset that cannot be had here is an error now, on every rank alike
    (a LibSVM path that is no file; a known dataset with no local copy, no bundled one and downloads off)."""
    if dataset in LIBSVM_SHA256:
        if where(dataset) is None and dataset not in BUNDLED and os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
            raise _not_found(dataset, f"downloads are off (${OFFLINE_ENV})")
    elif "/" in dataset and not Path(dataset).is_file():
        raise CdmpiError(f"dataset file not found: {dataset}")


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
