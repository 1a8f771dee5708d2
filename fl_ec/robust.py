"""Rules for averaging client models into one: the plain weighted mean and robust ones.

FedEC builds two models from the round's replies with one of these rules: the
student's start (what distillation starts from, and with ``distill-steps=0`` the model
served) and, under ``client-start="average"``, what the next round's clients train
from. The weighted mean is ``FedAvg``'s; a few well-formed but malicious replies
(sign-flipped, scaled, random weights) move it anywhere. The robust rules bound what
a minority can do:

* :class:`CoordinateMedian` -- each coordinate's median over the clients;
* :class:`TrimmedMean` -- each coordinate's mean after dropping the ``trim`` largest
  and ``trim`` smallest values (``trim`` = the number of attackers tolerated, or a
  fraction of the round's clients: :func:`trim_count`);
* :class:`ClippedMean` -- each client's update (its model minus the previous global
  model) clipped to the median update norm, and each self-reported weight capped at
  twice the median weight, then averaged by weight.

The coordinate-wise rules are unweighted: a self-reported ``num-examples`` is exactly
what an attacker would inflate. Integer buffers (BatchNorm's ``num_batches_tracked``)
take the weighted mean, rounded, under every rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

State = dict[str, torch.Tensor]


def check_trim(trim: float) -> None:
    """``ValueError`` unless ``trim`` is 0, a whole number of clients, or a fraction in (0, 1)."""
    if not (trim == 0 or 0 < trim < 1 or (trim >= 1 and float(trim).is_integer())):
        raise ValueError(
            f"trim {trim:g} is neither a number of clients (1, 2, ...) nor a fraction of "
            "them (0 < trim < 1)"
        )


def trim_count(trim: float, members: int) -> int:
    """How many of ``members`` a trim stands for: ``trim`` itself if >= 1, else that
    fraction of them, rounded down (a fraction tolerates as many attackers as the
    round has clients for, whether a round samples 5 of them or 50)."""
    check_trim(trim)
    # The epsilon keeps e.g. 0.29 x 100 (28.999...) from rounding down to 28.
    return int(trim) if trim >= 1 else int(trim * members + 1e-9)


class StartRule:
    """One way to combine client states ``states`` (same keys and shapes) into one."""

    name: ClassVar[str]

    def combine(
        self, states: Sequence[State], weights: Sequence[float], previous: State | None
    ) -> State:
        """The combined state; ``previous`` is the last global model (None if unknown)."""
        raise NotImplementedError


def _integer_mean(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = sum(weights)
    acc = sum(v.to(torch.float64) * (w / total) for v, w in zip(values, weights, strict=True))
    return acc.round().to(values[0].dtype)  # type: ignore[union-attr]


def _per_key(
    states: Sequence[State],
    weights: Sequence[float],
    floating: Callable[[list[torch.Tensor]], torch.Tensor],
) -> State:
    """``floating(values)`` for each floating key (the clients' tensors, cast to the
    first one's dtype); integer keys take the weighted mean, rounded."""
    out: State = {}
    for key, reference in states[0].items():
        values = [s[key] for s in states]
        if not reference.is_floating_point():
            out[key] = _integer_mean(values, weights)
        else:
            out[key] = floating([v.to(reference.dtype) for v in values])
    return out


@dataclass(frozen=True)
class WeightedMean(StartRule):
    """``FedAvg``'s example-weighted mean, arithmetic step for step (bit for bit)."""

    name: ClassVar[str] = "mean"

    def combine(
        self, states: Sequence[State], weights: Sequence[float], previous: State | None
    ) -> State:
        total = sum(weights)

        def mean(values: list[torch.Tensor]) -> torch.Tensor:
            # Accumulated in reply order, as FedAvg does: a last-bit difference would
            # grow through the clients' local epochs into another trajectory.
            acc = values[0] * (weights[0] / total)
            for value, weight in zip(values[1:], weights[1:], strict=True):
                acc += value * (weight / total)
            return acc

        return _per_key(states, weights, mean)


@dataclass(frozen=True)
class CoordinateMedian(StartRule):
    """Each coordinate's median over the clients (the mean of the two middle values)."""

    name: ClassVar[str] = "median"

    def combine(
        self, states: Sequence[State], weights: Sequence[float], previous: State | None
    ) -> State:
        def median(values: list[torch.Tensor]) -> torch.Tensor:
            ordered = torch.stack(values).sort(0).values
            k = ordered.shape[0]
            return (ordered[(k - 1) // 2] + ordered[k // 2]) / 2

        return _per_key(states, weights, median)


@dataclass(frozen=True)
class TrimmedMean(StartRule):
    """Each coordinate's mean without its ``trim`` largest and ``trim`` smallest values.

    ``trim``: a number of clients per side, or a fraction of the round's clients
    (:func:`trim_count`). With ``2 * trim`` clients or fewer nothing would be left: the
    median is taken.
    """

    name: ClassVar[str] = "trimmed-mean"
    trim: float = 1

    def __post_init__(self) -> None:
        check_trim(self.trim)
        if self.trim <= 0:
            raise ValueError("trimmed-mean needs a trim > 0 (a count or a fraction)")

    def combine(
        self, states: Sequence[State], weights: Sequence[float], previous: State | None
    ) -> State:
        count = trim_count(self.trim, len(states))
        if len(states) <= 2 * count:
            return CoordinateMedian().combine(states, weights, previous)

        def trimmed(values: list[torch.Tensor]) -> torch.Tensor:
            ordered = torch.stack(values).sort(0).values
            return ordered[count : ordered.shape[0] - count].mean(0)

        return _per_key(states, weights, trimmed)


@dataclass(frozen=True)
class ClippedMean(StartRule):
    """The weighted mean of updates clipped to the median update norm, weights capped.

    Without a previous model (nothing to measure updates from) it is the mean of the
    models clipped in norm the same way.
    """

    name: ClassVar[str] = "clipped-mean"
    weight_cap: float = 2.0  # times the median weight

    def combine(
        self, states: Sequence[State], weights: Sequence[float], previous: State | None
    ) -> State:
        keys = [k for k, v in states[0].items() if v.is_floating_point()]
        base = previous or {k: torch.zeros_like(states[0][k]) for k in keys}
        updates = [{k: s[k].to(base[k].dtype) - base[k] for k in keys} for s in states]
        norms = torch.stack(
            [torch.sqrt(sum(u[k].double().pow(2).sum() for k in keys)) for u in updates]
        )
        bound = norms.median()
        cap = self.weight_cap * float(torch.tensor(list(weights)).median())
        capped = [min(w, cap) for w in weights]
        total = sum(capped)
        out: State = {}
        for key, reference in states[0].items():
            if not reference.is_floating_point():
                out[key] = _integer_mean([s[key] for s in states], capped)
                continue
            acc = base[key].clone()
            for update, norm, weight in zip(updates, norms, capped, strict=True):
                scale = float(min(1.0, bound / norm)) if norm > 0 else 1.0
                acc += update[key] * (scale * weight / total)
            out[key] = acc
        return out


START_RULES = ("mean", "median", "trimmed-mean:<n or fraction>", "clipped-mean")


def parse_start_rule(text: str) -> StartRule:
    """``mean``, ``median``, ``trimmed-mean:2``, ``trimmed-mean:0.2`` or ``clipped-mean``.

    ``ValueError`` for anything else.
    """
    name, _, argument = text.strip().partition(":")
    if name == "trimmed-mean" and argument:
        try:
            return TrimmedMean(float(argument))
        except ValueError as err:
            raise ValueError(f"robust start rule {text!r}: {err}") from None
    simple = {"mean": WeightedMean, "median": CoordinateMedian, "clipped-mean": ClippedMean}
    if name in simple and not argument:
        return simple[name]()
    raise ValueError(
        f"robust start rule {text!r} is unknown: choose one of {', '.join(START_RULES)}"
    )
