"""When a run stops because its clients fail.

A round in which *every* training reply failed keeps the global model as it was (the
strategy gets only error replies). The run stops -- :class:`~fl_ec.errors.FlEcError`
naming the first failure -- only when that happens before any round succeeded (a
misconfiguration: every ClientApp crashes) or in :data:`MAX_FAILED_ROUNDS` rounds in a
row (the federation is gone), so that one node answering with errors cannot end it.
:class:`AbortOnFailedRounds` wraps the ``Grid`` and applies that rule to every training
round's replies; its counters travel in the run's checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_ec.errors import FlEcError
from fl_ec.run.metering import DelegatingGrid, round_of

MAX_FAILED_ROUNDS = 3  # training rounds in a row in which every reply failed


class AbortOnFailedRounds(DelegatingGrid):
    """``inner``, stopping the run when its training rounds keep failing entirely."""

    def __init__(self, inner: Grid, max_failed_rounds: int = MAX_FAILED_ROUNDS) -> None:
        super().__init__(inner)
        self.max_failed_rounds = max_failed_rounds
        self.trained_once = False  # some round had a training reply that did not fail
        self.failed_rounds = 0  # rounds in a row in which every training reply failed

    def state(self) -> dict[str, int | bool]:
        """The failed-round counters, for the run's checkpoint."""
        return {"trained-once": self.trained_once, "failed-rounds": self.failed_rounds}

    def restore(self, state: dict[str, int | bool]) -> None:
        """Continue counting from :meth:`state`'s counters (a resumed run)."""
        self.trained_once = bool(state.get("trained-once", False))
        self.failed_rounds = int(state.get("failed-rounds", 0))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        if messages and replies and messages[0].metadata.message_type == MessageType.TRAIN:
            failed = [reply for reply in replies if reply.has_error()]
            if len(failed) < len(replies):
                self.trained_once, self.failed_rounds = True, 0
            else:
                self._every_reply_failed(round_of(messages[0], default=0), failed)
        return replies

    def _every_reply_failed(self, server_round: int, failed: list[Message]) -> None:
        """Stop the run on a misconfiguration or a lost federation; else say so and go on."""
        self.failed_rounds += 1
        first = f"first (node {failed[0].metadata.src_node_id}): {failed[0].error.reason}"
        if not self.trained_once or self.failed_rounds >= self.max_failed_rounds:
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
