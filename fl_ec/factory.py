"""Run-config strategy name -> a configured Flower strategy instance."""

from __future__ import annotations

import math

import torch
from flwr.serverapp.strategy import FedAvg, Strategy
from torch import nn

from fl_ec.config import ExperimentConfig
from fl_ec.data.federated import ServerData
from fl_ec.errors import ConfigError
from fl_ec.layer_parallel import train_layer_parallel
from fl_ec.models.spec import ArchSpec
from fl_ec.run.downlink import QuantizedDownlink
from fl_ec.run.quorum import ReplyQuorum
from fl_ec.strategies.fedec import FedEC
from fl_ec.strategies.fedhce import FedHCE
from fl_ec.strategies.steps import StudentTrainer


def build_strategy(
    config: ExperimentConfig, spec: ArchSpec | None = None, server_data: ServerData | None = None
) -> Strategy:
    """The strategy named by ``config.federation.strategy``, with the federation knobs applied.

    ``fedavg`` is Flower's own ``FedAvg``, unchanged: the baseline every fl-ec
    strategy is compared against. ``fedec`` and ``fedhce`` need the global ``spec``
    and the server's data (proxy and validation sets). A training round with fewer
    than ``min-train-replies`` usable replies keeps the global model: FedEC and FedHCE
    count the replies they accept, after their own checks; ``FedAvg`` is wrapped in a
    :class:`~fl_ec.run.quorum.ReplyQuorum` that counts the replies that are not errors.
    ``downlink-bits`` wraps the result in a :class:`~fl_ec.run.downlink.QuantizedDownlink`.
    """
    federation = config.federation
    common = dict(
        fraction_train=federation.fraction_train,
        fraction_evaluate=federation.fraction_evaluate,
        # One knob: a round waits for as many nodes as it trains and evaluates.
        min_train_nodes=federation.min_available_nodes,
        min_evaluate_nodes=federation.min_available_nodes,
        min_available_nodes=federation.min_available_nodes,
    )
    strategy = _inner_strategy(config, common, spec, server_data)
    if federation.downlink_bits:
        strategy = QuantizedDownlink(strategy, federation.downlink_bits)
    return strategy


def _inner_strategy(
    config: ExperimentConfig,
    common: dict,
    spec: ArchSpec | None,
    server_data: ServerData | None,
) -> Strategy:
    federation = config.federation
    if federation.strategy == "fedavg":
        return ReplyQuorum(FedAvg(**common), federation.min_train_replies)
    if spec is None or server_data is None:
        raise ConfigError(
            f"strategy={federation.strategy} needs the model spec and the server's proxy data"
        )
    fedec = config.fedec
    validation = server_data.validation
    fedec_kwargs = dict(
        proxy_data=server_data.proxy.normalize(server_data.proxy.images),
        arch_spec=spec,
        validation_data=(validation.normalize(validation.images), validation.labels),
        distill=fedec.distill_settings(),
        teacher_rule=fedec.teacher_rule,
        teacher_trim=fedec.teacher_trim,
        start_rule=fedec.start_rule(),
        client_start=fedec.client_start,
        calibration=fedec.calibration_settings(),
        proxy_per_round=fedec.proxy_per_round,
        device=config.training.device,
        seed=config.seed,
        min_valid_replies=federation.min_train_replies,
        student_trainer=_layer_parallel_student_trainer(config, spec)
        if fedec.distill_trainer == "layer-parallel"
        else None,
        **common,
    )
    if federation.strategy == "fedec":
        return FedEC(**fedec_kwargs)
    fedhce = config.fedhce
    return FedHCE(
        variants=fedhce.variant_list(),
        assignment_policy=fedhce.tier_policy(),
        hce_ensemble=fedhce.hce_ensemble_names() or None,
        diversity_weight=fedhce.diversity_weight,
        variant_distill=fedhce.variant_distill_settings(),
        fold_pruned=fedhce.fold_pruned,
        calibrate_variants=fedhce.calibrate_variants,
        reprune=fedhce.reprune,
        **fedec_kwargs,
    )


def _layer_parallel_student_trainer(config: ExperimentConfig, spec: ArchSpec) -> StudentTrainer:
    """Distillation through the layer-parallel trainer: KL to the teacher, same budget.

    ``distill-steps`` x the distillation batch size (:class:`DistillSettings`) proxy
    samples become whole epochs over the round's proxy set (at least one).
    """
    distill = config.fedec.distill_settings()

    def train(student: nn.Module, proxy: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        epochs = max(1, math.ceil(distill.steps * distill.batch_size / len(proxy)))
        settings = config.lp_settings(
            loss="kl",
            temperature=distill.temperature,
            epochs=epochs,
            batch_size=distill.batch_size,
            augment=False,  # teacher logits belong to the un-augmented proxy images
        )
        train_layer_parallel(student, spec, proxy, teacher_logits, settings)

    return train
