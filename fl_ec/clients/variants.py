"""FedHCE's compressed variants in any Flower ClientApp: receive one, reply with it.

A stock ClientApp (e.g. Flower's quickstart-pytorch) trains FedHCE's variants with two
changed lines::

    model = receive_variant(msg, Net)  # was: model = Net(); model.load_state_dict(...)
    ...
    return reply_variant(msg, model, metrics, context)  # was: building the reply

:func:`receive_variant` unpacks int8/int4/int2 weights and cuts a fresh model to a
pruned variant's shape by replaying the decision the server sent; the client trains
it in fp32. A plain FedAvg/FedEC message gives the plain model. :func:`reply_variant`
sends the trained weights with what FedHCE reads from a reply: the variant's name and
what this node is (its ``device-tier``), from which the server picks the node's next
variant. Message keys are
:mod:`fl_ec.protocol`'s, Flower's defaults (``arrays``, ``config``, ``metrics``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from fl_ec.compression import replay_pruning, unpack_state_dict
from fl_ec.errors import ModelSpecError
from fl_ec.protocol import (
    ARRAY_RECORD_KEY,
    CAPABILITY_KEY,
    CLASS_COUNTS_KEY,
    CONFIG_RECORD_KEY,
    DEVICE_TIER_KEY,
    MEMORY_MB_KEY,
    METRIC_RECORD_KEY,
    PRUNING_KEY,
    SPEED_KEY,
    TRAIN_INFO_KEY,
    VARIANT_KEY,
    WIRE_MANIFEST_KEY,
)
from fl_ec.training import device_capability


def receive_variant(msg: Message, model_builder: Callable[[], nn.Module]) -> nn.Module:
    """The model ``msg`` carries, built with ``model_builder`` (e.g. quickstart's ``Net``).

    For a FedHCE variant: packed quantized weights are unpacked (integers times their
    per-channel scales) into fp32 weights, which the client trains as fl-ec's own
    ClientApp does, and a pruned variant's decision is replayed on the fresh model
    (:func:`fl_ec.compression.replay_pruning`) before loading. Raises
    ``ModelSpecError`` in one line when the arrays do not fit the model.
    """
    content = msg.content
    if ARRAY_RECORD_KEY not in content.array_records:
        raise ModelSpecError(f"the message has no {ARRAY_RECORD_KEY!r} array record")
    config = content.config_records.get(CONFIG_RECORD_KEY, ConfigRecord())
    state = received_state(content.array_records[ARRAY_RECORD_KEY], config)
    model = model_builder()
    if PRUNING_KEY in config:
        try:
            replay_pruning(model, str(config[PRUNING_KEY]))
        except ValueError as err:
            raise ModelSpecError(f"the pruned variant does not fit this model: {err}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # keys/shapes the builder's model does not have
        first = str(err).strip().splitlines()[0]
        raise ModelSpecError(f"the received arrays do not fit this model: {first}") from None
    return model


def received_state(arrays: ArrayRecord, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The sent weights as a state dict; quantized variants arrive packed (``wire-manifest``)."""
    if WIRE_MANIFEST_KEY not in config:
        return arrays.to_torch_state_dict()
    try:
        manifest = json.loads(str(config[WIRE_MANIFEST_KEY]))
        return unpack_state_dict({k: a.numpy() for k, a in arrays.items()}, manifest)
    except Exception as err:  # noqa: BLE001 - any malformed payload is one clear error
        raise ModelSpecError(f"malformed quantized payload from the server: {err}") from None


def reply_variant(
    msg: Message,
    model: nn.Module,
    metrics: Mapping[str, int | float] | MetricRecord,
    context: Context | None = None,
    *,
    tier: str | None = None,
    class_counts: Sequence[int] | None = None,
) -> Message:
    """The train reply to ``msg``: ``model``'s weights, ``metrics`` and what FedHCE reads.

    ``metrics`` must hold the strategy's weighting key (``num-examples``). Weights go
    back in fp32: the server takes each client's change (returned minus sent) and
    applies it to its own full-precision copy of the variant. The reply also
    carries ``train-info`` with the variant's name, from which the server rebuilds it,
    and ``capability`` with the node's ``device-tier``: ``tier`` if given, else the
    ``device-tier`` of ``context.node_config`` (``flower-supernode --node-config``),
    else ``gpu`` or ``cpu`` by where ``model`` is. ``class_counts`` (the node's
    training labels per class), if given, lets FedEC's label-aware teachers use it.
    """
    config = msg.content.config_records.get(CONFIG_RECORD_KEY, ConfigRecord())
    node_config: Mapping[str, Any] = context.node_config if context is not None else {}
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    capability = device_capability(
        device,
        tier if tier is not None else str(node_config.get(DEVICE_TIER_KEY, "")),
        float(node_config.get(MEMORY_MB_KEY, 0.0)),
        float(node_config.get(SPEED_KEY, 0.0)),
    )
    info: dict[str, Any] = {VARIANT_KEY: str(config.get(VARIANT_KEY, ""))}
    if class_counts is not None:
        info[CLASS_COUNTS_KEY] = [int(count) for count in class_counts]
    metric_record = metrics if isinstance(metrics, MetricRecord) else MetricRecord(dict(metrics))
    content = RecordDict(
        {
            ARRAY_RECORD_KEY: ArrayRecord(
                {k: v.detach().cpu() for k, v in model.state_dict().items()}
            ),
            METRIC_RECORD_KEY: metric_record,
            CAPABILITY_KEY: ConfigRecord(capability),
            TRAIN_INFO_KEY: ConfigRecord(info),
        }
    )
    return Message(content=content, reply_to=msg)
