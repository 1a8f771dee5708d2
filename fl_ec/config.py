"""Run-config -> one typed, validated config object.

This is the only module that reads Flower's ``context.run_config`` (a flat mapping of
kebab-case keys, defaults in ``[tool.flwr.app.config]`` of ``pyproject.toml``).
Everything downstream receives :class:`ExperimentConfig` or plain arguments, so the
algorithms never depend on Flower's config format.

Validation happens here, eagerly, so that a bad value fails in the first second of a
run with one line naming the key and what to change -- instead of deep inside a
client after Flower's start-up. Knobs that fill a settings object (distillation,
layer-parallel training, FedHCE's variants and policy) are checked by building that
object with the code that owns it, its error re-raised naming the run-config key;
this module checks the rest, and what spans sections.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fl_ec.calibration import CALIBRATION_NODES, CalibrationSettings
from fl_ec.distill import DistillSettings
from fl_ec.ensemble import RULES
from fl_ec.errors import ConfigError, SettingError
from fl_ec.layer_parallel.objectives import LPSettings
from fl_ec.models.spec import is_known_model
from fl_ec.robust import StartRule, check_trim, parse_start_rule

STRATEGIES = ("fedavg", "fedec", "fedhce")
TEACHER_RULES = RULES  # the ensemble module's own list: one place to add a rule
CLIENT_STARTS = ("student", "average")  # what FedEC/FedHCE clients train from
DATASETS = ("fashion-mnist", "cifar10", "synthetic")
PARTITIONERS = ("iid", "dirichlet", "pathological")
DEVICES = ("auto", "cpu", "cuda")
FAIL_MODES = ("error", "silent")  # how a simulated node fails (fl_ec.clients.faults)
# The LPSettings fields the run-config sets, each with the ExperimentConfig field it
# comes from (whose kebab-case name is the run-config key).
LP_FIELDS = {
    "stages": "lp_stages",
    "method": "lp_method",
    "downsample": "lp_downsample",
    "boundary_bits": "lp_boundary_bits",
    "parallel_epochs": "lp_parallel_epochs",
    "serial_epochs": "lp_serial_epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "momentum": "momentum",
    "seed": "seed",
}


# Run-config keys fl-ec no longer has, each with what to do instead: a retired key fails
# the run rather than being ignored (the numbers behind each are in docs/experiments.md).
_REMOVED = "it was removed and its old default is now fixed; delete it from the run-config"
_DENSE = 'use calibration="dense" (one Gaussian per class) or "dense-mixture"'
RETIRED_KEYS = {
    "prior-correction": 'use calibration="prior"',
    "feature-calibration": 'use calibration="classifier" (or "dense", "dense-mixture")',
    "calibration-layers": _DENSE,
    "calibration-rank": _DENSE,
    "calibration-components": _DENSE,
    "calibration-samples": "calibration draws a fixed 20000 virtual features; delete it",
    "prior-correction-revert-z": "the revert threshold is fixed at z=1.96; delete it",
    "eval-batch-size": "evaluation runs in fixed batches of 512; delete it",
    "min-train-nodes": "min-available-nodes is the fewest nodes a round trains or evaluates",
    "min-evaluate-nodes": "min-available-nodes is the fewest nodes a round trains or evaluates",
    "client-test-fraction": "every client keeps 10% of its partition for evaluate; delete it",
    "lp-threads-per-worker": "layer-parallel workers run one thread each; delete it",
    **{
        key: _REMOVED
        for key in (
            "tail-average-rounds",
            "prior-aware-distillation",
            "augment-copies",
            "teacher-includes-average",
            "teacher-includes-previous",
            "student-init",
            "trim-ratio",
            "downlink-rounding",
            "variant-client-start",
            "prune-steps",
            "prune-importance",
            "default-variant",
            "rebase-updates",
            "lp-aux-resolution",
            "weight-decay",
            "local-loss",
        )
    },
    **{
        key: "fixed in fl_ec.distill.DistillSettings (library only); delete it"
        for key in (
            "distill-batch-size",
            "distill-lr",
            "distill-temperature",
            "distill-eval-every",
            "distill-patience",
        )
    },
}


@dataclass(frozen=True)
class ExperimentConfig:
    """Every knob of an fl-ec experiment; field ``foo_bar`` is run-config key ``foo-bar``.

    ``docs/configuration.md`` documents each field; defaults here mirror
    ``[tool.flwr.app.config]`` so the library can be used without a pyproject.
    """

    # Federation / strategy
    strategy: str = "fedec"
    num_server_rounds: int = 10
    fraction_train: float = 0.2
    fraction_evaluate: float = 0.0
    min_available_nodes: int = 2
    # seconds a round waits for its replies (training, evaluation, FedEC's queries)
    round_timeout: float = 3600.0
    # fewer usable training replies than this: the round keeps the global model
    min_train_replies: int = 1
    # Data
    dataset: str = "fashion-mnist"
    data_dir: str = ""
    download: bool = False
    train_subset: int = 0
    partitioner: str = "dirichlet"
    alpha: float = 0.1
    classes_per_client: int = 2
    proxy_size: int = 5000
    validation_size: int = 1000
    seed: int = 42
    # Model and local training
    model: str = "cnn"
    local_epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    max_grad_norm: float = 10.0
    device: str = "auto"
    client_threads: int = 0
    # FedEC: ensemble teacher on the proxy set, distillation into the student
    teacher_rule: str = "gated"
    proxy_per_round: int = 0
    client_start: str = "average"
    calibration: str = "none"  # a CalibrationSettings.preset name
    calibration_rounds: str = "all"
    calibration_nodes: str = "sampled"
    distill_steps: int = 500
    # FedHCE: compressed variants, assignment by capability, diversity-aware distillation
    variants: str = "full,int8,int4,prune-0.5+int8,prune-0.5+int4"
    variant_policy: str = "gpu=int8,edge=prune-0.5+int4"
    hce_ensemble: str = ""
    diversity_weight: float = 0.5
    variant_distill_steps: int = 100
    fold_pruned: bool = True
    calibrate_variants: bool = True
    simulated_tiers: str = "gpu=3,edge=7"
    # Robustness tests: simulated partitions 0..count-1 attack ("sign-flip:2"), or none
    attack: str = ""
    # Lost-client tests: this share of simulated partitions fails each training round,
    # answering with an error ("error") or not within round-timeout ("silent")
    fail_fraction: float = 0.0
    fail_mode: str = "error"
    # per sample, leave out the clients farthest from the median: a count or a fraction
    teacher_trim: float = 0
    robust_start: str = "mean"  # FedEC's average: mean, median, trimmed-mean:<n>, clipped-mean
    # Layer-parallel training (ResNets): for clients and/or the server's distillation
    trainer: str = "sgd"
    distill_trainer: str = "adam"
    lp_stages: int = 2
    lp_method: str = "penalty"
    lp_downsample: int = 1
    lp_boundary_bits: int = 32
    lp_parallel_epochs: int = 1
    lp_serial_epochs: int = 1
    # Server-side evaluation and output
    results_dir: str = "results"
    run_name: str = ""
    resume: str = ""  # a run folder: go on from its last checkpoint
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], *, allow_retired: bool = False
    ) -> ExperimentConfig:
        """Parse and validate a Flower run-config mapping.

        Unknown keys are kept in :attr:`extra` (later strategies read their own
        knobs from there through their own typed configs) rather than rejected, so
        an app can carry keys of its own. A key fl-ec used to have
        (:data:`RETIRED_KEYS`) fails with what to use instead, since silently ignoring
        it would run something else than asked; ``allow_retired`` lets tools re-read
        the configs recorded by older runs.
        """
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if key in RETIRED_KEYS and not allow_retired:
                raise ConfigError(f"{key} no longer exists: {RETIRED_KEYS[key]}")
            if name in known:
                values[name] = _coerce(key, raw, known[name].type)
            else:
                extra[key] = raw
        config = cls(**values, extra=extra)
        config.validate()
        return config

    def start_rule(self) -> StartRule:
        """FedEC's rule for the student's start and the clients' next model."""
        try:
            return parse_start_rule(self.robust_start)
        except ValueError as err:
            raise ConfigError(f"robust-start: {err}") from None

    def attack_settings(self) -> tuple[str, int]:
        """The simulated attack and how many partitions run it (:func:`parse_attack`)."""
        return parse_attack(self.attack)

    def _validate_fedhce(self) -> None:
        """The FedHCE knobs, parsed by the code that uses them, and their cross-references."""
        from fl_ec.compression.variants import parse_variants
        from fl_ec.diversity import check_diversity_weight
        from fl_ec.strategies.fedhce_utils import check_variant_names, parse_tier_policy

        try:
            names = [v.name for v in parse_variants(self.variants)]
        except ValueError as err:
            raise ConfigError(f"variants={self.variants!r}: {err}") from None
        try:
            policy = parse_tier_policy(self.variant_policy, default=names[-1])
            check_variant_names("variant-policy", policy.by_tier.values(), names)
            check_variant_names("hce-ensemble", self.hce_ensemble_names(), names)
        except ValueError as err:  # the messages name the run-config key
            raise ConfigError(str(err)) from None
        with _settings_errors(diversity_weight="diversity-weight"):
            check_diversity_weight(self.diversity_weight)
        parse_tier_counts(self.simulated_tiers)

    def validate(self) -> None:
        """Raise :class:`ConfigError` with one actionable line for the first bad value."""
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("dataset", self.dataset, DATASETS)
        if not is_known_model(self.model):
            raise ConfigError(
                f"model={self.model!r} is unknown: choose cnn, resnet8, resnet20 "
                "(or any resnet<6n+2>, e.g. resnet56)"
            )
        _choice("partitioner", self.partitioner, PARTITIONERS)
        _choice("device", self.device, DEVICES)
        _choice("teacher-rule", self.teacher_rule, TEACHER_RULES)
        _choice("client-start", self.client_start, CLIENT_STARTS)
        _choice("calibration-nodes", self.calibration_nodes, CALIBRATION_NODES)
        try:
            method = self.calibration_settings().method
        except ValueError as reason:
            raise ConfigError(str(reason)) from None
        if method != "none" and self.strategy == "fedavg":
            raise ConfigError(
                f"calibration={self.calibration!r} is a FedEC step (it needs the server's "
                "proxy set or a query to the clients): for FedAvg + calibration set "
                'strategy="fedec", distill-steps=0, client-start="average"'
            )
        if self.proxy_per_round < 0:
            raise ConfigError(f"proxy-per-round={self.proxy_per_round} must be >= 0")
        self.distill_settings()
        self.variant_distill_settings()
        self._validate_fedhce()
        self.attack_settings()
        self.start_rule()
        try:
            check_trim(self.teacher_trim)
        except ValueError as err:
            raise ConfigError(f"teacher-trim: {err}") from None
        _choice("trainer", self.trainer, ("sgd", "layer-parallel"))
        _choice("distill-trainer", self.distill_trainer, ("adam", "layer-parallel"))
        self.lp_settings()  # checked whatever the trainers: a bad lp-* value fails every run
        uses_lp = "layer-parallel" in (self.trainer, self.distill_trainer)
        if uses_lp and not self.model.startswith("resnet"):
            raise ConfigError(
                f"layer-parallel training splits a ResNet at block boundaries: set "
                f'model="resnet20" (or another resnet<6n+2>), not {self.model!r}'
            )
        if not self.alpha > 0:
            raise ConfigError(
                f"alpha={self.alpha} must be > 0 (Dirichlet concentration; "
                "0.1 is very non-IID, 100 is nearly IID): set e.g. alpha=0.5"
            )
        _positive("num-server-rounds", self.num_server_rounds)
        _positive("local-epochs", self.local_epochs)
        _positive("batch-size", self.batch_size)
        _positive("classes-per-client", self.classes_per_client)
        _positive("lr", self.lr)
        _positive("min-available-nodes", self.min_available_nodes)
        _positive("round-timeout", self.round_timeout)
        _positive("min-train-replies", self.min_train_replies)
        _choice("fail-mode", self.fail_mode, FAIL_MODES)
        if not 0 <= self.fail_fraction < 1:
            raise ConfigError(
                f"fail-fraction={self.fail_fraction} must be in [0, 1): the share of "
                "simulated nodes that fail each training round"
            )
        for key, value in (
            ("proxy-size", self.proxy_size),
            ("validation-size", self.validation_size),
            ("train-subset", self.train_subset),
            ("client-threads", self.client_threads),
        ):
            if value < 0:
                raise ConfigError(f"{key}={value} must be >= 0")
        for key, value in (
            ("fraction-train", self.fraction_train),
            ("fraction-evaluate", self.fraction_evaluate),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}={value} must be within [0, 1]")
        if self.fraction_train == 0.0:
            raise ConfigError("fraction-train=0 trains no client: set it within (0, 1]")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum={self.momentum} must be within [0, 1)")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max-grad-norm={self.max_grad_norm} must be >= 0 (0 = no clipping)")

    def distill_settings(self) -> DistillSettings:
        """The server's distillation: the library's settings with ``distill-steps``."""
        with _settings_errors(steps="distill-steps"):
            return DistillSettings(steps=self.distill_steps)

    def variant_distill_settings(self) -> DistillSettings:
        """FedHCE's distillation of its variants: ``variant-distill-steps`` steps."""
        with _settings_errors(steps="variant-distill-steps"):
            return dataclasses.replace(self.distill_settings(), steps=self.variant_distill_steps)

    def lp_settings(self, **overrides: Any) -> LPSettings:
        """The layer-parallel trainer's settings, with ``overrides`` (LPSettings fields).

        The ``lp-*`` knobs, the clients' batch size, lr, momentum and seed, and no weight
        decay (as the clients' SGD).
        """
        values: dict[str, Any] = {name: getattr(self, source) for name, source in LP_FIELDS.items()}
        values["weight_decay"] = 0.0
        values.update(overrides)
        keys = {name: source.replace("_", "-") for name, source in LP_FIELDS.items()}
        with _settings_errors(**{k: v for k, v in keys.items() if k not in overrides}):
            return LPSettings(**values)

    def hce_ensemble_names(self) -> list[str]:
        """The variants named by ``hce-ensemble`` (empty: FedHCE's default members)."""
        return [name.strip() for name in self.hce_ensemble.split(",") if name.strip()]

    def calibration_settings(self) -> CalibrationSettings:
        """The ``calibration`` preset, with ``calibration-rounds`` and ``calibration-nodes``."""
        return CalibrationSettings.preset(
            self.calibration, rounds=self.calibration_rounds, nodes=self.calibration_nodes
        )

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping, as written to ``metrics.json`` for reproducibility."""
        out = {
            f.name.replace("_", "-"): getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "extra"
        }
        out.update(self.extra)
        return out


# What a resumed run may set differently from the run it continues.
RESUME_MAY_CHANGE = ("resume", "num-server-rounds", "round-timeout", "run-name", "results-dir")


def check_resumable(saved: Mapping[str, Any], config: ExperimentConfig) -> None:
    """``ConfigError`` naming each knob whose value differs from the checkpointed run's.

    A resumed run must be the run it continues: only the knobs in
    :data:`RESUME_MAY_CHANGE` (more rounds, a longer timeout) may change.
    """
    current = config.to_dict()
    # Knobs only one side has (added or retired since) are left out of the comparison.
    changed = [
        f"{key} ({saved[key]!r} -> {current[key]!r})"
        for key in sorted(set(saved) & set(current))
        if key not in RESUME_MAY_CHANGE and saved[key] != current[key]
    ]
    if changed:
        raise ConfigError(
            "resume: the run-config differs from the checkpointed run's in "
            f"{', '.join(changed)}; set them back (only {', '.join(RESUME_MAY_CHANGE[1:])} "
            "may change)"
        )


@dataclass(frozen=True)
class NodeSettings:
    """What a ClientApp learns from its node's ``node_config``.

    ``partition-id``/``num-partitions`` are set by the simulation engine, or by
    ``flower-supernode --node-config`` in a deployment. The capability knobs let a
    simulated node pretend to be a GPU box or an edge device; they are optional.
    """

    partition_id: int
    num_partitions: int
    device_tier: str = ""
    memory_mb: float = 0.0
    speed: float = 0.0

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        try:
            partition_id = int(node_config["partition-id"])
            num_partitions = int(node_config["num-partitions"])
        except KeyError as err:
            raise ConfigError(
                f"node_config lacks {err.args[0]!r}: start the SuperNode with "
                '--node-config "partition-id=0 num-partitions=N"'
            ) from None
        except (TypeError, ValueError):
            raise ConfigError("node_config partition-id/num-partitions must be integers") from None
        if num_partitions <= 0 or not 0 <= partition_id < num_partitions:
            raise ConfigError(
                f"node_config partition-id={partition_id} must be within "
                f"[0, num-partitions={num_partitions})"
            )
        return cls(
            partition_id=partition_id,
            num_partitions=num_partitions,
            device_tier=str(node_config.get("device-tier", "")),
            memory_mb=float(node_config.get("memory-mb", 0.0)),
            speed=float(node_config.get("speed", 0.0)),
        )


def _coerce(key: str, raw: Any, annotation: Any) -> Any:
    """Convert a run-config value to the field's declared type, or fail readably."""
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
                return raw.lower() in ("true", "1")
            if isinstance(raw, int | float) and raw in (0, 1):
                return bool(raw)
            raise ValueError
        if kind == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if kind == "str":
            return str(raw)
    except (TypeError, ValueError):
        pass
    else:
        return raw
    raise ConfigError(f"run-config {key}={raw!r} is not a valid {kind}")


def parse_attack(text: str) -> tuple[str, int]:
    """``"sign-flip:2"`` -> (attack, number of attacking partitions); ``""`` -> no attack."""
    from fl_ec.clients.attacks import ATTACKS

    if not text.strip():
        return "", 0
    name, _, count = text.strip().partition(":")
    if name not in ATTACKS or not count.isdigit() or int(count) < 1:
        raise ConfigError(
            f"attack={text!r} must look like kind:count with kind one of "
            f'{", ".join(ATTACKS)} (e.g. "sign-flip:2"), or be empty'
        )
    return name, int(count)


def parse_tier_counts(text: str, num_partitions: int | None = None) -> list[str]:
    """``"gpu=3,edge=7"`` -> the tier of each partition id, in order (simulation).

    The counts are shares: with ``num_partitions`` other than their sum they scale to
    it (``"gpu=3,edge=7"`` on 20 nodes: 6 gpu, 14 edge), so one setting fits a
    federation of any size.
    """
    tiers: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        tier, sep, count = part.partition("=")
        if not sep or not tier.strip() or not count.strip().isdigit():
            raise ConfigError(f"simulated-tiers entry {part!r} must look like tier=count")
        tiers += [tier.strip()] * int(count)
    if text.strip() and not tiers:
        raise ConfigError(f"simulated-tiers={text!r} names no node: give a count above 0")
    if tiers and num_partitions is not None and len(tiers) != num_partitions:
        tiers = [tiers[i * len(tiers) // num_partitions] for i in range(num_partitions)]
    return tiers


@contextmanager
def _settings_errors(**keys: str) -> Iterator[None]:
    """Re-raise a settings object's :class:`SettingError` as a :class:`ConfigError`.

    ``keys`` maps the settings' field names to the run-config keys that set them; an
    error in a field set elsewhere keeps the settings' own message.
    """
    try:
        yield
    except SettingError as err:
        key = keys.get(err.field)
        raise ConfigError(f"{key}={err.value!r} {err.reason}" if key else str(err)) from None


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is unknown: choose one of {', '.join(options)}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value} must be > 0")
