"""FedHCE: FedEC plus a heterogeneously compressed ensemble sent to GPU and edge clients.

After each round's ensemble distillation (FedEC), the server derives compressed
*variants* of the global student -- torch-pruning structured pruning and/or per-channel
weight quantization (``full``, ``prune-0.5``, ``int8``, ``prune-0.5+int4``, ...) --
fine-tunes them jointly by distillation from the round's teacher with a
diversity-aware objective (:mod:`fl_ec.diversity`), and sends every client the variant
its capability calls for. Clients train their variant (quantization-aware, pruned
structure kept) and send it back; next round every returned model, whatever its
variant, joins the ensemble teacher. The final product is the HCE ensemble: the mean
logits of a chosen subset of variants, more accurate per byte than one model.

The algorithms live in :mod:`fl_ec.compression` and :mod:`fl_ec.diversity`; this class
is the Flower glue: per-node messages, capability bookkeeping, metrics.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import nn

from fl_ec.checkpoint import StrategyState, tensors_under
from fl_ec.compression import (
    Variant,
    enable_weight_fake_quant,
    expand_to_full,
    fold_into_full,
)
from fl_ec.compression.pruning import PrunedStructure
from fl_ec.compression.variants import ReplayVariantFactory, VariantFactory
from fl_ec.data.tensor_data import TensorData
from fl_ec.distill import DistillSettings, distill
from fl_ec.diversity import VariantEnsemble, check_diversity_weight, diversity_loss_fn
from fl_ec.hce import evaluate_variants, save_variants
from fl_ec.models.layout import channels_last
from fl_ec.models.spec import ArchSpec, build_from_state_dict
from fl_ec.protocol import (
    CAPABILITY_KEY,
    PRUNING_KEY,
    VARIANT_BITS_KEY,
    VARIANT_KEY,
    WIRE_MANIFEST_KEY,
)
from fl_ec.results import RunRecorder
from fl_ec.robust import WeightedMean
from fl_ec.scoring import accuracy
from fl_ec.strategies.fedec import FedEC
from fl_ec.strategies.fedec_calibration import serve_feature_calibrated
from fl_ec.strategies.fedec_utils import ClientModel, is_finite_state
from fl_ec.strategies.fedhce_utils import (
    AssignmentPolicy,
    Payload,
    TierPolicy,
    check_variant_names,
    make_payload,
    prediction_disagreement,
    rebase_update,
    sent_state,
)
from fl_ec.strategies.replies import (
    Expected,
    RejectedReplyError,
    check_capability,
    shapes_of_state,
)

FULL = "full"


class FedHCE(FedEC):
    """Heterogeneously compressed ensemble on top of :class:`FedEC`.

    Parameters
    ----------
    variants : Sequence[str | Variant]
        The variants to maintain, e.g. ``["full", "prune-0.5+int8", "int4"]``.
    assignment_policy : Callable[[Mapping | None], str] | None
        Maps a node's reported capability (``None`` before its first reply) to a
        variant name. Default: every node gets the last of ``variants`` (the most
        compressed, by convention), which every device can hold; so does a node for
        which the policy names an unknown variant.
    hce_ensemble : Sequence[str] | None
        Variants whose mean logits form the HCE ensemble. Default: all but ``full``.
    diversity_weight : float (default: 0.5)
        lambda of the diversity-aware variant distillation, in [0, 1]; 0 turns the
        diversity term off (plain distillation of each variant).
    variant_distill : DistillSettings | None
        Steps/lr/patience of the variants' fine-tuning (default: 100 steps).
    fold_pruned : bool (default: True)
        Fold pruned clients' updates into full-model coordinates through the pruning
        index maps (HeteroFL-style) for the student's starting point.
    reprune : bool (default: False)
        Re-run the pruner every round. Off: a variant's architecture is decided once
        and replayed by slicing, so it is stable across rounds.
    pack_quantized : bool (default: True)
        Send quantized variants as packed integers plus scales (else fp32 values).
    calibrate_variants : bool (default: True)
        With feature calibration (``calibration`` of method ``features``): in each
        calibrated round, besides the global model, query the clients once per
        compressed variant for the statistics of *that variant's* classifier inputs,
        and recalibrate its classifier from them (the same CCVR and validation guard
        as the global model). A pruned variant's features differ from the global
        model's, so the calibrated global classifier does not fit them. Off: variants
        inherit the global model's classifier.
    **fedec_kwargs
        Every :class:`FedEC` (and so ``FedAvg``) argument, with ``arch_spec`` or
        ``model_builder``. With ``model_builder`` (a user's own model class), a pruned
        variant is that model cut to its pruning decision, which travels as JSON in the
        train config (``pruning``) for the client to replay
        (:func:`fl_ec.clients.receive_variant`). Layers whose pruning the model's
        forward cannot take (a ``.view`` to a fixed size, the output layer) are found
        on a ``proxy_data`` sample and kept whole; a pruned variant with no layer left
        to prune raises ``ValueError`` naming the variants that work.
        With ``client_start="average"`` the clients train plain compressed copies of
        the round's (rebased, folded) parameter average, while the served global
        model (distilled, calibrated) and the variants derived from it
        serve evaluation and the HCE ensemble; clients' changes are rebased on the
        copies they were sent, so the training trajectory never passes through the
        served model. ``student`` (FedDF): clients train the served model's variants.
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
        self.variants = {v.name: v for v in parsed}
        self.default_variant = parsed[-1].name
        names = list(self.variants)
        check_variant_names("hce_ensemble", hce_ensemble or [], names)
        self.hce_names = list(hce_ensemble or [n for n in names if n != FULL]) or names
        self.policy = assignment_policy or TierPolicy({}, self.default_variant)
        check_diversity_weight(diversity_weight)
        self.diversity_weight = diversity_weight
        self.variant_distill = variant_distill or DistillSettings(steps=100)
        self.fold_pruned = fold_pruned
        self.reprune = reprune
        self.pack_quantized = pack_quantized
        self.calibrate_variants = calibrate_variants
        example = self.proxy_inputs[:2]  # what pruning traces the model with
        if self.arch_spec is not None:
            self.factory = VariantFactory(
                lambda state: build_from_state_dict(self.arch_spec, state), example
            )
        elif not len(example) and any(v.is_pruned for v in parsed):
            raise ValueError("FedHCE's pruned variants of model_builder's model need proxy_data")
        else:
            self.factory = ReplayVariantFactory(self.model_builder, example, parsed)
        # The variants that serve inference (validation metrics, the HCE ensemble)...
        self.variant_models: dict[str, nn.Module] = {}
        # ... and those the clients were sent, fp32, to rebase their changes on: the same
        # models, unless client_start="average".
        self.sent_models: dict[str, nn.Module] = {}
        # The last calibrated round's variants before their own calibration (a copy
        # each), so the ServerApp can report what that calibration gained on test.
        self.uncalibrated_variant_models: dict[str, nn.Module] = {}
        self.payloads: dict[str, Payload] = {}
        self.sent_states: dict[str, dict[str, torch.Tensor]] = {}
        self.capabilities: dict[int, dict[str, Any]] = {}
        self.assignment: dict[int, str] = {}

    def summary(self) -> None:
        super().summary()
        log(
            INFO,
            "\t└──> FedHCE: variants %s, default %s, HCE ensemble %s, diversity %.2f, "
            "fold pruned %s",
            list(self.variants),
            self.default_variant,
            self.hce_names,
            self.diversity_weight,
            self.fold_pruned,
        )

    # -- Flower hooks -------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        if not self.payloads:  # first round: variants of the initial model, no teacher yet
            self._derive_variants(arrays.to_torch_state_dict(), 0, {})
        self.assignment = {}
        messages = []
        for message in sampled:
            node = message.metadata.dst_node_id
            name = self._assign(node)
            self.assignment[node] = name
            payload = self.payloads[name]
            node_config = ConfigRecord({**dict(config), **self._variant_config(name, payload)})
            record = RecordDict(
                {self.arrayrecord_key: payload.arrays, self.configrecord_key: node_config}
            )
            messages += self._construct_messages(record, [node], MessageType.TRAIN)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        stats = self.server_metrics.setdefault(server_round, {})
        stats["variant-by-node"] = {str(k): v for k, v in self.assignment.items()}
        stats["returned-variant-by-node"] = {
            str(m.node_id): m.variant or FULL for m in self.last_client_models
        }
        return arrays, metrics

    # -- checkpoints ----------------------------------------------------------------
    def checkpoint_state(self) -> StrategyState:
        """FedEC's state, the variants as served and as sent, their index maps, and the
        capability each node reported (its tier)."""
        state = super().checkpoint_state()
        shared = all(self.sent_models[n] is m for n, m in self.variant_models.items())
        state.meta["variants-sent-as-served"] = shared
        state.meta["structures"] = {
            name: structure.to_json_dict() for name, structure in self.factory.structures.items()
        }
        state.meta["capabilities"] = {str(node): c for node, c in self.capabilities.items()}
        for prefix, models in (("variant", self.variant_models), ("sent", self.sent_models)):
            if prefix == "sent" and shared:
                continue
            for name, model in models.items():
                state.tensors.update(
                    {f"{prefix}/{name}/{k}": v for k, v in model.state_dict().items()}
                )
        return state

    def restore_state(self, state: StrategyState) -> None:
        """Rebuild the variants (and their payloads) from :meth:`checkpoint_state`'s."""
        super().restore_state(state)
        self.factory.structures = {
            name: PrunedStructure.from_json_dict(data)
            for name, data in state.meta.get("structures", {}).items()
        }
        self.capabilities = {int(n): c for n, c in state.meta.get("capabilities", {}).items()}

        def rebuild(prefix: str) -> dict[str, nn.Module]:
            models = {}
            for name, variant in self.variants.items():
                tensors = tensors_under(state.tensors, f"{prefix}/{name}/")
                if tensors:
                    models[name] = self.factory.build_variant(variant, tensors).eval()
            return models

        self.variant_models = rebuild("variant")
        shared = state.meta.get("variants-sent-as-served", True)
        self.sent_models = dict(self.variant_models) if shared else rebuild("sent")
        self.payloads = {
            name: make_payload(model, self.variants[name], self.pack_quantized)
            for name, model in self.sent_models.items()
        }
        self.sent_states = {name: sent_state(p) for name, p in self.payloads.items()}

    # -- FedEC hooks ----------------------------------------------------------------
    def _parse(self, reply: Message) -> ClientModel:
        """FedEC's checks, the node's capability's; the capability is kept once accepted."""
        records = reply.content.config_records if not reply.has_error() else {}
        capability = (
            check_capability(records[CAPABILITY_KEY]) if CAPABILITY_KEY in records else None
        )
        client_model = super()._parse(reply)
        if capability is not None:
            self.capabilities[client_model.node_id] = capability
        return client_model

    def _expect(self, claimed: ArchSpec | None, variant: str, node: int) -> Expected:
        """Exactly the arrays of the variant the node was sent this round."""
        name = variant or FULL
        sent = self.assignment.get(node)
        if sent is None:
            raise RejectedReplyError("the node was sent no model this round")
        if name != sent:
            raise RejectedReplyError(f"returned variant {name!r}, but was sent {sent!r}")
        if claimed is not None and claimed != self.arch_spec:
            raise RejectedReplyError("the reply's spec is not the one its variant was sent with")
        model = self.variant_models.get(name)
        if model is None:
            return super()._expect(claimed, variant, node)
        return Expected(self.arch_spec, shapes_of_state(model.state_dict()), True, self.num_classes)

    def _prepare_client_model(self, client_model: ClientModel) -> None:
        """Run a returned variant as it was trained: quantized ones with fake-quant on."""
        enable_weight_fake_quant(
            client_model.model, self.variants[client_model.variant or FULL].bits
        )

    def _student_start(
        self, same_arch: list[ClientModel], accepted: list[ClientModel], previous: nn.Module
    ) -> nn.Module:
        return self._build(self.arch_spec, self._round_average(same_arch, accepted, previous))

    def _round_average(
        self, same_arch: list[ClientModel], accepted: list[ClientModel], previous: nn.Module
    ) -> dict[str, torch.Tensor]:
        """The round's parameter average: rebased on what was sent, pruned ones folded.

        Each client's change (what it returned minus what it was sent) is applied to
        the server's full-precision copy of the variant it was sent (after the
        variants' fine-tuning and calibration), so the rounding of the quantized copy
        it started from stays out of the average. Each coordinate combines the clients
        that hold it by ``start_rule`` (FedAvg's weighted mean unless a robust rule is
        set: :meth:`fl_ec.robust.StartRule.fold`).
        """
        # Without full-size replies (e.g. round 1, when every node got a pruned default)
        # folding is the only way the round's training reaches the student's start.
        fold = self.fold_pruned or not same_arch
        base = previous.state_dict()
        if self.client_start == "average" and self.client_start_arrays is not None:
            base = self.client_start_arrays.to_torch_state_dict()  # what was sent, fp32
        updates = []
        for model in accepted if fold else same_arch:
            name = model.variant or FULL
            structure = self.factory.structure(self.variants[name])
            state = model.state
            sent = self.sent_states.get(name)
            if sent is not None:
                # The client's change was computed from the variant it received, which
                # the variants' fine-tuning moved away from the global student. Applied
                # to the student instead, it would land where it was not computed, and
                # the fine-tuning would never reach the global model. sent_models
                # still hold the variants as sent: they are replaced only by _compress.
                as_sent = self.sent_models[name].state_dict()
                state = rebase_update(state, sent, as_sent)
            updates.append((state, structure, model.num_examples))
        if isinstance(self.start_rule, WeightedMean):
            return fold_into_full(base, updates)  # the arithmetic FedHCE always had
        expanded = [expand_to_full(base, state, structure) for state, structure, _ in updates]
        return self.start_rule.fold(expanded, [weight for *_, weight in updates], base)

    def _uses_round_teacher(self) -> bool:
        # The variants are fine-tuned from the round's teacher even if the student is not.
        tuned = any(name != FULL for name in self.variants)
        return super()._uses_round_teacher() or (tuned and self.variant_distill.steps > 0)

    def _compress(
        self, server_round: int, accepted: list[ClientModel], stats: dict[str, Any]
    ) -> tuple[nn.Module, dict[str, Any]]:
        student, stats = super()._compress(server_round, accepted, stats)
        if not is_finite_state(student.state_dict()):
            return student, stats  # FedEC keeps the global model; the variants stay too
        train_state = None
        if self.client_start == "average" and self.client_start_arrays is not None:
            train_state = self.client_start_arrays.to_torch_state_dict()
        self._derive_variants(student.state_dict(), server_round, stats, accepted, train_state)
        return student, stats

    def _client_start_arrays(
        self, same_arch: list[ClientModel], accepted: list[ClientModel], start: nn.Module
    ) -> ArrayRecord | None:
        # The average the clients' changes are rebased and folded into: the student's
        # start itself (copied before distillation).
        return ArrayRecord(start.state_dict())

    # -- variants -------------------------------------------------------------------
    def _assign(self, node: int) -> str:
        name = self.policy(self.capabilities.get(node))
        if name not in self.variants:
            log(
                WARNING,
                "assignment policy chose unknown variant %r for node %d; using %r",
                name,
                node,
                self.default_variant,
            )
            name = self.default_variant
        return name

    def _variant_config(self, name: str, payload: Payload) -> dict[str, Any]:
        """What a client needs, besides the arrays, to rebuild and run variant ``name``.

        Without a spec, a pruned variant's shape is its pruning decision on the user's
        model: the client replays it on a fresh ``model_builder()``.
        """
        config: dict[str, Any] = {
            VARIANT_KEY: name,
            VARIANT_BITS_KEY: self.variants[name].bits,
            WIRE_MANIFEST_KEY: payload.manifest_json,
        }
        structure = self.factory.structure(self.variants[name])
        if self.arch_spec is None and structure is not None:
            config[PRUNING_KEY] = structure.decision_json()
        return config

    def _build(self, spec: ArchSpec | None, state: dict[str, torch.Tensor]) -> nn.Module:
        """A model from arrays: by spec, else model_builder's, pruned as the arrays' variant."""
        if spec is None and isinstance(self.factory, ReplayVariantFactory):
            return self.factory.rebuild(state)
        return super()._build(spec, state)

    def _derive_variants(
        self,
        full_state: dict[str, torch.Tensor],
        server_round: int,
        stats: dict[str, Any],
        accepted: list[ClientModel] | None = None,
        train_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Derive every variant from the global student, fine-tune them, pack them.

        ``accepted``: the round's clients, asked for each variant's feature statistics
        when this round is calibrated (``calibrate_variants``). ``train_state``
        (``client_start="average"``): the clients get plain compressed copies of it
        instead of the served variants.
        """
        models = {
            name: self.factory.derive(variant, full_state, reprune=self.reprune)
            for name, variant in self.variants.items()
        }
        tuned = [name for name, variant in self.variants.items() if name != FULL]
        validation = self.validation
        sent = models
        if train_state is not None:
            sent = {
                name: self.factory.derive(variant, train_state, reprune=self.reprune)
                for name, variant in self.variants.items()
            }
        if tuned and self.round_teacher is not None and self.variant_distill.steps > 0:
            proxy, teacher = self.round_teacher
            result = distill(
                VariantEnsemble([models[name] for name in tuned]),
                proxy,
                teacher,
                validation,
                self.variant_distill,
                self.device,
                seed=self.seed * 10_007 + server_round + 1,
                loss_fn=diversity_loss_fn(self.variant_distill.temperature, self.diversity_weight),
            )
            stats["variants-distill-seconds"] = result.seconds
            stats["variants-distill-steps"] = float(result.steps)
        self.variant_models = {name: model.cpu().eval() for name, model in models.items()}
        self.sent_models = {name: model.cpu().eval() for name, model in sent.items()}
        if accepted and self.calibrate_variants and self._calibrates(server_round):
            stats["variant-calibration"] = self._calibrate_variants(server_round, accepted)
        self.payloads = {
            name: make_payload(model, self.variants[name], self.pack_quantized)
            for name, model in self.sent_models.items()
        }
        # What each client will start from, to rebase its reply on.
        self.sent_states = {name: sent_state(p) for name, p in self.payloads.items()}
        stats["variant-bytes"] = {name: p.nbytes for name, p in self.payloads.items()}
        if validation is not None and server_round > 0:
            self._validation_metrics(stats)

    def _calibrate_variants(
        self, server_round: int, accepted: list[ClientModel]
    ) -> dict[str, dict[str, float]]:
        """CCVR for each compressed variant, from statistics of its own features.

        One query per variant, sent as clients receive it for training (packed
        integers for quantized ones), so each client measures the features the
        variant really computes. Returns per-variant query and calibration metrics.
        """
        nodes = [m.node_id for m in accepted]
        outcome = {}
        self.uncalibrated_variant_models = {}
        for index, (name, model) in enumerate(self.variant_models.items()):
            if name == FULL:  # the global student itself, calibrated by FedEC
                continue
            self.uncalibrated_variant_models[name] = copy.deepcopy(model)
            payload = make_payload(model, self.variants[name], self.pack_quantized)
            parts, metrics = self._query_feature_stats(
                server_round,
                payload.arrays,
                self._variant_config(name, payload),
                model,
                nodes,
            )
            if parts:
                metrics.update(
                    serve_feature_calibrated(
                        model,
                        self.feature_statistics,
                        self.feature_statistics.merge(parts),
                        self.calibration,
                        self.seed * 10_007 + server_round + 7_919 * (index + 1),
                        self._hits,
                        server_round,
                        name=f"variant {name}",
                    )
                )
            else:
                metrics["feature-calibration-applied"] = 0.0
            model.cpu().eval()
            outcome[name] = metrics
        return outcome

    @torch.inference_mode()
    def _validation_metrics(self, stats: dict[str, Any]) -> None:
        val_x, val_y = self.validation  # type: ignore[misc]
        # One pass per variant; its logits serve both its accuracy and the HCE ensemble.
        logits = {}
        for name, model in self.variant_models.items():
            model.to(self.device).eval()
            with channels_last(model):
                batches = [model(x.to(self.device)).cpu() for x in val_x.split(512)]
            logits[name] = torch.cat(batches)
            model.cpu()
        member_logits = [logits[name] for name in self.hce_names]
        stats["variant-val-accuracy"] = {n: accuracy(z, val_y) for n, z in logits.items()}
        stats["hce-val-accuracy"] = accuracy(torch.stack(member_logits).mean(0), val_y)
        stats["variant-disagreement"] = prediction_disagreement(member_logits)

    def hce_members(self) -> list[nn.Module]:
        """The HCE ensemble's variants (eval mode, fake-quant on for quantized ones)."""
        return [self.variant_models[name].eval() for name in self.hce_names]

    def save_artifacts(self, recorder: RunRecorder, test: TensorData) -> None:
        """FedEC's ensemble, then the final variants to ``variants/`` (:mod:`fl_ec.hce`).

        The run's summary gets each variant's test accuracy and wire bytes and the HCE
        ensemble's, and, when the variants were calibrated, their accuracies before
        that calibration (``*-uncalibrated``). Latency and the int8 export are left to
        ``fl-ec-hce-eval <run dir>``.
        """
        super().save_artifacts(recorder, test)
        if not self.variant_models:
            return
        index = save_variants(
            recorder,
            self.variant_models,
            self.variants,
            {name: payload.nbytes for name, payload in self.payloads.items()},
            self.hce_names,
        )
        test_x = test.normalize(test.images)
        reports = evaluate_variants(
            self.variant_models, index, test_x, test.labels, self.hce_names, latency=False
        )
        summary = recorder.extra_summary
        summary["variant-test-accuracy"] = {r.name: r.accuracy for r in reports[:-1]}
        summary["variant-wire-bytes"] = {r.name: r.wire_bytes for r in reports[:-1]}
        summary["hce-test-accuracy"] = reports[-1].accuracy
        summary["hce-wire-bytes"] = reports[-1].wire_bytes
        if self.uncalibrated_variant_models:  # what the variants' own calibration gained
            before = evaluate_variants(
                {**self.variant_models, **self.uncalibrated_variant_models},
                index,
                test_x,
                test.labels,
                self.hce_names,
                latency=False,
            )
            summary["variant-test-accuracy-uncalibrated"] = {
                r.name: r.accuracy for r in before[:-1]
            }
            summary["hce-test-accuracy-uncalibrated"] = before[-1].accuracy
        log(
            INFO,
            "[fl-ec] HCE ensemble %s: test acc %.2f%%, %d bytes on the wire",
            self.hce_names,
            100 * reports[-1].accuracy,
            reports[-1].wire_bytes,
        )
