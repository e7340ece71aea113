"""Datasets: LibSVM reading, label mapping, shards, lookup and checksums."""

import hashlib
import os
import shutil
import subprocess

import numpy as np
import pytest

from cdmpi import data
from cdmpi.errors import CdmpiError

from conftest import SHARED_LIBSVM


@pytest.mark.parametrize("labels, expected", [
    (["0", "1", "1"], [-1, 1, 1]), (["1", "2", "1"], [-1, 1, -1]), (["-1", "+1", "+1"], [-1, 1, 1]),
])
def test_labels_map_to_plus_minus_one(tmp_path, labels, expected):
    path = tmp_path / "d.svm"
    path.write_text("".join(f"{lab} 1:1.5 3:-2\n" for lab in labels))
    ds = data.read_libsvm(path)
    np.testing.assert_array_equal(ds.labels, expected)
    assert ds.n_features == 3
    np.testing.assert_array_equal(ds.features.toarray()[0], [1.5, 0, -2])


def test_one_class_is_an_error(tmp_path):
    path = tmp_path / "d.svm"
    path.write_text("1 1:1\n1 2:1\n")
    with pytest.raises(CdmpiError, match="exactly two label values"):
        data.read_libsvm(path)


def test_malformed_line_is_named(tmp_path):
    path = tmp_path / "d.svm"
    path.write_text("1 1:1\n0 2:1\n1 x:1\n")
    with pytest.raises(CdmpiError, match="line 3"):
        data.read_libsvm(path)


def test_libsvm_reader_equals_scikit_learns_on_mushrooms():
    """cdmpi's own reader against scikit-learn's load_svmlight_file, bit for bit."""
    from sklearn.datasets import load_svmlight_file

    path = data.locate("mushrooms", allow_download=False)  # bundled
    ds = data.read_libsvm(path)
    features, labels = load_svmlight_file(str(path), dtype=np.float64)
    assert ds.features.shape == features.shape == (8124, 112)
    assert ds.features.toarray().tobytes() == features.toarray().tobytes()
    np.testing.assert_array_equal(ds.labels, np.where(labels == labels.max(), 1.0, -1.0))


def test_libsvm_comments_and_qid(tmp_path):
    path = tmp_path / "d.svm"
    path.write_text("# a comment line\n1 qid:3 1:2.5 3:1e-3  # trailing comment\n\n-1 2:-4\n")
    ds = data.read_libsvm(path)
    np.testing.assert_array_equal(ds.features.toarray(), [[2.5, 0, 1e-3], [0, -4, 0]])
    np.testing.assert_array_equal(ds.labels, [1, -1])
    assert data.read_libsvm(path, n_features=5).n_features == 5
    with pytest.raises(CdmpiError, match="features up to index 3 but data.n_features = 2"):
        data.read_libsvm(path, n_features=2)


@pytest.mark.parametrize("line,fragment", [("1 0:2.5 2:1", "start at 1"), ("1 1:1_0", "line 2"),
                                           ("1 100000000000000000000000:1", "larger than cdmpi reads")])
def test_libsvm_indices_and_numbers_python_alone_would_accept(tmp_path, line, fragment):
    """An index 0 would silently shift every row (scikit-learn reads the file as zero-based), 1_0 is 10 to
    Python's float(), and an index past int64 overflowed: each is one clear error."""
    path = tmp_path / "d.svm"
    path.write_text(f"-1 1:1\n{line}\n")
    with pytest.raises(CdmpiError, match=fragment):
        data.read_libsvm(path)


@pytest.mark.parametrize("line", ["1 3:1 2:1", "1 2:1 2:1", "1 2:1:1", "1 2", "1 :2", "1 2:"])
def test_malformed_libsvm_tokens_are_named(tmp_path, line):
    path = tmp_path / "d.svm"
    path.write_text(f"0 1:1\n{line}\n")
    with pytest.raises(CdmpiError, match=f"line 2: {line!r}"):
        data.read_libsvm(path)


def test_shards_are_contiguous_and_equal():
    bounds = data.shard_bounds(8124, 20)
    sizes = [hi - lo for lo, hi in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == 8124 and max(sizes) - min(sizes) <= 1
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(19))
    with pytest.raises(CdmpiError, match="cannot be split"):
        data.shard_bounds(3, 4)


def test_offline_lookup_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CDMPI_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CDMPI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CDMPI_OFFLINE", "1")
    with pytest.raises(CdmpiError, match="CDMPI_DATA_DIR"):
        data.locate("phishing")  # mushrooms ships with cdmpi: found offline too


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    (tmp_path / "mushrooms").write_text("1 1:1\n0 1:2\n")
    monkeypatch.setenv("CDMPI_DATA_DIR", str(tmp_path))
    with pytest.raises(CdmpiError, match="sha256"):
        data.locate("mushrooms")


def test_manifest_checksums_match_the_package():
    manifest = SHARED_LIBSVM / "MANIFEST.tsv"
    if not manifest.exists():
        pytest.skip("no shared LIBSVM folder beside the repository")
    rows = [line.split("\t") for line in manifest.read_text().splitlines()[1:]]
    for name, _, n_features, _, sha, size, _ in rows:
        assert data.LIBSVM_SHA256[name] == sha
        assert hashlib.sha256((SHARED_LIBSVM / name).read_bytes()).hexdigest() == sha


@pytest.mark.parametrize("name, samples, features", [("mushrooms", 8124, 112), ("phishing", 11055, 68)])
def test_real_datasets_load(name, samples, features, monkeypatch):
    if not (SHARED_LIBSVM / name).exists():
        pytest.skip("no shared LIBSVM folder beside the repository")
    monkeypatch.setenv("CDMPI_DATA_DIR", str(SHARED_LIBSVM))
    ds = data.load(name)
    assert (ds.n_samples, ds.n_features) == (samples, features)
    assert set(np.unique(ds.labels)) == {-1.0, 1.0}


def test_synthetic_is_seeded():
    a, b = data.synthetic(50, 4, seed=1), data.synthetic(50, 4, seed=1)
    np.testing.assert_array_equal(a.features, b.features)
    assert not np.array_equal(a.features, data.synthetic(50, 4, seed=2).features)


def _bundled_mushrooms(tmp_path):
    import gzip

    plain = tmp_path / "mushrooms"
    plain.write_bytes(gzip.decompress(data.BUNDLED["mushrooms"].read_bytes()))
    return plain


def test_data_add_makes_a_file_others_can_read(tmp_path, monkeypatch):
    monkeypatch.setenv("CDMPI_CACHE_DIR", str(tmp_path / "cache"))
    name, path = data.add(_bundled_mushrooms(tmp_path))
    assert name == "mushrooms" and path.stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("options", ["size=64k", "ro"])
def test_data_add_to_a_full_or_read_only_cache_is_one_error_and_leaves_nothing(tmp_path, monkeypatch, options):
    source = _bundled_mushrooms(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(cache)]).returncode != 0:
        pytest.skip("could not mount a tmpfs here")
    try:
        monkeypatch.setenv("CDMPI_CACHE_DIR", str(cache))
        with pytest.raises(CdmpiError, match="cannot write .*data cache"):
            data.add(source)
        assert not [p for p in cache.rglob("*") if p.is_file()]
    finally:
        subprocess.run(["umount", str(cache)])
