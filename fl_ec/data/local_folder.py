"""A node's own data: the examples one folder holds, as a real site keeps them.

A SuperNode started with ``--node-config 'data-dir="/srv/site-a"'`` trains and
evaluates on exactly what that folder holds, in one of two layouts:

* **arrays**: ``train.npz`` (and optionally ``test.npz``), each with two arrays:
  ``x``, uint8 pixels, ``N x H x W`` (one channel) or ``N x H x W x C`` (channels last,
  as numpy, PIL and torchvision's ``CIFAR10.data`` hold images); ``y``, ``N`` integer
  labels in ``[0, num_classes)``. Written with ``np.savez(path, x=x, y=y)``; read
  without pickle.
* **image folders**: ``train/<class-name>/<image>`` (and optionally
  ``test/<class-name>/...``), torchvision ``ImageFolder`` semantics: the class index is
  the position of the folder name among the sorted class folder names, images are the
  files ImageFolder accepts (``.png``, ``.jpg``, ...), found recursively. Each image
  is converted to the dataset's channels (``L`` or ``RGB``), never resized.

Everything is checked against the format of the run-config's ``dataset``
(:data:`~fl_ec.data.sources.DATASET_FORMATS`): image size, channels, number of
classes. The server's proxy, validation and test sets come from that dataset, so the
node normalises with its statistics, not the folder's. A folder that does not fit
raises :class:`~fl_ec.errors.DataError`, one line naming the folder or file and what
to change.

Without a test split, a fixed :data:`~fl_ec.data.federated.CLIENT_TEST_FRACTION` of
train is held out for the node's local evaluation: the first rows of a permutation
seeded with :data:`HOLDOUT_SEED`, so the same rows every run, whatever the run's seed.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from fl_ec.data.federated import CLIENT_TEST_FRACTION, ClientData
from fl_ec.data.sources import DatasetFormat, dataset_format
from fl_ec.data.tensor_data import TensorData
from fl_ec.errors import DataError

HOLDOUT_SEED = 0


def load_local_data(directory: str | Path, dataset: str) -> ClientData:
    """The train and test examples in ``directory``, in the format of ``dataset``.

    ``test`` is the folder's test split, or a fixed share of train held out when it has
    none (module docstring). Raises :class:`DataError` for a folder that does not fit.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data-dir {root} is not a folder: fix the SuperNode's --node-config data-dir"
        )
    fmt = dataset_format(dataset)
    try:
        train, classes = _read_split(root, "train", fmt, dataset, None)
        if train is None:
            raise DataError(
                f"data-dir {root} holds neither train.npz nor train/<class-name>/ image "
                "folders: add one (docs/deployment.md, 'SuperNodes on their own data')"
            )
        test, _ = _read_split(root, "test", fmt, dataset, classes)
    except OSError as err:  # e.g. a folder the SuperNode's user may not read
        raise DataError(
            f"data-dir {root} cannot be read ({_first_line(err)}): check its permissions"
        ) from None
    if test is None:
        return _hold_out(train)
    return ClientData(train=train, test=test)


def stable_id(data: TensorData) -> int:
    """A 32-bit digest of ``data``'s labels and pixels: the same for the same examples in
    every run and process (unlike Python's ``hash``), different for different data."""
    digest = zlib.crc32(data.labels.numpy().tobytes())
    return zlib.crc32(data.images.numpy().tobytes(), digest)


def _read_split(
    root: Path, split: str, fmt: DatasetFormat, dataset: str, classes: list[str] | None
) -> tuple[TensorData | None, list[str] | None]:
    """``split`` in whichever layout holds it (None if neither), and its class folder
    names (None for arrays)."""
    arrays, folder = root / f"{split}.npz", root / split
    if arrays.exists() and folder.exists():
        raise DataError(
            f"data-dir {root} holds both {split}.npz and {split}/: keep one layout per split"
        )
    if arrays.exists():
        x, y = _read_arrays(arrays)
        return _tensor_data(x, y, fmt, dataset, arrays), None
    if folder.is_dir():
        x, y, names = _read_image_folder(folder, fmt, dataset, classes)
        return _tensor_data(x, y, fmt, dataset, folder), names
    return None, None


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` of an ``.npz`` file; no pickled objects are loaded."""
    not_npz = DataError(
        f"{path} is not an .npz archive: save it with np.savez(path, x=images, y=labels)"
    )
    try:
        # np.load takes any other file for a pickle (and says so); name the real problem.
        if not zipfile.is_zipfile(path):
            raise not_npz
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise not_npz
        with archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise DataError(
                    f"{path} lacks array {missing[0]!r} (it holds {sorted(archive.files)}): "
                    "save it with np.savez(path, x=images, y=labels)"
                )
            return archive["x"], archive["y"]
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(
            f"{path} cannot be read as an .npz of plain arrays ({_first_line(err)}): re-save "
            "it with np.savez(path, x=images, y=labels), x uint8 and y integer"
        ) from None


def _read_image_folder(
    folder: Path, fmt: DatasetFormat, dataset: str, classes: list[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pixels (``N x H x W`` or ``N x H x W x C``), labels and the class folder names.

    ``classes``: the train split's names, which a test split must repeat so that an
    index means the same class in both.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if len(names) != fmt.num_classes:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise DataError(
            f"{folder} has {len(names)} class folders ({shown or 'none'}) but {dataset} has "
            f"{fmt.num_classes} classes: make one folder per class, an empty one for a class "
            "this node lacks, so the sorted names give every node the same class indices"
        )
    if classes is not None and names != classes:
        raise DataError(
            f"{folder}'s class folders differ from train's ({', '.join(classes)}): "
            "name them as in train/"
        )
    samples = make_dataset(
        folder, {name: i for i, name in enumerate(names)}, IMG_EXTENSIONS, allow_empty=True
    )
    pixels = [_read_image(Path(path), fmt, dataset) for path, _ in samples]
    if not pixels:
        raise DataError(
            f"{folder} holds no images ({', '.join(IMG_EXTENSIONS)}) in its class folders"
        )
    return np.stack(pixels), np.array([label for _, label in samples], dtype=np.int64), names


def _read_image(path: Path, fmt: DatasetFormat, dataset: str) -> np.ndarray:
    """One image's uint8 pixels in the dataset's channels; its size checked before its
    pixels are decoded, so a huge file fails fast."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.size != (fmt.width, fmt.height):
                width, height = image.size
                raise DataError(
                    f"{path} is {width}x{height} (width x height) but {dataset}'s images are "
                    f"{fmt.width}x{fmt.height}: resize it"
                )
            return np.asarray(image.convert("L" if fmt.channels == 1 else "RGB"), np.uint8)
    except DataError:
        raise
    except Exception as err:  # PIL reports a corrupt file through many exception types
        raise DataError(
            f"{path} cannot be read as an image ({_first_line(err)}): replace or remove it"
        ) from None


def _first_line(err: Exception) -> str:
    """An exception's message, cut to its first line (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _tensor_data(
    x: np.ndarray, y: np.ndarray, fmt: DatasetFormat, dataset: str, source: Path
) -> TensorData:
    """``x``/``y`` checked against ``fmt`` as :class:`TensorData` with its statistics."""
    images = _checked_images(x, fmt, dataset, source)
    labels = _checked_labels(y, len(images), fmt, dataset, source)
    return TensorData(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        mean=fmt.mean,
        std=fmt.std,
        num_classes=fmt.num_classes,
    )


def _checked_images(x: np.ndarray, fmt: DatasetFormat, dataset: str, source: Path) -> np.ndarray:
    """``x`` (``N x H x W`` or ``N x H x W x C``) as a contiguous ``N x C x H x W`` array."""
    size = f"{fmt.height}x{fmt.width}"
    hw = f"N x {fmt.height} x {fmt.width}"
    wanted = f"{hw} (or {hw} x 1)" if fmt.channels == 1 else f"{hw} x {fmt.channels}"
    if x.dtype != np.uint8:
        raise DataError(f"{source}: x is {x.dtype}, not uint8: store pixels as uint8 0..255")
    if x.ndim not in (3, 4):
        raise DataError(f"{source}: x has shape {x.shape}; {dataset} needs {wanted}")
    if len(x) == 0:
        raise DataError(f"{source} holds no examples: add some or remove it")
    if x.ndim == 4 and x.shape[1] == fmt.channels and x.shape[2:] == (fmt.height, fmt.width):
        raise DataError(
            f"{source}: x has shape {x.shape}, channels first; {dataset} needs {wanted} "
            "(channels last): save x.transpose(0, 2, 3, 1)"
        )
    if x.shape[1:3] != (fmt.height, fmt.width):
        height, width = x.shape[1:3]
        raise DataError(
            f"{source}: images are {height}x{width} but {dataset}'s are {size}: resize them"
        )
    channels = 1 if x.ndim == 3 else x.shape[3]
    if channels != fmt.channels:
        raise DataError(
            f"{source}: images have {channels} channel(s) but {dataset}'s have "
            f"{fmt.channels}: x must be {wanted}"
        )
    return np.ascontiguousarray(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2))


def _checked_labels(
    y: np.ndarray, num_images: int, fmt: DatasetFormat, dataset: str, source: Path
) -> np.ndarray:
    """``y`` as int64, one label per image, each a class of the dataset."""
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise DataError(f"{source}: y is {y.dtype} of shape {y.shape}; it must be N integer labels")
    if len(y) != num_images:
        raise DataError(
            f"{source}: x holds {num_images} images but y {len(y)} labels: one label per image"
        )
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= fmt.num_classes:
        raise DataError(
            f"{source}: labels span {low}..{high} but {dataset} has {fmt.num_classes} classes: "
            f"use labels 0..{fmt.num_classes - 1}"
        )
    return y.astype(np.int64)


def _hold_out(train: TensorData) -> ClientData:
    """Split a folder without a test split: a fixed share of train for local evaluation."""
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(train))
    num_test = int(round(len(order) * CLIENT_TEST_FRACTION))
    return ClientData(train=train.subset(order[num_test:]), test=train.subset(order[:num_test]))
