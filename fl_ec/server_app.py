"""The fl-ec ServerApp: run-config -> typed config -> data, model, strategy -> run folder.

Flow: parse and validate the run-config (fails in the first second on a bad knob),
load the server's data (proxy, validation, test), build the initial model from its
JSON spec, build the strategy by name, then run it -- wrapped in ``SeededSampling``
(the same clients per round for every strategy) and ``TimedAggregation`` -- through
a metered ``Grid`` with central evaluation on the test set after every round. The run
folder ``<results-dir>/<run-name>/`` receives ``metrics.json`` and a checkpoint
(:mod:`fl_ec.checkpoint`) after every round, ``accuracy.png``, ``accuracy_vs_bytes.png``
and the final model at the end. ``resume=<run folder>`` goes on from that folder's last
checkpoint.

An fl-ec strategy (:class:`~fl_ec.run.reporting.RunReporter`) reports more: its
server-side measurements of each round go into that round's record, and at the end it
saves its own artifacts (ensemble members, FedHCE's variants) and their test results.
Any other strategy (Flower's ``FedAvg``) is run and recorded as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_ec.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_latest,
    restore_rng,
    write_checkpoint,
)
from fl_ec.config import ExperimentConfig, check_resumable
from fl_ec.data.federated import ServerData, load_server_data
from fl_ec.errors import install_one_line_errors
from fl_ec.factory import build_strategy
from fl_ec.models.spec import ArchSpec, build_from_state_dict, build_model, scaled_widths
from fl_ec.protocol import ARCH_SPEC_KEY, LOCAL_EPOCHS_KEY, LR_KEY
from fl_ec.results import RunRecorder, default_run_name, safe_run_name
from fl_ec.run.abort import AbortOnFailedRounds
from fl_ec.run.loop import RoundPlan, run_rounds
from fl_ec.run.metering import MeteredGrid, TimedAggregation
from fl_ec.run.reporting import RunReporter
from fl_ec.run.sampling import NodeInfo, SampleCallback, SeededSampler, SeededSampling
from fl_ec.run.tiers import TrainTiers
from fl_ec.run.wrapper import StrategyWrapper, innermost
from fl_ec.strategies import FedHCE
from fl_ec.training import evaluate, select_device

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    install_one_line_errors()
    config = ExperimentConfig.from_run_config(context.run_config)
    run_experiment(grid, config)


def run_experiment(grid: Grid, config: ExperimentConfig) -> Path:
    """Run one configured experiment on ``grid``; returns the run folder.

    With ``config.output.resume`` set, the run goes on in that folder from its last
    readable checkpoint; else it starts in a new folder. Either way a checkpoint is
    written after every completed round (:mod:`fl_ec.checkpoint`).
    """
    federation, data, output = config.federation, config.data, config.output
    checkpoint = None
    if output.resume:  # before loading any data: a wrong path fails in the first second
        run_dir = Path(output.resume).expanduser().resolve()
        checkpoint = load_latest(run_dir)
        check_resumable(checkpoint.run.get("config", {}), config)
        log(INFO, "[fl-ec] resuming the run in %s", run_dir)
    else:
        announce_results_dir(output.results_dir)
    server_data = load_server_data(data, config.seed)
    spec = ArchSpec(
        name=config.training.model,
        input_shape=server_data.test.input_shape,
        num_classes=server_data.test.num_classes,
        widths=scaled_widths(config.training.model, config.training.model_width),
    )
    torch.manual_seed(config.seed)
    initial_model = build_model(spec)
    strategy = build_strategy(config, spec, server_data)
    inner = innermost(strategy)
    reporter = inner if isinstance(inner, RunReporter) else None

    if checkpoint is None:
        run_name = safe_run_name(
            output.run_name or default_run_name(federation.strategy, data.dataset, data.alpha)
        )
        run_dir = Path(output.results_dir).expanduser().resolve() / run_name
    recorder = RunRecorder(run_dir, config.to_dict(), spec, federation.num_server_rounds)
    # Every message is metered; the run stops when whole training rounds keep failing.
    guarded = AbortOnFailedRounds(MeteredGrid(grid, recorder))
    # The wrappers run the rounds; ``reporter`` is the inner strategy itself.
    sampler = SeededSampler(config.seed, federation.round_timeout)
    sampled = SeededSampling(strategy, sampler, record_sample(recorder))
    if isinstance(inner, FedHCE):  # tiers known before round 1
        sampler.capability_listeners.append(inner.note_capability)
    if federation.tier_list():  # outside the sampling: the sample recorded is the whole one
        sampled = TrainTiers(sampled, federation.tier_list())
        sampler.capability_listeners.append(sampled.note_capability)
    wrapped = TimedAggregation(sampled, recorder)
    arrays = ArrayRecord(initial_model.state_dict())
    if checkpoint is not None:
        arrays = resume_from(checkpoint, recorder, guarded, wrapped)
    log(
        INFO,
        "[fl-ec] %s on %s (%s, alpha=%g), %d rounds, %d server threads; results -> %s",
        federation.strategy,
        data.dataset,
        data.partitioner,
        data.alpha,
        federation.num_server_rounds,
        torch.get_num_threads(),
        run_dir,
    )

    def save_checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        start = time.perf_counter()
        run_state = {"config": config.to_dict(), **recorder.state(), "grid": guarded.state()}
        path = write_checkpoint(
            run_dir,
            Checkpoint(
                server_round, arrays.to_torch_state_dict(), wrapped.checkpoint_state(), run_state
            ),
        )
        size = sum(f.stat().st_size for f in path.iterdir())
        log(
            INFO,
            "[fl-ec] checkpoint %s: %.2f MB in %.2fs",
            path.name,
            size / 1e6,
            time.perf_counter() - start,
        )

    # The spec travels with every message so clients rebuild the model from arrays.
    round_config = ConfigRecord(
        {
            ARCH_SPEC_KEY: spec.to_json(),
            LR_KEY: config.training.lr,
            LOCAL_EPOCHS_KEY: config.training.local_epochs,
        }
    )
    first_round = checkpoint.round + 1 if checkpoint is not None else 1
    result = run_rounds(
        wrapped,
        guarded,
        arrays,
        RoundPlan(federation.num_server_rounds, first_round, federation.round_timeout),
        train_config=round_config,
        evaluate_config=ConfigRecord({ARCH_SPEC_KEY: spec.to_json()}),
        evaluate_fn=central_evaluation(spec, server_data, config, recorder, reporter),
        after_round=save_checkpoint,
    )

    recorder.write_model(result.arrays.to_torch_state_dict())
    if reporter is not None:
        reporter.save_artifacts(recorder, server_data.test)
    metrics_path = recorder.write_metrics()
    plots = [recorder.write_plot(), recorder.write_bytes_plot()]
    final_acc = recorder.summary()["final-test-accuracy"]
    log(
        INFO,
        "[fl-ec] done: final test accuracy %.2f%%\n  metrics:  %s\n  plots:    %s",
        100 * (final_acc or 0.0),
        metrics_path,
        "\n            ".join(str(path) for path in plots),
    )
    return run_dir


def resume_from(
    checkpoint: Checkpoint,
    recorder: RunRecorder,
    grid: AbortOnFailedRounds,
    strategy: StrategyWrapper,
) -> ArrayRecord:
    """Put the run back where ``checkpoint`` left it; returns its global model.

    The random states are restored last, after everything built at start-up has drawn
    from them, so the next round draws what it drew in the run that was interrupted.
    """
    run = checkpoint.run
    try:
        recorder.restore(run.get("rounds", []), run.get("started", recorder.started))
        grid.restore(run.get("grid", {}))
        strategy.restore_state(checkpoint.strategy)
        restore_rng(checkpoint.rng, checkpoint.rng.get("torch"))
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"the checkpoint of round {checkpoint.round} holds a state this run cannot take "
            f"back ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
        ) from None
    log(
        INFO,
        "[fl-ec] resuming %s after round %d (its last complete checkpoint)",
        recorder.run_dir,
        checkpoint.round,
    )
    return ArrayRecord(checkpoint.model)


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


def record_sample(recorder: RunRecorder) -> SampleCallback:
    """Record each training round's sampled partitions (also by node id) and their pooled
    class counts."""

    def on_sample(server_round: int, nodes: list[int], info: dict[int, NodeInfo]) -> None:
        known = [info[n] for n in nodes if n in info]
        metrics = recorder.record_for(server_round).metrics
        metrics["sampled-partitions"] = sorted(i.partition_id for i in known)
        metrics["partition-by-node"] = {str(n): info[n].partition_id for n in nodes if n in info}
        if known and all(len(i.class_counts) == len(known[0].class_counts) for i in known):
            columns = zip(*(i.class_counts for i in known), strict=True)
            metrics["sampled-class-counts"] = [sum(column) for column in columns]

    return on_sample


def central_evaluation(
    spec: ArchSpec,
    server_data: ServerData,
    config: ExperimentConfig,
    recorder: RunRecorder,
    reporter: RunReporter | None = None,
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """The ``evaluate_fn`` for ``strategy.start``: test-set metrics, then close the round.

    ``reporter``'s measurements of the round (the strategy's, when it reports any) are
    recorded with it.
    """
    device = select_device(config.training.device)
    test = server_data.test

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.perf_counter()
        model = build_from_state_dict(spec, arrays.to_torch_state_dict())
        result = evaluate(model, test, device=device)
        record = recorder.record_for(server_round)
        record.server_evaluate_seconds += time.perf_counter() - start
        # Server-side measurements of the round (FedEC: teacher/student validation
        # accuracy, distillation steps and seconds, replies it dropped as invalid).
        server_metrics = (
            dict(reporter.server_metrics.get(server_round, {})) if reporter is not None else {}
        )
        # Error replies were counted as rejected when they arrived (MeteredGrid).
        invalid = int(server_metrics.pop("rejected-replies", 0)) - int(
            server_metrics.pop("error-replies", 0)
        )
        record.rejected_replies += invalid
        record.train_replies -= invalid
        record = recorder.close_round(
            server_round,
            {"test-accuracy": result.accuracy, "test-loss": result.loss, **server_metrics},
        )
        log(
            INFO,
            "[fl-ec] round %d/%d | test acc %.2f%% loss %.4f | %.1fs (train %.1fs, "
            "aggregate %.2fs) | down %.2f MB, up %.2f MB | %d replies, %d rejected",
            server_round,
            config.federation.num_server_rounds,
            100 * result.accuracy,
            result.loss,
            record.wall_seconds,
            record.train_seconds,
            record.aggregate_seconds,
            record.bytes_down / 1e6,
            record.bytes_up / 1e6,
            record.train_replies,
            record.rejected_replies,
        )
        return MetricRecord({"test-accuracy": result.accuracy, "test-loss": result.loss})

    return evaluate_fn
