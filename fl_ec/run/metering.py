"""Measure any Flower strategy from the outside: bytes on the wire, time per phase.

:class:`MeteredGrid` wraps the ``Grid`` handed to ``strategy.start``. Every message
the strategy sends and every reply it receives passes through it, so the bytes are
those of the arrays actually sent (``len(Array.data)``, the serialised payload) --
whatever the strategy, including ones that send different arrays to each node. It
also logs failed replies with their node id and reason. A round in which *every*
training reply failed keeps the global model as it was; the run stops only when that
happens before any round succeeded (a misconfiguration: every ClientApp crashes) or
in :data:`MAX_FAILED_ROUNDS` rounds in a row (the federation is gone), so that one
node answering with errors cannot end the run.

:class:`TimedAggregation` wraps a strategy to time its ``aggregate_train`` and to record
the clients' aggregated train metrics (``client-train-loss``, ...); time spent waiting
on clients for queries sent from inside it is left out of it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_ec.errors import FlEcError
from fl_ec.protocol import SERVER_ROUND_KEY
from fl_ec.results import RoundRecord, RunRecorder
from fl_ec.run.wrapper import StrategyWrapper

MAX_FAILED_ROUNDS = 3  # training rounds in a row in which every reply failed


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
        self.trained_once = False  # some round had a training reply that did not fail
        self.failed_rounds = 0  # rounds in a row in which every training reply failed

    def state(self) -> dict[str, int | bool]:
        """The failed-round counters, for the run's checkpoint."""
        return {"trained-once": self.trained_once, "failed-rounds": self.failed_rounds}

    def restore(self, state: dict[str, int | bool]) -> None:
        """Continue counting from :meth:`state`'s counters (a resumed run)."""
        self.trained_once = bool(state.get("trained-once", False))
        self.failed_rounds = int(state.get("failed-rounds", 0))

    # -- the metered path ------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        message_type = messages[0].metadata.message_type
        is_train = message_type == MessageType.TRAIN
        server_round = _round_of(messages[0], default=self.recorder.current.round)
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
            if replies and len(failed) == len(replies):
                self._every_reply_failed(server_round, failed)
            elif replies:
                self.trained_once, self.failed_rounds = True, 0
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

    def _every_reply_failed(self, server_round: int, failed: list[Message]) -> None:
        """Stop the run on a misconfiguration or a lost federation; else say so and go on."""
        self.failed_rounds += 1
        first = f"first (node {failed[0].metadata.src_node_id}): {failed[0].error.reason}"
        if not self.trained_once or self.failed_rounds >= MAX_FAILED_ROUNDS:
            in_a_row = f" ({self.failed_rounds} rounds in a row)" if self.trained_once else ""
            raise FlEcError(
                f"round {server_round}: all {len(failed)} clients failed{in_a_row}; {first}"
            )
        log(
            WARNING,
            "round %d: all %d clients failed, the global model stays as it was; %s",
            server_round,
            len(failed),
            first,
        )


def _round_of(message: Message, default: int) -> int:
    for record in message.content.config_records.values():
        if SERVER_ROUND_KEY in record:
            return int(record[SERVER_ROUND_KEY])
    return default


class TimedAggregation(StrategyWrapper):
    """``strategy`` with its ``aggregate_train`` timed and its train metrics recorded.

    The seconds go into the round's ``aggregate_seconds`` in ``recorder``, less the
    time spent waiting on clients for queries sent from inside ``aggregate_train``
    (FedEC's feature statistics, metered by :class:`MeteredGrid` as the round's
    ``client_query_seconds``). The clients' aggregated train metrics are recorded as
    the round's ``client-<name>`` metrics (``client-train-loss``, ...).
    """

    def __init__(self, strategy: Strategy, recorder: RunRecorder) -> None:
        super().__init__(strategy)
        self.recorder = recorder

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's ``aggregate_train``, timed; its metrics recorded."""
        record = self.recorder.record_for(server_round)
        # Queries sent from inside aggregate_train (FedEC's feature statistics) wait on
        # the clients: their time is the clients', not the server's aggregation.
        query_seconds_before = record.client_query_seconds
        start = time.perf_counter()
        try:
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        finally:
            waited = record.client_query_seconds - query_seconds_before
            record.aggregate_seconds += time.perf_counter() - start - waited
        if metrics is not None:  # the clients' aggregated train metrics, e.g. client-train-loss
            self.recorder.record_for(server_round).metrics.update(
                {f"client-{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            )
        return arrays, metrics

    def describe(self) -> str:
        """The timed strategy."""
        return f"aggregation of {self.strategy.__class__.__name__} timed"
