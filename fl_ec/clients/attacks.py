"""Simulated Byzantine clients: what a malicious node sends instead of its honest model.

For robustness tests and benchmarks only. The run-config's ``attack="kind:N"`` makes
the simulated partitions ``0 .. N-1`` attack with ``kind`` (one object per kind below,
parsed by :func:`fl_ec.clients.settings.parse_attack`); a deployed SuperNode never
attacks, whatever the run-config says (:func:`attack_for`). Each attack keeps the
reply well-formed (finite arrays of the right shapes, honest class counts and example
counts), so that it passes every check of :mod:`fl_ec.strategies.replies` and only
robust aggregation can stop it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from fl_ec.data.federated import ClientData


class Attack:
    """An attack's two hooks: the labels it trains on and the weights it sends."""

    name: ClassVar[str]

    def labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The labels the node trains on (honest by default)."""
        return labels

    def training_data(self, data: ClientData) -> ClientData:
        """``data`` with its training labels replaced by :meth:`labels` of them."""
        labels = self.labels(data.train.labels, data.train.num_classes)
        return dataclasses.replace(data, train=dataclasses.replace(data.train, labels=labels))

    def poison(self, model: nn.Module, sent: dict[str, torch.Tensor], seed: int) -> None:
        """Replace ``model``'s trained weights (in place) with what the node sends.

        ``sent`` is the model the server sent this round.
        """


@dataclass(frozen=True)
class SignFlip(Attack):
    """Sends every floating weight negated: the update points away from the model."""

    name: ClassVar[str] = "sign-flip"

    def poison(self, model: nn.Module, sent: dict[str, torch.Tensor], seed: int) -> None:
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if value.is_floating_point() and "running_var" not in key:
                    value.neg_()


@dataclass(frozen=True)
class Scale(Attack):
    """Sends its weights multiplied by ``factor`` (a boosted model)."""

    name: ClassVar[str] = "scale"
    factor: float = 100.0

    def poison(self, model: nn.Module, sent: dict[str, torch.Tensor], seed: int) -> None:
        with torch.no_grad():
            for value in model.state_dict().values():
                if value.is_floating_point():
                    value.mul_(self.factor)


@dataclass(frozen=True)
class RandomWeights(Attack):
    """Sends Gaussian noise with each tensor's own mean and spread."""

    name: ClassVar[str] = "random"

    def poison(self, model: nn.Module, sent: dict[str, torch.Tensor], seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if value.is_floating_point() and "running_var" not in key:
                    noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
                    value.copy_(value.mean() + value.std(unbiased=False) * noise)


@dataclass(frozen=True)
class LabelFlip(Attack):
    """Trains honestly on flipped labels (class ``c`` becomes ``C - 1 - c``)."""

    name: ClassVar[str] = "label-flip"

    def labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return num_classes - 1 - labels


ATTACKS: dict[str, Attack] = {
    attack.name: attack for attack in (SignFlip(), Scale(), RandomWeights(), LabelFlip())
}


def attack_for(partition_id: int, attackers: int, attack: str, simulation: bool) -> Attack | None:
    """The attack of simulated partition ``partition_id``, or None for an honest node."""
    if not simulation or partition_id >= attackers:
        return None
    return ATTACKS[attack]
