"""Named model variants: ``full``, ``prune-<ratio>``, ``int<bits>`` and combinations.

``prune-0.5+int4`` means: remove 50% of the channels (torch-pruning), then fake-
quantize the remaining weights to 4 bits. A :class:`Variant` is only the recipe;
:class:`VariantFactory` turns a full model into the variant and remembers the pruning
decision, so the architecture of a variant stays the same across rounds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fl_ec.compression.pruning import PrunedStructure, prune_structured
from fl_ec.compression.quantization import SUPPORTED_BITS, enable_weight_fake_quant

_PART = re.compile(r"^(?:prune-(0(?:\.\d+)?)|int(\d+)|full)$")


@dataclass(frozen=True)
class Variant:
    """A compression recipe: channel pruning ratio and weight bits (0 = fp32)."""

    name: str
    prune_ratio: float = 0.0
    bits: int = 0

    @property
    def is_pruned(self) -> bool:
        return self.prune_ratio > 0

    @classmethod
    def parse(cls, name: str) -> Variant:
        name = name.strip()
        ratio, bits = 0.0, 0
        for part in name.split("+"):
            match = _PART.match(part.strip())
            if not match:
                raise ValueError(
                    f"variant {name!r}: parts are full, prune-<ratio in (0,1)>, int8, int4, int2"
                )
            if match.group(1):
                ratio = float(match.group(1))
                if not 0 < ratio < 1:
                    raise ValueError(f"variant {name!r}: prune ratio must be in (0, 1)")
            elif match.group(2):
                bits = int(match.group(2))
                if bits not in SUPPORTED_BITS:
                    raise ValueError(f"variant {name!r}: bits must be one of {SUPPORTED_BITS}")
        return cls(name=name, prune_ratio=ratio, bits=bits)


def parse_variants(text: str) -> list[Variant]:
    """``"full, prune-0.5+int8, int4"`` -> variants (names unique, order kept)."""
    variants = [Variant.parse(part) for part in text.split(",") if part.strip()]
    if not variants:
        raise ValueError("the variant list is empty")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names repeat: {names}")
    return variants


class VariantFactory:
    """Derives variants of a full model; prunes once per variant, then replays the cut.

    The first call for a pruned variant runs torch-pruning on the full model it is
    given and stores the index maps; later calls slice the new full weights with the
    same maps (same architecture, no re-ranking) unless ``reprune`` is asked for.
    """

    def __init__(
        self,
        build: Callable[[dict[str, torch.Tensor]], nn.Module],  # shapes from the arrays
        example_inputs: torch.Tensor,
    ) -> None:
        self.build = build
        self.example_inputs = example_inputs
        self.structures: dict[str, PrunedStructure] = {}

    def structure(self, variant: Variant) -> PrunedStructure | None:
        return self.structures.get(variant.name) if variant.is_pruned else None

    def derive(
        self,
        variant: Variant,
        full_state: Mapping[str, torch.Tensor],
        reprune: bool = False,
    ) -> nn.Module:
        """The ``variant`` of the full model with ``full_state`` (fake-quant on if bits)."""
        if variant.is_pruned and (reprune or variant.name not in self.structures):
            model = self.build(dict(full_state))
            self.structures[variant.name] = prune_structured(
                model, self.example_inputs, variant.prune_ratio
            )
        structure = self.structure(variant)
        state = (
            structure.slice(full_state)
            if structure
            else {k: v.clone() for k, v in full_state.items()}
        )
        return enable_weight_fake_quant(self.build(state), variant.bits)
