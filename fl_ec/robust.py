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

    def fold(self, expanded: Sequence[State], weights: Sequence[float], base: State) -> State:
        """:meth:`combine` over states of different widths (FedHCE's pruned variants).

        ``expanded`` are the states in full-model coordinates, NaN where a client's
        pruned model has no coordinate (:func:`fl_ec.compression.expand_to_full`):
        each coordinate combines the clients that hold it, by this rule; one that no
        client holds, and every integer buffer, keeps ``base``'s value.
        """
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


def _fold_per_key(
    expanded: Sequence[State],
    base: State,
    floating: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor],
) -> State:
    """``floating(stacked, count, key)`` for each floating key of ``base``.

    ``stacked`` holds the clients' values ``(U, ...)``, NaN where a client lacks the
    coordinate; ``count`` is how many clients hold each one. Coordinates nobody holds
    keep ``base``'s value, and so do integer buffers.
    """
    out: State = {}
    for key, reference in base.items():
        if not reference.is_floating_point():
            out[key] = reference.clone()
            continue
        stacked = torch.stack([s[key].to(reference.dtype) for s in expanded])
        count = (~stacked.isnan()).sum(0)
        out[key] = torch.where(count > 0, floating(stacked, count, key), reference)
    return out


def _ordered(stacked: torch.Tensor) -> torch.Tensor:
    """Values sorted along the clients' dim, absent ones (NaN) last."""
    return stacked.sort(0).values  # torch sorts NaN above every number


def _at(ordered: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``ordered[index[c], c]`` for every coordinate ``c``."""
    index = index.clamp(0, ordered.shape[0] - 1).unsqueeze(0)
    return ordered.gather(0, index).squeeze(0)


def _median_of_present(ordered: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (_at(ordered, (count - 1).clamp_min(0) // 2) + _at(ordered, count // 2)) / 2


def _column(weights: Sequence[float], stacked: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(weights), dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))


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

    def fold(self, expanded: Sequence[State], weights: Sequence[float], base: State) -> State:
        def mean(stacked: torch.Tensor, count: torch.Tensor, key: str) -> torch.Tensor:
            present = (~stacked.isnan()).to(stacked.dtype) * _column(weights, stacked)
            return (stacked.nan_to_num(0.0) * present).sum(0) / present.sum(0).clamp_min(1e-12)

        return _fold_per_key(expanded, base, mean)


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

    def fold(self, expanded: Sequence[State], weights: Sequence[float], base: State) -> State:
        return _fold_per_key(
            expanded, base, lambda stacked, count, key: _median_of_present(_ordered(stacked), count)
        )


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

    def fold(self, expanded: Sequence[State], weights: Sequence[float], base: State) -> State:
        def trimmed(stacked: torch.Tensor, count: torch.Tensor, key: str) -> torch.Tensor:
            ordered = _ordered(stacked)
            if self.trim >= 1:
                cut = torch.full_like(count, int(self.trim))
            else:  # each coordinate trims its share of the clients that hold it
                cut = (count * self.trim + 1e-9).floor().to(count.dtype)
            rank = torch.arange(ordered.shape[0]).view(-1, *[1] * (ordered.dim() - 1))
            keep = ((rank >= cut) & (rank < count - cut)).to(ordered.dtype)
            mean = (ordered.nan_to_num(0.0) * keep).sum(0) / keep.sum(0).clamp_min(1)
            # Too few holders to trim: their median, as combine() does.
            return torch.where(count <= 2 * cut, _median_of_present(ordered, count), mean)

        return _fold_per_key(expanded, base, trimmed)


@dataclass(frozen=True)
class ClippedMean(StartRule):
    """The weighted mean of updates clipped to the median update norm, weights capped.

    Without a previous model (nothing to measure updates from) it is the mean of the
    models clipped in norm the same way.
    """

    name: ClassVar[str] = "clipped-mean"
    weight_cap: float = 2.0  # times the median weight

    def _clipping(
        self, updates: Sequence[State], weights: Sequence[float]
    ) -> tuple[list[float], list[float]]:
        """Each update's scale down to the median update norm, and the capped weights.

        Absent coordinates (NaN, in :meth:`fold`) count as no change in a norm.
        """
        norms = torch.stack(
            [
                torch.sqrt(sum(u.double().nan_to_num(0.0).pow(2).sum() for u in update.values()))
                for update in updates
            ]
        )
        bound = norms.median()
        cap = self.weight_cap * float(torch.tensor(list(weights)).median())
        scales = [float(min(1.0, bound / norm)) if norm > 0 else 1.0 for norm in norms]
        return scales, [min(w, cap) for w in weights]

    def combine(
        self, states: Sequence[State], weights: Sequence[float], previous: State | None
    ) -> State:
        keys = [k for k, v in states[0].items() if v.is_floating_point()]
        base = previous or {k: torch.zeros_like(states[0][k]) for k in keys}
        updates = [{k: s[k].to(base[k].dtype) - base[k] for k in keys} for s in states]
        scales, capped = self._clipping(updates, weights)
        total = sum(capped)
        out: State = {}
        for key, reference in states[0].items():
            if not reference.is_floating_point():
                out[key] = _integer_mean([s[key] for s in states], capped)
                continue
            acc = base[key].clone()
            for update, scale, weight in zip(updates, scales, capped, strict=True):
                acc += update[key] * (scale * weight / total)
            out[key] = acc
        return out

    def fold(self, expanded: Sequence[State], weights: Sequence[float], base: State) -> State:
        keys = [k for k, v in base.items() if v.is_floating_point()]
        updates = [{k: s[k].to(base[k].dtype) - base[k] for k in keys} for s in expanded]
        scales, capped = self._clipping(updates, weights)

        def clipped(stacked: torch.Tensor, count: torch.Tensor, key: str) -> torch.Tensor:
            update = stacked - base[key]
            present = (~update.isnan()).to(update.dtype) * _column(capped, update)
            scaled = update.nan_to_num(0.0) * _column(scales, update)
            return base[key] + (scaled * present).sum(0) / present.sum(0).clamp_min(1e-12)

        return _fold_per_key(expanded, base, clipped)


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
