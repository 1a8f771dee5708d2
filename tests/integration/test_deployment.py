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


def _site(folder: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """A SuperNode's own data folder: train.npz in the arrays layout (no test split)."""
    folder.mkdir()
    np.savez(folder / "train.npz", x=x, y=y)
    return folder


def test_superlink_and_two_supernodes_one_on_its_own_data_complete_one_round(tmp_path):
    # Node 0 trains on its own folder (site A: 300 images of classes 0-4, 10% held out
    # for its local evaluation), node 1 on its benchmark partition: both kinds in one run.
    from fl_ec.data.local_folder import load_local_data
    from fl_ec.data.sources import load_fashion_mnist

    train, _ = load_fashion_mnist()
    images, labels = train.images[:, 0].numpy(), train.labels.numpy()
    low = np.flatnonzero(labels < 5)[:300]
    site_a = _site(tmp_path / "site-a", images[low], labels[low])
    counts_a = load_local_data(site_a, "fashion-mnist").train.class_counts()
    assert sum(counts_a) == 270 and counts_a[5:] == [0] * 5

    home, results = tmp_path / "flwr-home", tmp_path / "results"
    state = up(2, tmp_path / "deploy", home, node_configs=[f'data-dir="{site_a}"', ""])
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
    assert last["test-accuracy"] > 0.3
    # Each node described itself and trained on its own data: site A's folder, and the
    # partition (whose class counts are the pooled ones less site A's).
    site_of = {node: "a" if pid == 0 else "b" for node, pid in last["partition-by-node"].items()}
    assert sorted(site_of.values()) == ["a", "b"]
    trained = {site_of[node]: n for node, n in last["train-examples-by-node"].items()}
    pooled = last["sampled-class-counts"]
    assert trained == {"a": 270, "b": sum(pooled) - 270}
    assert all(p >= a for p, a in zip(pooled, counts_a, strict=True)) and pooled != counts_a
