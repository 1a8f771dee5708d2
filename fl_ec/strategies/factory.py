"""Run-config strategy name -> a configured Flower strategy instance."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy

from fl_ec.config import STRATEGIES, ExperimentConfig
from fl_ec.data.federated import ServerData
from fl_ec.errors import ConfigError
from fl_ec.models.spec import ArchSpec


def build_strategy(
    config: ExperimentConfig, spec: ArchSpec | None = None, server_data: ServerData | None = None
) -> Strategy:
    """The strategy named by ``config.strategy``, with the federation knobs applied.

    ``fedavg`` is Flower's own ``FedAvg``, unchanged: the baseline every fl-ec
    strategy is compared against. ``fedec`` needs the global ``spec`` and the server's
    data (proxy and validation sets).
    """
    common = dict(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        # One knob: a round waits for as many nodes as it trains and evaluates.
        min_train_nodes=config.min_available_nodes,
        min_evaluate_nodes=config.min_available_nodes,
        min_available_nodes=config.min_available_nodes,
    )
    if config.strategy == "fedavg":
        return FedAvg(**common)
    if config.strategy in ("fedec", "fedhce"):
        if spec is None or server_data is None:
            raise ConfigError(
                f"strategy={config.strategy} needs the model spec and the server's proxy data"
            )
        validation = server_data.validation
        fedec_kwargs = dict(
            proxy_data=server_data.proxy.normalize(server_data.proxy.images),
            arch_spec=spec,
            validation_data=(validation.normalize(validation.images), validation.labels),
            distill=config.distill_settings(),
            teacher_rule=config.teacher_rule,
            teacher_trim=config.teacher_trim,
            start_rule=config.start_rule(),
            client_start=config.client_start,
            calibration=config.calibration_settings(),
            proxy_per_round=config.proxy_per_round,
            device=config.device,
            seed=config.seed,
            min_valid_replies=config.min_train_replies,
            student_trainer=_layer_parallel_student_trainer(config, spec)
            if config.distill_trainer == "layer-parallel"
            else None,
            **common,
        )
        if config.strategy == "fedec":
            from fl_ec.strategies.fedec import FedEC

            return FedEC(**fedec_kwargs)
        return _fedhce(config, fedec_kwargs)
    raise ConfigError(
        f"strategy={config.strategy!r} is unknown: choose one of {', '.join(STRATEGIES)}"
    )


def _fedhce(config: ExperimentConfig, fedec_kwargs: dict) -> Strategy:
    from fl_ec.compression import parse_variants
    from fl_ec.strategies.fedhce import FedHCE
    from fl_ec.strategies.fedhce_utils import parse_tier_policy

    variants = parse_variants(config.variants)
    return FedHCE(
        variants=variants,
        # Unlisted tiers get the last variant, the most compressed by convention.
        assignment_policy=parse_tier_policy(config.variant_policy, variants[-1].name),
        hce_ensemble=config.hce_ensemble_names() or None,
        diversity_weight=config.diversity_weight,
        variant_distill=config.variant_distill_settings(),
        fold_pruned=config.fold_pruned,
        calibrate_variants=config.calibrate_variants,
        **fedec_kwargs,
    )


def _layer_parallel_student_trainer(config: ExperimentConfig, spec: ArchSpec):  # noqa: ANN202
    """Distillation through the layer-parallel trainer: KL to the teacher, same budget.

    ``distill-steps`` x the distillation batch size (:class:`DistillSettings`) proxy
    samples become whole epochs over the round's proxy set (at least one).
    """
    import math

    from fl_ec.layer_parallel import train_layer_parallel

    distill = config.distill_settings()

    def train(student, proxy, teacher_logits) -> None:  # noqa: ANN001
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
