"""The strategies' run-config sections: the federation, FedEC's knobs, FedHCE's knobs.

Each section is checked when it is built, by the code that uses its values: FedEC's
choices by :class:`~fl_ec.strategies.settings.FedECSettings`, the distillation by
:class:`~fl_ec.distill.DistillSettings`, the calibration by
:class:`~fl_ec.calibration.CalibrationSettings`, the start rule by
:func:`fl_ec.robust.parse_start_rule`, FedHCE's variants and policy by their parsers.
A bad value raises :class:`~fl_ec.errors.SettingError` naming the owner's field;
``OWNER_FIELDS`` maps an owner's field to the section's, whose kebab-case name is the
run-config key (:class:`~fl_ec.config.ExperimentConfig` reports it by that key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fl_ec.calibration import CalibrationSettings
from fl_ec.compression import Variant, parse_variants
from fl_ec.distill import DistillSettings
from fl_ec.diversity import check_diversity_weight
from fl_ec.errors import ConfigError, SettingError, check_fields, one_of
from fl_ec.robust import StartRule, parse_start_rule
from fl_ec.strategies.fedhce_utils import TierPolicy, check_variant_names, parse_tier_policy
from fl_ec.strategies.settings import FedECSettings

STRATEGIES = ("fedavg", "fedec", "fedhce")  # built by fl_ec.factory.build_strategy
DISTILL_TRAINERS = ("adam", "layer-parallel")  # how FedEC trains its student


@dataclass(frozen=True)
class FederationSection:
    """Run-config keys ``strategy`` ... ``min-train-replies``: who trains, and how long a
    round waits.

    ``fraction_train`` of the connected nodes train each of ``num_server_rounds``
    rounds (``fraction_evaluate`` evaluate), at least ``min_available_nodes`` of them;
    a round waits ``round_timeout`` seconds for replies and keeps the global model
    with fewer than ``min_train_replies`` usable ones. ``train_tiers`` (comma-separated
    device tiers; empty: all) leaves the sampled nodes of other tiers out of training
    (:class:`~fl_ec.run.tiers.TrainTiers`); ``downlink_bits`` (8, 4, 2; 0: fp32) sends
    FedAvg's training weights quantized (:class:`~fl_ec.run.downlink.QuantizedDownlink`).
    """

    strategy: str = "fedec"
    num_server_rounds: int = 10
    fraction_train: float = 0.2
    fraction_evaluate: float = 0.0
    min_available_nodes: int = 2
    round_timeout: float = 3600.0
    min_train_replies: int = 1
    train_tiers: str = ""
    downlink_bits: int = 0

    def tier_list(self) -> list[str]:
        """The tiers named by ``train_tiers`` (empty: every tier trains)."""
        return [tier.strip() for tier in self.train_tiers.split(",") if tier.strip()]

    def __post_init__(self) -> None:
        check_fields(
            self,
            [
                ("downlink_bits", self.downlink_bits in (0, 2, 4, 8), one_of(("0", "2", "4", "8"))),
                (
                    "downlink_bits",
                    not self.downlink_bits or self.strategy == "fedavg",
                    "applies to strategy=fedavg only (FedHCE quantizes per variant): set it "
                    "to 0",
                ),
                ("strategy", self.strategy in STRATEGIES, one_of(STRATEGIES)),
                ("num_server_rounds", self.num_server_rounds > 0, "must be > 0"),
                ("fraction_train", 0.0 <= self.fraction_train <= 1.0, "must be within [0, 1]"),
                (
                    "fraction_train",
                    self.fraction_train != 0.0,
                    "trains no client: set it within (0, 1]",
                ),
                (
                    "fraction_evaluate",
                    0.0 <= self.fraction_evaluate <= 1.0,
                    "must be within [0, 1]",
                ),
                ("min_available_nodes", self.min_available_nodes > 0, "must be > 0"),
                ("round_timeout", self.round_timeout > 0, "must be > 0"),
                ("min_train_replies", self.min_train_replies > 0, "must be > 0"),
            ],
        )


@dataclass(frozen=True)
class FedECSection:
    """Run-config keys of FedEC (and FedHCE, which extends it): the teacher, the
    distillation, the calibration and the start rule (docs/fedec.md)."""

    OWNER_FIELDS: ClassVar[dict[str, str]] = {
        "steps": "distill_steps",  # DistillSettings
        "batch_size": "distill_batch_size",
        "preset": "calibration",  # CalibrationSettings
        "rounds": "calibration_rounds",
        "nodes": "calibration_nodes",
    }

    teacher_rule: str = "gated"
    teacher_trim: float = 0  # a count (int) or a fraction of the round's clients
    proxy_per_round: int = 0
    client_start: str = "average"
    calibration: str = "none"  # a CalibrationSettings.preset name
    calibration_rounds: str = "all"
    calibration_nodes: str = "sampled"
    distill_steps: int = 200
    distill_batch_size: int = 64
    robust_start: str = "mean"
    distill_trainer: str = "adam"

    def __post_init__(self) -> None:
        self.settings()
        self.distill_settings()
        self.calibration_settings()
        self.start_rule()
        check_fields(
            self,
            [
                (
                    "distill_trainer",
                    self.distill_trainer in DISTILL_TRAINERS,
                    one_of(DISTILL_TRAINERS),
                )
            ],
        )

    def settings(self, **fields: Any) -> FedECSettings:
        """FedEC's own choices, with ``fields`` (more FedECSettings fields)."""
        return FedECSettings(
            teacher_rule=self.teacher_rule,
            teacher_trim=self.teacher_trim,
            client_start=self.client_start,
            proxy_per_round=self.proxy_per_round,
            **fields,
        )

    def distill_settings(self) -> DistillSettings:
        """The server's distillation: the library's settings with ``distill-steps`` and
        ``distill-batch-size``."""
        return DistillSettings(steps=self.distill_steps, batch_size=self.distill_batch_size)

    def calibration_settings(self) -> CalibrationSettings:
        """The ``calibration`` preset, with ``calibration-rounds`` and ``calibration-nodes``."""
        return CalibrationSettings.preset(
            self.calibration, rounds=self.calibration_rounds, nodes=self.calibration_nodes
        )

    def start_rule(self) -> StartRule:
        """The rule for the student's start and the clients' next model (``robust-start``)."""
        try:
            return parse_start_rule(self.robust_start)
        except ValueError as err:
            raise SettingError(
                type(self).__name__, "robust_start", self.robust_start, f"is invalid: {err}"
            ) from None


@dataclass(frozen=True)
class FedHCESection:
    """Run-config keys of FedHCE: the compressed variants, which tier gets which, the
    HCE ensemble and the variants' distillation (docs/fedhce.md)."""

    OWNER_FIELDS: ClassVar[dict[str, str]] = {"steps": "variant_distill_steps"}

    variants: str = "full,int8,int4,prune-0.5+int8,prune-0.5+int4"
    variant_policy: str = "gpu=int8,edge=prune-0.5+int4"
    hce_ensemble: str = ""
    diversity_weight: float = 0.5
    variant_distill_steps: int = 100
    fold_pruned: bool = True
    calibrate_variants: bool = True
    reprune: bool = False

    def __post_init__(self) -> None:
        names = [variant.name for variant in self.variant_list()]
        try:
            check_variant_names("variant-policy", self.tier_policy().by_tier.values(), names)
            check_variant_names("hce-ensemble", self.hce_ensemble_names(), names)
        except ValueError as err:  # the messages name the run-config key
            raise ConfigError(str(err)) from None
        check_diversity_weight(self.diversity_weight)
        self.variant_distill_settings()

    def variant_list(self) -> list[Variant]:
        """The variants named by ``variants``, in order."""
        try:
            return parse_variants(self.variants)
        except ValueError as err:
            raise SettingError(
                type(self).__name__, "variants", self.variants, f"is invalid: {err}"
            ) from None

    def tier_policy(self) -> TierPolicy:
        """``variant-policy``; unlisted tiers get the last variant, the most compressed by
        convention."""
        try:
            return parse_tier_policy(self.variant_policy, default=self.variant_list()[-1].name)
        except ValueError as err:  # the message names the run-config key
            raise ConfigError(str(err)) from None

    def hce_ensemble_names(self) -> list[str]:
        """The variants named by ``hce-ensemble`` (empty: FedHCE's default members)."""
        return [name.strip() for name in self.hce_ensemble.split(",") if name.strip()]

    def variant_distill_settings(self) -> DistillSettings:
        """FedHCE's distillation of its variants: ``variant-distill-steps`` steps of 128
        (the variants' fine-tuning was measured at that size)."""
        return DistillSettings(steps=self.variant_distill_steps, batch_size=128)
