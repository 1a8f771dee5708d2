"""MeteredGrid / TimedAggregation with a scripted Grid (unit test of the metering logic)."""

import json
import logging

import numpy as np
import pytest
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
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_ec.errors import FlEcError
from fl_ec.models import ArchSpec
from fl_ec.results import RunRecorder
from fl_ec.run.abort import AbortOnFailedRounds
from fl_ec.run.metering import (
    MeteredGrid,
    TimedAggregation,
    payload_bytes,
    round_of,
)
from fl_ec.run.quorum import ReplyQuorum


class ScriptedGrid(Grid):
    """Replies to each message with what ``reply_fn(message)`` returns."""

    def __init__(self, reply_fn):
        self.reply_fn = reply_fn

    def set_run(self, run): ...

    @property
    def run(self): ...

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None): ...

    def get_node_ids(self):
        return [1, 2, 3]

    def push_messages(self, messages): ...

    def pull_messages(self, message_ids): ...

    def send_and_receive(self, messages, *, timeout=None):
        return [self.reply_fn(m) for m in messages]


def _arrays(n):
    return ArrayRecord({"w": Array(np.ones(n, dtype=np.float32))})


def _train_messages(server_round, n=100):
    return [
        Message(
            RecordDict(
                {"arrays": _arrays(n), "config": ConfigRecord({"server-round": server_round})}
            ),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
        )
        for node in (1, 2, 3)
    ]


def _ok_reply(message, n=50):
    return Message(
        RecordDict({"arrays": _arrays(n), "metrics": MetricRecord({"num-examples": 10})}),
        reply_to=message,
    )


@pytest.fixture
def recorder(tmp_path):
    return RunRecorder(
        tmp_path / "run", {"strategy": "fedavg"}, ArchSpec("cnn", (1, 28, 28), 10), num_rounds=2
    )


def test_bytes_are_those_of_the_serialised_arrays(task_identity, recorder):
    grid = MeteredGrid(ScriptedGrid(_ok_reply), recorder)
    messages = _train_messages(1)
    replies = grid.send_and_receive(messages)
    record = recorder.record_for(1)
    assert record.bytes_down == 3 * len(messages[0].content["arrays"]["w"].data)
    assert record.bytes_down > 3 * 100 * 4  # the npy header travels too
    assert record.bytes_up == sum(payload_bytes(r.content) for r in replies)
    assert record.bytes_up < record.bytes_down
    assert record.train_replies == 3 and record.rejected_replies == 0


def test_failed_replies_are_logged_with_node_and_counted(task_identity, recorder, caplog):
    def reply(message):
        if message.metadata.dst_node_id == 2:
            return Message(Error(code=100, reason="partition missing"), reply_to=message)
        return _ok_reply(message)

    caplog.set_level(logging.WARNING, logger="flwr")
    replies = MeteredGrid(ScriptedGrid(reply), recorder).send_and_receive(_train_messages(1))
    assert len(replies) == 3
    record = recorder.record_for(1)
    assert record.train_replies == 2 and record.rejected_replies == 1
    assert any(
        "node 2" in r.getMessage() and "partition missing" in r.getMessage() for r in caplog.records
    )


def test_nodes_that_do_not_answer_in_time_are_recorded_and_the_round_goes_on(
    task_identity, recorder, caplog
):
    class Timing(ScriptedGrid):  # node 3 never answers within the timeout
        def send_and_receive(self, messages, *, timeout=None):
            self.timeout = timeout
            return [self.reply_fn(m) for m in messages if m.metadata.dst_node_id != 3]

    caplog.set_level(logging.WARNING, logger="flwr")
    grid = Timing(_ok_reply)
    replies = MeteredGrid(grid, recorder).send_and_receive(_train_messages(1), timeout=5.0)
    assert len(replies) == 2 and grid.timeout == 5.0
    record = recorder.record_for(1)
    assert record.lost_nodes == {3} and record.to_dict()["lost-nodes"] == [3]
    assert record.train_replies == 2 and record.rejected_replies == 0
    assert any("node(s) [3] within 5 s" in r.getMessage() for r in caplog.records)


def test_a_round_where_every_client_failed_stops_the_run(task_identity, recorder):
    def reply(message):
        return Message(Error(code=100, reason="alpha=0.0 must be > 0"), reply_to=message)

    with pytest.raises(FlEcError, match="all 3 clients failed.*alpha=0.0 must be > 0"):
        AbortOnFailedRounds(MeteredGrid(ScriptedGrid(reply), recorder)).send_and_receive(
            _train_messages(1)
        )


def test_after_a_good_round_a_failed_round_keeps_going_until_three_in_a_row(
    task_identity, recorder, caplog
):
    failing = {2, 3, 4}  # rounds in which every client answers with an error

    def reply(message):
        if round_of(message, default=0) in failing:
            return Message(Error(code=100, reason="hostile node"), reply_to=message)
        return _ok_reply(message)

    caplog.set_level(logging.WARNING, logger="flwr")
    grid = AbortOnFailedRounds(MeteredGrid(ScriptedGrid(reply), recorder))
    grid.send_and_receive(_train_messages(1))
    for server_round in (2, 3):
        replies = grid.send_and_receive(_train_messages(server_round))
        assert all(r.has_error() for r in replies)  # handed to the strategy, which keeps
    assert sum("global model stays" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(FlEcError, match=r"round 4: all 3 clients failed \(3 rounds in a row\)"):
        grid.send_and_receive(_train_messages(4))
    failing.clear()  # a good round resets the count
    grid.send_and_receive(_train_messages(5))
    assert grid.failed_rounds == 0


def test_aggregation_is_timed_and_rounds_are_written(task_identity, recorder):
    strategy = TimedAggregation(FedAvg(), recorder)
    replies = MeteredGrid(ScriptedGrid(_ok_reply), recorder).send_and_receive(_train_messages(1))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert recorder.record_for(1).aggregate_seconds > 0
    recorder.close_round(1, {"test-accuracy": 0.5})
    written = json.loads((recorder.run_dir / "metrics.json").read_text())
    assert written["rounds"][0]["round"] == 1
    assert written["rounds"][0]["bytes-down"] == recorder.rounds[0].bytes_down
    assert written["rounds"][0]["test-accuracy"] == 0.5


def test_a_round_below_the_reply_quorum_keeps_the_global_model(task_identity, recorder, caplog):
    def reply(message):  # two of three nodes crash
        if message.metadata.dst_node_id != 1:
            return Message(Error(code=100, reason="crashed"), reply_to=message)
        return _ok_reply(message)

    replies = ScriptedGrid(reply).send_and_receive(_train_messages(1))
    caplog.set_level(logging.WARNING, logger="flwr")
    assert ReplyQuorum(FedAvg(), minimum=2).aggregate_train(1, replies) == (None, None)
    assert "1 usable training replies, fewer than min-train-replies=2" in caplog.text
    arrays, _ = ReplyQuorum(FedAvg(), minimum=1).aggregate_train(1, replies)
    assert arrays is not None  # the one good reply is enough at the default
