"""Checks of one client reply, each made before anything is allocated from it.

A train reply becomes a :class:`~fl_ec.strategies.fedec_utils.ClientModel` only after
every check below passed, cheapest first:

1. its MetricRecord: the weight (``FedAvg``'s ``weighted_by_key``) a positive number no
   larger than :attr:`ReplyLimits.max_num_examples`, every metric finite;
2. its ``train-info``: a bounded architecture spec no larger than the global one
   (:func:`spec_bounds`); class counts, one per class, non-negative, summing to the
   number of examples;
3. its arrays, read from their ``.npy`` headers only (:func:`check_arrays`): the keys of
   the architecture, real floating dtypes, shapes within the architecture's (or equal to
   a pruned variant's), and byte sizes that match the shapes;
4. only then are the arrays deserialised, cast to the model's dtype and checked finite,
   and the model built.

Each failed check raises :class:`RejectedReplyError` naming the defect; the strategy logs
it with the node id and goes on with the other replies.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl_ec.calibration import FeatureStatistics, FeatureStats
from fl_ec.errors import ModelSpecError
from fl_ec.models.spec import ArchSpec, build_model, family, resnet_depth
from fl_ec.protocol import (
    ARCH_SPEC_KEY,
    ARRAY_RECORD_KEY,
    CLASS_COUNTS_KEY,
    NUM_EXAMPLES_KEY,
    STATS_RECORD_KEY,
    TRAIN_INFO_KEY,
    VARIANT_KEY,
)
from fl_ec.strategies.fedec_utils import Builder, ClientModel


class RejectedReplyError(ValueError):
    """A reply that fails a check; the message names the defect."""


@dataclass(frozen=True)
class ReplyLimits:
    """Bounds on what one reply may claim.

    ``max_num_examples``: the largest weight (``num-examples``) a reply may report; a
    client's self-reported count is otherwise unbounded and could make it the whole
    parameter average. ``count_tolerance``: how far (as a fraction of ``num-examples``,
    at least one example) the class counts may sum from ``num-examples``.
    ``max_spec_chars``: the longest architecture spec JSON read.
    """

    max_num_examples: float = 1e8
    count_tolerance: float = 0.01
    max_spec_chars: int = 4096

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_num_examples) and self.max_num_examples >= 1):
            raise ValueError(f"max_num_examples={self.max_num_examples} must be >= 1")
        if not 0 <= self.count_tolerance < 1:
            raise ValueError(f"count_tolerance={self.count_tolerance} must be in [0, 1)")


# Array bounds: per state key, the largest shape (or the exact one) and the dtype the
# server's model holds it in.
Bounds = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
# Bytes an .npy header may take (numpy writes 128 or 256 bytes for an array's header).
_HEADER_BYTES = 4096


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def reply_weight(
    content: RecordDict,
    weighted_by_key: str = NUM_EXAMPLES_KEY,
    limits: ReplyLimits | None = None,
) -> float:
    """A reply's weight from its only MetricRecord, or :class:`RejectedReplyError`.

    As ``FedAvg`` requires: exactly one MetricRecord, holding ``weighted_by_key`` as a
    single number. Beyond it: the number must be positive (a reply of weight 0 adds
    nothing to ``FedAvg``'s average either) and at most ``limits.max_num_examples``,
    and every metric of the record finite.
    """
    limits = limits or ReplyLimits()
    metric_records = list(content.metric_records.values())
    if len(metric_records) != 1:
        raise RejectedReplyError(f"expected exactly one MetricRecord, found {len(metric_records)}")
    record = metric_records[0]
    if weighted_by_key not in record:
        raise RejectedReplyError(f"missing metric {weighted_by_key!r}")
    check_metrics(record)
    weight = record[weighted_by_key]
    if not is_number(weight) or not 0 < weight <= limits.max_num_examples:
        raise RejectedReplyError(
            f"{weighted_by_key}={weight!r} must be a positive number, at most "
            f"{limits.max_num_examples:g}"
        )
    return float(weight)


def check_metrics(record: MetricRecord) -> None:
    """Every metric a finite number (or a list of finite numbers)."""
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        if not all(is_number(v) and math.isfinite(v) for v in values):
            raise RejectedReplyError(f"metric {key!r} is not finite")


def read_spec(text: Any, limits: ReplyLimits) -> ArchSpec:
    """A reply's architecture spec, from JSON text of bounded length."""
    if not isinstance(text, str) or len(text) > limits.max_spec_chars:
        raise RejectedReplyError(
            f"architecture spec must be JSON of at most {limits.max_spec_chars} chars"
        )
    try:
        return ArchSpec.from_json(text)
    except ModelSpecError as err:
        raise RejectedReplyError(str(err)) from None


def spec_bounds(spec: ArchSpec, global_spec: ArchSpec) -> Bounds:
    """The nominal array shapes of ``spec``, if it is no larger than ``global_spec``.

    Same family (cnn / resnet), input shape and number of classes; depth and each
    width at most the global model's. The shapes come from a model built on the
    ``meta`` device: no memory is allocated for its weights.
    """
    if family(spec.name) != family(global_spec.name):
        raise RejectedReplyError(
            f"model {spec.name!r} is not of the global {global_spec.name!r} family"
        )
    if spec.input_shape != global_spec.input_shape or spec.num_classes != global_spec.num_classes:
        raise RejectedReplyError(
            f"input {spec.input_shape} / {spec.num_classes} classes differ from the global "
            f"model's {global_spec.input_shape} / {global_spec.num_classes}"
        )
    if resnet_depth(spec.name) > resnet_depth(global_spec.name) or any(
        w > g for w, g in zip(spec.widths, global_spec.widths, strict=True)
    ):
        raise RejectedReplyError(
            f"{spec.name} {spec.widths} is larger than the global {global_spec.name} "
            f"{global_spec.widths}"
        )
    return shapes_of_spec(spec)


def shapes_of_spec(spec: ArchSpec) -> Bounds:
    """Every state key of ``spec``'s nominal model with its shape and dtype."""
    with torch.device("meta"):
        model = build_model(spec)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def shapes_of_state(state: Mapping[str, torch.Tensor]) -> Bounds:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def check_class_counts(
    counts: Any, num_classes: int | None, num_examples: float | None, limits: ReplyLimits
) -> list[float]:
    """Class counts as floats: one per class, finite, non-negative, summing to the
    number of examples within ``limits.count_tolerance``."""
    if not isinstance(counts, list) or not counts:
        raise RejectedReplyError("class-counts must be a list of counts")
    if num_classes is not None and len(counts) != num_classes:
        raise RejectedReplyError(f"{len(counts)} class-counts for a {num_classes}-class model")
    if not all(
        is_number(c) and math.isfinite(c) and 0 <= c <= limits.max_num_examples for c in counts
    ):
        raise RejectedReplyError("class-counts must be finite, non-negative numbers")
    values = [float(c) for c in counts]
    if num_examples is not None:
        total = sum(values)
        if abs(total - num_examples) > max(1.0, limits.count_tolerance * num_examples):
            raise RejectedReplyError(
                f"class-counts sum to {total:g}, not to num-examples={num_examples:g}"
            )
    return values


def reply_arrays(content: RecordDict, arrayrecord_key: str = ARRAY_RECORD_KEY) -> ArrayRecord:
    """A train reply's model arrays, found as ``FedAvg`` finds them.

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
        raise RejectedReplyError("no ArrayRecord in the reply")
    raise RejectedReplyError(
        f"{len(records)} ArrayRecords ({', '.join(sorted(records))}) and none named "
        f"{arrayrecord_key!r}"
    )


def check_arrays(record: ArrayRecord, bounds: Bounds, exact: bool) -> None:
    """Keys, dtypes, shapes and sizes of ``record``'s arrays, from their headers alone.

    The keys must be ``bounds``' keys. Each array an ``.npy`` payload whose header
    declares a real dtype (floating where the model holds floats; integer buffers may
    come as integers or floats), the shape in the array's metadata, as many dimensions
    as the bound, each no larger (``exact``: equal), and exactly as many data bytes.
    """
    if set(record) != set(bounds):
        missing = sorted(set(bounds) - set(record))[:3]
        unexpected = sorted(set(record) - set(bounds))[:3]
        raise RejectedReplyError(
            f"array keys do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    for key, array in record.items():
        bound, dtype = bounds[key]
        shape, kind, itemsize, offset = _npy_header(key, array.data)
        if tuple(array.shape) != shape:
            raise RejectedReplyError(f"{key!r}: metadata shape {array.shape} but data {shape}")
        allowed = "f" if dtype.is_floating_point else "fiu"
        if kind not in allowed:
            raise RejectedReplyError(f"{key!r}: dtype kind {kind!r} where {dtype} belongs")
        fits = (
            shape == bound
            if exact
            else len(shape) == len(bound)
            and all(0 < s <= b for s, b in zip(shape, bound, strict=True))
        )
        if not fits:
            raise RejectedReplyError(f"{key!r}: shape {shape} does not fit {bound}")
        if len(array.data) != offset + math.prod(shape) * itemsize:
            raise RejectedReplyError(f"{key!r}: {len(array.data)} bytes do not hold shape {shape}")


def _npy_header(key: str, data: bytes) -> tuple[tuple[int, ...], str, int, int]:
    """Shape, dtype kind, item size and data offset of an ``.npy`` payload's header."""
    buffer = io.BytesIO(bytes(data[:_HEADER_BYTES]))
    try:
        version = np.lib.format.read_magic(buffer)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read(buffer)
    except Exception as err:  # numpy raises ValueError, EOFError, SyntaxError, ...
        raise RejectedReplyError(
            f"{key!r}: unreadable array header ({type(err).__name__})"
        ) from None
    if fortran_order or dtype.hasobject or dtype.fields is not None or dtype.itemsize > 8:
        raise RejectedReplyError(f"{key!r}: unsupported array layout {dtype}")
    if dtype.kind == "f" and dtype.itemsize < 2:
        raise RejectedReplyError(f"{key!r}: unsupported dtype {dtype}")
    return tuple(int(s) for s in shape), dtype.kind, dtype.itemsize, buffer.tell()


def read_state(record: ArrayRecord, bounds: Bounds) -> dict[str, torch.Tensor]:
    """The arrays as tensors in the model's dtypes, each float value finite.

    Call after :func:`check_arrays`. A float64 value beyond float32's range becomes
    infinite when cast, and is rejected as such.
    """
    state: dict[str, torch.Tensor] = {}
    for key, array in record.items():
        tensor = torch.from_numpy(array.numpy()).to(bounds[key][1])
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RejectedReplyError(f"non-finite values in {key!r}")
        state[key] = tensor
    return state


def shared_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model``'s own tensors in place of ``state``, which it was loaded from.

    Loading copies the arrays into the model, so a reply would otherwise be held twice
    until the round ends: once as the arrays the average reads, once as the module the
    teacher runs. The client models are only read (inference, averaging), so both can
    be the same memory. ``state`` is kept where the model holds other keys, shapes or
    dtypes (a user's builder may differ).
    """
    own = model.state_dict()
    same = own.keys() == state.keys() and all(
        own[k].shape == v.shape and own[k].dtype == v.dtype for k, v in state.items()
    )
    return {k: own[k] for k in state} if same else state  # state_dict() is detached


def check_capability(record: ConfigRecord, max_entries: int = 32) -> dict[str, Any]:
    """What a node reports about itself: a few scalars (strings of bounded length)."""
    if len(record) > max_entries:
        raise RejectedReplyError(f"capability has {len(record)} entries (at most {max_entries})")
    for key, value in record.items():
        scalar = (is_number(value) and math.isfinite(value)) or isinstance(value, bool)
        if not scalar and not (isinstance(value, str) and len(value) <= 256):
            raise RejectedReplyError(
                f"capability {key!r} must be a finite number or a short string"
            )
    return dict(record)


@dataclass(frozen=True)
class Expected:
    """What a reply's arrays must be: the spec they are built as (None: the user's
    ``model_builder``), their bounds, whether the shapes are exact, the class count."""

    spec: ArchSpec | None
    bounds: Bounds
    exact: bool
    num_classes: int | None


# The strategy's expectation of a reply, given the spec and variant the reply claims
# and its node; raises RejectedReplyError when the claim itself is not acceptable.
ExpectationFn = Callable[[ArchSpec | None, str, int], Expected]


def parse_train_reply(
    message: Message,
    expect: ExpectationFn,
    build: Builder,
    weighted_by_key: str = NUM_EXAMPLES_KEY,
    arrayrecord_key: str = ARRAY_RECORD_KEY,
    limits: ReplyLimits | None = None,
) -> ClientModel:
    """A train reply as a :class:`ClientModel`, or :class:`RejectedReplyError` naming the defect.

    Checks in the order of the module's docstring: nothing is deserialised before the
    metrics, the spec, the class counts and the array headers passed.
    """
    limits = limits or ReplyLimits()
    node = message.metadata.src_node_id
    if message.has_error():
        raise RejectedReplyError(f"error reply: {message.error.reason}")
    content = message.content
    arrays = reply_arrays(content, arrayrecord_key)
    weight = reply_weight(content, weighted_by_key, limits)
    metrics = next(iter(content.metric_records.values()))
    info = content.config_records.get(TRAIN_INFO_KEY, ConfigRecord())
    variant = info.get(VARIANT_KEY, "")
    if not isinstance(variant, str) or len(variant) > 64:
        raise RejectedReplyError(f"{VARIANT_KEY} must be a short string")
    claimed = read_spec(info[ARCH_SPEC_KEY], limits) if ARCH_SPEC_KEY in info else None
    expected = expect(claimed, variant, node)
    class_counts = None
    if CLASS_COUNTS_KEY in info:
        examples = metrics.get(NUM_EXAMPLES_KEY)
        class_counts = check_class_counts(
            info[CLASS_COUNTS_KEY],
            expected.num_classes,
            float(examples) if is_number(examples) else None,  # type: ignore[arg-type]
            limits,
        )
    check_arrays(arrays, expected.bounds, expected.exact)
    state = read_state(arrays, expected.bounds)
    try:
        model = build(expected.spec, state)
    except ModelSpecError as err:
        raise RejectedReplyError(str(err)) from None
    state = shared_state(model, state)
    numeric = {k: float(v) for k, v in metrics.items() if is_number(v)}
    return ClientModel(node, expected.spec, state, model, weight, class_counts, numeric, variant)


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
    message: Message,
    num_classes: int,
    dim: int,
    statistics: FeatureStatistics,
    limits: ReplyLimits | None = None,
) -> FeatureStats:
    """A query reply's feature statistics of kind ``statistics``, or :class:`RejectedReplyError`.

    Before any array is deserialised its header must declare a real dtype and at most
    ``dim x (rank + 2)`` values per class and component (a full covariance: ``rank =
    dim``); the counts must be at most ``limits.max_num_examples``.
    """
    limits = limits or ReplyLimits()
    if message.has_error():
        raise RejectedReplyError(f"error reply: {message.error.reason}")
    if STATS_RECORD_KEY not in message.content.array_records:
        raise RejectedReplyError(f"no {STATS_RECORD_KEY!r} ArrayRecord in the reply")
    record = message.content.array_records[STATS_RECORD_KEY]
    if len(record) > 16:
        raise RejectedReplyError(f"{len(record)} statistics arrays")
    rows = num_classes * getattr(statistics, "components", 1)
    largest = rows * dim * (getattr(statistics, "rank", dim) + 2)
    for key, array in record.items():
        shape, kind, itemsize, offset = _npy_header(key, array.data)
        if kind not in "fiu" or math.prod(shape) > largest:
            raise RejectedReplyError(f"statistics {key!r}: {kind!r} array of shape {shape}")
        if len(array.data) != offset + math.prod(shape) * itemsize:
            raise RejectedReplyError(f"statistics {key!r}: bytes do not hold shape {shape}")
    arrays = {k: a.numpy() for k, a in record.items()}
    counts = arrays.get("counts")
    if counts is not None and counts.size and not counts.max() <= limits.max_num_examples:
        raise RejectedReplyError(f"statistics counts above {limits.max_num_examples:g}")
    try:
        return statistics.parse(arrays, num_classes, dim)
    except ValueError as err:
        raise RejectedReplyError(str(err)) from None
