"""Small pure helpers of FedEC: validate replies, group by architecture, average, metrics.

Kept apart from the strategy (as Flower keeps ``strategy_utils`` apart from ``FedAvg``)
so each can be tested by building replies by hand. A reply is checked on its own
(:func:`reply_arrays`, :func:`reply_weight`, :func:`parse_reply`): every reply that
Flower's ``validate_message_reply_consistency`` lets through passes, and a bad one
raises ``ValueError`` naming its defect instead of failing the whole round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

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


def reply_arrays(content: RecordDict, arrayrecord_key: str = ARRAY_RECORD_KEY) -> ArrayRecord:
    """A train reply's model arrays, found as ``FedAvg`` finds them, or ``ValueError``.

    The reply's only ArrayRecord, whatever its name (``FedAvg`` aggregates the one
    ArrayRecord of each reply and ignores its name); with several, the one named
    ``arrayrecord_key``, where ``FedAvg`` would reject the round.
    """
    records = content.array_records
    if len(records) == 1:
        return next(iter(records.values()))
    if arrayrecord_key in records:
        return records[arrayrecord_key]
    if not records:
        raise ValueError("no ArrayRecord in the reply")
    raise ValueError(
        f"{len(records)} ArrayRecords ({', '.join(sorted(records))}) and none named "
        f"{arrayrecord_key!r}"
    )


def reply_weight(content: RecordDict, weighted_by_key: str = NUM_EXAMPLES_KEY) -> float:
    """A reply's weight from its only MetricRecord, or ``ValueError`` naming the defect.

    As ``FedAvg`` requires: exactly one MetricRecord, holding ``weighted_by_key`` as a
    single number. Beyond it: the number must be finite and positive (a reply of weight
    0 adds nothing to ``FedAvg``'s average either).
    """
    metric_records = list(content.metric_records.values())
    if len(metric_records) != 1:
        raise ValueError(f"expected exactly one MetricRecord, found {len(metric_records)}")
    if weighted_by_key not in metric_records[0]:
        raise ValueError(f"missing metric {weighted_by_key!r}")
    weight = metric_records[0][weighted_by_key]
    if not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
        raise ValueError(f"{weighted_by_key}={weight!r} must be a positive number")
    return float(weight)


def parse_reply(
    message: Message,
    default_spec: ArchSpec | None,
    builder: Builder = build_by_spec,
    weighted_by_key: str = NUM_EXAMPLES_KEY,
    arrayrecord_key: str = ARRAY_RECORD_KEY,
) -> ClientModel:
    """Turn a reply into a :class:`ClientModel`, or raise ``ValueError`` naming the defect.

    Checks, in order: error reply; the model's ArrayRecord (:func:`reply_arrays`); its
    weight (:func:`reply_weight`); a well-formed spec (the reply's own ``train-info``
    spec, or the global one); finite values; keys and shapes that build the declared
    architecture.
    """
    if message.has_error():
        raise ValueError(f"error reply: {message.error.reason}")
    content = message.content
    arrays = reply_arrays(content, arrayrecord_key)
    weight = reply_weight(content, weighted_by_key)
    metrics = next(iter(content.metric_records.values()))
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
            counts = info[CLASS_COUNTS_KEY]
            if not isinstance(counts, list) or not counts:
                raise ValueError(f"{CLASS_COUNTS_KEY}={counts!r} must be a list of counts")
            class_counts = [float(v) for v in counts]  # type: ignore[arg-type]
            if not all(np.isfinite(c) and c >= 0 for c in class_counts):
                raise ValueError(f"{CLASS_COUNTS_KEY} {class_counts} must be non-negative")
    try:
        state = arrays.to_torch_state_dict()
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
        weight,
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


def aggregatable_metrics(
    contents: list[RecordDict], weighted_by_key: str = NUM_EXAMPLES_KEY
) -> tuple[list[RecordDict], list[str]]:
    """The replies as a metric aggregation function can take them, and the keys left out.

    Each reply holds one MetricRecord (:func:`reply_weight`). When every reply reports
    the same metric keys, each key a number in all or a list of one length in all (what
    ``FedAvg`` needs of its replies), ``contents`` are returned as they are. Otherwise
    a copy of each reply keeps only the metrics that all report alike, and the others
    are named, so that no reply can make the aggregation fail.
    """
    if not contents:
        return [], []

    def kinds(content: RecordDict) -> dict[str, int | None]:
        record = next(iter(content.metric_records.values()))
        return {k: len(v) if isinstance(v, list) else None for k, v in record.items()}

    each = [kinds(content) for content in contents]
    shared = {k for k, kind in each[0].items() if all(k in o and o[k] == kind for o in each)}
    if all(set(o) == shared for o in each):
        return contents, []
    left_out = sorted(set().union(*each) - shared - {weighted_by_key})
    usable = []
    for content in contents:
        name, record = next(iter(content.metric_records.items()))
        reduced = RecordDict(dict(content.items()))
        reduced[name] = MetricRecord({k: v for k, v in record.items() if k in shared})
        usable.append(reduced)
    return usable, left_out


def state_of(arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in arrays.items()}


# How Flower answers a message type that a ClientApp registered no function for.
NO_HANDLER_REASON = "No query function registered"


def missing_stats_support(message: Message) -> str | None:
    """Why a statistics-query reply shows its client cannot answer the query, else None.

    A stock ClientApp has no query handler (Flower's error reply says so); a query
    handler of another app replies without the statistics record. Other errors and
    malformed statistics are not a missing feature: :func:`parse_stats_reply` names them.
    """
    if message.has_error():
        return "no query handler" if NO_HANDLER_REASON in message.error.reason else None
    if STATS_RECORD_KEY not in message.content.array_records:
        return f"no {STATS_RECORD_KEY!r} ArrayRecord in the reply"
    return None


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
