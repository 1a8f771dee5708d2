"""A Flower strategy that wraps another one, as Flower's differential-privacy wrappers do.

:class:`StrategyWrapper` holds an inner strategy and hands it every hook of a round
(``configure_train``, ``aggregate_train``, the query phase's ``configure_query`` and
``aggregate_query``, ``configure_evaluate``, ``aggregate_evaluate``) and ``summary``;
a subclass overrides the hooks it changes. ``start`` is fl-ec's round loop run on the
wrapper (:func:`~fl_ec.run.loop.run_rounds`), so every round goes through the
wrapper's hooks. The inner strategy's own ``start`` is therefore not called: what a
strategy notes there (FedEC: the number of rounds, for calibration ``rounds="last"``)
reaches it through :meth:`StrategyWrapper.begin_run` instead
(:class:`~fl_ec.run.loop.BeginsRun`).

A wrapper does not pass on the inner strategy's other attributes: what a strategy
reports beyond Flower's result (:class:`~fl_ec.run.reporting.RunReporter`) is
read from the inner strategy itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_ec.checkpoint import KeepsState, StrategyState
from fl_ec.run.loop import BeginsRun, QueriesClients, RunsRoundsOnStart


class StrategyWrapper(RunsRoundsOnStart, Strategy):
    """A ``Strategy`` that delegates every hook to ``strategy``.

    Subclasses override the hooks they change and call the inner strategy's in them.
    """

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def begin_run(self, num_rounds: int, timeout: float = 3600) -> None:
        """Pass the run's length and timeout on to the inner strategy, when it takes them."""
        if isinstance(self.strategy, BeginsRun):
            self.strategy.begin_run(num_rounds, timeout)

    def checkpoint_state(self) -> StrategyState:
        """The inner strategy's state for the run's checkpoint (none if it keeps none)."""
        if isinstance(self.strategy, KeepsState):
            return self.strategy.checkpoint_state()
        return StrategyState()

    def restore_state(self, state: StrategyState) -> None:
        """Hand a checkpoint's state back to the inner strategy, when it keeps any."""
        if isinstance(self.strategy, KeepsState):
            self.strategy.restore_state(state)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's training messages."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's aggregate of the training replies."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_query(
        self, server_round: int, arrays: ArrayRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's next query messages (none if it asks nothing more)."""
        if isinstance(self.strategy, QueriesClients):
            return self.strategy.configure_query(server_round, arrays, grid)
        return []

    def aggregate_query(
        self, server_round: int, replies: Iterable[Message]
    ) -> ArrayRecord | None:
        """The inner strategy's global model after the query's replies (None: unchanged)."""
        if isinstance(self.strategy, QueriesClients):
            return self.strategy.aggregate_query(server_round, replies)
        return None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's evaluation messages."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The inner strategy's aggregate of the evaluation replies."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log what the wrapper adds, then the inner strategy's summary."""
        log(INFO, "\t├──> %s", self.describe())
        self.strategy.summary()

    def describe(self) -> str:
        """One line on what the wrapper adds, for :meth:`summary`."""
        return f"{self.__class__.__name__} of {self.strategy.__class__.__name__}"


def innermost(strategy: Strategy) -> Strategy:
    """The strategy inside any number of :class:`StrategyWrapper` layers."""
    while isinstance(strategy, StrategyWrapper):
        strategy = strategy.strategy
    return strategy
