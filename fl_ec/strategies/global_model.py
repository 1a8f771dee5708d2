"""The global model's architecture as the server knows it: what replies must hold, and
how a model is rebuilt from arrays.

A strategy is given either an :class:`~fl_ec.models.spec.ArchSpec` (fl-ec's models,
rebuilt from JSON) or a ``model_builder`` (a user's own ``nn.Module`` class). The
reference model is built once, at construction, so a reply is checked against the
configured model, never against anything a client sent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fl_ec.errors import ModelSpecError
from fl_ec.models.spec import ArchSpec, build_from_state_dict, build_model
from fl_ec.strategies.replies import Expected, shapes_of_state, spec_bounds

ModelBuilder = Callable[[], nn.Module]
# Rebuilds a model whose arrays do not fit the builder's model as it is (FedHCE: a
# pruned variant of a user's model, replayed from its pruning decision).
Rebuild = Callable[[dict[str, torch.Tensor]], nn.Module]


class GlobalModel:
    """The global architecture: by ``spec``, else by ``builder``."""

    def __init__(self, spec: ArchSpec | str | None, builder: ModelBuilder | None) -> None:
        if spec is None and builder is None:
            raise ValueError("FedEC needs arch_spec or model_builder to rebuild client models")
        self.spec = ArchSpec.from_json(spec) if isinstance(spec, str) else spec
        self.builder = builder
        self.reference = build_model(self.spec) if self.spec else builder()  # type: ignore[misc]
        self.bounds = shapes_of_state(self.reference.state_dict())
        self.num_classes = num_outputs(self.reference)
        # Replaces builder-and-load for arrays of another shape; None: they fail.
        self.rebuild: Rebuild | None = None

    def build(
        self, spec: ArchSpec | None, state: dict[str, torch.Tensor], share: bool = False
    ) -> nn.Module:
        """A model from arrays: by ``spec`` when there is one, else the user's builder.

        ``share``: built by ``spec``, the model holds ``state``'s own tensors
        (:func:`~fl_ec.models.spec.build_from_state_dict`); for models only read.
        """
        if spec is not None:
            return build_from_state_dict(spec, state, share=share)
        if self.rebuild is not None:
            return self.rebuild(state)
        model = self.builder()  # type: ignore[misc]
        try:
            model.load_state_dict(state)
        except RuntimeError as err:  # keys/shapes that do not fit the builder's model
            raise ModelSpecError(f"arrays do not fit model_builder's model: {err}") from None
        return model

    def from_state(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """The global architecture holding ``state``."""
        return self.build(self.spec, state)

    def expected(self, claimed: ArchSpec | None) -> Expected:
        """What a reply claiming architecture ``claimed`` must hold.

        With a global spec: the claimed one (else the global one), if no larger
        (:func:`~fl_ec.strategies.replies.spec_bounds`); its arrays may be
        channel-pruned. With ``model_builder``: exactly the builder's arrays, whatever
        is claimed.
        """
        if self.spec is None:
            return Expected(None, self.bounds, True, self.num_classes)
        if claimed is None or claimed == self.spec:
            return Expected(self.spec, self.bounds, False, self.num_classes)
        return Expected(claimed, spec_bounds(claimed, self.spec), False, self.num_classes)


def num_outputs(model: nn.Module) -> int | None:
    """The number of classes: the last linear layer's outputs (None without one)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
