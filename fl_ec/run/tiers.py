"""Train only the nodes of some device tiers: the others are sampled but left out.

:class:`TrainTiers` wraps any strategy. A node's tier is what its training replies
report (``capability`` / ``device-tier``), or what its describe reply reported before
the first round (:meth:`TrainTiers.note_capability`, fed by seeded sampling). The
sample stays the inner strategy's (so a run samples the same nodes as one without the
wrapper), then nodes known to be of another tier get no training message, and replies
from another tier, or with no tier, are left out of the aggregate, logged with their
node id. The baseline "FedEC on the GPU tier only" of a mixed fleet is FedEC wrapped in
``TrainTiers({"gpu"})``.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_ec.protocol import CAPABILITY_KEY, DEVICE_TIER_KEY
from fl_ec.run.wrapper import StrategyWrapper


class TrainTiers(StrategyWrapper):
    """``strategy``, trained only by nodes whose ``device-tier`` is one of ``tiers``."""

    def __init__(self, strategy: Strategy, tiers: Iterable[str]) -> None:
        super().__init__(strategy)
        self.tiers = frozenset(tiers)
        if not self.tiers:
            raise ValueError("TrainTiers needs at least one tier")
        self.tier_of: dict[int, str] = {}  # node -> the tier it last reported

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages, less those to nodes known to be of another tier."""
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        return [m for m in messages if self._trains(m.metadata.dst_node_id)]

    def note_capability(self, node_id: int, record: ConfigRecord) -> None:
        """Learn a node's tier before its first training reply (a describe reply's
        ``capability``); ``ValueError`` if it reports none."""
        tier = _tier_of(record)
        if not tier:
            raise ValueError(f"no {DEVICE_TIER_KEY!r} (a string of at most 64 characters)")
        self.tier_of[node_id] = tier

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's aggregate of the replies from the chosen tiers."""
        kept = []
        for reply in replies:
            if reply.has_error():  # the inner strategy counts and logs it as it would
                kept.append(reply)
                continue
            node = reply.metadata.src_node_id
            self.tier_of[node] = _reported_tier(reply)
            if self._trains(node):
                kept.append(reply)
            else:
                log(INFO, "round %d: node %d (tier %r) left out: only tiers %s train",
                    server_round, node, self.tier_of[node], sorted(self.tiers))
        return self.strategy.aggregate_train(server_round, kept)

    def _trains(self, node: int) -> bool:
        return self.tier_of.get(node) in self.tiers or node not in self.tier_of

    def describe(self) -> str:
        """The tiers that train."""
        return f"only tiers {sorted(self.tiers)} train"


def _reported_tier(reply: Message) -> str:
    """The tier a reply reports; ``""`` when it reports none (or not as a short string)."""
    capability = reply.content.config_records.get(CAPABILITY_KEY)
    return _tier_of(capability) if capability is not None else ""


def _tier_of(capability: ConfigRecord) -> str:
    tier = capability.get(DEVICE_TIER_KEY, "")
    return tier if isinstance(tier, str) and len(tier) <= 64 else ""
