"""FedHCE: FedEC plus a heterogeneously compressed ensemble sent to GPU and edge clients.

After each round's ensemble distillation (FedEC), the server derives compressed
*variants* of the global student -- torch-pruning structured pruning and/or per-channel
weight quantization (``full``, ``prune-0.5``, ``int8``, ``prune-0.5+int4``, ...) --
fine-tunes them jointly by distillation from the round's teacher with a
diversity-aware objective (:mod:`fl_ec.diversity`), and sends every client the variant
its capability calls for (quantized ones packed as integers). Clients train their
variant in fp32 on the unpacked weights (pruned structure kept) and send it back; the
server applies the change to its fp32 copy; next round every returned model, whatever its
variant, joins the ensemble teacher. The final product is the HCE ensemble: the mean
logits of a chosen subset of variants, more accurate per byte than one model.

The variants live in a :class:`~fl_ec.strategies.variant_bank.VariantBank`; this class
adds them to FedEC's round through its public hooks: per-node messages, the replies'
capabilities and variants, and :meth:`FedHCE.serve`, FedEC's work after distillation
followed by the variants'.
"""

from __future__ import annotations

import copy
from collections.abc import Generator, Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import nn

from fl_ec.checkpoint import StrategyState
from fl_ec.compression import Variant
from fl_ec.compression.variants import ReplayVariantFactory, VariantFactory
from fl_ec.data.tensor_data import TensorData
from fl_ec.distill import DistillSettings, distill
from fl_ec.diversity import VariantEnsemble, check_diversity_weight, diversity_loss_fn
from fl_ec.models.spec import ArchSpec, build_from_state_dict
from fl_ec.protocol import CAPABILITY_KEY
from fl_ec.results import RunRecorder
from fl_ec.strategies.artifacts import save_variants_of
from fl_ec.strategies.fedec import FedEC
from fl_ec.strategies.fedec_utils import ClientModel
from fl_ec.strategies.fedhce_utils import AssignmentPolicy, TierPolicy, check_variant_names
from fl_ec.strategies.replies import Expected, RejectedReplyError, check_capability
from fl_ec.strategies.replies import shapes_of_state as shapes
from fl_ec.strategies.serving import QueryAnswer, ServePlan
from fl_ec.strategies.stats_query import StatsQuery, messages_to
from fl_ec.strategies.steps import RoundOutcome, round_seed
from fl_ec.strategies.variant_bank import FULL, FoldedStart, VariantBank

# Each variant's calibration draws its virtual features from its own seed.
_VARIANT_SEED_STRIDE = 7_919


class FedHCE(FedEC):
    """Heterogeneously compressed ensemble on top of :class:`FedEC`.

    Parameters
    ----------
    variants : Sequence[str | Variant]
        The variants to maintain, e.g. ``["full", "prune-0.5+int8", "int4"]``.
    assignment_policy : Callable[[Mapping | None], str] | None
        Maps a node's reported capability (from seeded sampling's describe query or
        its last reply; ``None`` if it reported none) to a variant name. Default:
        every node gets the last of ``variants`` (the most compressed, by convention);
        so does a node the policy names an unknown one for.
    hce_ensemble : Sequence[str] | None
        Variants whose mean logits form the HCE ensemble. Default: all but ``full``.
    diversity_weight : float (default: 0.5)
        lambda of the diversity-aware variant distillation, in [0, 1]; 0: plain.
    variant_distill : DistillSettings | None
        Steps/lr/patience of the variants' fine-tuning (default: 100 steps).
    fold_pruned : bool (default: True)
        Fold pruned clients' updates into full-model coordinates (HeteroFL-style).
    reprune : bool (default: False)
        Re-run the pruner every round (else a variant's architecture is decided once).
    pack_quantized : bool (default: True)
        Send quantized variants as packed integers plus scales (else fp32 values).
    calibrate_variants : bool (default: True)
        In each feature-calibrated round, also query the clients once per compressed
        variant for *its* features and recalibrate its classifier from them.
    **fedec_kwargs
        Every :class:`FedEC` (and so ``FedAvg``) argument. With ``model_builder`` a
        pruned variant is the user's model cut to its pruning decision, which travels
        as JSON (``pruning``) for the client to replay (:func:`fl_ec.clients.receive_variant`).
        ``docs/fedhce.md`` says what the clients train under each ``client_start``.
    """

    def __init__(
        self,
        *,
        variants: Sequence[str | Variant],
        assignment_policy: AssignmentPolicy | None = None,
        hce_ensemble: Sequence[str] | None = None,
        diversity_weight: float = 0.5,
        variant_distill: DistillSettings | None = None,
        fold_pruned: bool = True,
        reprune: bool = False,
        pack_quantized: bool = True,
        calibrate_variants: bool = True,
        **fedec_kwargs: Any,
    ) -> None:
        super().__init__(**fedec_kwargs)
        parsed = [v if isinstance(v, Variant) else Variant.parse(v) for v in variants]
        if not parsed:
            raise ValueError("FedHCE needs at least one variant")
        names = [v.name for v in parsed]
        self.default_variant = names[-1]
        check_variant_names("hce_ensemble", hce_ensemble or [], names)
        self.hce_names = list(hce_ensemble or [n for n in names if n != FULL]) or names
        self.policy = assignment_policy or TierPolicy({}, self.default_variant)
        check_diversity_weight(diversity_weight)
        self.diversity_weight = diversity_weight
        self.variant_distill = variant_distill or DistillSettings(steps=100, batch_size=128)
        self.calibrate_variants = calibrate_variants
        example = self.proxy_inputs[:2]  # what pruning traces the model with
        spec = self.model.spec
        if spec is not None:
            factory = VariantFactory(lambda state: build_from_state_dict(spec, state), example)
        elif not len(example) and any(v.is_pruned for v in parsed):
            raise ValueError("FedHCE's pruned variants of model_builder's model need proxy_data")
        else:
            factory = ReplayVariantFactory(self.model.builder, example, parsed)
            self.model.rebuild = factory.rebuild  # builder's model, pruned as the arrays
        self.bank = VariantBank(parsed, factory, pack_quantized, reprune)
        self.student_start = FoldedStart(self.model, self.bank, self.start_rule, fold_pruned)
        # The variants are fine-tuned from the round's teacher even if the student is not.
        tunes = bool(self.bank.tuned) and self.variant_distill.steps > 0
        self.trains_on_teacher = self.trains_on_teacher or tunes
        self.capabilities: dict[int, dict[str, Any]] = {}  # node -> what it reported
        self.assignment: dict[int, str] = {}  # node -> the variant sent this round

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> FedHCE: variants %s, default %s, HCE ensemble %s, diversity %.2f",
            list(self.bank.variants), self.default_variant, self.hce_names,
            self.diversity_weight)

    # -- Flower hooks -------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedEC's sample, each node sent the payload of the variant assigned to it."""
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        if not self.bank.payloads:  # first round: variants of the initial model, no teacher
            self.bank.derive(arrays.to_torch_state_dict())
            self.bank.place()
            self.bank.pack_payloads()
        self.assignment = {}
        messages = []
        for message in sampled:
            node = message.metadata.dst_node_id
            name = self.assignment[node] = self._assign(node)
            payload = self.bank.payloads[name]
            variant_config = self.bank.config_of(name, payload, self.model.spec is None)
            node_config = ConfigRecord({**dict(config), **variant_config})
            record = RecordDict(
                {self.arrayrecord_key: payload.arrays, self.configrecord_key: node_config}
            )
            messages += messages_to([node], record, MessageType.TRAIN)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedEC's aggregate; the round's metrics say which variant each node got back."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        stats = self.server_metrics.setdefault(server_round, {})
        stats["variant-by-node"] = {str(k): v for k, v in self.assignment.items()}
        stats["returned-variant-by-node"] = {
            str(m.node_id): m.variant or FULL for m in self.last_client_models
        }
        return arrays, metrics

    # -- FedEC hooks ----------------------------------------------------------------
    def read_reply(self, reply: Message) -> ClientModel:
        """FedEC's checks and the node's capability's (kept once valid); a returned
        variant runs as it was trained, in fp32."""
        records = reply.content.config_records if not reply.has_error() else {}
        capability = (
            check_capability(records[CAPABILITY_KEY]) if CAPABILITY_KEY in records else None
        )
        client_model = super().read_reply(reply)
        if capability is not None:
            self.capabilities[client_model.node_id] = capability
        return client_model

    def note_capability(self, node_id: int, record: ConfigRecord) -> None:
        """Keep a capability ``node_id`` reported before training (seeded sampling's
        describe query), so its first round trains its tier's variant, not the default;
        :class:`~fl_ec.strategies.replies.RejectedReplyError` if the record is malformed."""
        self.capabilities[node_id] = check_capability(record)

    def expected_reply(self, claimed: ArchSpec | None, variant: str, node: int) -> Expected:
        """Exactly the arrays of the variant the node was sent this round."""
        name = variant or FULL
        sent = self.assignment.get(node)
        if sent is None:
            raise RejectedReplyError("the node was sent no model this round")
        if name != sent:
            raise RejectedReplyError(f"returned variant {name!r}, but was sent {sent!r}")
        if claimed is not None and claimed != self.model.spec:
            raise RejectedReplyError("the reply's spec is not the one its variant was sent with")
        model = self.bank.models.get(name)
        if model is None:
            return super().expected_reply(claimed, variant, node)
        return Expected(self.model.spec, shapes(model.state_dict()), True, self.model.num_classes)

    def serve(self, outcome: RoundOutcome) -> ServePlan:
        """FedEC's work on the student, then its variants: derived from the (calibrated)
        student, fine-tuned jointly from the round's teacher, each calibrated from its
        own features when the round is calibrated, packed for the clients.

        Under ``client_start="average"`` the clients get plain compressed copies of the
        round's average instead of the served variants.
        """
        yield from super().serve(outcome)
        metrics, server_round = outcome.metrics, outcome.server_round
        self.bank.derive(outcome.student.state_dict(), outcome.client_start)
        teacher = outcome.teacher
        if self.bank.tuned and teacher is not None and self.variant_distill.steps > 0:
            result = distill(
                VariantEnsemble([self.bank.models[name] for name in self.bank.tuned]),
                teacher.proxy, teacher.logits, self.validation, self.variant_distill,
                self.device, seed=round_seed(self.seed, server_round, 1),
                loss_fn=diversity_loss_fn(self.variant_distill.temperature,
                                          self.diversity_weight),
            )
            metrics["variants-distill-seconds"] = result.seconds
            metrics["variants-distill-steps"] = float(result.steps)
        self.bank.place()
        if self.calibrate_variants and self.calibrator.calibrates(server_round, self.num_rounds):
            metrics["variant-calibration"] = yield from self._calibrate_variants(outcome)
        metrics["variant-bytes"] = self.bank.pack_payloads()
        if self.validation is not None:
            metrics.update(self.bank.validation_metrics(*self.validation, self.hce_names,
                                                        self.device))

    def _calibrate_variants(
        self, outcome: RoundOutcome
    ) -> Generator[StatsQuery, QueryAnswer, dict[str, dict[str, float]]]:
        """CCVR for each compressed variant, from statistics of its own features.

        Each query carries the variant as clients receive it for training (packed
        integers for quantized ones), so each client measures the features the variant
        really computes; the round's clients are asked.
        """
        results = {}
        self.bank.uncalibrated = {}
        for index, (name, model) in enumerate(self.bank.models.items()):
            if name == FULL:  # the global student itself, calibrated by FedEC
                continue
            self.bank.uncalibrated[name] = copy.deepcopy(model)
            payload = self.bank.payload_of(name, model)
            results[name] = yield from self.calibrator.calibrate(
                model, outcome, payload.arrays,
                self.bank.config_of(name, payload, self.model.spec is None),
                offset=_VARIANT_SEED_STRIDE * (index + 1), name=f"variant {name}",
                round_clients=True,
            )
            model.cpu().eval()
        return results

    def _assign(self, node: int) -> str:
        name = self.policy(self.capabilities.get(node))
        if name not in self.bank.variants:
            log(WARNING, "assignment policy chose unknown variant %r for node %d; using %r",
                name, node, self.default_variant)
            name = self.default_variant
        return name

    # -- checkpoints and artifacts ----------------------------------------------------
    def checkpoint_state(self) -> StrategyState:
        """FedEC's state, the variants (:meth:`VariantBank.checkpoint_state`) and the
        capability each node reported (its tier)."""
        state = super().checkpoint_state()
        self.bank.checkpoint_state(state)
        state.meta["capabilities"] = {str(node): c for node, c in self.capabilities.items()}
        return state

    def restore_state(self, state: StrategyState) -> None:
        """Rebuild the variants (and their payloads) from :meth:`checkpoint_state`'s."""
        super().restore_state(state)
        self.bank.restore_state(state)
        self.capabilities = {int(n): c for n, c in state.meta.get("capabilities", {}).items()}

    def hce_members(self) -> list[nn.Module]:
        """The HCE ensemble's variants (eval mode, fake-quant on for quantized ones)."""
        return [self.bank.models[name].eval() for name in self.hce_names]

    def save_artifacts(self, recorder: RunRecorder, test: TensorData) -> None:
        """FedEC's ensemble, then the final variants and the HCE ensemble's test results
        (:func:`~fl_ec.strategies.artifacts.save_variants_of`)."""
        super().save_artifacts(recorder, test)
        save_variants_of(recorder, test, self.bank, self.hce_names)
