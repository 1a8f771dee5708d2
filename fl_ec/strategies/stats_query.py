"""Feature-statistics queries: what the server asks the clients, and what it keeps.

Feature calibration needs each client's class-conditional statistics of the served
model's features. A :class:`StatsQuery` says which model to measure, how, and whom to
ask; the round loop sends it between training and evaluation
(:func:`fl_ec.run.loop.query_phase`), and :func:`read_stats_replies` keeps the valid
answers, logging each invalid one with its node and reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import DEBUG, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from torch import nn

from fl_ec.calibration import CalibrationSettings, FeatureStatistics, FeatureStats
from fl_ec.models.spec import ArchSpec
from fl_ec.protocol import (
    ARCH_SPEC_KEY,
    SERVER_ROUND_KEY,
    STATS_COMPONENTS_KEY,
    STATS_LAYERS_KEY,
    STATS_RANK_KEY,
    STATS_RECORD_KEY,
)
from fl_ec.strategies.acceptance import accept_stats_replies
from fl_ec.strategies.degraded import ADD_FEATURE_STATS, DegradedFeatures
from fl_ec.strategies.replies import ReplyLimits, parse_stats_reply


@dataclass
class StatsQuery:
    """One statistics query: ``model`` travels as ``arrays``, to ``nodes`` (None: all).

    ``extra_config`` joins the query's config (FedHCE: how to unpack a compressed
    variant).
    """

    server_round: int
    model: nn.Module
    arrays: ArrayRecord
    nodes: list[int] | None
    extra_config: dict[str, Any] = field(default_factory=dict)


def messages_to(nodes: Iterable[int], record: RecordDict, message_type: str) -> list[Message]:
    """One message per node, each carrying ``record``."""
    return [
        Message(content=record, message_type=message_type, dst_node_id=node) for node in nodes
    ]


def query_messages(
    query: StatsQuery,
    nodes: list[int],
    calibration: CalibrationSettings,
    spec: ArchSpec | None,
    keys: tuple[str, str],
) -> list[Message]:
    """The query's messages to ``nodes``; ``keys``: the array and config record names."""
    config = ConfigRecord(
        {
            SERVER_ROUND_KEY: query.server_round,
            STATS_RECORD_KEY: True,
            STATS_LAYERS_KEY: calibration.layers,
            STATS_RANK_KEY: calibration.rank,
            STATS_COMPONENTS_KEY: calibration.components,
        }
    )
    if spec is not None:
        config[ARCH_SPEC_KEY] = spec.to_json()
    for key, value in query.extra_config.items():
        config[key] = value
    record = RecordDict({keys[0]: query.arrays, keys[1]: config})
    return messages_to(nodes, record, MessageType.QUERY)


def read_stats_replies(
    query: StatsQuery,
    replies: list[Message],
    statistics: FeatureStatistics,
    limits: ReplyLimits,
    degraded: DegradedFeatures,
) -> tuple[list[FeatureStats], dict[str, float]]:
    """The valid statistics of ``query.model``'s features, and the query's counts.

    Clients that cannot answer (no query handler) are named once per run.
    """
    server_round = query.server_round
    num_classes, dim = statistics.dims(query.model)
    parts, unsupported = accept_stats_replies(
        server_round,
        replies,
        lambda reply: parse_stats_reply(reply, num_classes, dim, statistics, limits),
    )
    if unsupported:
        degraded.warn(
            "feature-statistics",
            "round %d: node(s) %s answer no feature-statistics query (%s): feature "
            "calibration runs without them, and a round without any statistics serves "
            "the uncalibrated model; %s",
            server_round,
            sorted(unsupported),
            "; ".join(sorted(set(unsupported.values()))),
            ADD_FEATURE_STATS,
        )
    if not parts:
        # Clients known to lack the query were reported once: no warning per round.
        level = DEBUG if replies and len(unsupported) == len(replies) else WARNING
        log(level, "round %d: no valid feature statistics; not calibrated", server_round)
    return parts, {
        "calibration-valid-replies": float(len(parts)),
        "calibration-rejected-replies": float(len(replies) - len(parts)),
    }
