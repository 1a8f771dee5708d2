"""FedHCE's compressed variants of the global model, and what each client was sent.

:class:`VariantBank` owns the variants (``full``, ``int8``, ``prune-0.5+int4``, ...):
the models that serve inference, the fp32 copies the clients were sent (the same
models unless ``client_start="average"``), their wire payloads, the states a client
starts from after unpacking (to rebase its reply on) and their checkpoint state.
:class:`FoldedStart` is FedHCE's student start: every client's change, rebased on what
it was sent and folded into full-model coordinates (HeteroFL-style).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fl_ec.checkpoint import StrategyState, tensors_under
from fl_ec.compression import Variant, expand_to_full, fold_into_full
from fl_ec.compression.pruning import PrunedStructure
from fl_ec.compression.variants import VariantFactory
from fl_ec.models.layout import channels_last
from fl_ec.protocol import PRUNING_KEY, VARIANT_KEY, WIRE_MANIFEST_KEY
from fl_ec.robust import StartRule, WeightedMean
from fl_ec.scoring import accuracy
from fl_ec.strategies.fedec_utils import ClientModel
from fl_ec.strategies.fedhce_utils import (
    Payload,
    make_payload,
    prediction_disagreement,
    rebase_update,
    sent_state,
)
from fl_ec.strategies.global_model import GlobalModel
from fl_ec.strategies.student_start import StartOutcome, State, same_architecture, snapshot

FULL = "full"


class VariantBank:
    """The variants of the global model, as served and as sent, and their payloads."""

    def __init__(
        self, variants: Sequence[Variant], factory: VariantFactory, pack: bool, reprune: bool
    ) -> None:
        self.variants = {v.name: v for v in variants}
        self.factory = factory
        self.pack = pack  # quantized variants as packed integers plus scales
        self.reprune = reprune  # re-run the pruner every round (else replay its decision)
        self.models: dict[str, nn.Module] = {}  # serve inference and the HCE ensemble
        self.sent_models: dict[str, nn.Module] = {}  # fp32, what the clients train
        # The last calibrated round's variants before their own calibration.
        self.uncalibrated: dict[str, nn.Module] = {}
        self.payloads: dict[str, Payload] = {}
        self.sent_states: dict[str, State] = {}

    @property
    def tuned(self) -> list[str]:
        """The variants fine-tuned from the teacher: all but ``full``."""
        return [name for name in self.variants if name != FULL]

    def derive(self, served: State, train: State | None = None) -> None:
        """Every variant of ``served``; the clients get those of ``train`` if given."""
        self.models = self._derive(served)
        self.sent_models = self._derive(train) if train is not None else self.models

    def _derive(self, state: State) -> dict[str, nn.Module]:
        return {
            name: self.factory.derive(variant, state, reprune=self.reprune)
            for name, variant in self.variants.items()
        }

    def place(self) -> None:
        """The variants on the CPU, in eval mode, where they serve and are packed."""
        self.models = {name: model.cpu().eval() for name, model in self.models.items()}
        self.sent_models = {name: model.cpu().eval() for name, model in self.sent_models.items()}

    def pack_payloads(self) -> dict[str, int]:
        """Pack what the clients get (the variants as sent); the bytes of each payload."""
        sent = self.sent_models.items()
        self.payloads = {name: self.payload_of(name, model) for name, model in sent}
        # What each client will start from, to rebase its reply on.
        self.sent_states = {name: sent_state(p) for name, p in self.payloads.items()}
        return {name: p.nbytes for name, p in self.payloads.items()}

    def payload_of(self, name: str, model: nn.Module) -> Payload:
        """``model`` packed as variant ``name`` travels."""
        return make_payload(model, self.variants[name], self.pack)

    def config_of(self, name: str, payload: Payload, replayed: bool) -> dict[str, Any]:
        """What a client needs, besides the arrays, to rebuild variant ``name``.

        The client trains the unpacked weights in fp32; the quantization is the wire's
        and the served copy's. ``replayed`` (no spec): a pruned variant's shape is its
        pruning decision on the user's model, which the client replays on a fresh
        ``model_builder()``.
        """
        config: dict[str, Any] = {VARIANT_KEY: name, WIRE_MANIFEST_KEY: payload.manifest_json}
        structure = self.factory.structure(self.variants[name])
        if replayed and structure is not None:
            config[PRUNING_KEY] = structure.decision_json()
        return config

    def round_average(
        self, accepted: list[ClientModel], base: State, rule: StartRule
    ) -> State:
        """The round's parameter average: rebased on what was sent, pruned ones folded.

        Each client's change (what it returned minus what it was sent) is applied to
        the server's fp32 copy of the variant it was sent, so the rounding of the
        quantized copy it started from stays out of the average. Each coordinate
        combines the clients that hold it by ``rule`` (:meth:`StartRule.fold`).
        """
        updates = []
        for model in accepted:
            name = model.variant or FULL
            state = model.state
            sent = self.sent_states.get(name)
            if sent is not None:
                # The client's change was computed from the variant it received, which
                # the variants' fine-tuning moved away from the global student: applied
                # to the student instead, it would land where it was not computed.
                state = rebase_update(state, sent, self.sent_models[name].state_dict())
            structure = self.factory.structure(self.variants[name])
            updates.append((state, structure, model.num_examples))
        if isinstance(rule, WeightedMean):
            return fold_into_full(base, updates)  # the arithmetic FedHCE always had
        expanded = [expand_to_full(base, state, structure) for state, structure, _ in updates]
        return rule.fold(expanded, [weight for *_, weight in updates], base)

    @torch.inference_mode()
    def validation_metrics(
        self, inputs: torch.Tensor, labels: torch.Tensor, members: list[str], device: Any
    ) -> dict[str, Any]:
        """Each variant's validation accuracy, the HCE ensemble's (``members``' mean
        logits) and how often its members disagree."""
        logits = {}
        for name, model in self.models.items():  # one pass each serves both
            model.to(device).eval()
            with channels_last(model):
                logits[name] = torch.cat([model(x.to(device)).cpu() for x in inputs.split(512)])
            model.cpu()
        member_logits = [logits[name] for name in members]
        return {
            "variant-val-accuracy": {n: accuracy(z, labels) for n, z in logits.items()},
            "hce-val-accuracy": accuracy(torch.stack(member_logits).mean(0), labels),
            "variant-disagreement": prediction_disagreement(member_logits),
        }

    def checkpoint_state(self, state: StrategyState) -> None:
        """Add the variants as served and as sent (when they differ) and the pruning
        structures to ``state``."""
        shared = all(self.sent_models[n] is m for n, m in self.models.items())
        state.meta["variants-sent-as-served"] = shared
        state.meta["structures"] = {
            name: structure.to_json_dict() for name, structure in self.factory.structures.items()
        }
        for prefix, models in (("variant", self.models), ("sent", self.sent_models)):
            if prefix == "sent" and shared:
                continue
            for name, model in models.items():
                state.tensors.update(
                    {f"{prefix}/{name}/{k}": v for k, v in model.state_dict().items()}
                )

    def restore_state(self, state: StrategyState) -> None:
        """Rebuild the variants and their payloads from :meth:`checkpoint_state`'s."""
        self.factory.structures = {
            name: PrunedStructure.from_json_dict(data)
            for name, data in state.meta.get("structures", {}).items()
        }

        def rebuild(prefix: str) -> dict[str, nn.Module]:
            models = {}
            for name, variant in self.variants.items():
                tensors = tensors_under(state.tensors, f"{prefix}/{name}/")
                if tensors:
                    models[name] = self.factory.build_variant(variant, tensors).eval()
            return models

        self.models = rebuild("variant")
        shared = state.meta.get("variants-sent-as-served", True)
        self.sent_models = dict(self.models) if shared else rebuild("sent")
        self.pack_payloads()


class FoldedStart:
    """FedHCE's student start: :meth:`VariantBank.round_average` of the round.

    ``fold_pruned`` off: only the full-size replies are averaged -- unless there is
    none (e.g. round 1, when every node got a pruned default), since folding is then
    the only way the round's training reaches the student.
    """

    def __init__(
        self, model: GlobalModel, bank: VariantBank, rule: StartRule, fold_pruned: bool
    ) -> None:
        self.model, self.bank, self.rule, self.fold_pruned = model, bank, rule, fold_pruned

    def __call__(
        self, accepted: list[ClientModel], previous: nn.Module, sent: State
    ) -> StartOutcome:
        same_arch = same_architecture(accepted, self.model.spec, previous)
        folded = accepted if self.fold_pruned or not same_arch else same_arch
        student = self.model.from_state(self.bank.round_average(folded, sent, self.rule))
        # The average the clients' changes are rebased and folded into, copied before
        # distillation: what they train next under client_start="average".
        return StartOutcome(student, snapshot(student))
