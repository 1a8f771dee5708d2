"""The fl-ec ServerApp: run-config -> typed config -> data, model, strategy -> run folder.

Flow: parse and validate the run-config (fails in the first second on a bad knob),
open the run folder (or the one ``resume`` names), load the server's data (proxy,
validation, test), build the initial model from its JSON spec, build the strategy by
name, then run it -- wrapped in ``SeededSampling`` (the same clients per round for every
strategy) and :class:`~fl_ec.run.recorded.RecordedRun` -- with central evaluation on
the test set after every round. ``RecordedRun`` is the run machinery any app can use:
``metrics.json`` and a checkpoint after every round, the trackers ``tracking`` names,
``accuracy.png``, ``accuracy_vs_bytes.png`` and the final model at the end.

An fl-ec strategy (:class:`~fl_ec.run.reporting.RunReporter`) reports more: its
server-side measurements of each round go into that round's record, and at the end it
saves its own artifacts (ensemble members, FedHCE's variants) and their test results.
Any other strategy (Flower's ``FedAvg``) is run and recorded as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_ec.config import ExperimentConfig
from fl_ec.data.federated import ServerData, load_server_data
from fl_ec.errors import install_one_line_errors
from fl_ec.factory import build_strategy
from fl_ec.models.spec import ArchSpec, build_from_state_dict, build_model, scaled_widths
from fl_ec.protocol import ARCH_SPEC_KEY, LOCAL_EPOCHS_KEY, LR_KEY
from fl_ec.results import RunRecorder, default_run_name
from fl_ec.run.recorded import RecordedRun, RunFolder
from fl_ec.run.reporting import RunReporter
from fl_ec.run.sampling import NodeInfo, SampleCallback, SeededSampler, SeededSampling
from fl_ec.run.tiers import TrainTiers
from fl_ec.run.wrapper import innermost
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
    written after every completed round (:class:`~fl_ec.run.recorded.RecordedRun`).
    """
    federation, data = config.federation, config.data
    # Before loading any data: a wrong resume path or a missing tracker fails at once.
    folder = RunFolder.open(
        config.output,
        config.to_dict(),
        default_run_name(federation.strategy, data.dataset, data.alpha),
    )
    server_data = load_server_data(data, config.seed)
    spec = ArchSpec(
        name=config.training.model,
        input_shape=server_data.test.input_shape,
        num_classes=server_data.test.num_classes,
        widths=scaled_widths(config.training.model, config.training.model_width),
    )
    folder.recorder.spec = spec
    torch.manual_seed(config.seed)
    initial_model = build_model(spec)
    strategy = build_strategy(config, spec, server_data)
    inner = innermost(strategy)

    # The wrappers run the rounds; the sampling goes first, whatever the strategy.
    sampler = SeededSampler(config.seed, federation.round_timeout)
    sampled = SeededSampling(strategy, sampler, record_sample(folder.recorder))
    if isinstance(inner, FedHCE):  # tiers known before round 1
        sampler.capability_listeners.append(inner.note_capability)
    if federation.tier_list():  # outside the sampling: the sample recorded is the whole one
        sampled = TrainTiers(sampled, federation.tier_list())
        sampler.capability_listeners.append(sampled.note_capability)
    recorded = RecordedRun(sampled, folder)
    log(
        INFO,
        "[fl-ec] %s on %s (%s, alpha=%g), %d rounds, %d server threads",
        federation.strategy,
        data.dataset,
        data.partitioner,
        data.alpha,
        federation.num_server_rounds,
        torch.get_num_threads(),
    )
    # The spec travels with every message so clients rebuild the model from arrays.
    round_config = ConfigRecord(
        {
            ARCH_SPEC_KEY: spec.to_json(),
            LR_KEY: config.training.lr,
            LOCAL_EPOCHS_KEY: config.training.local_epochs,
        }
    )
    recorded.start(
        grid,
        ArrayRecord(initial_model.state_dict()),
        federation.num_server_rounds,
        federation.round_timeout,
        train_config=round_config,
        evaluate_config=ConfigRecord({ARCH_SPEC_KEY: spec.to_json()}),
        evaluate_fn=central_evaluation(spec, server_data, config),
    )
    if isinstance(inner, RunReporter):  # ensemble members, FedHCE's variants
        inner.save_artifacts(folder.recorder, server_data.test)
        folder.recorder.write_metrics()
    return folder.run_dir


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
    spec: ArchSpec, server_data: ServerData, config: ExperimentConfig
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """The ``evaluate_fn`` for ``strategy.start``: the global model on the test set."""
    device = select_device(config.training.device)
    test = server_data.test

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = build_from_state_dict(spec, arrays.to_torch_state_dict())
        result = evaluate(model, test, device=device)
        return MetricRecord({"test-accuracy": result.accuracy, "test-loss": result.loss})

    return evaluate_fn
