"""The round loop's query phase: between training and evaluation, on a scripted grid.

FedEC's feature-statistics query is sent by the round loop
(:func:`fl_ec.run.loop.run_rounds`), not from inside ``aggregate_train``: these tests run
whole rounds through ``start`` and check the order of the messages, that the
calibrated model is the round's global model, that wrappers pass the phase on, and
what happens under a loop that has no query phase (Flower's own ``Strategy.start``).
"""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, Strategy

from fl_ec.data.sources import make_synthetic
from fl_ec.distill import DistillSettings
from fl_ec.models import ArchSpec, build_model
from fl_ec.protocol import TRAIN_INFO_KEY
from fl_ec.results import RunRecorder
from fl_ec.run.loop import RoundPlan, run_rounds
from fl_ec.run.metering import TimedAggregation
from fl_ec.run.sampling import SeededSampler, SeededSampling
from fl_ec.strategies.fedec import FedEC
from tests.conftest import FeatureStatsGrid

SPEC = ArchSpec("cnn", (1, 28, 28), 10)
NODES = (1, 2, 3)


@pytest.fixture(scope="module")
def data():
    train, val = make_synthetic(num_train=300, num_test=150, seed=4)
    return train.normalize(train.images), (val.normalize(val.images), val.labels)


class RoundGrid(FeatureStatsGrid):
    """Trains (each node returns the model it got, nudged), answers statistics queries
    as fl-ec's ClientApp does, and records every message type in the order sent."""

    def __init__(self, node_data):
        super().__init__(node_data)
        self.sent_types: list[str] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages:
            return []
        kind = messages[0].metadata.message_type
        self.sent_types.append(kind)
        if kind == MessageType.QUERY and "arrays" not in messages[0].content:
            # SeededSampler's describe query: a node that cannot say its partition.
            return [Message(Error(code=0, reason="no partition"), reply_to=m) for m in messages]
        if kind == MessageType.QUERY:
            return super().send_and_receive(messages, timeout=timeout)
        return [self._train_reply(m) for m in messages]

    def _train_reply(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        state = message.content["arrays"].to_torch_state_dict()
        generator = torch.Generator().manual_seed(node)
        nudged = {
            k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in state.items()
        }
        content = RecordDict(
            {
                "arrays": ArrayRecord(nudged),
                "metrics": MetricRecord({"num-examples": 50 + node}),
                TRAIN_INFO_KEY: ConfigRecord({"arch-spec": SPEC.to_json()}),
            }
        )
        return Message(content, reply_to=message)


def _fedec(data, **kwargs) -> FedEC:
    proxy, validation = data
    return FedEC(
        proxy_data=proxy,
        arch_spec=SPEC,
        validation_data=validation,
        distill=DistillSettings(steps=4, batch_size=32, eval_every=2),
        calibration="classifier",
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=2,
        **kwargs,
    )


def _grid(data) -> RoundGrid:
    val_x, val_y = data[1]
    return RoundGrid({n: (val_x[n::3], val_y[n::3]) for n in NODES})


def _initial() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(build_model(SPEC).state_dict())


def test_the_statistics_query_runs_between_training_and_evaluation(task_identity, data):
    strategy, grid = _fedec(data), _grid(data)
    seen = {}

    def evaluate_fn(server_round, arrays):
        seen[server_round] = arrays.to_torch_state_dict()

    result = strategy.start(grid, _initial(), num_rounds=2, evaluate_fn=evaluate_fn)
    # Each round: train, then the query; no evaluation messages (fraction_evaluate=0).
    assert grid.sent_types == [MessageType.TRAIN, MessageType.QUERY] * 2
    assert {m.metadata.dst_node_id for m in grid.queries} == set(NODES)
    for server_round in (1, 2):
        metrics = strategy.server_metrics[server_round]
        assert metrics["feature-calibration-applied"] == 1.0
        assert metrics["calibration-valid-replies"] == len(NODES)
    # The calibrated model is the round's global model: evaluated, and the result.
    served = strategy.serving.outcome.student.state_dict()
    for key, value in result.arrays.to_torch_state_dict().items():
        assert torch.equal(value, served[key]), key
        assert torch.equal(seen[2][key], served[key]), key


def test_wrappers_pass_the_query_phase_on(task_identity, data, tmp_path):
    strategy, grid = _fedec(data), _grid(data)
    recorder = RunRecorder(tmp_path / "run", {}, SPEC, num_rounds=1)
    wrapped = TimedAggregation(SeededSampling(strategy, SeededSampler(3)), recorder)
    run_rounds(wrapped, grid, _initial(), RoundPlan(1))
    assert grid.queries  # the statistics query went out through both wrappers
    assert strategy.server_metrics[1]["feature-calibration-applied"] == 1.0
    # The calibration is the server's work: timed with the aggregation.
    assert recorder.record_for(1).aggregate_seconds > 0


def test_a_loop_without_a_query_phase_skips_the_calibration_once_said(
    task_identity, data, caplog
):
    strategy, grid = _fedec(data), _grid(data)
    with caplog.at_level(logging.WARNING):
        result = Strategy.start(strategy, grid, _initial(), num_rounds=3)  # Flower's loop
    assert MessageType.QUERY not in grid.sent_types
    assert len(result.train_metrics_clientapp) == 3  # the rounds themselves went on
    assert strategy.server_metrics[1]["feature-calibration-applied"] == 0.0
    warnings = [r.getMessage() for r in caplog.records if "no query phase" in r.getMessage()]
    assert len(warnings) == 1 and "feature calibration is skipped" in warnings[0]


class _TwoQueries(FedAvg):
    """A strategy whose round asks the clients twice; the second answer changes the model."""

    def __init__(self) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=2)
        self.pending: list[int] = []

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.pending = [1, 2]
        return arrays, metrics

    def configure_query(self, server_round, arrays, grid):
        if not self.pending:
            return []
        record = RecordDict({"config": ConfigRecord({"server-round": server_round})})
        return [Message(record, dst_node_id=1, message_type=MessageType.QUERY)]

    def aggregate_query(self, server_round, replies):
        step = self.pending.pop(0)
        if step == 2:
            return ArrayRecord({"marker": torch.full((1,), float(server_round))})
        return None


class _AnswerAll(RoundGrid):
    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.QUERY:
            self.sent_types.append(MessageType.QUERY)
            return [Message(RecordDict({}), reply_to=m) for m in messages]
        return super().send_and_receive(messages, timeout=timeout)


def test_run_rounds_repeats_the_query_until_the_strategy_asks_nothing(task_identity, data):
    grid = _AnswerAll(_grid(data).node_data)
    seen = {}
    result = run_rounds(
        _TwoQueries(),
        grid,
        _initial(),
        RoundPlan(2),
        evaluate_fn=lambda r, arrays: seen.setdefault(r, dict(arrays.to_torch_state_dict())),
    )
    assert grid.sent_types == [MessageType.TRAIN, MessageType.QUERY, MessageType.QUERY] * 2
    assert float(seen[1]["marker"]) == 1.0 and float(seen[2]["marker"]) == 2.0
    assert float(result.arrays.to_torch_state_dict()["marker"]) == 2.0
