"""The fl-ec ClientApp: local training and evaluation on this node's data.

A node's data is its partition of the run's benchmark dataset, or, when its
``node_config`` names a ``data-dir``, exactly the examples in that folder
(:mod:`fl_ec.data.local_folder`).

The server sends arrays plus a JSON architecture spec (the config's ``arch-spec``);
the client rebuilds the model from them -- no pickled module travels. A train reply
carries:

* ``arrays``: the trained state_dict as an ``ArrayRecord``;
* ``metrics``: ``num-examples``, ``train-loss``, ``train-seconds`` (a ``MetricRecord``,
  averaged by any Flower strategy);
* ``capability``: what this node is (device kind and tier, memory, threads, speed) as
  a ``ConfigRecord`` -- the server cannot read ``node_config``, so clients tell it;
* ``train-info``: the architecture it trained, its class counts and its variant.

Every message key is a constant of :mod:`fl_ec.protocol`, which lists what each
message carries.

A configuration problem becomes an error reply whose reason is one readable line,
instead of a traceback in the node's log.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fl_ec.calibration import CalibrationSettings, model_bytes
from fl_ec.clients.attacks import attack_for
from fl_ec.clients.faults import inject_fault
from fl_ec.clients.settings import NodeSettings, parse_tier_counts
from fl_ec.clients.variants import received_state
from fl_ec.config import ExperimentConfig
from fl_ec.data.federated import ClientData, load_client_data
from fl_ec.data.local_folder import load_local_data, stable_id
from fl_ec.errors import ConfigError, FlEcError, ModelSpecError
from fl_ec.models.spec import ArchSpec, build_from_state_dict
from fl_ec.protocol import (
    ARCH_SPEC_KEY,
    ARRAY_RECORD_KEY,
    CAPABILITY_KEY,
    CLASS_COUNTS_KEY,
    CONFIG_RECORD_KEY,
    DESCRIBE_KEY,
    EVAL_ACC_KEY,
    EVAL_LOSS_KEY,
    LOCAL_EPOCHS_KEY,
    LR_KEY,
    METRIC_RECORD_KEY,
    NODE_INFO_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
    STATS_COMPONENTS_KEY,
    STATS_LAYERS_KEY,
    STATS_RANK_KEY,
    STATS_RECORD_KEY,
    STATS_SECONDS_KEY,
    TRAIN_INFO_KEY,
    TRAIN_LOSS_KEY,
    TRAIN_SECONDS_KEY,
    TRAINER_STAGES_KEY,
    VARIANT_KEY,
)
from fl_ec.training import (
    TrainResult,
    device_capability,
    evaluate,
    select_device,
    set_cpu_threads,
    train_supervised,
)

app = ClientApp()

# Error code for fl-ec's own, user-fixable errors in replies (Flower's are < 100).
FL_EC_ERROR_CODE = 100


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        return _train(msg, context)
    except FlEcError as err:
        return Message(Error(code=FL_EC_ERROR_CODE, reason=str(err)), reply_to=msg)


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """Who this node is, or class-conditional feature statistics of the sent model.

    ``describe=true``: the partition id and its class counts (seeded client sampling,
    :mod:`fl_ec.run.sampling`; :func:`_node_setup` says which id a ``data-dir`` node
    reports). ``feature-stats=true``: FedEC's feature calibration asks for them after
    aggregating a round: one forward pass, no training (:mod:`fl_ec.calibration`).
    """
    try:
        if bool(msg.content[CONFIG_RECORD_KEY].get(DESCRIBE_KEY, False)):
            return _describe(msg, context)
        return _feature_stats(msg, context)
    except FlEcError as err:
        return Message(Error(code=FL_EC_ERROR_CODE, reason=str(err)), reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    try:
        return _evaluate(msg, context)
    except FlEcError as err:
        return Message(Error(code=FL_EC_ERROR_CODE, reason=str(err)), reply_to=msg)


def _setup(msg: Message, context: Context):
    config, node, data = _node_setup(context)
    spec, model = received_model(msg.content)
    return config, node, data, spec, model


def _node_setup(context: Context) -> tuple[ExperimentConfig, NodeSettings, ClientData]:
    """The run's config, this node (with its simulated tier in a simulation, and always
    a partition id) and its data; torch's threads set to those the node trains with."""
    config = ExperimentConfig.from_run_config(context.run_config)
    node = NodeSettings.from_node_config(context.node_config)
    set_cpu_threads(config.training.client_threads)
    data = _client_data(config, node)
    if node.partition_id is None:
        # A data-dir node given no partition-id. Seeded sampling lists the nodes by the
        # partition id they describe themselves with; Flower's node ids are new every
        # run, so a digest of the node's data keeps the order, and the clients sampled
        # each round, the same from run to run. A node answering without an id would be
        # listed last by node id and its capability ignored (FedHCE's tiers in round 1).
        node = dataclasses.replace(node, partition_id=stable_id(data.train))
    node = with_simulated_tier(node, config.simulation.simulated_tiers, in_simulation())
    return config, node, data


def in_simulation() -> bool:
    """Whether this ClientApp runs inside Flower's simulation engine.

    The engine runs ClientApps in Ray actors; a real SuperNode runs them without Ray.
    """
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def with_simulated_tier(node: NodeSettings, simulated_tiers: str, simulation: bool) -> NodeSettings:
    """``node`` with its tier from ``simulated-tiers``, in a simulation only.

    Flower's simulation engine puts only partition-id/num-partitions into node_config,
    so the run-config gives each simulated partition its tier. A real SuperNode reports
    the tier of its ``--node-config`` (or none): a run-config default must not make a
    deployed GPU box pretend to be an edge device.
    """
    if node.device_tier or not simulated_tiers or not simulation or not node.num_partitions:
        return node
    tiers = parse_tier_counts(simulated_tiers, node.num_partitions)
    return dataclasses.replace(node, device_tier=tiers[node.partition_id])


def received_model(content: RecordDict) -> tuple[ArchSpec, nn.Module]:
    """The model a server message carries: its spec, and the model rebuilt from the arrays.

    Quantized variants (FedHCE) arrive packed; they are unpacked and run in fp32.
    """
    if CONFIG_RECORD_KEY not in content.config_records or ARRAY_RECORD_KEY not in content:
        raise ModelSpecError(f"the message lacks {CONFIG_RECORD_KEY!r} or {ARRAY_RECORD_KEY!r}")
    round_config = content[CONFIG_RECORD_KEY]
    if ARCH_SPEC_KEY not in round_config:
        raise ModelSpecError(f"the message's config has no {ARCH_SPEC_KEY!r}")
    spec = ArchSpec.from_json(str(round_config[ARCH_SPEC_KEY]))
    model = build_from_state_dict(spec, received_state(content[ARRAY_RECORD_KEY], round_config))
    return spec, model


def _train(msg: Message, context: Context) -> Message:
    config, node, data, spec, model = _setup(msg, context)
    training, simulation = config.training, config.simulation
    device = select_device(training.device)
    round_config = msg.content[CONFIG_RECORD_KEY]
    server_round = int(round_config.get(SERVER_ROUND_KEY, 0))
    if simulation.fail_fraction and in_simulation():
        # A silent node answers a little after the server stopped waiting for it.
        silent = simulation.fail_mode == "silent"
        silent_for = config.federation.round_timeout + 5 if silent else 0.0
        inject_fault(
            config.seed,
            server_round,
            node.partition_id,
            node.num_partitions,
            simulation.fail_fraction,
            silent_for,
        )
    kind, attackers = simulation.attack_settings()
    attack = attack_for(node.partition_id, attackers, kind, in_simulation())
    sent = {k: v.detach().clone() for k, v in model.state_dict().items()} if attack else {}
    train_data = data
    if attack is not None:  # trains on what the attack makes of its labels
        train_data = attack.training_data(data)
    if training.trainer == "layer-parallel":
        result = _train_layer_parallel(
            model, spec, train_data, config, round_config, node, server_round
        )
    else:
        result = train_locally(
            model,
            train_data,
            config,
            node.partition_id,
            server_round,
            epochs=int(round_config.get(LOCAL_EPOCHS_KEY, training.local_epochs)),
            lr=float(round_config.get(LR_KEY, training.lr)),
            device=device,
        )
    if attack is not None:
        attack.poison(model, sent, local_seed(config, node.partition_id, server_round))
    # The reply reports the honest partition's class counts, as an attacker would.
    return _reply(msg, model, spec, data, node, device, result)


def local_seed(config: ExperimentConfig, partition_id: int, server_round: int) -> int:
    """Different shuffles per node and round, reproducible for a fixed seed."""
    return config.seed * 1_000_003 + partition_id * 1_009 + server_round


def train_locally(
    model: nn.Module,
    data: ClientData,
    config: ExperimentConfig,
    partition_id: int,
    server_round: int,
    epochs: int | None = None,
    lr: float | None = None,
    device: torch.device | str = "cpu",
) -> TrainResult:
    """A node's local supervised training (in place), as the ClientApp runs it.

    ``epochs`` and ``lr`` default to the run-config's (the server may send others).
    """
    training = config.training
    return train_supervised(
        model,
        data.train,
        epochs=training.local_epochs if epochs is None else epochs,
        batch_size=training.batch_size,
        lr=training.lr if lr is None else lr,
        momentum=training.momentum,
        max_grad_norm=training.max_grad_norm,
        device=device,
        seed=local_seed(config, partition_id, server_round),
    )


def _train_layer_parallel(model, spec, data, config, round_config, node, server_round):  # noqa: ANN001, ANN202
    """The layer-parallel trainer (K worker processes) on this node's partition."""
    from fl_ec.layer_parallel import train_layer_parallel

    start = time.perf_counter()
    settings = config.lp_settings(
        epochs=int(round_config.get(LOCAL_EPOCHS_KEY, config.training.local_epochs)),
        lr=float(round_config.get(LR_KEY, config.training.lr)),
        seed=local_seed(config, node.partition_id, server_round),
    )
    result = train_layer_parallel(
        model, spec, data.train.normalize(data.train.images), data.train.labels, settings
    )
    return TrainResult(
        result.train_loss[-1],
        settings.epochs * len(data.train),
        time.perf_counter() - start,
        result.stages,
    )


def _reply(msg, model, spec, data, node, device, result) -> Message:  # noqa: ANN001
    round_config = msg.content[CONFIG_RECORD_KEY]
    model.to("cpu")
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: len(data.train),
            TRAIN_LOSS_KEY: result.train_loss,
            TRAIN_SECONDS_KEY: result.seconds,
            # 1 for plain SGD; the stages the layer-parallel trainer actually used.
            TRAINER_STAGES_KEY: result.stages,
        }
    )
    capability = _capability(node, device)
    # What the server needs to use this model in an ensemble: the architecture it was
    # trained as, and the label distribution it saw (label-aware teacher weighting).
    train_info = ConfigRecord(
        {
            ARCH_SPEC_KEY: spec.to_json(),
            CLASS_COUNTS_KEY: data.train.class_counts(),
            VARIANT_KEY: str(round_config.get(VARIANT_KEY, "")),
        }
    )
    content = RecordDict(
        {
            ARRAY_RECORD_KEY: ArrayRecord(model.state_dict()),
            METRIC_RECORD_KEY: metrics,
            CAPABILITY_KEY: capability,
            TRAIN_INFO_KEY: train_info,
        }
    )
    return Message(content=content, reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    config, _, data, _, model = _setup(msg, context)
    result = evaluate(model, data.test, device=select_device(config.training.device))
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: result.num_examples,
            EVAL_LOSS_KEY: result.loss,
            EVAL_ACC_KEY: result.accuracy,
        }
    )
    return Message(content=RecordDict({METRIC_RECORD_KEY: metrics}), reply_to=msg)


def _describe(msg: Message, context: Context) -> Message:
    config, node, data = _node_setup(context)
    info = ConfigRecord(
        {PARTITION_ID_KEY: node.partition_id, CLASS_COUNTS_KEY: data.train.class_counts()}
    )
    # The capability as a training reply reports it, so a strategy that assigns models by
    # tier (FedHCE) knows this node's before sending it anything to train.
    capability = _capability(node, select_device(config.training.device))
    return Message(
        content=RecordDict({NODE_INFO_KEY: info, CAPABILITY_KEY: capability}), reply_to=msg
    )


def _capability(node: NodeSettings, device: torch.device) -> ConfigRecord:
    return ConfigRecord(device_capability(device, node.device_tier, node.memory_mb, node.speed))


def _feature_stats(msg: Message, context: Context) -> Message:
    query_config = msg.content[CONFIG_RECORD_KEY]
    if not bool(query_config.get(STATS_RECORD_KEY, False)):
        raise ConfigError(f"query without {STATS_RECORD_KEY}=true: nothing to answer")
    config, _, data, spec, model = _setup(msg, context)
    start = time.perf_counter()
    statistics = _stats_settings(query_config).statistics()
    measured = statistics.measure(
        model,
        data.train.normalize(data.train.images),
        data.train.labels,
        spec.num_classes,
        device=select_device(config.training.device),
    )
    # No more upload than a copy of the model itself, however many classes it holds.
    wire = statistics.to_arrays(measured, budget_bytes=model_bytes(model))
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in wire.items()})
    metrics = MetricRecord(
        {NUM_EXAMPLES_KEY: len(data.train), STATS_SECONDS_KEY: time.perf_counter() - start}
    )
    content = RecordDict({STATS_RECORD_KEY: arrays, METRIC_RECORD_KEY: metrics})
    return Message(content=content, reply_to=msg)


def _stats_settings(query_config: ConfigRecord) -> CalibrationSettings:
    """Which statistics the server asked for (classifier inputs when it does not say)."""
    try:
        return CalibrationSettings(
            layers=str(query_config.get(STATS_LAYERS_KEY, "classifier")),
            rank=int(query_config.get(STATS_RANK_KEY, CalibrationSettings.rank)),
            components=int(query_config.get(STATS_COMPONENTS_KEY, CalibrationSettings.components)),
        )
    except ValueError as reason:
        raise ConfigError(f"{STATS_RECORD_KEY} query: {reason}") from reason


def _client_data(config: ExperimentConfig, node: NodeSettings) -> ClientData:
    """This node's data: its own folder's when it has a ``data-dir`` (checked against the
    format of the run's dataset), else its partition of the run's dataset."""
    # Simulated nodes share worker processes; cache the data per (data section, seed,
    # partition) instead of re-partitioning every round, and a folder per (dataset,
    # folder) instead of decoding it for every message. Bounded: a worker serves a
    # handful of partitions at a time.
    if node.data_dir:
        key: tuple = (config.data.dataset, node.data_dir)
    else:
        key = (config.data, config.seed, node.partition_id, node.num_partitions)
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) >= _DATA_CACHE_SIZE:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        if node.data_dir:
            _DATA_CACHE[key] = load_local_data(node.data_dir, config.data.dataset)
        else:
            _DATA_CACHE[key] = load_client_data(
                config.data, config.seed, node.partition_id, node.num_partitions
            )
    return _DATA_CACHE[key]


_DATA_CACHE: dict[tuple, ClientData] = {}
_DATA_CACHE_SIZE = 32
