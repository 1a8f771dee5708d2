import gzip
from pathlib import Path

import numpy as np
import pytest

from fl_ec.data import sources
from fl_ec.data.sources import load_fashion_mnist, locate_fashion_mnist, read_idx
from fl_ec.errors import DataError
from tests.conftest import requires_fashion_mnist


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def _fake_fashion_mnist(root: Path, n: int, compress: bool, torchvision_layout: bool) -> Path:
    folder = root / "FashionMNIST" / "raw" if torchvision_layout else root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("t10k", n // 2)):
        _write_idx(
            folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)), compress
        )
        _write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, count), compress)
    return root


@pytest.fixture(autouse=True)
def _clear_cache(monkeypatch):
    load_fashion_mnist.cache_clear()
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
    yield
    load_fashion_mnist.cache_clear()


def test_idx_reader_reads_gz_and_plain(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    _write_idx(tmp_path / "a", array, compress=False)
    _write_idx(tmp_path / "b", array, compress=True)
    assert np.array_equal(read_idx(tmp_path / "a"), array)
    assert np.array_equal(read_idx(tmp_path / "b.gz"), array)


def test_truncated_idx_is_reported_as_corrupt(tmp_path):
    _write_idx(tmp_path / "x", np.zeros((10, 28, 28)), compress=False)
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-100])
    with pytest.raises(DataError, match="corrupt"):
        read_idx(tmp_path / "x")


def test_corrupt_gzip_is_reported_as_corrupt(tmp_path):
    root = _fake_fashion_mnist(tmp_path, 20, compress=True, torchvision_layout=False)
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError) as info:
        load_fashion_mnist(str(root))
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_data_dir_comes_first_in_either_layout(tmp_path):
    plain = _fake_fashion_mnist(tmp_path / "plain", 40, compress=True, torchvision_layout=False)
    tv = _fake_fashion_mnist(tmp_path / "tv", 30, compress=False, torchvision_layout=True)
    assert locate_fashion_mnist(str(plain)) == plain
    train, test = load_fashion_mnist(str(tv))
    assert (len(train), len(test)) == (30, 15)
    assert train.images.shape[1:] == (1, 28, 28)


def test_environment_variable_comes_before_debian(tmp_path, monkeypatch):
    root = _fake_fashion_mnist(tmp_path, 24, compress=True, torchvision_layout=False)
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(root))
    assert locate_fashion_mnist("") == root


def test_missing_data_names_where_it_looked_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        locate_fashion_mnist(str(empty))
    message = str(info.value)
    assert str(empty) in message and "apt-get install -y dataset-fashion-mnist" in message
    assert "download=true" in message and "\n" not in message


def test_missing_data_dir_is_an_error_not_a_silent_fallback(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        locate_fashion_mnist(str(tmp_path / "typo"))


@requires_fashion_mnist
def test_debian_fashion_mnist_loads():
    train, test = load_fashion_mnist()
    assert (len(train), len(test)) == (60000, 10000)
    assert train.class_counts() == [6000] * 10
    x, y = next(train.batches(64))
    assert x.shape == (64, 1, 28, 28) and abs(float(x.mean())) < 0.5
