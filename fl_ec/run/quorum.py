"""Keep the global model in a round where too few clients answered.

A round goes on with the replies that arrived within ``round-timeout``; Flower's
strategies then aggregate whatever came back, one reply included. :class:`ReplyQuorum`
wraps any strategy: a training round with fewer than ``minimum`` replies that are not
errors keeps the global model as it was, with a warning, instead of letting one or two
clients overwrite it. (FedEC counts again after its own reply checks:
``min_valid_replies``.)
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from fl_ec.run.wrapper import StrategyWrapper


class ReplyQuorum(StrategyWrapper):
    """``strategy``, aggregating a training round only when ``minimum`` replies are usable."""

    def __init__(self, strategy: Strategy, minimum: int) -> None:
        super().__init__(strategy)
        if minimum < 1:
            raise ValueError(f"minimum={minimum} must be >= 1")
        self.minimum = minimum

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's aggregate, or ``(None, None)`` below the quorum."""
        replies = list(replies)
        usable = sum(not reply.has_error() for reply in replies)
        if usable < self.minimum:
            log(
                WARNING,
                "round %d: %d usable training replies, fewer than min-train-replies=%d; "
                "the global model stays",
                server_round,
                usable,
                self.minimum,
            )
            return None, None
        return self.strategy.aggregate_train(server_round, replies)

    def describe(self) -> str:
        """The quorum."""
        return f"at least {self.minimum} training replies per round"
