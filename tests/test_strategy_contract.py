"""FedEC held to FedAvg's contract: the same hand-built replies through both strategies.

Modelled on Flower's own strategy tests (``flwr/serverapp/strategy/fedavg_test.py``
and ``strategy_utils_test.py``): pure logic, replies built by hand, a fake grid for
``start()``. FedEC runs without distillation (``distill-steps=0``: it must return
FedAvg's arrays bit for bit) and with a few steps (everything but the arrays must
still be FedAvg's). The model is a quickstart-style CNN rebuilt by ``model_builder``,
and the replies are what a stock Flower ClientApp sends: arrays and metrics only.
Where FedEC differs on purpose (a malformed reply is dropped, not fatal), the test
shows both sides.
"""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the universal alias

from fl_ec.distill import DistillSettings
from fl_ec.strategies.fedec import FedEC


class Net(nn.Module):
    """Flower quickstart-pytorch's model, smaller (no BatchNorm: FedAvg's arrays exactly)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(4, 8, 5)
        self.fc1 = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc1(x.view(-1, 8 * 4 * 4))


PROXY = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
# What FedAvg is compared with: FedEC without and with distillation steps.
FEDEC_STEPS = [0, 3]
NODES = [3, 5, 8]


@pytest.fixture(autouse=True)
def _identity(task_identity):
    """Messages need Flower's run/node ids (``task_identity`` in conftest)."""


def _fedavg(**kwargs) -> FedAvg:
    return FedAvg(**kwargs)


def _fedec(steps: int, **kwargs) -> FedEC:
    return FedEC(
        proxy_data=PROXY,
        model_builder=Net,
        distill=DistillSettings(steps=steps, batch_size=8, eval_every=steps or 1),
        **kwargs,
    )


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Net().state_dict()


def _request(node: int, message_type: str = MessageType.TRAIN) -> Message:
    return Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=message_type
    )


def _train_reply(node, state=None, metrics=None, *, arrays_name="arrays", extra=None):
    """A stock ClientApp's train reply: one ArrayRecord and one MetricRecord."""
    metrics = metrics if metrics is not None else _metrics(node)
    content = RecordDict(
        {
            arrays_name: ArrayRecord(state if state is not None else _state(node)),
            "metrics": MetricRecord(metrics),
        }
    )
    for name, record in (extra or {}).items():
        content[name] = record
    return Message(content, reply_to=_request(node))


def _evaluate_reply(node, metrics=None, extra=None):
    metrics = metrics if metrics is not None else _eval_metrics(node)
    content = RecordDict({"metrics": MetricRecord(metrics)})
    for name, record in (extra or {}).items():
        content[name] = record
    return Message(content, reply_to=_request(node, MessageType.EVALUATE))


def _metrics(node: int) -> dict:
    """Numbers and a list-valued metric, weighted by num-examples."""
    return {
        "num-examples": 10 * node + 7,
        "train_loss": 1.0 / node,
        "steps": node,
        "per-class-loss": [0.1 * node, 0.2, 1.0 / node],
    }


def _eval_metrics(node: int) -> dict:
    return {
        "num-examples": 5 * node + 1,
        "eval_loss": 0.5 / node,
        "eval_acc": 0.1 * node,
        "confusion-row": [float(node), 2.0, 3.0 * node],
    }


def _prepared(strategy, arrays=None):
    """``strategy`` after configure_train of round 1 (FedEC keeps the global model)."""
    arrays = arrays if arrays is not None else ArrayRecord(_state(0))
    list(strategy.configure_train(1, arrays, ConfigRecord(), _Grid(NODES)))
    return strategy


def _torch(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def _assert_same_arrays(got: ArrayRecord, expected: ArrayRecord) -> None:
    got_state, expected_state = _torch(got), _torch(expected)
    assert list(got_state) == list(expected_state)
    for key, value in expected_state.items():
        assert torch.equal(got_state[key], value), key


def _assert_same_shapes(got: ArrayRecord, expected: ArrayRecord) -> None:
    assert {k: tuple(v.shape) for k, v in _torch(got).items()} == {
        k: tuple(v.shape) for k, v in _torch(expected).items()
    }


class _Grid:
    """The Grid calls ``Strategy.start`` makes, answered as stock ClientApps would.

    A train reply is the received model moved by a node- and round-dependent step with
    :func:`_metrics`; an evaluate reply carries :func:`_eval_metrics`. Replies come
    back in node order, so FedAvg and FedEC see them in the same order.
    """

    def __init__(self, nodes):
        self.nodes = list(nodes)
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            self.sent.append(message)
            node = message.metadata.dst_node_id
            content = message.content
            server_round = int(content["config"]["server-round"])
            if message.metadata.message_type == MessageType.TRAIN:
                state = {
                    k: v + 0.01 * node * server_round
                    for k, v in content["arrays"].to_torch_state_dict().items()
                }
                reply = RecordDict(
                    {"arrays": ArrayRecord(state), "metrics": MetricRecord(_metrics(node))}
                )
            else:
                reply = RecordDict({"metrics": MetricRecord(_eval_metrics(node))})
            replies.append(Message(reply, reply_to=message))
        return replies


# -- aggregate_train ---------------------------------------------------------------------
@pytest.mark.parametrize("steps", FEDEC_STEPS)
def test_train_aggregates_arrays_and_metrics_as_fedavg(steps):
    replies = [_train_reply(n) for n in NODES]
    expected_arrays, expected_metrics = _prepared(_fedavg()).aggregate_train(1, replies)
    arrays, metrics = _prepared(_fedec(steps)).aggregate_train(1, replies)
    if steps == 0:
        _assert_same_arrays(arrays, expected_arrays)
    else:
        _assert_same_shapes(arrays, expected_arrays)
    # List-valued metrics kept, the weighting key not reported: FedAvg's record exactly.
    assert dict(metrics) == dict(expected_metrics)
    assert "per-class-loss" in metrics and "num-examples" not in metrics


@pytest.mark.parametrize("steps", FEDEC_STEPS)
def test_train_metrics_aggr_fn_is_called_as_fedavg_calls_it(steps):
    calls = {}

    def aggregate(name):
        def aggregate_fn(records, weighted_by_key):
            calls[name] = (records, weighted_by_key)
            return MetricRecord(
                {"replies": len(records), "worst": max(r["metrics"]["train_loss"] for r in records)}
            )

        return aggregate_fn

    replies = [_train_reply(n) for n in NODES]
    kwargs = {"weighted_by_key": "steps"}
    _, expected = _prepared(
        _fedavg(train_metrics_aggr_fn=aggregate("fedavg"), **kwargs)
    ).aggregate_train(1, replies)
    _, metrics = _prepared(
        _fedec(steps, train_metrics_aggr_fn=aggregate("fedec"), **kwargs)
    ).aggregate_train(1, replies)
    assert dict(metrics) == dict(expected) == {"replies": 3, "worst": pytest.approx(1 / 3)}
    fedavg_records, fedavg_key = calls["fedavg"]
    fedec_records, fedec_key = calls["fedec"]
    assert fedec_key == fedavg_key == "steps"
    assert all(a is b for a, b in zip(fedec_records, fedavg_records, strict=True))


@pytest.mark.parametrize("steps", FEDEC_STEPS)
def test_weighted_by_key_weights_arrays_and_metrics_as_fedavg(steps):
    replies = [_train_reply(n) for n in NODES]
    expected_arrays, expected = _prepared(_fedavg(weighted_by_key="steps")).aggregate_train(
        1, replies
    )
    arrays, metrics = _prepared(_fedec(steps, weighted_by_key="steps")).aggregate_train(1, replies)
    if steps == 0:
        _assert_same_arrays(arrays, expected_arrays)
    assert dict(metrics) == dict(expected)
    assert "steps" not in metrics and "num-examples" in metrics


@pytest.mark.parametrize("steps", FEDEC_STEPS)
def test_a_single_array_record_of_another_name_is_the_model(steps):
    replies = [_train_reply(n, arrays_name="weights") for n in NODES]
    expected_arrays, expected = _prepared(_fedavg()).aggregate_train(1, replies)
    arrays, metrics = _prepared(_fedec(steps)).aggregate_train(1, replies)
    assert arrays is not None
    if steps == 0:
        _assert_same_arrays(arrays, expected_arrays)
    assert dict(metrics) == dict(expected)


@pytest.mark.parametrize("steps", FEDEC_STEPS)
@pytest.mark.parametrize(
    "federation",
    [{}, {"min_train_nodes": 0}, {"fraction_train": 0.0}],
    ids=["defaults", "min_train_nodes=0", "fraction_train=0"],
)
def test_no_replies_give_none_none(steps, federation):
    assert _prepared(_fedavg(**federation)).aggregate_train(1, []) == (None, None)
    assert _prepared(_fedec(steps, **federation)).aggregate_train(1, []) == (None, None)


@pytest.mark.parametrize("steps", FEDEC_STEPS)
def test_only_error_replies_give_none_none(steps):
    request = _request(4)
    replies = [Message(Error(code=0, reason="client crashed"), reply_to=request)]
    assert _prepared(_fedavg()).aggregate_train(1, replies) == (None, None)
    assert _prepared(_fedec(steps)).aggregate_train(1, replies) == (None, None)


@pytest.mark.parametrize("steps", FEDEC_STEPS)
def test_a_single_reply_is_aggregated(steps):
    # FedAvg's default min_train_nodes is 2: it samples two nodes and aggregates the
    # one reply that arrives.
    reply = [_train_reply(5)]
    expected_arrays, expected = _prepared(_fedavg()).aggregate_train(1, reply)
    arrays, metrics = _prepared(_fedec(steps)).aggregate_train(1, reply)
    assert arrays is not None and dict(metrics) == dict(expected)
    if steps == 0:
        _assert_same_arrays(arrays, expected_arrays)
        _assert_same_arrays(arrays, ArrayRecord(_state(5)))


# -- aggregate_evaluate ------------------------------------------------------------------
@pytest.mark.parametrize("steps", FEDEC_STEPS)
def test_evaluate_metrics_are_fedavgs(steps):
    replies = [_evaluate_reply(n) for n in NODES]
    expected = _fedavg().aggregate_evaluate(1, replies)
    metrics = _fedec(steps).aggregate_evaluate(1, replies)
    assert dict(metrics) == dict(expected)
    assert "confusion-row" in metrics and "num-examples" not in metrics
    assert _fedavg().aggregate_evaluate(1, []) is None
    assert _fedec(steps).aggregate_evaluate(1, []) is None


def test_evaluate_metrics_aggr_fn_is_called_as_fedavg_calls_it():
    calls = {}

    def aggregate(name):
        def aggregate_fn(records, weighted_by_key):
            calls[name] = records
            return MetricRecord({"best": max(r["metrics"]["eval_acc"] for r in records)})

        return aggregate_fn

    replies = [_evaluate_reply(n) for n in NODES]
    expected = _fedavg(evaluate_metrics_aggr_fn=aggregate("fedavg")).aggregate_evaluate(1, replies)
    metrics = _fedec(0, evaluate_metrics_aggr_fn=aggregate("fedec")).aggregate_evaluate(1, replies)
    assert dict(metrics) == dict(expected) == {"best": pytest.approx(0.8)}
    assert all(a is b for a, b in zip(calls["fedec"], calls["fedavg"], strict=True))


# -- start() -----------------------------------------------------------------------------
@pytest.mark.parametrize("steps", FEDEC_STEPS)
def test_an_evaluation_only_run_works_as_fedavgs(steps, caplog):
    initial = ArrayRecord(_state(0))
    results = {}
    for name, strategy in (
        ("fedavg", _fedavg(fraction_train=0.0)),
        ("fedec", _fedec(steps, fraction_train=0.0)),
    ):
        grid = _Grid(NODES)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            results[name] = strategy.start(grid, initial, num_rounds=2)
        assert {m.metadata.message_type for m in grid.sent} == {MessageType.EVALUATE}
        # Nothing to warn about: no round is short of replies, no feature degrades.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    expected, result = results["fedavg"], results["fedec"]
    assert result.train_metrics_clientapp == expected.train_metrics_clientapp == {}
    assert set(result.evaluate_metrics_clientapp) == {1, 2}
    for server_round, metrics in expected.evaluate_metrics_clientapp.items():
        assert dict(result.evaluate_metrics_clientapp[server_round]) == dict(metrics)
    assert dict(result.arrays) == dict(expected.arrays)


def test_a_run_serves_fedavgs_models_without_distillation():
    initial = ArrayRecord(_state(0))
    expected = _fedavg(min_train_nodes=3).start(_Grid(NODES), initial, num_rounds=2)
    result = _fedec(0, min_train_nodes=3).start(_Grid(NODES), initial, num_rounds=2)
    _assert_same_arrays(result.arrays, expected.arrays)
    for server_round in (1, 2):
        assert dict(result.train_metrics_clientapp[server_round]) == dict(
            expected.train_metrics_clientapp[server_round]
        )
        assert dict(result.evaluate_metrics_clientapp[server_round]) == dict(
            expected.evaluate_metrics_clientapp[server_round]
        )


# -- a malformed reply: FedAvg fails the round, FedEC drops the reply ---------------------
def _two_metric_records(node):
    return _train_reply(node, extra={"more-metrics": MetricRecord({"x": 1.0})})


def _without_weight(node):
    return _train_reply(node, metrics={"train_loss": 0.3, "steps": 1, "per-class-loss": [1.0] * 3})


def _list_weight(node):
    metrics = {**_metrics(node), "num-examples": [1, 2]}
    return _train_reply(node, metrics=metrics)


def _two_unnamed_array_records(node):
    return _train_reply(node, arrays_name="a", extra={"b": ArrayRecord(_state(node))})


def _mismatched_array_keys(node):
    state = {f"other.{k}": v for k, v in _state(node).items()}
    return _train_reply(node, state=state)


def _wrong_dtype(node):
    arrays = {k: Array(v.numpy()) for k, v in _state(node).items()}
    arrays["fc1.weight"] = Array(torch.zeros(2, 2).numpy())
    return _train_reply(node, state=arrays)


MALFORMED = {
    "two MetricRecords": (_two_metric_records, "exactly one MetricRecord"),
    "no weighting key": (_without_weight, "missing metric 'num-examples'"),
    "list-valued weight": (_list_weight, "must be a positive number"),
    "two ArrayRecords, none named arrays": (_two_unnamed_array_records, "2 ArrayRecords"),
    "array keys unlike the others'": (_mismatched_array_keys, "array keys do not fit"),
}


@pytest.mark.parametrize("steps", FEDEC_STEPS)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_train_reply_fails_fedavg_and_is_dropped_by_fedec(steps, case, caplog):
    make_bad, reason = MALFORMED[case]
    good = [_train_reply(n) for n in NODES]
    replies = good[:1] + [make_bad(9)] + good[1:]
    with pytest.raises(InconsistentMessageReplies):
        _prepared(_fedavg()).aggregate_train(1, replies)
    expected_arrays, expected = _prepared(_fedavg()).aggregate_train(1, good)
    strategy = _prepared(_fedec(steps))
    caplog.set_level(logging.WARNING, logger="flwr")
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert dict(metrics) == dict(expected)
    if steps == 0:
        _assert_same_arrays(arrays, expected_arrays)
    assert strategy.server_metrics[1]["rejected-replies"] == 1
    dropped = [r.getMessage() for r in caplog.records if "rejected reply" in r.getMessage()]
    assert len(dropped) == 1 and "node 9" in dropped[0] and reason in dropped[0], dropped


def test_fedec_drops_what_fedavg_would_average_into_garbage(caplog):
    # FedAvg accepts these as long as every reply looks alike; FedEC's checks drop them.
    good = [_train_reply(n) for n in NODES]
    nan_state = _state(9)
    nan_state["fc1.bias"][0] = float("nan")
    for bad, reason in (
        (_train_reply(9, state=nan_state), "non-finite"),
        (_wrong_dtype(9), "does not fit"),
    ):
        caplog.clear()
        strategy = _prepared(_fedec(0))
        with caplog.at_level(logging.WARNING):
            arrays, _ = strategy.aggregate_train(1, good + [bad])
        _assert_same_arrays(arrays, _prepared(_fedavg()).aggregate_train(1, good)[0])
        assert "node 9" in caplog.text and reason in caplog.text


def test_differently_named_array_records_across_replies_are_all_models():
    renamed = [_train_reply(n, arrays_name=f"model-{n}") for n in NODES]
    with pytest.raises(InconsistentMessageReplies):
        _prepared(_fedavg()).aggregate_train(1, renamed)
    expected, _ = _prepared(_fedavg()).aggregate_train(1, [_train_reply(n) for n in NODES])
    arrays, _ = _prepared(_fedec(0)).aggregate_train(1, renamed)
    _assert_same_arrays(arrays, expected)


@pytest.mark.parametrize(
    ("spoil", "left_out"),
    [
        pytest.param(lambda m: m.pop("steps"), "steps", id="a key missing"),
        pytest.param(lambda m: m.update({"extra": 1.0}), "extra", id="an extra key"),
        pytest.param(
            lambda m: m.update({"per-class-loss": [1.0]}), "per-class-loss", id="a shorter list"
        ),
        pytest.param(lambda m: m.update({"steps": [1.0, 2.0]}), "steps", id="a list for a number"),
    ],
)
def test_metrics_not_reported_alike_are_left_out_not_fatal(spoil, left_out, caplog):
    odd_metrics = _metrics(9)
    spoil(odd_metrics)
    replies = [_train_reply(n) for n in NODES] + [_train_reply(9, metrics=odd_metrics)]
    with pytest.raises((InconsistentMessageReplies, ValueError, TypeError)):
        _prepared(_fedavg()).aggregate_train(1, replies)
    caplog.set_level(logging.WARNING, logger="flwr")
    arrays, metrics = _prepared(_fedec(0)).aggregate_train(1, replies)
    assert arrays is not None
    reduced = [
        RecordDict({"metrics": MetricRecord({k: v for k, v in m.items() if k != left_out})})
        for m in [_metrics(n) for n in NODES] + [odd_metrics]
    ]
    assert dict(metrics) == dict(aggregate_metricrecords(reduced, "num-examples"))
    assert left_out not in metrics and "train_loss" in metrics
    assert f"metric(s) {left_out} not reported alike" in caplog.text


EVALUATE_MALFORMED = {
    "two MetricRecords": (
        lambda n: _evaluate_reply(n, extra={"more": MetricRecord({"x": 1.0})}),
        "exactly one MetricRecord",
    ),
    "no weighting key": (
        lambda n: _evaluate_reply(n, metrics={"eval_loss": 0.1, "eval_acc": 0.5}),
        "missing metric 'num-examples'",
    ),
    "list-valued weight": (
        lambda n: _evaluate_reply(n, metrics={**_eval_metrics(n), "num-examples": [3]}),
        "must be a positive number",
    ),
}


@pytest.mark.parametrize("case", list(EVALUATE_MALFORMED))
def test_a_malformed_evaluate_reply_fails_fedavg_and_is_dropped_by_fedec(case, caplog):
    make_bad, reason = EVALUATE_MALFORMED[case]
    good = [_evaluate_reply(n) for n in NODES]
    replies = good + [make_bad(9)]
    with pytest.raises(InconsistentMessageReplies):
        _fedavg().aggregate_evaluate(1, replies)
    caplog.set_level(logging.WARNING, logger="flwr")
    metrics = _fedec(0).aggregate_evaluate(1, replies)
    assert dict(metrics) == dict(_fedavg().aggregate_evaluate(1, good))
    assert "node 9" in caplog.text and reason in caplog.text
