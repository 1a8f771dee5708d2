"""Measure any Flower strategy from the outside: bytes on the wire, time per phase.

:class:`MeteredGrid` wraps the ``Grid`` handed to ``strategy.start``. Every message
the strategy sends and every reply it receives passes through it, so the bytes are
those of the arrays actually sent (``len(Array.data)``, the serialised payload) --
whatever the strategy, including ones that send different arrays to each node. It
records the ``num-examples`` each node's training reply reports
(``train-examples-by-node``), and logs failed replies with their node id and reason and
the nodes that did not answer in time. When failures stop the run is :mod:`fl_ec.run.abort`'s rule.

:class:`TimedAggregation` wraps a strategy to time its ``aggregate_train`` and
``aggregate_query`` (the server's own work; the clients' answers to queries are
metered apart, as ``client-query-seconds``) and to record the clients' aggregated
train metrics (``client-train-loss``, ...).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import WARNING

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_ec.protocol import NUM_EXAMPLES_KEY, SERVER_ROUND_KEY
from fl_ec.results import RoundRecord, RunRecorder
from fl_ec.run.wrapper import StrategyWrapper


def payload_bytes(content: RecordDict) -> int:
    """Serialised bytes of every array in a message's content."""
    return sum(
        len(array.data) for record in content.array_records.values() for array in record.values()
    )


class DelegatingGrid(Grid):
    """A ``Grid`` that forwards everything to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run):  # noqa: ANN001, ANN201 - signature fixed by Flower
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # noqa: ANN201
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


class MeteredGrid(DelegatingGrid):
    """A ``Grid`` that forwards everything to ``inner`` and records traffic and timing."""

    def __init__(self, inner: Grid, recorder: RunRecorder) -> None:
        super().__init__(inner)
        self.recorder = recorder

    # -- the metered path ------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        message_type = messages[0].metadata.message_type
        is_train = message_type == MessageType.TRAIN
        server_round = round_of(messages[0], default=self.recorder.current.round)
        record = self.recorder.record_for(server_round)
        for message in messages:
            sent = payload_bytes(message.content)
            record.bytes_down += sent
            if is_train:
                node = message.metadata.dst_node_id
                record.bytes_down_by_node[node] = record.bytes_down_by_node.get(node, 0) + sent
        start = time.perf_counter()
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        elapsed = time.perf_counter() - start
        self._note_lost(server_round, message_type, messages, replies, timeout, record)
        failed = [r for r in replies if r.has_error()]
        record.bytes_up += sum(payload_bytes(r.content) for r in replies if not r.has_error())
        for reply in failed:
            log(
                WARNING,
                "round %d: %s reply from node %d failed: %s",
                server_round,
                message_type,
                reply.metadata.src_node_id,
                reply.error.reason,
            )
        if is_train:
            record.train_seconds += elapsed
            record.train_replies += len(replies) - len(failed)
            record.rejected_replies += len(failed)
            # What each node says it trained on: a site's own data shows up here.
            examples = {str(r.metadata.src_node_id): examples_reported(r) for r in replies}
            examples = {node: n for node, n in examples.items() if n is not None}
            if examples:
                record.metrics.setdefault("train-examples-by-node", {}).update(examples)
        elif message_type == MessageType.QUERY:  # e.g. FedEC's feature statistics
            record.client_query_seconds += elapsed
        else:
            record.client_evaluate_seconds += elapsed
        return replies

    def _note_lost(
        self,
        server_round: int,
        message_type: str,
        messages: list[Message],
        replies: list[Message],
        timeout: float | None,
        record: RoundRecord,
    ) -> None:
        """Record and log the nodes that did not answer within ``timeout``."""
        answered = {reply.metadata.src_node_id for reply in replies}
        lost = sorted({m.metadata.dst_node_id for m in messages} - answered)
        if not lost:
            return
        record.lost_nodes.update(lost)
        log(
            WARNING,
            "round %d: no %s reply from node(s) %s within %s; the round goes on without them",
            server_round,
            message_type,
            lost,
            "the wait" if timeout is None else f"{timeout:g} s",
        )


def examples_reported(reply: Message) -> int | None:
    """The ``num-examples`` a training reply reports (Flower's weighting key), when it is
    a non-negative whole number; None for an error reply or anything else."""
    if reply.has_error():
        return None
    for record in reply.content.metric_records.values():
        value = record.get(NUM_EXAMPLES_KEY)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and 0 <= value < 2**53 and float(value).is_integer():
            return int(value)
    return None


def round_of(message: Message, default: int) -> int:
    """The server round a message belongs to (its config's ``server-round``)."""
    for record in message.content.config_records.values():
        if SERVER_ROUND_KEY in record:
            return int(record[SERVER_ROUND_KEY])
    return default


class TimedAggregation(StrategyWrapper):
    """``strategy`` with its server-side work timed and its train metrics recorded.

    The seconds of ``aggregate_train`` and ``aggregate_query`` go into the round's
    ``aggregate_seconds`` in ``recorder``; the time the clients take to answer a query
    is the grid's (:class:`MeteredGrid`: ``client_query_seconds``), not counted here.
    The clients' aggregated train metrics are recorded as the round's
    ``client-<name>`` metrics (``client-train-loss``, ...).
    """

    def __init__(self, strategy: Strategy, recorder: RunRecorder) -> None:
        super().__init__(strategy)
        self.recorder = recorder

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's ``aggregate_train``, timed; its metrics recorded."""
        with self._timed(server_round):
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if metrics is not None:  # the clients' aggregated train metrics, e.g. client-train-loss
            self.recorder.record_for(server_round).metrics.update(
                {f"client-{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            )
        return arrays, metrics

    def aggregate_query(
        self, server_round: int, replies: Iterable[Message]
    ) -> ArrayRecord | None:
        """The inner strategy's ``aggregate_query``, timed."""
        with self._timed(server_round):
            return super().aggregate_query(server_round, replies)

    @contextmanager
    def _timed(self, server_round: int) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.recorder.record_for(server_round).aggregate_seconds += (
                time.perf_counter() - start
            )

    def describe(self) -> str:
        """The timed strategy."""
        return f"aggregation of {self.strategy.__class__.__name__} timed"
