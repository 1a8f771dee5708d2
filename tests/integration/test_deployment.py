"""A real deployment on 127.0.0.1: flower-superlink + 2 flower-supernode processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fl_ec.deploy import CONNECTION, down, up
from tests.conftest import ROOT, requires_fashion_mnist
from tests.integration.helpers import FlowerCli, model_bytes, run_config

pytestmark = [pytest.mark.integration, requires_fashion_mnist]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().split()[2] != "Z"


def _site(folder: Path, x: np.ndarray, y: np.ndarray, test: tuple | None = None) -> Path:
    """A SuperNode's own data folder: train.npz (and test.npz) in the arrays layout."""
    folder.mkdir()
    np.savez(folder / "train.npz", x=x, y=y)
    if test is not None:
        np.savez(folder / "test.npz", x=test[0], y=test[1])
    return folder


def test_superlink_and_two_supernodes_on_their_own_data_complete_one_round(tmp_path):
    # Site A holds 300 images of classes 0-4 (10% held out for its local evaluation),
    # site B 500 of classes 5-9 and a test split: the pooled class counts the server
    # records then show each node's own counts side by side.
    from fl_ec.data.local_folder import load_local_data
    from fl_ec.data.sources import load_fashion_mnist

    train, test = load_fashion_mnist()
    images, labels = train.images[:, 0].numpy(), train.labels.numpy()
    low = np.flatnonzero(labels < 5)[:300]
    high = np.flatnonzero(labels >= 5)[:500]
    test_high = np.flatnonzero(test.labels.numpy() >= 5)[:50]
    site_a = _site(tmp_path / "site-a", images[low], labels[low])
    site_b = _site(
        tmp_path / "site-b",
        images[high],
        labels[high],
        (test.images[test_high, 0].numpy(), test.labels[test_high].numpy()),
    )
    counts_a = load_local_data(site_a, "fashion-mnist").train.class_counts()
    counts_b = np.bincount(labels[high], minlength=10).tolist()
    assert sum(counts_a) == 270 and counts_a[5:] == [0] * 5 and counts_b[:5] == [0] * 5

    home, results = tmp_path / "flwr-home", tmp_path / "results"
    configs = [f'data-dir="{site_a}"', f'data-dir="{site_b}"']
    state = up(2, tmp_path / "deploy", home, node_configs=configs)
    try:
        assert len(state.supernode_pids) == 2
        assert all(_alive(p) for p in [state.superlink_pid, *state.supernode_pids])
        cli = FlowerCli(home=home, superlink=CONNECTION)
        run_id = cli.submit(ROOT, run_config(results, "deployed"))
        outcome = cli.wait(run_id, timeout=600)
        assert outcome.completed, f"{outcome.status}: {outcome.details}"
    finally:
        pids = down(state)
    assert not any(_alive(p) for p in pids)
    metrics = json.loads((results / "deployed" / "metrics.json").read_text())
    metrics["_run_dir"] = str(results / "deployed")
    last = metrics["rounds"][-1]
    assert last["round"] == 1 and last["train-replies"] == 2
    assert last["bytes-down"] == 2 * model_bytes(metrics)
    # Both nodes described themselves (deploy.up gives them partition-id 0 and 1) with
    # the class counts of the folder they train on, and trained on exactly that.
    assert last["sampled-class-counts"] == counts_a[:5] + counts_b[5:]
    site_of = {node: "a" if pid == 0 else "b" for node, pid in last["partition-by-node"].items()}
    trained = {site_of[node]: n for node, n in last["train-examples-by-node"].items()}
    assert trained == {"a": 270, "b": 500}
