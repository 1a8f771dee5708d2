"""Start rules: the weighted mean is FedAvg's; robust rules bound what a minority can do."""

from __future__ import annotations

import pytest
import torch

from fl_ec.robust import (
    ClippedMean,
    CoordinateMedian,
    TrimmedMean,
    WeightedMean,
    parse_start_rule,
    trim_count,
)


def _states(values):
    return [
        {"w": torch.tensor([v, 2 * v]), "n": torch.tensor(3, dtype=torch.int64)} for v in values
    ]


def test_the_weighted_mean_weights_by_examples_and_rounds_integer_buffers():
    out = WeightedMean().combine(_states([1.0, 4.0]), [3.0, 1.0], None)
    assert torch.allclose(out["w"], torch.tensor([1.75, 3.5]))
    assert out["n"].dtype == torch.int64 and out["n"].item() == 3


@pytest.mark.parametrize(
    ("rule", "expected"),
    [(CoordinateMedian(), 1.5), (TrimmedMean(1), 1.5), (TrimmedMean(2), 1.5)],
)
def test_a_scaled_attacker_does_not_move_coordinatewise_rules(rule, expected):
    honest = [1.0, 1.0, 2.0, 2.0]
    out = rule.combine(_states(honest + [1e6]), [1.0] * 5, None)
    mean = WeightedMean().combine(_states(honest + [1e6]), [1.0] * 5, None)
    assert out["w"][0].item() == pytest.approx(expected, abs=0.5)
    assert mean["w"][0].item() > 1e5


def test_the_clipped_mean_bounds_a_boosted_update_and_an_inflated_weight():
    previous = {"w": torch.zeros(2), "n": torch.tensor(3)}
    states = _states([1.0, 1.0, 1.0, -1000.0])
    out = ClippedMean().combine(states, [10.0, 10.0, 10.0, 1e6], previous)
    # The attacker's update is clipped to norm |(1, 2)| and its weight to 20 of 50.
    assert out["w"][0].item() == pytest.approx((30 - 20) / 50)


def test_start_rules_parse_from_the_run_config():
    assert parse_start_rule("trimmed-mean:2") == TrimmedMean(2)
    assert parse_start_rule("trimmed-mean:0.2") == TrimmedMean(0.2)
    assert isinstance(parse_start_rule("median"), CoordinateMedian)
    with pytest.raises(ValueError, match="unknown"):
        parse_start_rule("trimmed-mean")
    with pytest.raises(ValueError, match="number of clients"):
        parse_start_rule("trimmed-mean:1.5")
    with pytest.raises(ValueError, match="trim > 0"):
        TrimmedMean(0)


def test_a_trim_is_a_number_of_clients_or_a_fraction_of_them():
    assert trim_count(2, 10) == trim_count(2, 50) == 2
    assert trim_count(0.2, 10) == 2 and trim_count(0.2, 50) == 10
    assert trim_count(0.29, 100) == 29  # not 28 from 28.999...
    assert trim_count(0.1, 5) == 0 and trim_count(0, 10) == 0
    for bad in (-1, 1.5, 2.5):
        with pytest.raises(ValueError, match="number of clients"):
            trim_count(bad, 10)


def test_a_fractional_trim_drops_that_share_of_the_clients_per_side():
    values = [-1e6, -1e6, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 1e6, 1e6]
    out = TrimmedMean(0.2).combine(_states(values), [1.0] * 10, None)
    assert out["w"][0].item() == pytest.approx(2.0)  # the six middle values


def _expanded(values, absent=()):
    """Full-coordinate states; the clients in ``absent`` lack coordinate 1 (pruned)."""
    states = _states(values)
    for i in absent:
        states[i]["w"] = torch.tensor([values[i], float("nan")])
    return states


@pytest.mark.parametrize("rule", [CoordinateMedian(), TrimmedMean(1), TrimmedMean(0.2)])
def test_folding_is_combining_when_every_client_holds_every_coordinate(rule):
    states = _states([1.0, 3.0, -2.0, 7.0, 1e6])
    base = {"w": torch.zeros(2), "n": torch.tensor(5)}
    folded = rule.fold(states, [1.0] * 5, base)
    assert torch.allclose(folded["w"], rule.combine(states, [1.0] * 5, None)["w"])
    assert folded["n"].item() == 5  # integer buffers keep the base's


@pytest.mark.parametrize("rule", [CoordinateMedian(), TrimmedMean(1), ClippedMean()])
def test_a_folded_coordinate_combines_only_the_clients_that_hold_it(rule):
    # Five clients; two pruned ones lack coordinate 1; one full-size client attacks.
    states = _expanded([1.0, 1.5, 2.0, 1.0, 1e6], absent=(1, 3))
    base = {"w": torch.zeros(2), "n": torch.tensor(5)}
    folded = rule.fold(states, [1.0] * 5, base)["w"]
    mean = WeightedMean().fold(states, [1.0] * 5, base)["w"]
    assert mean[0].item() > 1e5 and mean[1].item() > 1e5  # the plain fold is dragged off
    assert torch.isfinite(folded).all() and folded.abs().max().item() < 10, rule
    # Coordinate 0: all five hold it; coordinate 1: clients 0, 2 and 4 (2.0, 4.0, 2e6).
    if isinstance(rule, CoordinateMedian):
        assert folded.tolist() == pytest.approx([1.5, 4.0])


def test_a_coordinate_no_client_holds_keeps_the_base_value():
    states = _expanded([1.0, 2.0], absent=(0, 1))
    base = {"w": torch.tensor([9.0, 9.0]), "n": torch.tensor(1)}
    for rule in (WeightedMean(), CoordinateMedian(), TrimmedMean(1), ClippedMean()):
        assert rule.fold(states, [1.0, 1.0], base)["w"][1].item() == 9.0
