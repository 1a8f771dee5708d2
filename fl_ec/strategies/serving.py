"""The round's work after distillation, and the statistics queries it sends.

A strategy writes that work as a *serve plan*: a generator that yields a
:class:`~fl_ec.strategies.stats_query.StatsQuery` whenever it needs statistics from
the clients and receives their valid answers, so the work reads top to bottom although
the round loop sends the queries (:func:`fl_ec.run.loop.query_phase`).
:class:`RoundServing` drives one round's plan; :class:`FeatureCalibrator` is the plan
step that calibrates one model from its clients' feature statistics.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from torch import nn

from fl_ec.calibration import CalibrationSettings, FeatureStats, calibration_every
from fl_ec.strategies.degraded import DegradedFeatures
from fl_ec.strategies.fedec_calibration import HitsFn, serve_feature_calibrated
from fl_ec.strategies.stats_query import StatsQuery
from fl_ec.strategies.steps import RoundOutcome, round_seed

# The statistics of a query's valid replies, and the query's counts.
QueryAnswer = tuple[list[FeatureStats], dict[str, float]]
# The round's work after distillation: yields each statistics query to send.
ServePlan = Generator[StatsQuery, QueryAnswer, None]
NO_ANSWER: QueryAnswer = ([], {"calibration-valid-replies": 0.0})


class RoundServing:
    """One round's serve plan, advanced query by query."""

    def __init__(self) -> None:
        self.outcome: RoundOutcome | None = None
        self.plan: ServePlan | None = None
        self.query: StatsQuery | None = None  # the query the plan waits on

    def begin(self, outcome: RoundOutcome, plan: ServePlan) -> None:
        """Start ``plan`` for ``outcome``'s round and run it to its first query."""
        self.outcome, self.plan = outcome, plan
        self.advance(None)

    def advance(self, answer: QueryAnswer | None) -> None:
        """Hand ``answer`` to the plan and run it to its next query, or to its end."""
        try:
            self.query = self.plan.send(answer) if self.plan is not None else None  # type: ignore[arg-type]
        except StopIteration:
            self.plan = self.query = None

    def next_query(self, grid: Grid) -> tuple[StatsQuery, list[int]] | None:
        """The query to send and to whom (``nodes=None``: every node of ``grid``).

        A query nobody can be asked is answered empty at once.
        """
        while self.query is not None:
            nodes = self.query.nodes
            nodes = nodes if nodes is not None else sorted(grid.get_node_ids())
            if nodes:
                return self.query, nodes
            self.advance(NO_ANSWER)
        return None

    @property
    def done(self) -> bool:
        return self.plan is None

    def finish(self, degraded: DegradedFeatures) -> None:
        """Finish a plan that no query phase ran (a round loop other than fl-ec's):
        its queries get no answer, so its feature calibration is skipped."""
        if self.query is not None:
            degraded.warn(
                "query-phase",
                "round %d: the round loop ran no query phase, so feature calibration is "
                "skipped; run the strategy with its start() or fl_ec.run.loop.run_rounds",
                self.query.server_round,
            )
        while self.plan is not None:
            self.advance(NO_ANSWER)


class FeatureCalibrator:
    """CCVR of a served model from its clients' feature statistics, when a round has it.

    ``settings.rounds`` says which rounds are calibrated, ``settings.nodes`` whom the
    query asks (the round's clients, or every node). ``hits`` scores a model on
    validation, so a calibration that hurts is reverted.
    """

    def __init__(self, settings: CalibrationSettings, seed: int, hits: HitsFn) -> None:
        self.settings = settings
        self.statistics = settings.statistics()
        self.seed = seed
        self.hits = hits
        self.every = calibration_every(settings.rounds)

    def calibrates(self, server_round: int, num_rounds: int | None) -> bool:
        """Whether round ``server_round`` is calibrated (every round when the run's
        length is unknown)."""
        last = num_rounds is None or server_round >= num_rounds
        periodic = self.every > 0 and server_round % self.every == 0
        return self.settings.method == "features" and (last or periodic)

    def calibrate(
        self,
        model: nn.Module,
        outcome: RoundOutcome,
        arrays: ArrayRecord | None = None,
        extra_config: dict[str, Any] | None = None,
        offset: int = 0,
        name: str = "served model",
        round_clients: bool = False,
    ) -> Generator[StatsQuery, QueryAnswer, dict[str, float]]:
        """Ask for statistics of ``model``'s features (sent as ``arrays``, by default
        its own), calibrate it in place from them; the query's and calibration's metrics.

        ``offset`` tells the calibration's seed apart from the round's other draws;
        ``round_clients`` asks the round's clients whatever ``settings.nodes`` says.
        """
        if arrays is None:
            arrays = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})
        nodes = [m.node_id for m in outcome.accepted]
        query = StatsQuery(
            outcome.server_round,
            model,
            arrays,
            None if self.settings.nodes == "all" and not round_clients else nodes,
            extra_config or {},
        )
        parts, metrics = yield query
        if not parts:
            return {**metrics, "feature-calibration-applied": 0.0}
        metrics.update(
            serve_feature_calibrated(
                model,
                self.statistics,
                self.statistics.merge(parts),
                self.settings,
                round_seed(self.seed, outcome.server_round, offset),
                self.hits,
                outcome.server_round,
                name=name,
            )
        )
        return metrics

