"""Where datasets come from: Fashion-MNIST, CIFAR-10, and a synthetic set for tests.

Fashion-MNIST is looked up, in order, in
  1. the run-config ``data-dir``;
  2. the environment variable ``FL_EC_DATA_DIR``;
  3. the Debian package location ``/usr/share/datasets/fashion-mnist``
     (``apt-get install dataset-fashion-mnist``);
  4. a torchvision download into ``data-dir`` (or ``~/.cache/fl_ec``) when
     ``download=true``.
In each directory both layouts are accepted: the four IDX files directly (``.gz`` as
Debian ships them, or uncompressed) and torchvision's ``<root>/FashionMNIST/raw/``.
The IDX reader below parses either, so the Debian files need no unpacking.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fl_ec.data.tensor_data import TensorData
from fl_ec.errors import DataError

DATA_DIR_ENV = "FL_EC_DATA_DIR"
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DEFAULT_DOWNLOAD_ROOT = Path.home() / ".cache" / "fl_ec"

FASHION_MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
SYNTHETIC_STATS = ((0.5,), (0.3,))

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a numpy array, validating its header.

    Raises :class:`DataError` naming the file when it is truncated or not IDX, so a
    corrupt download is reported as such rather than as a reshape error.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise DataError(
            f"cannot read {path}: {err}; delete it and reinstall or re-download"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX uint8 file (bad header); the file is corrupt")
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path} is truncated (header); the file is corrupt")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) if shape else 0
    if len(raw) - header_len != expected:
        raise DataError(
            f"{path} holds {len(raw) - header_len} bytes of data but its header promises "
            f"{expected}; the file is corrupt or truncated"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _fashion_mnist_dir_ok(directory: Path) -> bool:
    return all(_find_idx(directory, stem) for stem in FASHION_MNIST_FILES.values())


def locate_fashion_mnist(data_dir: str = "", download: bool = False) -> Path:
    """Return the first directory (in the documented order) that holds Fashion-MNIST."""
    candidates: list[Path] = []
    # A directory the user named explicitly must exist; a typo should not silently
    # fall through to another copy of the data.
    for source, value in (("data-dir", data_dir), (DATA_DIR_ENV, os.environ.get(DATA_DIR_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_dir() and not (download and source == "data-dir"):
                raise DataError(f"{source}={value} does not exist: fix the path or unset it")
            candidates.append(path)
    candidates.append(Path(DEBIAN_FASHION_MNIST))
    for candidate in candidates:
        if _fashion_mnist_dir_ok(candidate):
            return candidate
    if download:
        root = Path(data_dir).expanduser() if data_dir else DEFAULT_DOWNLOAD_ROOT
        _torchvision_download("FashionMNIST", root)
        if _fashion_mnist_dir_ok(root):
            return root
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"Fashion-MNIST not found (looked in: {looked}); run "
        "'sudo apt-get install -y dataset-fashion-mnist', set data-dir or "
        f'{DATA_DIR_ENV}, or pass --run-config "download=true"'
    )


def _torchvision_download(name: str, root: Path) -> None:
    """Download through torchvision's own dataset class (the path users with internet take)."""
    import torchvision.datasets as tv_datasets

    root.mkdir(parents=True, exist_ok=True)
    try:
        getattr(tv_datasets, name)(root=str(root), train=True, download=True)
        getattr(tv_datasets, name)(root=str(root), train=False, download=True)
    except Exception as err:  # network errors come in many types
        raise DataError(f"download of {name} into {root} failed: {err}") from None


@lru_cache(maxsize=4)
def load_fashion_mnist(data_dir: str = "", download: bool = False) -> tuple[TensorData, TensorData]:
    """``(train, test)`` Fashion-MNIST as :class:`TensorData`; cached per process."""
    directory = locate_fashion_mnist(data_dir, download)
    splits = []
    for split in ("train", "test"):
        images = read_idx(_find_idx(directory, FASHION_MNIST_FILES[(split, "images")]))
        labels = read_idx(_find_idx(directory, FASHION_MNIST_FILES[(split, "labels")]))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"Fashion-MNIST {split} files in {directory} disagree: images "
                f"{images.shape} vs labels {labels.shape}; the files are corrupt"
            )
        if labels.max(initial=0) > 9:
            raise DataError(f"Fashion-MNIST {split} labels in {directory} exceed 9; corrupt file")
        splits.append(
            TensorData(
                images=torch.from_numpy(images.copy()).unsqueeze(1),
                labels=torch.from_numpy(labels.astype(np.int64)),
                mean=FASHION_MNIST_STATS[0],
                std=FASHION_MNIST_STATS[1],
                num_classes=10,
            )
        )
    return splits[0], splits[1]


@lru_cache(maxsize=2)
def load_cifar10(data_dir: str = "", download: bool = False) -> tuple[TensorData, TensorData]:
    """CIFAR-10 from ``<data-dir>/cifar-10-batches-py`` (torchvision's standard layout).

    The files are the official python-format batches, read by torchvision's own
    ``CIFAR10`` class. They are local files the user put there, not data from peers.
    """
    import torchvision.datasets as tv_datasets

    root = Path(data_dir or os.environ.get(DATA_DIR_ENV, "") or DEFAULT_DOWNLOAD_ROOT).expanduser()
    splits = []
    for train in (True, False):
        try:
            dataset = tv_datasets.CIFAR10(root=str(root), train=train, download=download)
        except RuntimeError:
            raise DataError(
                f"CIFAR-10 not found in {root}/cifar-10-batches-py; set data-dir to its "
                'parent or pass --run-config "download=true"'
            ) from None
        except Exception as err:
            raise DataError(
                f"CIFAR-10 in {root} could not be read ({err}); it may be corrupt"
            ) from None
        images = (
            torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
        )
        splits.append(
            TensorData(
                images=images,
                labels=torch.tensor(dataset.targets, dtype=torch.int64),
                mean=CIFAR10_STATS[0],
                std=CIFAR10_STATS[1],
                num_classes=10,
            )
        )
    return splits[0], splits[1]


def make_synthetic(
    num_train: int = 2000,
    num_test: int = 500,
    num_classes: int = 10,
    image_size: int = 28,
    seed: int = 0,
) -> tuple[TensorData, TensorData]:
    """Learnable synthetic images for unit tests: one random prototype per class plus noise.

    Not a benchmark dataset -- it exists so tests of training code run in seconds
    without any files.
    """
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(num_classes, 1, image_size, image_size, generator=generator)

    def draw(n: int) -> TensorData:
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        noise = 0.35 * torch.randn(n, 1, image_size, image_size, generator=generator)
        images = (prototypes[labels] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
        mean, std = SYNTHETIC_STATS
        return TensorData(images, labels, mean=mean, std=std, num_classes=num_classes)

    return draw(num_train), draw(num_test)


@dataclass(frozen=True)
class DatasetFormat:
    """What one example of a dataset looks like: ``channels`` x ``height`` x ``width``
    uint8 pixels, a label in ``[0, num_classes)``, and the per-channel ``mean``/``std``
    every consumer normalises with."""

    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# The format of each dataset load_dataset serves, known without loading it: a node with
# its own data (fl_ec.data.local_folder) must match the run's dataset, whose proxy,
# validation and test sets the server loads.
DATASET_FORMATS = {
    "fashion-mnist": DatasetFormat(1, 28, 28, 10, *FASHION_MNIST_STATS),
    "cifar10": DatasetFormat(3, 32, 32, 10, *CIFAR10_STATS),
    "synthetic": DatasetFormat(1, 28, 28, 10, *SYNTHETIC_STATS),  # make_synthetic's defaults
}


def dataset_format(name: str) -> DatasetFormat:
    """The :class:`DatasetFormat` of a dataset name from the run-config."""
    if name not in DATASET_FORMATS:
        raise DataError(f"dataset={name!r} is unknown: choose {', '.join(DATASET_FORMATS)}")
    return DATASET_FORMATS[name]


def load_dataset(
    name: str, data_dir: str = "", download: bool = False
) -> tuple[TensorData, TensorData]:
    """``(train, test)`` for a dataset name from the run-config."""
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, download)
    if name == "cifar10":
        return load_cifar10(data_dir, download)
    if name == "synthetic":
        return make_synthetic()
    raise DataError(f"dataset={name!r} is unknown: choose fashion-mnist, cifar10 or synthetic")
