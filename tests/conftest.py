"""Shared fixtures: real Fashion-MNIST when installed, synthetic data otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_ec.data.sources import DEBIAN_FASHION_MNIST

ROOT = Path(__file__).resolve().parents[1]
HAS_FASHION_MNIST = (Path(DEBIAN_FASHION_MNIST) / "train-labels-idx1-ubyte.gz").is_file()

requires_fashion_mnist = pytest.mark.skipif(
    not HAS_FASHION_MNIST,
    reason="needs 'apt-get install -y dataset-fashion-mnist' (.ci/run installs it)",
)


@pytest.fixture
def task_identity():
    """Flower stamps run/node ids on every Message it creates; set them for unit tests."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
