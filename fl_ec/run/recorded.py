"""The run machinery for any ServerApp: checkpoints, resume, metrics.json, plots, trackers.

Flower's ``Strategy.start`` runs rounds 1..N and returns at the end; nothing is saved
between rounds and a run killed in round 19 of 20 starts over. :class:`RecordedRun`
wraps any strategy (Flower's ``FedAvg`` as much as FedEC) and replaces ``start`` with
one that, around the same round loop (:func:`~fl_ec.run.loop.run_rounds`):

- meters every message (bytes per node, seconds per phase) and stops a run whose
  clients all keep failing (:mod:`~fl_ec.run.metering`, :mod:`~fl_ec.run.abort`);
- after every round writes ``metrics.json`` and an atomic checkpoint
  (:mod:`fl_ec.checkpoint`) of the model, the strategy's state (when it keeps one),
  the random states and Flower's result so far, and logs the round to the trackers
  that ``tracking`` names (:mod:`~fl_ec.run.tracking`);
- with ``resume`` set to a run folder, goes on from its last checkpoint and ends on the
  same model, bit for bit, as a run that was never stopped (when the clients train
  deterministically);
- at the end writes the final model, ``accuracy.png`` and ``accuracy_vs_bytes.png``.

In an app that calls ``strategy.start`` itself, it is two lines::

    from fl_ec.run.recorded import RecordedRun
    strategy = RecordedRun.from_run_config(FedAvg(...), context.run_config)

with ``results-dir``, ``run-name``, ``resume`` and ``tracking`` read from the app's
run-config (:class:`~fl_ec.run.settings.OutputSection`). fl-ec's own ServerApp runs
through it too.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fl_ec.checkpoint import Checkpoint, CheckpointError, load_latest, restore_rng, write_checkpoint
from fl_ec.models.spec import ArchSpec
from fl_ec.results import RoundRecord, RunRecorder, peak_rss_mb, safe_run_name
from fl_ec.run.abort import AbortOnFailedRounds
from fl_ec.run.loop import RoundPlan, run_rounds
from fl_ec.run.metering import MeteredGrid, TimedAggregation
from fl_ec.run.reporting import RunReporter
from fl_ec.run.settings import OutputSection, check_resumable
from fl_ec.run.tracking import TrackedRun, Tracker, build_trackers
from fl_ec.run.wrapper import innermost

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
# Flower's result, by part, as the checkpoint keeps it: round -> metric name -> value.
_HISTORIES = ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp")


@dataclass
class RunFolder:
    """A run's folder and what lives in it: the recorder, the trackers, the checkpoint
    being resumed (None for a new run)."""

    recorder: RunRecorder
    trackers: dict[str, Tracker]
    checkpoint: Checkpoint | None

    @classmethod
    def open(
        cls,
        output: OutputSection,
        config: Mapping[str, Any],
        default_name: str,
        spec: ArchSpec | None = None,
    ) -> RunFolder:
        """The folder ``output`` names: a new ``<results-dir>/<run-name or default_name>``,
        or, with ``resume``, that run folder with its last readable checkpoint.

        Fails in one line, before the caller loads any data, on a resume folder without
        a checkpoint, a run-config that differs from the resumed run's (``config`` is the
        flat run-config, kept in ``metrics.json`` and every checkpoint) or a tracker
        whose backend is not installed.
        """
        checkpoint = None
        if output.resume:
            run_dir = Path(output.resume).expanduser().resolve()
            checkpoint = load_latest(run_dir)
            check_resumable(checkpoint.run.get("config", {}), config)
            log(INFO, "[fl-ec] resuming the run in %s", run_dir)
        else:
            root = announce_results_dir(output.results_dir)
            run_dir = root / safe_run_name(output.run_name or default_name)
        previous = checkpoint.run.get("tracking", {}) if checkpoint is not None else {}
        trackers = build_trackers(
            output.trackers(), TrackedRun(run_dir, run_dir.name, dict(config), previous)
        )
        recorder = RunRecorder(run_dir, config, spec, num_rounds=0)
        return cls(recorder, trackers, checkpoint)

    @property
    def run_dir(self) -> Path:
        return self.recorder.run_dir


class RecordedRun(TimedAggregation):
    """``strategy`` run with checkpoints, resume, ``metrics.json``, plots and trackers.

    Its ``start`` takes Flower's ``Strategy.start`` arguments and returns its
    ``Result`` (on a resumed run: with the rounds before the restart too). The inner
    strategy's hooks run as they would under Flower's own ``start``.
    """

    def __init__(self, strategy: Strategy, folder: RunFolder) -> None:
        super().__init__(strategy, folder.recorder)
        self.folder = folder
        self.history: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in _HISTORIES}
        self.grid: AbortOnFailedRounds | None = None
        self._central: dict[int, dict[str, Any]] = {}

    @classmethod
    def from_run_config(
        cls, strategy: Strategy, run_config: Mapping[str, Any]
    ) -> RecordedRun:
        """``strategy`` recorded as the app's run-config says: ``results-dir``,
        ``run-name``, ``resume``, ``tracking`` (each optional; the rest is the app's)."""
        output = OutputSection.from_run_config(run_config)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"{type(innermost(strategy)).__name__.lower()}-{stamp}"
        config = {k: v for k, v in run_config.items() if isinstance(v, str | int | float | bool)}
        return cls(strategy, RunFolder.open(output, config, name))

    # -- the round loop -------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Rounds 1..``num_rounds`` (or from after the resumed checkpoint) of the strategy,
        recorded; the same arguments and result as Flower's ``Strategy.start``."""
        recorder, checkpoint = self.recorder, self.folder.checkpoint
        recorder.num_rounds = num_rounds
        # Every message is metered; the run stops when whole training rounds keep failing.
        self.grid = AbortOnFailedRounds(MeteredGrid(grid, recorder))
        arrays, first_round = initial_arrays, 1
        if checkpoint is not None:
            arrays, first_round = self._resume(checkpoint), checkpoint.round + 1
        log(INFO, "[fl-ec] %s, %d rounds; results -> %s", self.describe(), num_rounds, self.run_dir)
        result = run_rounds(
            self,
            self.grid,
            arrays,
            RoundPlan(num_rounds, first_round, timeout),
            train_config,
            evaluate_config,
            evaluate_fn=self._central_evaluation(evaluate_fn),
            after_round=self._complete_round,
        )
        for name in _HISTORIES:  # the rounds before a restart, as the result holds them
            earlier = {r: MetricRecord(m) for r, m in self.history[name].items()}
            setattr(result, name, {**earlier, **getattr(result, name)})
        self._finish(result.arrays)
        if result.arrays is initial_arrays:  # as Flower's start: no round aggregated
            result.arrays = ArrayRecord()
        return result

    @property
    def run_dir(self) -> Path:
        return self.folder.run_dir

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's aggregate, timed; its client metrics kept for the result."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            self.history["train_metrics_clientapp"][server_round] = dict(metrics)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The inner strategy's aggregate of the evaluation replies, kept for the result."""
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.history["evaluate_metrics_clientapp"][server_round] = dict(metrics)
            self.recorder.record_for(server_round).metrics.update(
                {f"client-eval-{k}": float(v) for k, v in metrics.items() if _is_number(v)}
            )
        return metrics

    def describe(self) -> str:
        return f"{self.strategy.__class__.__name__} recorded in its run folder"

    def accuracy_key(self) -> str | None:
        """The central evaluation's accuracy metric (``test-accuracy`` for fl-ec's app,
        ``accuracy`` for Flower's examples): the first name with "acc" in it."""
        names = [n for m in self.history["evaluate_metrics_serverapp"].values() for n in m]
        return next((n for n in dict.fromkeys(names) if "acc" in n.lower()), None)

    # -- each round -------------------------------------------------------------
    def _central_evaluation(self, evaluate_fn: EvaluateFn | None) -> EvaluateFn:
        """``evaluate_fn``, timed and kept; round 0 (the initial model) closes here, as
        no round's end follows it."""

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if evaluate_fn is None:
                return None
            start = time.perf_counter()
            metrics = evaluate_fn(server_round, arrays)
            record = self.recorder.record_for(server_round)
            record.server_evaluate_seconds += time.perf_counter() - start
            if metrics is not None:
                self._central[server_round] = dict(metrics)
                self.history["evaluate_metrics_serverapp"][server_round] = dict(metrics)
            if server_round == 0:
                self._track(0, self._close_round(0))
            return metrics

        return evaluate

    def _complete_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Close the round's record, checkpoint it, then log it to the trackers (after
        the checkpoint: a resumed run does not log a round twice)."""
        record = self._close_round(server_round)
        self._write_checkpoint(server_round, arrays)
        self._track(server_round, record)

    def _track(self, server_round: int, record: RoundRecord) -> None:
        scalars = _scalars(record)
        for tracker in self.folder.trackers.values():
            tracker.log_round(server_round, scalars)

    def _close_round(self, server_round: int) -> RoundRecord:
        """The round's central metrics and what the strategy measured on the server, into
        its record; ``metrics.json`` rewritten; one log line."""
        reporter = innermost(self)
        server = (
            dict(reporter.server_metrics.get(server_round, {}))
            if isinstance(reporter, RunReporter)
            else {}
        )
        record = self.recorder.record_for(server_round)
        # Replies the strategy rejected as invalid move from trained to rejected; error
        # replies were counted as rejected when they arrived (MeteredGrid).
        invalid = int(server.pop("rejected-replies", 0)) - int(server.pop("error-replies", 0))
        record.rejected_replies += invalid
        record.train_replies -= invalid
        central = {k: v for k, v in self._central.pop(server_round, {}).items() if _is_number(v)}
        # The server process's peak memory so far: what a larger federation costs it.
        server["server-peak-rss-mb"] = peak_rss_mb()
        record = self.recorder.close_round(server_round, {**central, **server})
        log(INFO, "[fl-ec] %s", _round_line(record, self.recorder.num_rounds, self.accuracy_key()))
        return record

    def _write_checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        start = time.perf_counter()
        assert self.grid is not None
        run_state = {
            "config": self.recorder.config,
            **self.recorder.state(),
            "grid": self.grid.state(),
            "tracking": {name: t.state() for name, t in self.folder.trackers.items()},
            "history": {
                name: {str(r): m for r, m in rounds.items()}
                for name, rounds in self.history.items()
            },
        }
        model = arrays.to_torch_state_dict()
        checkpoint = Checkpoint(server_round, model, self.checkpoint_state(), run_state)
        path = write_checkpoint(self.run_dir, checkpoint)
        size = sum(f.stat().st_size for f in path.iterdir())
        log(
            INFO,
            "[fl-ec] checkpoint %s: %.2f MB in %.2fs",
            path.name,
            size / 1e6,
            time.perf_counter() - start,
        )

    def _resume(self, checkpoint: Checkpoint) -> ArrayRecord:
        """Put the run back where ``checkpoint`` left it; returns its global model.

        The random states are restored last, after everything built at start-up has
        drawn from them, so the next round draws what it drew in the run that was
        interrupted.
        """
        run = checkpoint.run
        try:
            self.recorder.restore(run.get("rounds", []), run.get("started", self.recorder.started))
            assert self.grid is not None
            self.grid.restore(run.get("grid", {}))
            for name, rounds in run.get("history", {}).items():
                if name in self.history:
                    self.history[name] = {int(r): dict(m) for r, m in rounds.items()}
            self.restore_state(checkpoint.strategy)
            restore_rng(checkpoint.rng, checkpoint.rng.get("torch"))
        except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"the checkpoint of round {checkpoint.round} holds a state this run cannot "
                f"take back ({reason})"
            ) from None
        log(
            INFO,
            "[fl-ec] resuming %s after round %d (its last complete checkpoint)",
            self.run_dir,
            checkpoint.round,
        )
        return ArrayRecord(checkpoint.model)

    # -- the end ----------------------------------------------------------------
    def _finish(self, arrays: ArrayRecord) -> None:
        """The final model, ``metrics.json`` and the plots; the trackers closed."""
        recorder = self.recorder
        if len(arrays) > 0:
            recorder.write_model(arrays.to_torch_state_dict())
        metrics_path = recorder.write_metrics()
        key = self.accuracy_key()
        plots = [recorder.write_plot(key), recorder.write_bytes_plot(key)] if key else []
        for tracker in self.folder.trackers.values():
            tracker.close()
        final = next((r.metrics[key] for r in reversed(recorder.rounds) if key in r.metrics), None)
        log(
            INFO,
            "[fl-ec] done: %s\n  metrics:  %s%s",
            f"final {key} {100 * final:.2f}%" if final is not None else "no central accuracy",
            metrics_path,
            "".join(f"\n  plot:     {path}" for path in plots),
        )


def announce_results_dir(results_dir: str) -> Path:
    """Log where this run's folder goes, as an absolute path, before any work; a
    relative ``results-dir`` gets a warning that names the directory it resolves
    against (the ServerApp's working directory: under ``flwr run`` the local
    SuperLink's, wherever the first run on the machine started it)."""
    root = Path(results_dir).expanduser()
    if not root.is_absolute():
        log(
            WARNING,
            "[fl-ec] results-dir=%r is relative to the ServerApp's working directory %s "
            "(the SuperLink's, not necessarily this project's): set an absolute "
            "results-dir, or start the run with fl-ec-run, which passes the app's results/",
            results_dir,
            Path.cwd(),
        )
    log(INFO, "[fl-ec] results -> %s", root.resolve())
    return root.resolve()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalars(record: RoundRecord) -> dict[str, float]:
    """The round's record as one number per metric (tables and lists left out)."""
    return {k: float(v) for k, v in record.to_dict().items() if k != "round" and _is_number(v)}


def _round_line(record: RoundRecord, num_rounds: int, accuracy: str | None) -> str:
    """One log line for a closed round: its central accuracy and loss when evaluated,
    then seconds, bytes and replies."""
    metrics = record.metrics
    loss = next((k for k in metrics if k in ("test-loss", "loss")), None)
    scored = ""
    if accuracy is not None and accuracy in metrics:
        scored += f" | {accuracy} {100 * metrics[accuracy]:.2f}%"
    if loss is not None:
        scored += f" {loss} {metrics[loss]:.4f}"
    return (
        f"round {record.round}/{num_rounds}{scored} | {record.wall_seconds:.1f}s "
        f"(train {record.train_seconds:.1f}s, aggregate {record.aggregate_seconds:.2f}s) | "
        f"down {record.bytes_down / 1e6:.2f} MB, up {record.bytes_up / 1e6:.2f} MB | "
        f"{record.train_replies} replies, {record.rejected_replies} rejected"
    )
