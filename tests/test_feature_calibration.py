"""Classifier calibration from pooled class-conditional feature statistics (no Flower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fl_ec.calibration import (
    CalibrationSettings,
    ClassFeatureStats,
    ClassifierGaussian,
    classifier_inputs,
)
from fl_ec.scoring import accuracy

GAUSSIAN = ClassifierGaussian()  # calibration="classifier"


class TwoLayer(nn.Module):
    """features = relu(fc1(x)); classifier on top: the shape of fl-ec's CNN head."""

    def __init__(self, dim_in=6, dim=4, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, x):
        return self.classifier(torch.relu(self.fc1(x)))


def _data(n=300, dim_in=6, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim_in, generator=generator), torch.randint(
        0, classes, (n,), generator=generator
    )


def test_stats_are_the_per_class_mean_and_covariance_of_the_classifier_inputs():
    torch.manual_seed(0)
    model, (x, y) = TwoLayer(), _data()
    stats = GAUSSIAN.measure(model, x, y, num_classes=4, batch_size=64)
    features = torch.relu(model.fc1(x)).detach().double()
    for label in range(3):
        rows = features[y == label]
        assert stats.counts[label] == len(rows)
        assert torch.allclose(stats.means[label], rows.mean(0))
        assert torch.allclose(stats.covariances[label], torch.cov(rows.T, correction=0))
    assert stats.counts[3] == 0 and not stats.means[3].any()  # a class nobody holds


def test_classifier_inputs_leave_the_model_as_it_was():
    model = TwoLayer().train()
    features = classifier_inputs(model, _data()[0], batch_size=7)
    assert features.shape == (300, 4) and model.training
    assert not model.classifier._forward_pre_hooks


def test_merging_client_stats_equals_the_stats_of_the_pooled_data():
    torch.manual_seed(0)
    model, (x, y) = TwoLayer(), _data(n=400)
    # Skewed clients: each holds a different mix of the classes.
    parts = [
        (x[:50], y[:50]),
        (x[50:300][y[50:300] != 0], y[50:300][y[50:300] != 0]),
        (x[300:], y[300:]),
    ]
    merged = GAUSSIAN.merge([GAUSSIAN.measure(model, xi, yi, 3) for xi, yi in parts])
    keep = torch.cat(
        [torch.ones(50, dtype=torch.bool), y[50:300] != 0, torch.ones(100, dtype=torch.bool)]
    )
    pooled = GAUSSIAN.measure(model, x[keep], y[keep], 3)
    assert torch.equal(merged.counts, pooled.counts)
    assert torch.allclose(merged.means, pooled.means)
    assert torch.allclose(merged.covariances, pooled.covariances, atol=1e-10)


def test_wire_form_round_trips_and_omits_unseen_classes():
    torch.manual_seed(0)
    model, (x, y) = TwoLayer(), _data()
    stats = GAUSSIAN.measure(model, x[y != 1], y[y != 1], 3)
    arrays = GAUSSIAN.to_arrays(stats)
    assert arrays["classes"].tolist() == [0, 2]
    back = GAUSSIAN.parse(arrays, num_classes=3, dim=4)
    assert torch.equal(back.counts, stats.counts)
    assert torch.allclose(back.means, stats.means, atol=1e-6)
    assert torch.allclose(back.covariances, stats.covariances, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda a: a.pop("covariances"), "lack"),
        (lambda a: a.__setitem__("means", a["means"][:, :3]), "shape"),
        (lambda a: a["means"].__setitem__((0, 0), np.nan), "non-finite"),
        (lambda a: a.__setitem__("classes", np.array([0, 7])), "outside"),
        (lambda a: a.__setitem__("classes", np.array([2, 2])), "distinct"),
        (lambda a: a.__setitem__("counts", np.array([5, 0])), "positive"),
        (lambda a: a.__setitem__("counts", np.array(["5", "3"])), "expected real numbers"),
        (lambda a: a.__setitem__("means", a["means"].astype(np.complex64)), "real numbers"),
        (lambda a: a["covariances"].__setitem__((0, 1, 1), -5.0), "negative variances"),
    ],
)
def test_malformed_stats_are_rejected_with_the_reason(change, reason):
    torch.manual_seed(0)
    model, (x, y) = TwoLayer(), _data()
    arrays = GAUSSIAN.to_arrays(GAUSSIAN.measure(model, x[y != 1], y[y != 1], 3))
    change(arrays)
    with pytest.raises(ValueError, match=reason):
        GAUSSIAN.parse(arrays, num_classes=3, dim=4)


def test_virtual_features_follow_the_pooled_gaussians_and_class_shares():
    means = torch.tensor([[0.0, 0.0], [5.0, -5.0]], dtype=torch.float64)
    covariances = torch.tensor([[[1.0, 0.8], [0.8, 1.0]], [[0.25, 0.0], [0.0, 4.0]]])
    stats = ClassFeatureStats(torch.tensor([300.0, 100.0]), means, covariances.double())
    features, labels = GAUSSIAN.sample(stats, 20_000, torch.Generator().manual_seed(0))
    assert (labels == 0).sum() == 15_000 and (labels == 1).sum() == 5_000
    for label in (0, 1):
        rows = features[labels == label].double()
        assert torch.allclose(rows.mean(0), means[label], atol=0.06)
        assert torch.allclose(torch.cov(rows.T), covariances[label].double(), atol=0.08)


def test_calibration_repairs_a_classifier_biased_toward_one_class():
    # Three well-separated classes in feature space; the classifier is right but for a
    # bias that makes it predict class 0 almost always -- the label-skew failure.
    torch.manual_seed(0)
    model = TwoLayer(dim_in=4, dim=4)
    with torch.no_grad():
        model.fc1.weight.copy_(torch.eye(4))
        model.fc1.bias.zero_()
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    y = torch.arange(3).repeat(200)
    x = centres[y] + 0.7 * torch.randn(600, 4)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.cat([torch.eye(3), torch.zeros(3, 1)], 1))
        model.classifier.bias.copy_(torch.tensor([6.0, 0.0, 0.0]))
    before = accuracy(model(x), y)
    stats = GAUSSIAN.measure(model, x, y, 3)
    GAUSSIAN.calibrate(model, stats, CalibrationSettings(samples=3000, epochs=5, lr=1e-2))
    after = accuracy(model(x), y)
    assert before < 0.5 and after > 0.95
    assert torch.equal(model.fc1.weight, torch.eye(4))  # only the classifier changed


def test_calibration_rejects_stats_of_another_width():
    model = TwoLayer()
    stats = GAUSSIAN.measure(TwoLayer(dim=5), *_data(), num_classes=3)
    with pytest.raises(ValueError, match="5 features"):
        GAUSSIAN.calibrate(model, stats, CalibrationSettings())
