"""Seeded client sampling: with one seed, every strategy trains the same clients each round.

Flower's strategies sample nodes with ``random.sample`` on the process-wide random state,
which anything else in the ServerApp can advance, over node ids that are random per run.
So two methods run with the same seed train different clients, and with a few of many
clients per round *which* clients were sampled moves accuracy by several points.

:class:`SeededSampling` fixes both, wrapped around any Flower strategy without changing
its code: before its first round it asks every node which partition it holds (a ``query``
message the fl-ec ClientApp answers with its ``partition-id`` and class counts), lists
the nodes in partition order, and runs each ``configure_train`` / ``configure_evaluate``
on a random state seeded by (seed, round, phase) that it restores afterwards. The sample
is then a function of the seed, the round and the number of nodes only. Nodes that do
not answer (a stock ClientApp) are listed after the others by node id, with a warning.
The describe reply also carries the node's ``capability``; the sampler hands it to its
capability listeners (FedHCE's tier assignment, :class:`~fl_ec.run.tiers.TrainTiers`),
so a node's first training round already gets the model its tier calls for.

It also hands ``aggregate_train`` / ``aggregate_evaluate`` the replies in that node
order instead of their arrival order: float sums depend on the order of their terms,
and in a federation of several local epochs a last-bit difference in one round's
average grows into a different trajectory. With both fixed, FedAvg's run is
reproducible, and a FedEC run without distillation serves exactly FedAvg's models.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_ec.protocol import (
    CAPABILITY_KEY,
    CLASS_COUNTS_KEY,
    CONFIG_RECORD_KEY,
    DESCRIBE_KEY,
    NODE_INFO_KEY,
    PARTITION_ID_KEY,
)
from fl_ec.run.metering import DelegatingGrid
from fl_ec.run.wrapper import StrategyWrapper

QUERY = MessageType.QUERY


@dataclass(frozen=True)
class NodeInfo:
    """What a node said about itself: its data partition and that partition's labels."""

    partition_id: int
    class_counts: tuple[float, ...]


def parse_node_info(reply: Message) -> NodeInfo:
    """A describe reply's :class:`NodeInfo`; ``ValueError`` with the reason otherwise."""
    if reply.has_error():
        raise ValueError(f"error reply: {reply.error.reason}")
    if NODE_INFO_KEY not in reply.content.config_records:
        raise ValueError(f"no {NODE_INFO_KEY!r} record")
    record = reply.content.config_records[NODE_INFO_KEY]
    partition = record.get(PARTITION_ID_KEY)
    if not isinstance(partition, int) or isinstance(partition, bool) or partition < 0:
        raise ValueError(f"{PARTITION_ID_KEY}={partition!r} is not a non-negative integer")
    counts = record.get(CLASS_COUNTS_KEY, [])
    if not isinstance(counts, list) or not all(
        isinstance(c, int | float) and 0 <= c < float("inf") for c in counts
    ):
        raise ValueError(f"{CLASS_COUNTS_KEY} is not a list of finite non-negative numbers")
    return NodeInfo(partition, tuple(float(c) for c in counts))


CapabilityListener = Callable[[int, ConfigRecord], None]


class SeededSampler:
    """Canonical node order (by partition) and a per-round seeded random state.

    ``timeout``: how long the describe query waits for the nodes (each loads its
    partition to count its labels); a node that does not answer in time is listed
    after the described ones. Each ``capability_listeners(node_id, record)`` is called
    with the ``capability`` record of every describe reply that has one; a listener
    validates it (and raises ``ValueError`` to reject it, which is logged).
    """

    def __init__(
        self,
        seed: int,
        timeout: float = 120.0,
        capability_listeners: Iterable[CapabilityListener] = (),
    ) -> None:
        self.seed = seed
        self.timeout = timeout
        self.capability_listeners = list(capability_listeners)
        self.info: dict[int, NodeInfo] = {}
        self._asked: set[int] = set()
        self._position: dict[int, int] = {}  # node -> place in the last ordered_nodes()

    def ordered_nodes(self, grid: Grid) -> list[int]:
        """The grid's nodes, described ones by partition id first, then the rest by id."""
        nodes = sorted(grid.get_node_ids())
        new = [node for node in nodes if node not in self._asked]
        if new:
            self._describe(grid, new)
        described = sorted(
            (n for n in nodes if n in self.info), key=lambda n: (self.info[n].partition_id, n)
        )
        order = described + [n for n in nodes if n not in self.info]
        self._position = {node: i for i, node in enumerate(order)}
        return order

    def in_node_order(self, replies: Iterable[Message]) -> list[Message]:
        """``replies`` sorted by their sender's place in the node order (unknown: last)."""
        last = len(self._position)
        return sorted(
            replies,
            key=lambda r: (
                self._position.get(r.metadata.src_node_id, last),
                r.metadata.src_node_id,
            ),
        )

    @contextmanager
    def random_state(self, server_round: int, phase: str) -> Iterator[None]:
        """Run the body on ``random`` seeded by (seed, round, phase); restore it after."""
        saved = random.getstate()
        random.seed(f"fl-ec-sampling:{self.seed}:{server_round}:{phase}")
        try:
            yield
        finally:
            random.setstate(saved)

    def _describe(self, grid: Grid, nodes: list[int]) -> None:
        self._asked.update(nodes)
        config = ConfigRecord({DESCRIBE_KEY: True})
        messages = [
            Message(RecordDict({CONFIG_RECORD_KEY: config}), dst_node_id=node, message_type=QUERY)
            for node in nodes
        ]
        start = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            try:
                self.info[node] = parse_node_info(reply)
            except ValueError as reason:
                log(WARNING, "sampling: node %d did not describe itself: %s", node, reason)
                continue
            self._hand_capability(node, reply)
        silent = [n for n in nodes if n not in answered]
        if silent:
            log(WARNING, "sampling: no describe reply from nodes %s", silent)
        log(
            WARNING if len(self.info) < len(self._asked) else INFO,
            "sampling: %d of %d nodes described their partition in %.1fs",
            sum(n in self.info for n in nodes),
            len(nodes),
            time.perf_counter() - start,
        )

    def _hand_capability(self, node: int, reply: Message) -> None:
        record = reply.content.config_records.get(CAPABILITY_KEY)
        if record is None:
            return
        for listener in self.capability_listeners:
            try:
                listener(node, record)
            except ValueError as reason:
                log(WARNING, "sampling: node %d's capability rejected: %s", node, reason)


class OrderedGrid(DelegatingGrid):
    """``inner`` whose ``get_node_ids`` lists the nodes in a fixed order.

    ``order`` is the list, or what computes it when the nodes are first asked for.
    """

    def __init__(self, inner: Grid, order: list[int] | Callable[[], list[int]]) -> None:
        super().__init__(inner)
        self._order = order

    def get_node_ids(self) -> Iterable[int]:
        if callable(self._order):
            self._order = self._order()
        return list(self._order)


SampleCallback = Callable[[int, list[int], dict[int, NodeInfo]], None]


class SeededSampling(StrategyWrapper):
    """``strategy`` with seeded, strategy-independent node sampling and replies in node order.

    Each ``configure_train`` / ``configure_evaluate`` of the inner strategy sees the
    grid's nodes in ``sampler``'s order and runs on ``random`` seeded by (seed, round,
    phase); each ``aggregate_train`` / ``aggregate_query`` / ``aggregate_evaluate``
    gets the replies sorted into that order. ``on_sample(server_round, sampled_node_ids,
    node_info)`` is called after each training round's sample is drawn, e.g. to record
    which partitions trained.
    """

    def __init__(
        self, strategy: Strategy, sampler: SeededSampler, on_sample: SampleCallback | None = None
    ) -> None:
        super().__init__(strategy)
        self.sampler = sampler
        self.on_sample = on_sample

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's training messages, sampled on the seeded random state."""
        view = OrderedGrid(grid, self.sampler.ordered_nodes(grid))
        with self.sampler.random_state(server_round, "train"):
            messages = list(self.strategy.configure_train(server_round, arrays, config, view))
        if self.on_sample is not None:
            sampled = [m.metadata.dst_node_id for m in messages]
            self.on_sample(server_round, sampled, self.sampler.info)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's evaluation messages, sampled on the seeded random state."""
        view = OrderedGrid(grid, self.sampler.ordered_nodes(grid))
        with self.sampler.random_state(server_round, "evaluate"):
            return list(self.strategy.configure_evaluate(server_round, arrays, config, view))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's aggregate of the training replies, in node order."""
        return self.strategy.aggregate_train(server_round, self.sampler.in_node_order(replies))

    def configure_query(
        self, server_round: int, arrays: ArrayRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's query messages, the grid's nodes seen in node order
        (asked for only if the strategy asks for them: most rounds query nobody)."""
        return super().configure_query(
            server_round, arrays, OrderedGrid(grid, lambda: self.sampler.ordered_nodes(grid))
        )

    def aggregate_query(
        self, server_round: int, replies: Iterable[Message]
    ) -> ArrayRecord | None:
        """The inner strategy's global model after the query's replies, in node order."""
        return super().aggregate_query(server_round, self.sampler.in_node_order(replies))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The inner strategy's aggregate of the evaluation replies, in node order."""
        return self.strategy.aggregate_evaluate(server_round, self.sampler.in_node_order(replies))

    def describe(self) -> str:
        """The sampling seed and the inner strategy."""
        return f"seeded sampling (seed {self.sampler.seed}) of {self.strategy.__class__.__name__}"
