"""What a node trains and how a simulated node misbehaves: the clients' run-config sections.

* :class:`TrainingSection` -- the model and each client's local training (the server
  builds the model from ``model`` and evaluates on ``device`` too);
* :class:`SimulationSection` -- the knobs only simulated nodes obey: device tiers,
  attacks and failures (a deployed SuperNode ignores them);
* :class:`NodeSettings` -- what a ClientApp learns from its node's ``node_config``.

Each section checks its own values when it is built; :class:`~fl_ec.config.ExperimentConfig`
names the run-config key of a bad one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fl_ec.clients.attacks import ATTACKS
from fl_ec.errors import ConfigError, SettingError, check_fields, one_of
from fl_ec.models.spec import is_known_model

DEVICES = ("auto", "cpu", "cuda")  # fl_ec.training.select_device
TRAINERS = ("sgd", "layer-parallel")  # the clients' local trainer
FAIL_MODES = ("error", "silent")  # how a simulated node fails (fl_ec.clients.faults)


@dataclass(frozen=True)
class TrainingSection:
    """Run-config keys ``model`` ... ``client-threads`` and ``trainer``.

    Each client trains ``local_epochs`` epochs of SGD (no weight decay) on its
    partition, its gradient norm clipped to ``max_grad_norm`` (0: no clipping), with
    ``client_threads`` torch threads (0: torch's default); ``trainer="layer-parallel"``
    trains a ResNet with the layer-parallel trainer instead. ``model_width`` scales the
    model's default channel widths (0.5: half the channels, about a quarter of the
    parameters), for every node and the server alike.
    """

    model: str = "cnn"
    model_width: float = 1.0
    local_epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    max_grad_norm: float = 10.0
    device: str = "auto"
    client_threads: int = 0
    trainer: str = "sgd"

    def __post_init__(self) -> None:
        check_fields(
            self,
            [
                (
                    "model",
                    is_known_model(self.model),
                    "is unknown: choose cnn, resnet8, resnet20 (or any resnet<6n+2>, e.g. "
                    "resnet56)",
                ),
                ("model_width", 0 < self.model_width <= 4, "must be within (0, 4]"),
                ("local_epochs", self.local_epochs > 0, "must be > 0"),
                ("batch_size", self.batch_size > 0, "must be > 0"),
                ("lr", self.lr > 0, "must be > 0"),
                ("momentum", 0.0 <= self.momentum < 1.0, "must be within [0, 1)"),
                ("max_grad_norm", self.max_grad_norm >= 0, "must be >= 0 (0 = no clipping)"),
                ("device", self.device in DEVICES, one_of(DEVICES)),
                ("client_threads", self.client_threads >= 0, "must be >= 0 (0: torch's default)"),
                ("trainer", self.trainer in TRAINERS, one_of(TRAINERS)),
            ],
        )


@dataclass(frozen=True)
class SimulationSection:
    """Run-config keys ``simulated-tiers``, ``attack``, ``fail-fraction``, ``fail-mode``.

    Simulation only: the device tier of each simulated partition
    (:func:`parse_tier_counts`), the partitions that attack (:func:`parse_attack`), and
    the share of partitions that fail each training round and how
    (:mod:`fl_ec.clients.faults`).
    """

    simulated_tiers: str = "gpu=3,edge=7"
    attack: str = ""
    fail_fraction: float = 0.0
    fail_mode: str = "error"

    def __post_init__(self) -> None:
        parse_tier_counts(self.simulated_tiers)
        parse_attack(self.attack)
        check_fields(
            self,
            [
                (
                    "fail_fraction",
                    0 <= self.fail_fraction < 1,
                    "must be in [0, 1): the share of simulated nodes that fail each "
                    "training round",
                ),
                ("fail_mode", self.fail_mode in FAIL_MODES, one_of(FAIL_MODES)),
            ],
        )

    def attack_settings(self) -> tuple[str, int]:
        """The simulated attack and how many partitions run it (:func:`parse_attack`)."""
        return parse_attack(self.attack)


def parse_attack(text: str) -> tuple[str, int]:
    """``"sign-flip:2"`` -> (attack, number of attacking partitions); ``""`` -> no attack."""
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


@dataclass(frozen=True)
class NodeSettings:
    """What a ClientApp learns from its node's ``node_config``.

    A node trains on one of two sources. ``partition-id`` of ``num-partitions``: its
    slice of the run's benchmark dataset (set by the simulation engine, or by
    ``flower-supernode --node-config``). ``data-dir``: exactly the examples in that
    folder (:mod:`fl_ec.data.local_folder`); such a node needs no partition keys, and a
    ``partition-id`` it is given only names it to the server (seeded sampling orders
    nodes by it). The capability knobs let a simulated node pretend to be a GPU box or
    an edge device; they are optional.
    """

    partition_id: int | None = None
    num_partitions: int | None = None
    data_dir: str = ""
    device_tier: str = ""
    memory_mb: float = 0.0
    speed: float = 0.0

    def __post_init__(self) -> None:
        pid, num = self.partition_id, self.num_partitions
        check_fields(
            self,
            [
                (
                    "partition_id",
                    bool(self.data_dir) or (pid is not None and num is not None),
                    "(and num-partitions) must be set when there is no data-dir: start the "
                    "SuperNode with --node-config 'partition-id=0 num-partitions=N' (its "
                    "benchmark partition) or 'data-dir=\"/path\"' (its own data)",
                ),
                ("partition_id", pid is None or pid >= 0, "must be >= 0"),
                ("num_partitions", num is None or num > 0, "must be > 0"),
                (
                    "partition_id",
                    pid is None or num is None or pid < num,
                    f"must be within [0, num-partitions={num})",
                ),
            ],
        )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        """Parse ``node_config``; :class:`ConfigError` says what the SuperNode must set."""
        try:
            partition_id, num_partitions = (
                None if node_config.get(key) is None else int(node_config[key])
                for key in ("partition-id", "num-partitions")
            )
            memory_mb, speed = (float(node_config.get(k, 0.0)) for k in ("memory-mb", "speed"))
        except (TypeError, ValueError):
            raise ConfigError(
                "node_config partition-id/num-partitions must be integers, memory-mb/speed "
                "numbers"
            ) from None
        try:
            return cls(
                partition_id=partition_id,
                num_partitions=num_partitions,
                data_dir=str(node_config.get("data-dir", "")).strip(),
                device_tier=str(node_config.get("device-tier", "")),
                memory_mb=memory_mb,
                speed=speed,
            )
        except SettingError as err:  # named as the SuperNode's --node-config spells it
            key = err.field.replace("_", "-")
            raise ConfigError(f"node_config {key}={err.value!r} {err.reason}") from None
