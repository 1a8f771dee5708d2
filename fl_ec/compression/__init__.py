"""Compression toolkit, usable without Flower: structured pruning, weight quantization
(fake-quant for training, packed integers for the wire), and an int8 CPU export."""

from fl_ec.compression.pruning import (
    PrunedStructure,
    expand_to_full,
    fold_into_full,
    probe_prunable_layers,
    prune_structured,
    replay_pruning,
)
from fl_ec.compression.quantization import (
    enable_weight_fake_quant,
    fake_quantize,
    quantize_per_channel,
    weight_bits,
)
from fl_ec.compression.variants import Variant, parse_variants
from fl_ec.compression.wire import pack_state_dict, packed_nbytes, unpack_state_dict

__all__ = [
    "PrunedStructure",
    "Variant",
    "enable_weight_fake_quant",
    "fake_quantize",
    "expand_to_full",
    "fold_into_full",
    "pack_state_dict",
    "packed_nbytes",
    "parse_variants",
    "probe_prunable_layers",
    "prune_structured",
    "quantize_per_channel",
    "replay_pruning",
    "unpack_state_dict",
    "weight_bits",
]
