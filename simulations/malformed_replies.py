"""A catalogue of malformed train replies, one maker per defect, for fuzzing strategies.

Each maker takes the parts of a valid reply (:class:`ReplyParts`) and a seeded random
generator and returns a reply a strategy must reject: the kinds of defect a broken or
hostile client sends (overflowing specs, arrays of the wrong rank, dtype or size,
headers that promise more than the bytes hold, class counts and example counts that
lie, non-finite metrics, claims of another variant). The fuzz benchmark
(``fuzz_replies.py``) and the property-based tests draw from :data:`MAKERS`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl_ec.compression import unpack_state_dict
from fl_ec.models.spec import ArchSpec, build_model
from fl_ec.protocol import (
    ARCH_SPEC_KEY,
    CAPABILITY_KEY,
    CLASS_COUNTS_KEY,
    NUM_EXAMPLES_KEY,
    TRAIN_INFO_KEY,
    TRAIN_LOSS_KEY,
    VARIANT_KEY,
    WIRE_MANIFEST_KEY,
)


@dataclass
class ReplyParts:
    """A valid train reply, taken apart: what a maker changes before reassembling it."""

    request: Message
    arrays: dict[str, Array]
    metrics: dict[str, Any]
    info: dict[str, Any]
    capability: dict[str, Any] = field(default_factory=dict)
    metric_records: int = 1

    def message(self) -> Message:
        content = RecordDict({"arrays": ArrayRecord(dict(self.arrays))})
        for index in range(self.metric_records):
            content[f"metrics{index or ''}"] = MetricRecord(dict(self.metrics))
        if self.info:
            content[TRAIN_INFO_KEY] = ConfigRecord(dict(self.info))
        if self.capability:
            content[CAPABILITY_KEY] = ConfigRecord(dict(self.capability))
        return Message(content, reply_to=self.request)


def parts_of(reply: Message, request: Message) -> ReplyParts:
    content = reply.content
    records = content.config_records
    return ReplyParts(
        request=request,
        arrays=dict(next(iter(content.array_records.values())).items()),
        metrics=dict(next(iter(content.metric_records.values())).items()),
        info=dict(records[TRAIN_INFO_KEY]) if TRAIN_INFO_KEY in records else {},
        capability=dict(records[CAPABILITY_KEY]) if CAPABILITY_KEY in records else {},
    )


SPEC = ArchSpec("cnn", (1, 28, 28), 10)
TIERS = ("gpu", "edge", "cpu")


class NodeGrid:
    """What FedAvg's node sampling reads of a Grid: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def strategies(seed: int, **options: Any) -> dict[str, Any]:
    """A FedEC and a FedHCE to fuzz: every step of a round runs (teacher, distillation,
    variants) on small proxy and validation sets, so that a round takes well under a
    second on a CPU. ``options``: more constructor arguments for both."""
    from fl_ec.data.sources import make_synthetic
    from fl_ec.distill import DistillSettings
    from fl_ec.strategies import FedEC, FedHCE, TierPolicy

    train, val = make_synthetic(num_train=32, num_test=32, seed=seed)
    common = dict(
        proxy_data=train.normalize(train.images),
        arch_spec=SPEC,
        validation_data=(val.normalize(val.images), val.labels),
        distill=DistillSettings(steps=2, batch_size=32, eval_every=2, patience=2),
        min_train_nodes=2,
        min_available_nodes=2,
        seed=seed,
        **options,
    )
    return {
        "FedEC": FedEC(**common),
        "FedHCE": FedHCE(
            variants=["full", "int8", "prune-0.5+int4"],
            assignment_policy=TierPolicy({"gpu": "full", "edge": "prune-0.5+int4"}, "int8"),
            variant_distill=DistillSettings(steps=1, batch_size=32, eval_every=1, patience=1),
            client_start="student",
            **common,
        ),
    }


def requests_for(strategy: Any, server_round: int, nodes: list[int], model: Any) -> list[Message]:
    """The round's train messages to ``nodes`` (FedHCE: each node's variant), by node."""
    arrays = ArrayRecord(model.state_dict())
    config = ConfigRecord({ARCH_SPEC_KEY: SPEC.to_json()})
    strategy.fraction_train = 1.0
    messages = strategy.configure_train(server_round, arrays, config, NodeGrid(nodes))
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def valid_reply(
    request: Message, rng: np.random.Generator, examples: int = 120, tier: str = ""
) -> Message:
    """What fl-ec's ClientApp sends back: the model it received, changed a little."""
    config = request.content["config"]
    arrays = request.content["arrays"]
    if WIRE_MANIFEST_KEY in config:
        packed = {k: a.numpy() for k, a in arrays.items()}
        state = unpack_state_dict(packed, json.loads(str(config[WIRE_MANIFEST_KEY])))
    else:
        state = arrays.to_torch_state_dict()
    state = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()
    }
    counts = rng.multinomial(examples, np.full(10, 0.1)).tolist()
    node = request.metadata.dst_node_id
    info = {ARCH_SPEC_KEY: SPEC.to_json(), CLASS_COUNTS_KEY: counts}
    info[VARIANT_KEY] = str(config.get(VARIANT_KEY, ""))
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({NUM_EXAMPLES_KEY: examples, TRAIN_LOSS_KEY: 0.4}),
            CAPABILITY_KEY: ConfigRecord({"device-tier": tier or TIERS[node % 3]}),
            TRAIN_INFO_KEY: ConfigRecord(info),
        }
    )
    return Message(content, reply_to=request)


def npy(array: np.ndarray) -> Array:
    return Array(array)


def raw_array(shape: tuple[int, ...], dtype: str, data: bytes) -> Array:
    """An Array whose metadata and bytes are whatever a client chose to send."""
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def _npy_bytes(header_shape: tuple[int, ...], dtype: str, body: bytes) -> bytes:
    """An ``.npy`` payload with ``header_shape`` in its header and ``body`` after it."""
    buffer = io.BytesIO()
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": header_shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + body


def _weight_key(parts: ReplyParts, rng: np.random.Generator) -> str:
    keys = [k for k, a in parts.arrays.items() if len(a.shape) >= 2]
    return keys[int(rng.integers(len(keys)))]


def _array(parts: ReplyParts, key: str) -> np.ndarray:
    return parts.arrays[key].numpy()


Maker = Callable[[ReplyParts, np.random.Generator], ReplyParts]


def spec_overflow(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    spec = json.loads(str(parts.info.get(ARCH_SPEC_KEY, '{"name": "cnn"}')))
    spec.setdefault("input_shape", [1, 28, 28])
    spec.setdefault("num_classes", 10)
    choice = int(rng.integers(7))
    if choice == 0:
        text = json.dumps(spec).replace('"num_classes": 10', '"num_classes": 1e400')
    elif choice == 1:
        text = json.dumps({**spec, "num_classes": 10**15})
    elif choice == 2:
        text = json.dumps({**spec, "widths": [10**9, 10**9, 10**9]})
    elif choice == 3:
        text = json.dumps({**spec, "name": "resnet" + str(6 * 10**6 + 2)})
    elif choice == 4:
        text = json.dumps({**spec, "input_shape": [1, 2048, 2048]})
    elif choice == 5:
        text = "{" * int(rng.integers(1, 50_000))
    else:
        text = json.dumps({**spec, "extra": {"pad": "x" * 1_000_000}})
    return replace(parts, info={**parts.info, ARCH_SPEC_KEY: text})


def other_model(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    """A well-formed model of another input size or number of classes."""
    spec = ArchSpec.from_json(str(parts.info[ARCH_SPEC_KEY]))
    if rng.integers(2):
        other = replace(spec, num_classes=spec.num_classes + 1 + int(rng.integers(5)))
    else:
        other = replace(spec, input_shape=(spec.input_shape[0], 32, 32))
    state = build_model(other).state_dict()
    arrays = {k: Array(v.numpy()) for k, v in state.items()}
    return replace(parts, arrays=arrays, info={**parts.info, ARCH_SPEC_KEY: other.to_json()})


def wrong_rank(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    key = _weight_key(parts, rng)
    value = np.float32(rng.normal()) if rng.integers(2) else rng.normal(size=7).astype("f4")
    return replace(parts, arrays={**parts.arrays, key: npy(np.asarray(value))})


def wrong_dtype(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    key = _weight_key(parts, rng)
    base = _array(parts, key)
    choice = int(rng.integers(5))
    if choice == 0:
        value = base.astype(np.complex64) + 1j
    elif choice == 1:
        value = base.astype(np.float64)
        value.flat[int(rng.integers(value.size))] = 1e300  # beyond float32's range
    elif choice == 2:
        value = (base * 100).astype(np.int32)
    elif choice == 3:
        value = base > 0
    else:
        value = np.array(["x"] * base.size).reshape(base.shape)
    return replace(parts, arrays={**parts.arrays, key: npy(value)})


def non_finite(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    key = _weight_key(parts, rng)
    value = _array(parts, key).copy()
    value.flat[int(rng.integers(value.size))] = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
    return replace(parts, arrays={**parts.arrays, key: npy(value)})


def huge_shape(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    """Arrays that claim (in metadata or header) far more than the model holds."""
    key = _weight_key(parts, rng)
    base = _array(parts, key)
    choice = int(rng.integers(4))
    if choice == 0:  # a 3.5 KB reply whose header asks for 81M parameters
        shape = (9000, 9000)
        array = raw_array(shape, "float32", _npy_bytes(shape, "<f4", b"\0" * 3500))
    elif choice == 1:  # bigger along one axis, all bytes present
        bigger = np.zeros((base.shape[0] * 2, *base.shape[1:]), np.float32)
        array = npy(bigger)
    elif choice == 2:  # metadata and header disagree
        array = raw_array((1,) * base.ndim, "float32", npy(base).data)
    else:  # header promises the shape, the bytes are short
        array = raw_array(base.shape, "float32", _npy_bytes(base.shape, "<f4", b"\0" * 16))
    return replace(parts, arrays={**parts.arrays, key: array})


def corrupt_payload(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    key = _weight_key(parts, rng)
    data = npy(_array(parts, key)).data
    choice = int(rng.integers(4))
    if choice == 0:
        array = raw_array(parts.arrays[key].shape, "float32", data[: int(rng.integers(len(data)))])
    elif choice == 1:
        array = raw_array(parts.arrays[key].shape, "float32", rng.bytes(len(data)))
    elif choice == 2:
        array = Array(dtype="float32", shape=parts.arrays[key].shape, stype="torch.raw", data=data)
    else:
        fortran = np.asfortranarray(_array(parts, key).reshape(_array(parts, key).shape))
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, fortran.T, allow_pickle=False)
        array = raw_array(parts.arrays[key].shape, "float32", buffer.getvalue())
    return replace(parts, arrays={**parts.arrays, key: array})


def wrong_keys(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    arrays = dict(parts.arrays)
    key = _weight_key(parts, rng)
    if rng.integers(2):
        del arrays[key]
    else:
        arrays["injected." + key] = arrays[key]
    return replace(parts, arrays=arrays)


def bad_class_counts(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    # Floats throughout: a ConfigRecord list holds values of one type.
    counts = [float(c) for c in parts.info.get(CLASS_COUNTS_KEY, [10] * 10)]
    examples = parts.metrics.get(NUM_EXAMPLES_KEY, 100)
    choice = int(rng.integers(8))
    bad: Any
    if choice == 0:
        bad = 100
    elif choice == 1:
        bad = counts[:-1]
    elif choice == 2:
        bad = [float("inf")] + counts[1:]
    elif choice == 3:
        bad = [1e308] + counts[1:]
    elif choice == 4:
        bad = [-5.0] + counts[1:]
    elif choice == 5:
        bad = [float("nan")] + counts[1:]
    elif choice == 6:
        bad = [float(examples) * 10] + counts[1:]  # does not sum to num-examples
    else:
        bad = ["ten"] * len(counts)
    return replace(parts, info={**parts.info, CLASS_COUNTS_KEY: bad})


def bad_num_examples(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    choice = [1e30, 2**62, 0, -1, float("nan"), float("inf"), [100], 100.5e9]
    value = choice[int(rng.integers(len(choice)))]
    metrics = {**parts.metrics, NUM_EXAMPLES_KEY: value}
    info = {k: v for k, v in parts.info.items() if k != CLASS_COUNTS_KEY}  # nothing to bound it
    return replace(parts, metrics=metrics, info=info)


def bad_metrics(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    choice = int(rng.integers(4))
    if choice == 0:
        return replace(parts, metrics={**parts.metrics, TRAIN_LOSS_KEY: float("nan")})
    if choice == 1:
        return replace(parts, metrics={**parts.metrics, "extra": [1.0, float("inf")]})
    if choice == 2:
        return replace(parts, metric_records=2)
    metrics = {k: v for k, v in parts.metrics.items() if k != NUM_EXAMPLES_KEY}
    return replace(parts, metrics=metrics)


def bad_capability(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    choice = int(rng.integers(3))
    if choice == 0:
        capability = {f"k{i}": i for i in range(1000)}
    elif choice == 1:
        capability = {"device-tier": "edge" * 10_000}
    else:
        capability = {"device-tier": ["gpu", "edge"]}
    return replace(parts, capability=capability)


def other_variant(parts: ReplyParts, rng: np.random.Generator) -> ReplyParts:
    """A FedHCE reply claiming a variant other than the one its node was sent."""
    names = ["full", "int8", "prune-0.5+int4", "does-not-exist"]
    sent = str(parts.info.get(VARIANT_KEY, "")) or "full"
    others = [n for n in names if n != sent]
    return replace(parts, info={**parts.info, VARIANT_KEY: others[int(rng.integers(len(others)))]})


MAKERS: dict[str, Maker] = {
    "spec-overflow": spec_overflow,
    "other-model": other_model,
    "wrong-rank": wrong_rank,
    "wrong-dtype": wrong_dtype,
    "non-finite": non_finite,
    "huge-shape": huge_shape,
    "corrupt-payload": corrupt_payload,
    "wrong-keys": wrong_keys,
    "class-counts": bad_class_counts,
    "num-examples": bad_num_examples,
    "metrics": bad_metrics,
    "capability": bad_capability,
    "other-variant": other_variant,
}
# Makers whose defect only a strategy that reads it can see.
FEDHCE_ONLY = frozenset({"capability", "other-variant"})
