"""Small pure helpers of FedHCE: capability -> variant policies, per-variant payloads."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fl_ec.compression import Variant, pack_state_dict, packed_nbytes, unpack_state_dict
from fl_ec.compression.quantization import quantized_weight_keys
from fl_ec.protocol import DEVICE_TIER_KEY

# A policy maps what a node reported about itself (None if it has reported nothing: a
# stock ClientApp before its first reply) to the name of the variant it should train.
AssignmentPolicy = Callable[[Mapping[str, Any] | None], str]


@dataclass(frozen=True)
class TierPolicy:
    """The default policy: ``device-tier`` -> variant, with a fallback.

    ``TierPolicy({"gpu": "full", "edge": "prune-0.5+int4"}, default="int8")`` sends
    GPU nodes the full model and edge nodes the pruned 4-bit one; a node with an
    unlisted tier, or one that has reported none yet, gets ``default``.
    """

    by_tier: Mapping[str, str]
    default: str

    def __call__(self, capability: Mapping[str, Any] | None) -> str:
        if not capability:
            return self.default
        return self.by_tier.get(str(capability.get(DEVICE_TIER_KEY, "")), self.default)


def parse_tier_policy(text: str, default: str) -> TierPolicy:
    """``"gpu=full, edge=prune-0.5+int4"`` -> :class:`TierPolicy`."""
    by_tier = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        tier, sep, variant = part.partition("=")
        if not sep or not tier.strip() or not variant.strip():
            raise ValueError(f"variant-policy entry {part!r} must look like tier=variant")
        by_tier[tier.strip()] = variant.strip()
    return TierPolicy(by_tier, default)


def check_variant_names(key: str, requested: Iterable[str], variants: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``key`` when ``requested`` has a name not in ``variants``."""
    for name in requested:
        if name not in variants:
            raise ValueError(
                f"{key} names {name!r}, which is not among the variants {list(variants)}"
            )


@dataclass
class Payload:
    """What one variant sends down: arrays (packed when quantized) and their manifest."""

    arrays: ArrayRecord
    manifest_json: str
    nbytes: int


def make_payload(model: torch.nn.Module, variant: Variant, pack: bool = True) -> Payload:
    """A variant's weights for the wire: int8/int4/int2 packed when it is quantized."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bits = variant.bits if pack else 0
    arrays, manifest = pack_state_dict(state, bits, quantized_weight_keys(model))
    record = ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in arrays.items()})
    return Payload(record, json.dumps(manifest, sort_keys=True), packed_nbytes(arrays))


def sent_state(payload: Payload) -> dict[str, torch.Tensor]:
    """The weights a client rebuilds from ``payload`` (dequantized, as it receives them)."""
    arrays = {k: a.numpy() for k, a in payload.arrays.items()}
    return unpack_state_dict(arrays, json.loads(payload.manifest_json))


def rebase_update(
    returned: Mapping[str, torch.Tensor],
    sent: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``base + (returned - sent)``: a client's own change, applied to the server's copy.

    ``base`` is the server's full-precision weights of what was sent (``sent`` is the
    same model as the client rebuilt it: dequantized).

    A quantized variant reaches the client with its weights rounded (and fine-tuned
    by the variants' distillation); averaging what comes back would write that
    rounding into the global model every round. Applying only the client's change to
    the server's full-precision weights keeps it out. Integer buffers are returned
    as the client sent them.
    """
    rebased = {}
    for key, value in returned.items():
        if value.is_floating_point():
            change = value.to(torch.float32) - sent[key].to(torch.float32)
            rebased[key] = (base[key].to(torch.float32) + change).to(value.dtype)
        else:
            rebased[key] = value.clone()
    return rebased


def prediction_disagreement(member_logits: Sequence[torch.Tensor]) -> float:
    """Mean pairwise fraction of samples on which two members' top-1 predictions differ."""
    predictions = [logits.argmax(1) for logits in member_logits]
    pairs = [
        float((predictions[i] != predictions[j]).float().mean())
        for i in range(len(predictions))
        for j in range(i + 1, len(predictions))
    ]
    return sum(pairs) / len(pairs) if pairs else 0.0
