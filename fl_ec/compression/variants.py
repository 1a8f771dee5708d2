"""Named model variants: ``full``, ``prune-<ratio>``, ``int<bits>`` and combinations.

``prune-0.5+int4`` means: remove 50% of the channels (torch-pruning), then fake-
quantize the remaining weights to 4 bits. A :class:`Variant` is only the recipe;
:class:`VariantFactory` turns a full model into the variant and remembers the pruning
decision, so the architecture of a variant stays the same across rounds.
:class:`ReplayVariantFactory` does the same for a model fl-ec has no spec of, built by
a user's ``model_builder``: a pruned variant is that model with the decision replayed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fl_ec.compression.pruning import (
    LayerProbe,
    PrunedStructure,
    probe_prunable_layers,
    prune_structured,
    replay_pruning,
)
from fl_ec.compression.quantization import SUPPORTED_BITS, enable_weight_fake_quant
from fl_ec.errors import ModelSpecError

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
        keep: Sequence[str] = ("classifier",),
    ) -> None:
        self.build = build
        self.example_inputs = example_inputs
        self.keep = tuple(keep)  # layers whose outputs are never pruned
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
                model, self.example_inputs, variant.prune_ratio, self._keep(variant)
            )
        structure = self.structure(variant)
        state = (
            structure.slice(full_state)
            if structure
            else {k: v.clone() for k, v in full_state.items()}
        )
        return self.build_variant(variant, state)

    def build_variant(self, variant: Variant, state: dict[str, torch.Tensor]) -> nn.Module:
        """``variant`` (its stored cut, fake-quant on if bits) holding ``state`` as it is."""
        return enable_weight_fake_quant(self._model(state, self.structure(variant)), variant.bits)

    def _keep(self, variant: Variant) -> tuple[str, ...]:
        return self.keep

    def _model(
        self, state: dict[str, torch.Tensor], structure: PrunedStructure | None
    ) -> nn.Module:
        return self.build(state)


class ReplayVariantFactory(VariantFactory):
    """Variants of a user's model, built by ``model_builder`` instead of an fl-ec spec.

    A pruned variant is a fresh ``model_builder()`` cut to its pruning decision
    (:func:`~fl_ec.compression.pruning.replay_pruning`), then loaded. Which layers can be
    pruned is found once per variant by trying each on ``example_inputs``
    (:func:`~fl_ec.compression.pruning.probe_prunable_layers`): a layer whose pruning
    breaks the forward (a ``.view`` to a fixed size) or changes the output (the output
    layer) is kept whole. Raises ``ValueError`` in one line, naming the variants that
    work with this model, when a pruned variant has no layer left to prune.
    """

    def __init__(
        self,
        model_builder: Callable[[], nn.Module],
        example_inputs: torch.Tensor,
        variants: Iterable[Variant],
    ) -> None:
        super().__init__(self._load_full, example_inputs, keep=())
        self.model_builder = model_builder
        self.full_shapes = {k: tuple(v.shape) for k, v in model_builder().state_dict().items()}
        self.blocked: dict[str, tuple[str, ...]] = {}
        variants = list(variants)
        probes: dict[float, LayerProbe] = {}  # prune-0.5 and prune-0.5+int8 probe alike
        unprunable = []
        for variant in variants:
            if variant.is_pruned:
                ratio = variant.prune_ratio
                if ratio not in probes:
                    probes[ratio] = probe_prunable_layers(model_builder(), example_inputs, ratio)
                self.blocked[variant.name] = tuple(probes[ratio].blocked)
                if not probes[ratio].prunable:
                    unprunable.append(variant.name)
        if unprunable:
            working = [v.name for v in variants if v.name not in unprunable]
            raise ValueError(
                f"{', '.join(unprunable)} cannot be built from this model: pruning any of its "
                "layers breaks its forward (e.g. a .view to a fixed size) or changes its "
                f"output; variants that work with it: {', '.join(working) or 'full, int8, int4'}"
            )

    def rebuild(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """The model ``state`` is a state of: the full model or a pruned variant's.

        The variant is found by the state's shapes; raises ``ModelSpecError`` when they
        fit none.
        """
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes == self.full_shapes:
            return self._model(dict(state), None)
        for structure in self.structures.values():
            if structure.shapes(self.full_shapes) == shapes:
                return self._model(dict(state), structure)
        raise ModelSpecError("arrays fit neither model_builder's model nor a pruned variant of it")

    def _keep(self, variant: Variant) -> tuple[str, ...]:
        return self.blocked[variant.name]

    def _load_full(self, state: dict[str, torch.Tensor]) -> nn.Module:
        return self._model(state, None)

    def _model(
        self, state: dict[str, torch.Tensor], structure: PrunedStructure | None
    ) -> nn.Module:
        model = self.model_builder()
        if structure is not None:
            replay_pruning(model, structure.layers)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:  # keys/shapes that do not fit the builder's model
            first = str(err).strip().splitlines()[0]
            raise ModelSpecError(f"arrays do not fit model_builder's model: {first}") from None
        return model
