"""Small pure helpers of FedEC: group accepted replies by architecture, average, metrics.

Kept apart from the strategy (as Flower keeps ``strategy_utils`` apart from ``FedAvg``)
so each can be tested by building replies by hand. Replies are checked before they
get here (:mod:`fl_ec.strategies.replies`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING

import torch
from flwr.app import MetricRecord, RecordDict
from flwr.common.logger import log

from fl_ec.models.spec import ArchSpec
from fl_ec.protocol import NUM_EXAMPLES_KEY
from fl_ec.robust import WeightedMean

Builder = Callable[[ArchSpec | None, dict[str, torch.Tensor]], torch.nn.Module]


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


def members_of(models: Iterable[ClientModel]) -> list[torch.nn.Module]:
    """The client models themselves, in eval mode (EC-DNN's global ensemble)."""
    return [m.model.eval() for m in models]


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

    :class:`~fl_ec.robust.WeightedMean`: ``FedAvg``'s arithmetic step for step, so
    FedEC without distillation serves FedAvg's model bit for bit.
    """
    return WeightedMean().combine([m.state for m in models], [m.num_examples for m in models], None)


def is_finite_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every floating tensor of ``state`` is finite."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def aggregatable_metrics(
    contents: list[RecordDict], weighted_by_key: str = NUM_EXAMPLES_KEY
) -> tuple[list[RecordDict], list[str]]:
    """The replies as a metric aggregation function can take them, and the keys left out.

    Each reply holds one MetricRecord (:func:`~fl_ec.strategies.replies.reply_weight`).
    When every reply reports the same metric keys, each key a number in all or a list of
    one length in all (what
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


def aggregate_alike(
    server_round: int,
    contents: list[RecordDict],
    aggregate: Callable[[list[RecordDict], str], MetricRecord],
    weighted_by_key: str,
) -> MetricRecord:
    """``aggregate`` (a ``*_metrics_aggr_fn`` of FedAvg's) over the metrics every reply
    reports alike (:func:`aggregatable_metrics`); the others are named in a warning."""
    usable, left_out = aggregatable_metrics(contents, weighted_by_key)
    if left_out:
        log(
            WARNING,
            "round %d: metric(s) %s not reported alike by every reply; left out of "
            "the aggregated metrics",
            server_round,
            ", ".join(left_out),
        )
    return aggregate(usable, weighted_by_key)
