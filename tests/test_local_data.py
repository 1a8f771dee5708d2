"""A node's own data folder: both layouts, the checks against the run's dataset, and a
ClientApp that trains and describes itself on such a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from PIL import Image

from fl_ec.clients.settings import NodeSettings
from fl_ec.data.local_folder import load_local_data, stable_id
from fl_ec.data.sources import CIFAR10_STATS, FASHION_MNIST_STATS
from fl_ec.errors import ConfigError, DataError

CLASSES = [f"class-{c}" for c in "abcdefghij"]  # sorted: index i is CLASSES[i]


def _arrays(n: int, seed: int = 0, shape: tuple[int, ...] = (28, 28), classes: int = 10):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    return x, rng.integers(0, classes, n)


def _write_pngs(split: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """One folder per class of CLASSES (empty ones included), ``images`` as PNGs."""
    for name in CLASSES:
        (split / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(split / CLASSES[label] / f"{i:03d}.png")


# -- arrays -----------------------------------------------------------------------------


def test_arrays_with_a_test_split_load_as_they_are(tmp_path):
    x, y = _arrays(40)
    x_test, y_test = _arrays(7, seed=1)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "test.npz", x=x_test, y=y_test)  # compressed reads too
    data = load_local_data(tmp_path, "fashion-mnist")
    assert data.train.images.shape == (40, 1, 28, 28) and len(data.test) == 7
    assert torch.equal(data.train.images[:, 0], torch.from_numpy(x))
    assert data.train.labels.tolist() == y.tolist()
    assert data.train.class_counts() == np.bincount(y, minlength=10).tolist()
    assert data.test.labels.tolist() == y_test.tolist()
    # Normalised as the server normalises its Fashion-MNIST, not by the folder's statistics.
    assert (data.train.mean, data.train.std) == FASHION_MNIST_STATS


def test_channels_last_arrays_become_channels_first(tmp_path):
    x, y = _arrays(5, shape=(32, 32, 3))
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x[:2], y=y[:2])
    data = load_local_data(tmp_path, "cifar10")
    assert data.train.images.shape == (5, 3, 32, 32)
    assert torch.equal(data.train.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert (data.train.mean, data.train.std) == CIFAR10_STATS
    one_channel = tmp_path / "gray"
    one_channel.mkdir()
    np.savez(one_channel / "train.npz", x=_arrays(5)[0][..., None], y=y)
    assert load_local_data(one_channel, "fashion-mnist").train.images.shape[1:] == (1, 28, 28)


def test_without_a_test_split_a_fixed_tenth_of_train_is_held_out(tmp_path):
    x, y = _arrays(300)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    first, again = (load_local_data(tmp_path, "fashion-mnist") for _ in range(2))
    assert (len(first.train), len(first.test)) == (270, 30)
    assert torch.equal(first.test.labels, again.test.labels)
    assert torch.equal(first.train.images, again.train.images)
    pooled = np.add(first.train.class_counts(), first.test.class_counts())
    assert pooled.tolist() == np.bincount(y, minlength=10).tolist()


# -- image folders ----------------------------------------------------------------------


def test_image_folders_give_classes_their_sorted_index(tmp_path):
    x, y = _arrays(12, classes=4)  # classes e..j stay empty folders
    _write_pngs(tmp_path / "train", x, y)
    x_test, y_test = _arrays(3, seed=1, classes=4)
    _write_pngs(tmp_path / "test", x_test, y_test)
    data = load_local_data(tmp_path, "fashion-mnist")
    assert data.train.class_counts() == np.bincount(y, minlength=10).tolist()
    assert data.test.class_counts() == np.bincount(y_test, minlength=10).tolist()
    # Files are read class by class, sorted: each image's pixels keep their label.
    for image, label in zip(data.train.images, data.train.labels, strict=True):
        matches = [i for i in range(12) if np.array_equal(x[i], image[0].numpy())]
        assert matches and all(y[i] == label for i in matches)


def test_colour_images_become_the_datasets_channels(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    _write_pngs(tmp_path / "train", np.zeros((0, 28, 28), np.uint8), np.zeros(0, int))
    for name in CLASSES[:2]:
        Image.fromarray(rgb).save(tmp_path / "train" / name / "rgb.png")
    data = load_local_data(tmp_path, "fashion-mnist")
    assert data.train.images.shape[1] == 1 and len(data.train) + len(data.test) == 2


# -- what a folder must not be ----------------------------------------------------------


def _npz(x=None, y=None, **more):
    """A writer of train.npz from the given arrays (valid ones by default)."""
    good_x, good_y = _arrays(20)

    def write(root: Path) -> None:
        arrays = {"x": good_x if x is None else x, "y": good_y if y is None else y, **more}
        np.savez(root / "train.npz", **{k: v for k, v in arrays.items() if v is not False})

    return write


def _not_a_zip(root: Path) -> None:
    (root / "train.npz").write_bytes(b"definitely not a zip archive")


def _one_npy(root: Path) -> None:
    with (root / "train.npz").open("wb") as handle:
        np.save(handle, _arrays(20)[0])


def _folders(count: int = 10, size: tuple[int, int] = (28, 28), corrupt: bool = False):
    def write(root: Path) -> None:
        for name in CLASSES[:count]:
            (root / "train" / name).mkdir(parents=True)
        image = root / "train" / CLASSES[0] / "0.png"
        if corrupt:
            image.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        else:
            Image.fromarray(np.zeros(size[::-1], np.uint8)).save(image)

    return write


def _mismatched_test_classes(root: Path) -> None:
    _write_pngs(root / "train", *_arrays(4))
    (root / "test" / "other").mkdir(parents=True)
    for name in CLASSES[1:]:
        (root / "test" / name).mkdir()


def _both_layouts(root: Path) -> None:
    _npz()(root)
    _write_pngs(root / "train", *_arrays(4))


def _empty_class_folders(root: Path) -> None:
    _write_pngs(root / "train", np.zeros((0, 28, 28), np.uint8), np.zeros(0, int))


HOSTILE = {
    "empty folder": (lambda root: None, "neither train.npz nor train/"),
    "label too large": (_npz(y=np.full(20, 10)), "labels span 10..10"),
    "negative label": (_npz(y=np.arange(20) - 1), "labels span -1..18"),
    "fewer labels than images": (_npz(y=np.zeros(19, int)), "20 images but y 19 labels"),
    "wrong image size": (_npz(x=_arrays(20, shape=(32, 32))[0]), "are 32x32 but fashion-mnist"),
    "channels first": (_npz(x=_arrays(20, shape=(1, 28, 28))[0]), "transpose(0, 2, 3, 1)"),
    "three channels": (_npz(x=_arrays(20, shape=(28, 28, 3))[0]), "have 3 channel(s)"),
    "float pixels": (_npz(x=np.zeros((20, 28, 28), np.float32)), "not uint8"),
    "float labels": (_npz(y=np.zeros(20, np.float32)), "integer labels"),
    "no examples": (_npz(x=np.zeros((0, 28, 28), np.uint8), y=np.zeros(0, int)), "no examples"),
    "no y": (_npz(y=False), "lacks array 'y'"),
    "not a zip": (_not_a_zip, "is not an .npz archive"),
    "pickled objects": (_npz(y=np.array([{"a": 1}] * 20, dtype=object)), "cannot be read"),
    "one .npy": (_one_npy, "is not an .npz archive"),
    "too few class folders": (_folders(count=3), "3 class folders"),
    "wrong png size": (_folders(size=(30, 28)), "is 30x28 (width x height) but fashion-mnist's"),
    "corrupt png": (_folders(corrupt=True), "cannot be read as an image"),
    "only empty class folders": (_empty_class_folders, "holds no images"),
    "test classes differ": (_mismatched_test_classes, "differ from train's"),
    "both layouts": (_both_layouts, "both train.npz and train/"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_folder_that_does_not_fit_fails_with_one_line(tmp_path, case):
    write, fragment = HOSTILE[case]
    write(tmp_path)
    with pytest.raises(DataError) as caught:
        load_local_data(tmp_path, "fashion-mnist")
    message = str(caught.value)
    assert fragment in message and "\n" not in message
    assert str(tmp_path) in message  # names the folder or the file in it


def test_a_missing_folder_names_the_node_config_key(tmp_path):
    with pytest.raises(DataError, match="is not a folder: fix the SuperNode's --node-config"):
        load_local_data(tmp_path / "nowhere", "fashion-mnist")


def test_the_digest_is_stable_and_tells_data_apart(tmp_path):
    x, y = _arrays(30)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    first = load_local_data(tmp_path, "fashion-mnist").train
    assert stable_id(first) == stable_id(load_local_data(tmp_path, "fashion-mnist").train)
    assert stable_id(first) != stable_id(first.subset(range(len(first) - 1)))
    assert 0 <= stable_id(first) < 2**32


# -- node settings and the ClientApp ------------------------------------------------------


def test_a_data_dir_node_needs_no_partition_keys():
    node = NodeSettings.from_node_config({"data-dir": " /srv/site-a "})
    assert (node.data_dir, node.partition_id, node.num_partitions) == ("/srv/site-a", None, None)
    named = NodeSettings.from_node_config({"data-dir": "/srv/site-a", "partition-id": 3})
    assert named.partition_id == 3
    with pytest.raises(ConfigError, match="no data-dir") as caught:
        NodeSettings.from_node_config({"device-tier": "edge"})
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="partition-id=-1 must be >= 0"):
        NodeSettings.from_node_config({"data-dir": "/srv/site-a", "partition-id": -1})


def _context(data_dir: Path, **node_config) -> Context:
    from fl_ec.launch import app_defaults
    from tests.conftest import ROOT

    # "synthetic" has Fashion-MNIST's format; the node never loads the dataset itself.
    run_config = {**app_defaults(ROOT), "dataset": "synthetic", "client-threads": 1}
    return Context(
        run_id=1,
        node_id=7,
        node_config={"data-dir": str(data_dir), **node_config},
        state=RecordDict(),
        run_config=run_config,
    )


def _query(kind: str, **config) -> Message:
    from fl_ec.models import ArchSpec, build_model

    spec = ArchSpec("cnn", (1, 28, 28), 10)
    content = RecordDict(
        {
            "arrays": ArrayRecord(build_model(spec).state_dict()),
            "config": ConfigRecord({"arch-spec": spec.to_json(), "server-round": 1, **config}),
        }
    )
    return Message(content=content, dst_node_id=7, message_type=kind)


def test_a_data_dir_node_trains_evaluates_and_describes_itself_on_its_folder(
    tmp_path, task_identity
):
    from fl_ec.clients.client_app import evaluate_handler, query_handler, train

    x, y = _arrays(50)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x[:5], y=y[:5])
    reply = train(_query("train", **{"local-epochs": 1}), _context(tmp_path))
    assert not reply.has_error(), reply.error.reason
    assert reply.content["metrics"]["num-examples"] == 50
    counts = np.bincount(y, minlength=10).tolist()
    assert list(reply.content["train-info"]["class-counts"]) == counts
    evaluated = evaluate_handler(_query("evaluate"), _context(tmp_path))
    assert evaluated.content["metrics"]["num-examples"] == 5  # test.npz
    described = query_handler(_query("query", describe=True), _context(tmp_path))
    info = described.content["node-info"]
    assert list(info["class-counts"]) == counts
    # No partition-id given: the digest of its data, the same in every run.
    expected = stable_id(load_local_data(tmp_path, "synthetic").train)
    assert info["partition-id"] == expected
    named = query_handler(_query("query", describe=True), _context(tmp_path, **{"partition-id": 4}))
    assert named.content["node-info"]["partition-id"] == 4


def test_a_data_dir_that_does_not_fit_is_a_one_line_error_reply(tmp_path, task_identity):
    from fl_ec.clients.client_app import FL_EC_ERROR_CODE, train

    np.savez(tmp_path / "train.npz", x=_arrays(10, shape=(32, 32))[0], y=np.zeros(10, int))
    reply = train(_query("train"), _context(tmp_path))
    assert reply.has_error() and reply.error.code == FL_EC_ERROR_CODE
    assert "are 32x32 but synthetic's are 28x28" in reply.error.reason
    assert "\n" not in reply.error.reason
