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


class FakeGrid:
    """Only what FedAvg's node sampling reads: the grid's node ids."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


class FeatureStatsGrid:
    """A grid that answers FedEC's feature-statistics queries as fl-ec's ClientApp does.

    ``node_data`` maps a node to its labelled data, ``(inputs, labels)``. ``broken``
    maps a node to a function that spoils its statistics, or to an error reason.
    ``queries`` keeps every query message sent, ``replies`` the arrays answered. The
    model is rebuilt by the ClientApp's own ``received_model`` (FedHCE variants arrive
    packed).
    """

    def __init__(self, node_data, broken=None):
        self.node_data, self.broken = node_data, broken or {}
        self.queries, self.replies = [], []  # every query sent; every statistics reply's arrays
        self.timeouts = []  # each send_and_receive's timeout

    def get_node_ids(self):
        return list(self.node_data)

    def send_and_receive(self, messages, *, timeout=None):
        import torch
        from flwr.app import ArrayRecord, Error, Message, RecordDict

        self.timeouts.append(timeout)
        from fl_ec.calibration import model_bytes
        from fl_ec.clients.client_app import _stats_settings, received_model
        from fl_ec.protocol import STATS_RECORD_KEY

        replies = []
        for message in messages:
            self.queries.append(message)
            node = message.metadata.dst_node_id
            spoil = self.broken.get(node)
            if isinstance(spoil, str):
                replies.append(Message(Error(code=100, reason=spoil), reply_to=message))
                continue
            spec, model = received_model(message.content)
            x, y = self.node_data[node]
            settings = _stats_settings(message.content["config"])  # what the query asks
            statistics = settings.statistics()
            measured = statistics.measure(model, x, y, spec.num_classes)
            arrays = statistics.to_arrays(measured, budget_bytes=model_bytes(model))
            if spoil is not None:
                spoil(arrays)
            self.replies.append(arrays)
            record = ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()})
            replies.append(Message(RecordDict({STATS_RECORD_KEY: record}), reply_to=message))
        return replies


def aggregate_round(grid, strategy, server_round, replies, timeout=3600.0):
    """``aggregate_train``, then the round loop's query phase on ``grid``
    (:func:`fl_ec.run.loop.query_phase`): what a round does between train and evaluate."""
    from fl_ec.run.loop import query_phase

    arrays, metrics = strategy.aggregate_train(server_round, replies)
    if arrays is not None:
        arrays = query_phase(strategy, server_round, arrays, grid, timeout)
    return arrays, metrics
