"""Flower's round loop, able to begin at any round, to query the clients between
training and evaluation, and to act after each round.

``Strategy.start`` always runs rounds 1..N and returns only at the end, so a run
killed in round 19 of 20 cannot go on from round 18, and nothing can be saved between
rounds. :func:`run_rounds` is that loop -- configure_train, send and receive,
aggregate_train, the query phase, the same for evaluation, then the central
evaluation -- starting at ``first_round`` with the model given, and calling
``after_round`` once a round is complete (the ServerApp writes its checkpoint there).
Started at round 1 it does what ``start`` does, in the same order, so a run and its
resumed copy train alike. It serves the ServerApp and, through
:class:`RunsRoundsOnStart`, a strategy's own ``start``.

The query phase (:func:`query_phase`) is for a strategy that needs more from the
clients after aggregating (:class:`QueriesClients`: FedEC's feature statistics): it
sends what ``configure_query`` returns, hands the replies to ``aggregate_query``, and
repeats until there is nothing more to ask. A strategy without it is run as Flower
runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from typing import Protocol, runtime_checkable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy


@runtime_checkable
class BeginsRun(Protocol):
    """A strategy that notes the run's length and round timeout before its first round."""

    def begin_run(self, num_rounds: int, timeout: float = 3600) -> None:
        """Called once before the first round with the number of rounds the run has
        and how long each round waits for replies."""
        ...


@runtime_checkable
class QueriesClients(Protocol):
    """A strategy that asks the clients more between a round's training and evaluation.

    ``configure_query`` returns the next messages to send (none: the phase is over);
    ``aggregate_query`` takes their replies and returns the round's global model once
    it changed (None: unchanged).
    """

    def configure_query(
        self, server_round: int, arrays: ArrayRecord, grid: Grid
    ) -> Iterable[Message]: ...

    def aggregate_query(
        self, server_round: int, replies: Iterable[Message]
    ) -> ArrayRecord | None: ...


@dataclass(frozen=True)
class RoundPlan:
    """Which rounds to run and how long each waits for its replies."""

    num_rounds: int
    first_round: int = 1
    timeout: float = 3600.0


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    plan: RoundPlan,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    after_round: Callable[[int, ArrayRecord], None] | None = None,
) -> Result:
    """Rounds ``plan.first_round``..``plan.num_rounds`` of ``strategy`` from ``arrays``.

    ``evaluate_fn`` scores the starting model (round 0) only when the run starts at
    round 1; ``after_round(round, arrays)`` gets each completed round's global model.
    """
    if isinstance(strategy, BeginsRun):
        strategy.begin_run(plan.num_rounds, plan.timeout)
    log(INFO, "Starting %s strategy at round %d:", strategy.__class__.__name__, plan.first_round)
    strategy.summary()
    train_config = train_config if train_config is not None else ConfigRecord()
    evaluate_config = evaluate_config if evaluate_config is not None else ConfigRecord()
    result = Result(arrays=arrays)
    started = time.time()
    if evaluate_fn is not None and plan.first_round <= 1:
        metrics = evaluate_fn(0, arrays)
        if metrics is not None:
            result.evaluate_metrics_serverapp[0] = metrics

    for server_round in range(max(plan.first_round, 1), plan.num_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, plan.num_rounds)
        replies = grid.send_and_receive(
            messages=strategy.configure_train(server_round, arrays, train_config, grid),
            timeout=plan.timeout,
        )
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = result.arrays = new_arrays
        if train_metrics is not None:
            result.train_metrics_clientapp[server_round] = train_metrics
        queried = query_phase(strategy, server_round, arrays, grid, plan.timeout)
        if queried is not arrays:
            arrays = result.arrays = queried

        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(server_round, arrays, evaluate_config, grid),
            timeout=plan.timeout,
        )
        evaluate_metrics = strategy.aggregate_evaluate(server_round, replies)
        if evaluate_metrics is not None:
            result.evaluate_metrics_clientapp[server_round] = evaluate_metrics

        if evaluate_fn is not None:
            metrics = evaluate_fn(server_round, arrays)
            if metrics is not None:
                result.evaluate_metrics_serverapp[server_round] = metrics
        if after_round is not None:
            after_round(server_round, arrays)

    log(INFO, "Strategy execution finished in %.2fs", time.time() - started)
    return result


def query_phase(
    strategy: Strategy, server_round: int, arrays: ArrayRecord, grid: Grid, timeout: float
) -> ArrayRecord:
    """Send ``strategy``'s queries of the round until it has none; the global model after.

    Each query waits ``timeout`` seconds, as long as a training round does.
    """
    if not isinstance(strategy, QueriesClients):
        return arrays
    while messages := list(strategy.configure_query(server_round, arrays, grid)):
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        changed = strategy.aggregate_query(server_round, replies)
        if changed is not None:
            arrays = changed
    return arrays


class RunsRoundsOnStart:
    """Mixin for a ``Strategy``: ``start`` runs :func:`run_rounds` on ``self``.

    So the strategy gets :meth:`BeginsRun.begin_run` and the query phase whether it is
    started directly (``FedEC(...).start(...)``) or through wrappers
    (:class:`~fl_ec.run.wrapper.StrategyWrapper`).
    """

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Rounds 1..``num_rounds`` of this strategy, as Flower's ``Strategy.start``.

        As there, the result's arrays are the last aggregated ones (none if no round
        aggregated, e.g. an evaluation-only run).
        """
        result = run_rounds(
            self,  # type: ignore[arg-type]
            grid,
            initial_arrays,
            RoundPlan(num_rounds, 1, timeout),
            train_config,
            evaluate_config,
            evaluate_fn,
        )
        if result.arrays is initial_arrays:
            result.arrays = ArrayRecord()
        return result
