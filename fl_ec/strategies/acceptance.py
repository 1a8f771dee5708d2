"""A round's replies, accepted one by one: no reply can end the round.

Each reply is parsed on its own (:mod:`fl_ec.strategies.replies`); one that fails a
check, raises any other exception, or comes from a node that already replied this
round is rejected, logged with its node id and the reason, and counted. The round goes
on with the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TypeVar

from flwr.app import Message, RecordDict
from flwr.common.logger import log

from fl_ec.calibration import FeatureStats
from fl_ec.protocol import TRAIN_SECONDS_KEY
from fl_ec.strategies.fedec_utils import ClientModel
from fl_ec.strategies.replies import (
    RejectedReplyError,
    missing_stats_support,
    reply_weight,
)

T = TypeVar("T")


@dataclass
class AcceptedReplies:
    """The round's accepted client models, their replies' contents (same order), and
    the counts the round's metrics report."""

    models: list[ClientModel] = field(default_factory=list)
    contents: list[RecordDict] = field(default_factory=list)
    rejected: int = 0
    errors: int = 0
    server_round: int = 0

    def below(self, minimum: int, expected: bool = True) -> bool:
        """Whether fewer than ``minimum`` replies were accepted; said in a warning when
        replies were ``expected``."""
        if len(self.models) >= minimum:
            return False
        if expected:
            log(
                WARNING,
                "round %d: %d of %d replies accepted, fewer than min_valid_replies=%d; "
                "the global model stays",
                self.server_round,
                len(self.models),
                len(self.models) + self.rejected,
                minimum,
            )
        return True

    def stats(self) -> dict[str, float]:
        return {
            "valid-replies": float(len(self.models)),
            # Error replies included: Flower reports them as failures, and the ServerApp
            # counts them from there (``error-replies``).
            "rejected-replies": float(self.rejected),
            "error-replies": float(self.errors),
            # Compared against the server's own cost in the benchmark.
            "client-train-seconds-sum": sum(
                m.metrics.get(TRAIN_SECONDS_KEY, 0.0) for m in self.models
            ),
        }


def reason_of(err: Exception) -> str:
    """A rejection's reason: a failed check says what failed; anything else its type too."""
    return str(err) if isinstance(err, RejectedReplyError) else f"{type(err).__name__}: {err}"


def accept_each(
    server_round: int, replies: Iterable[Message], parse: Callable[[Message], T], what: str
) -> tuple[list[tuple[Message, T]], list[Message]]:
    """Each reply with what ``parse`` made of it, and the rejected replies.

    A node's second reply in the round, and a reply ``parse`` raises any exception
    for, is rejected and logged as a ``what`` from its node with the reason.
    """
    accepted: list[tuple[Message, T]] = []
    rejected: list[Message] = []
    seen: set[int] = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        try:
            if node in seen:
                raise RejectedReplyError("a second reply from this node in this round")
            seen.add(node)
            accepted.append((reply, parse(reply)))
        except Exception as err:  # noqa: BLE001 - no reply may end the round
            rejected.append(reply)
            log(
                WARNING,
                "round %d: rejected %s from node %d: %s",
                server_round,
                what,
                node,
                reason_of(err),
            )
    return accepted, rejected


def accept_train_replies(
    server_round: int, replies: Iterable[Message], parse: Callable[[Message], ClientModel]
) -> AcceptedReplies:
    """``parse`` each train reply; keep those it returns a client model for."""
    accepted, rejected = accept_each(server_round, replies, parse, "reply")
    result = AcceptedReplies(
        models=[model for _, model in accepted],
        contents=[reply.content for reply, _ in accepted],
        rejected=len(rejected),
        errors=sum(reply.has_error() for reply in rejected),
        server_round=server_round,
    )
    log(
        INFO,
        "aggregate_train: round %d: %d replies accepted, %d rejected (%d error replies)",
        server_round,
        len(result.models),
        result.rejected,
        result.errors,
    )
    return result


def _check_evaluate_reply(reply: Message, weighted_by_key: str) -> None:
    if reply.has_error():
        raise RejectedReplyError(f"error reply: {reply.error.reason}")
    reply_weight(reply.content, weighted_by_key)  # its only MetricRecord, all finite


def accept_evaluate_replies(
    server_round: int, replies: Iterable[Message], weighted_by_key: str
) -> list[RecordDict]:
    """The contents of the evaluation replies whose MetricRecord passes ``FedAvg``'s
    checks and holds finite metrics (:func:`~fl_ec.strategies.replies.reply_weight`),
    one per node."""
    accepted, _ = accept_each(
        server_round,
        replies,
        lambda reply: _check_evaluate_reply(reply, weighted_by_key),
        "evaluate reply",
    )
    return [reply.content for reply, _ in accepted]


def accept_stats_replies(
    server_round: int, replies: Iterable[Message], parse: Callable[[Message], FeatureStats]
) -> tuple[list[FeatureStats], dict[int, str]]:
    """The valid feature statistics, one per node, and the nodes that cannot answer.

    A node whose reply shows it has no statistics query handler (a stock ClientApp) is
    returned with the reason instead of rejected: the caller reports it once per run.
    """
    unsupported: dict[int, str] = {}

    def parse_supported(reply: Message) -> FeatureStats | None:
        missing = missing_stats_support(reply)
        if missing is not None:
            unsupported[reply.metadata.src_node_id] = missing
            return None
        return parse(reply)

    accepted, _ = accept_each(server_round, replies, parse_supported, "feature statistics")
    return [stats for _, stats in accepted if stats is not None], unsupported
