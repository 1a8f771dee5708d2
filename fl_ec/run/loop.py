"""Flower's round loop, able to begin at any round and to act after each one.

``Strategy.start`` always runs rounds 1..N and returns only at the end, so a run
killed in round 19 of 20 cannot go on from round 18, and nothing can be saved between
rounds. :func:`run_rounds` is that loop -- configure_train, send and receive,
aggregate_train, the same for evaluation, then the central evaluation -- starting at
``first_round`` with the model given, and calling ``after_round`` once a round is
complete (the ServerApp writes its checkpoint there). Started at round 1 it does what
``start`` does, in the same order, so a run and its resumed copy train alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fl_ec.run.wrapper import BeginsRun


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
