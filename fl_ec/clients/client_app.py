"""The fl-ec ClientApp: local training and evaluation on this node's partition.

The server sends arrays plus a JSON architecture spec (``config["arch-spec"]``); the
client rebuilds the model from them -- no pickled module travels. A reply carries:

* ``arrays``: the trained state_dict as an ``ArrayRecord``;
* ``metrics``: ``num-examples``, ``train-loss``, ``train-seconds`` (a ``MetricRecord``,
  averaged by any Flower strategy);
* ``capability``: what this node is (device kind and tier, memory, threads, speed) as
  a ``ConfigRecord`` -- the server cannot read ``node_config``, so clients tell it.

A configuration problem becomes an error reply whose reason is one readable line,
instead of a traceback in the node's log.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fl_ec.compression import enable_weight_fake_quant, unpack_state_dict
from fl_ec.config import ExperimentConfig, NodeSettings, parse_tier_counts
from fl_ec.data.federated import ClientData, load_client_data
from fl_ec.ensemble import log_class_prior
from fl_ec.errors import ConfigError, FlEcError, ModelSpecError
from fl_ec.feature_calibration import (
    STATS_COMPONENTS_KEY,
    STATS_LAYERS_KEY,
    STATS_RANK_KEY,
    STATS_RECORD_KEY,
    CalibrationSettings,
)
from fl_ec.head_calibration import measure_stats
from fl_ec.models.spec import ArchSpec, build_from_state_dict
from fl_ec.protocol import CLASS_COUNTS_KEY, DESCRIBE_KEY, NODE_INFO_KEY, PARTITION_ID_KEY
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
    :mod:`fl_ec.strategies.sampling`). ``feature-stats=true``: FedEC's feature
    calibration asks for them after aggregating a round: one forward pass, no training
    (:mod:`fl_ec.feature_calibration`).
    """
    try:
        if bool(msg.content["config"].get(DESCRIBE_KEY, False)):
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
    config = ExperimentConfig.from_run_config(context.run_config)
    node = NodeSettings.from_node_config(context.node_config)
    set_cpu_threads(config.client_threads)
    data = _client_data(config, node.partition_id, node.num_partitions)
    spec, model = received_model(msg.content)
    if not node.device_tier and config.simulated_tiers:
        # Flower's simulation engine only puts partition-id/num-partitions into
        # node_config; the simulated tier of each partition comes from run-config.
        tiers = parse_tier_counts(config.simulated_tiers, node.num_partitions)
        node = dataclasses.replace(node, device_tier=tiers[node.partition_id])
    return config, node, data, spec, model


def received_model(content: RecordDict) -> tuple[ArchSpec, nn.Module]:
    """The model a server message carries: its spec, and the model rebuilt from the arrays.

    Quantized variants (FedHCE) arrive packed and run with fake-quant weights, as they
    train (straight-through estimator) and as the server measures them.
    """
    round_config = content["config"]
    spec = ArchSpec.from_json(str(round_config["arch-spec"]))
    model = build_from_state_dict(spec, _received_state(content["arrays"], round_config))
    enable_weight_fake_quant(model, int(round_config.get("variant-bits", 0)))
    return spec, model


def _received_state(arrays: ArrayRecord, round_config: ConfigRecord) -> dict[str, torch.Tensor]:
    """The sent weights; quantized variants arrive as packed integers plus scales."""
    if "wire-manifest" not in round_config:
        return arrays.to_torch_state_dict()
    try:
        manifest = json.loads(str(round_config["wire-manifest"]))
        return unpack_state_dict({k: a.numpy() for k, a in arrays.items()}, manifest)
    except (ValueError, TypeError) as err:
        raise ModelSpecError(f"malformed quantized payload from the server: {err}") from None


def _train(msg: Message, context: Context) -> Message:
    config, node, data, spec, model = _setup(msg, context)
    device = select_device(config.device)
    round_config = msg.content["config"]
    server_round = int(round_config.get("server-round", 0))
    if config.trainer == "layer-parallel":
        result = _train_layer_parallel(model, spec, data, config, round_config, node, server_round)
        return _reply(msg, model, spec, data, node, device, result)
    result = train_locally(
        model,
        data,
        config,
        node.partition_id,
        server_round,
        epochs=int(round_config.get("local-epochs", config.local_epochs)),
        lr=float(round_config.get("lr", config.lr)),
        device=device,
    )
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
    """A node's local supervised training (in place), as the ClientApp runs it."""
    return train_supervised(
        model,
        data.train,
        epochs=config.local_epochs if epochs is None else epochs,
        batch_size=config.batch_size,
        lr=config.lr if lr is None else lr,
        momentum=config.momentum,
        max_grad_norm=config.max_grad_norm,
        log_prior=(
            log_class_prior(data.train.class_counts())
            if config.local_loss == "logit-adjusted"
            else None
        ),
        device=device,
        seed=local_seed(config, partition_id, server_round),
    )


def _train_layer_parallel(model, spec, data, config, round_config, node, server_round):  # noqa: ANN001, ANN202
    """The layer-parallel trainer (K worker processes) on this node's partition.

    It trains fp32 weights: a quantized FedHCE variant is trained without fake-quant here.
    """
    from fl_ec.layer_parallel import LPSettings, train_layer_parallel

    start = time.perf_counter()
    settings = LPSettings.from_experiment(
        config,
        epochs=int(round_config.get("local-epochs", config.local_epochs)),
        lr=float(round_config.get("lr", config.lr)),
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
    round_config = msg.content["config"]
    model.to("cpu")
    metrics = MetricRecord(
        {
            "num-examples": len(data.train),
            "train-loss": result.train_loss,
            "train-seconds": result.seconds,
            # 1 for plain SGD; the stages the layer-parallel trainer actually used.
            "trainer-stages": result.stages,
        }
    )
    capability = ConfigRecord(
        device_capability(device, node.device_tier, node.memory_mb, node.speed)
    )
    # What the server needs to use this model in an ensemble: the architecture it was
    # trained as, and the label distribution it saw (label-aware teacher weighting).
    train_info = ConfigRecord(
        {
            "arch-spec": spec.to_json(),
            "class-counts": data.train.class_counts(),
            "variant": str(round_config.get("variant", "")),
        }
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": metrics,
            "capability": capability,
            "train-info": train_info,
        }
    )
    return Message(content=content, reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    config, _, data, _, model = _setup(msg, context)
    result = evaluate(model, data.test, device=select_device(config.device))
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "eval-loss": result.loss,
            "eval-acc": result.accuracy,
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _describe(msg: Message, context: Context) -> Message:
    config = ExperimentConfig.from_run_config(context.run_config)
    node = NodeSettings.from_node_config(context.node_config)
    data = _client_data(config, node.partition_id, node.num_partitions)
    info = ConfigRecord(
        {PARTITION_ID_KEY: node.partition_id, CLASS_COUNTS_KEY: data.train.class_counts()}
    )
    return Message(content=RecordDict({NODE_INFO_KEY: info}), reply_to=msg)


def _feature_stats(msg: Message, context: Context) -> Message:
    if not bool(msg.content["config"].get(STATS_RECORD_KEY, False)):
        raise ConfigError("query without feature-stats=true: nothing to answer")
    config, _, data, spec, model = _setup(msg, context)
    start = time.perf_counter()
    wire = measure_stats(
        model,
        data.train.normalize(data.train.images),
        data.train.labels,
        spec.num_classes,
        _stats_settings(msg.content["config"]),
        device=select_device(config.device),
    )
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in wire.items()})
    metrics = MetricRecord(
        {"num-examples": len(data.train), "stats-seconds": time.perf_counter() - start}
    )
    return Message(content=RecordDict({STATS_RECORD_KEY: arrays, "metrics": metrics}), reply_to=msg)


def _stats_settings(query_config: ConfigRecord) -> CalibrationSettings:
    """Which statistics the server asked for (classifier inputs when it does not say)."""
    try:
        return CalibrationSettings(
            layers=str(query_config.get(STATS_LAYERS_KEY, "classifier")),
            rank=int(query_config.get(STATS_RANK_KEY, CalibrationSettings.rank)),
            components=int(query_config.get(STATS_COMPONENTS_KEY, CalibrationSettings.components)),
        )
    except ValueError as reason:
        raise ConfigError(f"feature-stats query: {reason}") from reason


def _client_data(config: ExperimentConfig, partition_id: int, num_partitions: int) -> ClientData:
    # Simulated nodes share worker processes; cache the data per (data settings,
    # partition) instead of re-partitioning every round. Bounded: a worker serves a
    # handful of partitions at a time.
    key = (
        config.dataset,
        config.data_dir,
        config.download,
        config.train_subset,
        config.partitioner,
        config.alpha,
        config.classes_per_client,
        config.proxy_size,
        config.validation_size,
        config.client_test_fraction,
        config.seed,
        partition_id,
        num_partitions,
    )
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) >= _DATA_CACHE_SIZE:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        _DATA_CACHE[key] = load_client_data(config, partition_id, num_partitions)
    return _DATA_CACHE[key]


_DATA_CACHE: dict[tuple, ClientData] = {}
_DATA_CACHE_SIZE = 32
