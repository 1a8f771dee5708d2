"""Label-prior correction (fl_ec.calibration): pure logic, no Flower."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl_ec.calibration import (
    classifier_of,
    correct_prior,
    model_logits,
    prior_offsets,
    target_prior,
)
from fl_ec.models import ArchSpec, build_model
from fl_ec.scoring import accuracy


def test_offsets_make_the_mean_prediction_match_the_prior():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 5, generator=generator) + torch.tensor([3.0, 0, 0, -2.0, 0])
    prior = torch.tensor([0.1, 0.2, 0.2, 0.3, 0.2])
    correction = prior_offsets(logits, prior)
    predicted = torch.softmax(logits + correction.offsets, 1).mean(0)
    assert torch.allclose(predicted, prior, atol=1e-3)
    assert correction.max_prior_error <= 1e-3
    # The over-predicted class loses logit mass, the suppressed one gains it.
    assert correction.offsets[0] < 0 < correction.offsets[3]


def test_a_model_already_matching_the_prior_is_left_alone():
    logits = torch.eye(4).repeat(50, 1) * 5  # every class predicted equally often
    correction = prior_offsets(logits, torch.full((4,), 0.25))
    assert correction.offsets.abs().max() < 1e-6


def test_correction_recovers_accuracy_lost_to_a_class_bias():
    # Balanced classes, informative logits, plus the kind of bias a skewed average has.
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(10).repeat(300)
    clean = 3.0 * nn.functional.one_hot(labels, 10).float()
    clean += torch.randn(clean.shape, generator=generator)
    biased = clean + torch.linspace(-2.5, 2.5, 10)
    proxy, test = slice(0, 1500), slice(1500, None)  # matched on one half, scored on the other
    correction = prior_offsets(biased[proxy], torch.full((10,), 0.1))

    def held_out(logits: torch.Tensor) -> float:
        return accuracy(logits[test], labels[test])

    assert held_out(biased) < held_out(clean) - 0.1
    assert held_out(biased + correction.offsets) > held_out(clean) - 0.02


def test_correct_prior_shifts_the_classifier_bias_by_the_offsets():
    torch.manual_seed(0)
    model = build_model(ArchSpec("cnn", (1, 28, 28), 10))
    inputs = torch.randn(64, 1, 28, 28)
    before = model_logits(model, inputs)
    correction = correct_prior(model, inputs, torch.full((10,), 0.1))
    after = model_logits(model, inputs)
    assert torch.allclose(after, before + correction.offsets, atol=1e-4)
    assert torch.allclose(torch.softmax(after, 1).mean(0), torch.full((10,), 0.1), atol=1e-3)


def test_target_prior_pools_smooths_and_rejects_bad_counts():
    prior = target_prior([[3, 0, 1], [1, 0, 1]], smoothing=1.0)
    assert torch.allclose(prior, torch.tensor([5.0, 1.0, 3.0], dtype=torch.float64) / 9)
    with pytest.raises(ValueError, match="non-negative"):
        target_prior([[1, -1]])


def test_models_without_a_biased_linear_head_get_a_clear_error():
    with pytest.raises(ValueError, match='calibration="none"'):
        classifier_of(nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False)))
    with pytest.raises(ValueError, match="do not match"):
        prior_offsets(torch.zeros(3, 4), torch.full((3,), 1 / 3))


def test_paired_z_counts_only_the_samples_the_two_disagree_on():
    from fl_ec.calibration import paired_z

    reference = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    candidate = torch.tensor([0, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    # reference alone right on 2 samples, candidate alone on 1: (2 - 1) / sqrt(3)
    assert paired_z(reference, candidate) == pytest.approx(1 / 3**0.5)
    assert paired_z(candidate, reference) == pytest.approx(-1 / 3**0.5)
    assert paired_z(reference, reference) == 0.0
    with pytest.raises(ValueError, match="same samples"):
        paired_z(reference, candidate[:4])
