"""Small pure helpers of FedEC: validate replies, group by architecture, average, metrics.

Kept apart from the strategy (as Flower keeps ``strategy_utils`` apart from ``FedAvg``)
so each can be tested by building replies by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Message

from fl_ec.calibration import FeatureStatistics, FeatureStats
from fl_ec.errors import ModelSpecError
from fl_ec.models.spec import ArchSpec, build_from_state_dict
from fl_ec.protocol import (
    ARCH_SPEC_KEY,
    ARRAY_RECORD_KEY,
    CLASS_COUNTS_KEY,
    NUM_EXAMPLES_KEY,
    STATS_RECORD_KEY,
    TRAIN_INFO_KEY,
    VARIANT_KEY,
)

Builder = Callable[[ArchSpec | None, dict[str, torch.Tensor]], torch.nn.Module]


def build_by_spec(spec: ArchSpec | None, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    if spec is None:
        raise ModelSpecError("no architecture spec in the reply and none configured")
    return build_from_state_dict(spec, state)


@dataclass
class ClientModel:
    """One accepted reply: its node, spec, arrays, weight and optional class counts.

    ``model`` is the module built while validating the reply; the teacher and the
    EC-DNN ensemble reuse it instead of rebuilding it from ``state``.
    """

    node_id: int
    spec: ArchSpec | None
    state: dict[str, torch.Tensor]
    model: torch.nn.Module
    num_examples: float
    class_counts: list[float] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    variant: str = ""  # the compressed variant the client trained (FedHCE), if any


def parse_reply(
    message: Message,
    default_spec: ArchSpec | None,
    builder: Builder = build_by_spec,
    weighted_by_key: str = NUM_EXAMPLES_KEY,
    arrayrecord_key: str = ARRAY_RECORD_KEY,
) -> ClientModel:
    """Turn a reply into a :class:`ClientModel`, or raise ``ValueError`` naming the defect.

    Checks, in order: error reply; exactly the expected ArrayRecord; a positive weight
    in a MetricRecord; a well-formed spec (the reply's own ``train-info`` spec, or the
    global one); finite values; keys and shapes that build the declared architecture.
    """
    if message.has_error():
        raise ValueError(f"error reply: {message.error.reason}")
    content = message.content
    if arrayrecord_key not in content.array_records:
        raise ValueError(f"missing ArrayRecord {arrayrecord_key!r}")
    metric_records = list(content.metric_records.values())
    if len(metric_records) != 1 or weighted_by_key not in metric_records[0]:
        raise ValueError(f"missing metric {weighted_by_key!r}")
    metrics = metric_records[0]
    weight = metrics[weighted_by_key]
    if not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
        raise ValueError(f"{weighted_by_key}={weight!r} must be a positive number")
    spec, class_counts, variant = default_spec, None, ""
    if TRAIN_INFO_KEY in content.config_records:
        info = content.config_records[TRAIN_INFO_KEY]
        variant = str(info.get(VARIANT_KEY, ""))
        if ARCH_SPEC_KEY in info:
            try:
                spec = ArchSpec.from_json(str(info[ARCH_SPEC_KEY]))
            except ModelSpecError as err:
                raise ValueError(str(err)) from None
        if CLASS_COUNTS_KEY in info:
            class_counts = [float(v) for v in info[CLASS_COUNTS_KEY]]  # type: ignore[union-attr]
            if min(class_counts, default=-1) < 0:
                raise ValueError(f"{CLASS_COUNTS_KEY} {class_counts} must be non-negative")
    try:
        state = content[arrayrecord_key].to_torch_state_dict()
    except Exception as err:  # malformed array payloads raise a variety of errors
        raise ValueError(f"unreadable arrays ({err})") from None
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"non-finite values in {key!r}")
    try:
        model = builder(spec, state)
    except ModelSpecError as err:
        raise ValueError(str(err)) from None
    if class_counts is not None:
        num_classes = _num_outputs(model)
        if num_classes is not None and len(class_counts) != num_classes:
            raise ValueError(
                f"{len(class_counts)} {CLASS_COUNTS_KEY} for a {num_classes}-class model"
            )
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return ClientModel(
        message.metadata.src_node_id,
        spec,
        state,
        model,
        float(weight),
        class_counts,
        numeric,
        variant,
    )


def _num_outputs(model: torch.nn.Module) -> int | None:
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1].out_features if linears else None


def group_by_spec(models: Iterable[ClientModel]) -> dict[str, list[ClientModel]]:
    """Replies grouped by architecture: spec JSON plus the array shapes (pruned variants)."""
    groups: dict[str, list[ClientModel]] = {}
    for model in models:
        shapes = tuple((k, tuple(v.shape)) for k, v in model.state.items())
        spec = model.spec.to_json() if model.spec is not None else ""
        groups.setdefault(spec + repr(shapes), []).append(model)
    return groups


def weighted_average(models: list[ClientModel]) -> dict[str, torch.Tensor]:
    """Parameter average weighted by num-examples (all models must share shapes).

    The arithmetic is Flower's ``FedAvg``'s, step for step: each model's arrays times
    its weight, summed in reply order in the arrays' own dtype. So FedEC without
    distillation serves FedAvg's model bit for bit, and a run's difference from FedAvg
    is the distillation's alone; a last-bit difference would otherwise grow, through
    the clients' local epochs, into a different trajectory. Integer buffers
    (BatchNorm's ``num_batches_tracked``) are averaged in float64 and rounded back to
    their dtype, so the result loads into the same architecture.
    """
    total = sum(m.num_examples for m in models)
    average: dict[str, torch.Tensor] = {}
    for key, reference in models[0].state.items():
        if not reference.is_floating_point():
            acc = sum(m.state[key].to(torch.float64) * (m.num_examples / total) for m in models)
            average[key] = acc.round().to(reference.dtype)
            continue
        acc = models[0].state[key] * (models[0].num_examples / total)
        for m in models[1:]:
            acc += m.state[key].to(reference.dtype) * (m.num_examples / total)
        average[key] = acc
    return average


def average_metrics(models: list[ClientModel], exclude: str = NUM_EXAMPLES_KEY) -> dict[str, float]:
    """Example-weighted mean of every numeric metric that all replies report."""
    if not models:
        return {}
    shared = set.intersection(*(set(m.metrics) for m in models)) - {exclude}
    total = sum(m.num_examples for m in models)
    return {k: sum(m.metrics[k] * m.num_examples for m in models) / total for k in sorted(shared)}


def state_of(arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in arrays.items()}


def parse_stats_reply(
    message: Message, num_classes: int, dim: int, statistics: FeatureStatistics
) -> FeatureStats:
    """A query reply's feature statistics of kind ``statistics``, or ``ValueError``.

    The error names the defect.
    """
    if message.has_error():
        raise ValueError(f"error reply: {message.error.reason}")
    if STATS_RECORD_KEY not in message.content.array_records:
        raise ValueError(f"no {STATS_RECORD_KEY!r} ArrayRecord in the reply")
    record = message.content.array_records[STATS_RECORD_KEY]
    return statistics.parse({k: a.numpy() for k, a in record.items()}, num_classes, dim)
