"""Dense-head calibration from low-rank class-conditional statistics (no Flower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fl_ec.feature_calibration import CalibrationSettings
from fl_ec.head_calibration import (
    calibrate,
    calibrate_dense_head,
    calibrated_layers,
    low_rank_class_stats,
    low_rank_factor,
    low_rank_from_arrays,
    low_rank_to_arrays,
    merge_low_rank,
    sample_low_rank,
)


class Body(nn.Module):
    """A frozen linear 'feature extractor' and a two-layer dense head, like the CNN's."""

    def __init__(self, dim_in=6, dim=8, hidden=5, classes=3):
        super().__init__()
        self.body = nn.Linear(dim_in, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.classifier = nn.Linear(hidden, classes)

    def dense_head(self):
        return nn.Sequential(self.fc1, nn.ReLU(), self.classifier)

    def forward(self, x):
        return self.dense_head()(self.body(x))


def _covariance(rows):
    centred = rows - rows.mean(0)
    return centred.T @ centred / len(rows)


def _classes(n=600, dim_in=6, classes=3, seed=0):
    """Well-separated Gaussian classes, so a good head is near 100% accurate."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    centres = 4 * torch.randn(classes, dim_in, generator=generator)
    return centres[labels] + torch.randn(n, dim_in, generator=generator), labels


def _model_covariance(stats, label):
    factor = stats.factors[label]
    return factor @ factor.T + torch.diag(stats.residuals[label])


def test_a_factor_of_full_rank_reproduces_the_covariance_and_truncation_keeps_the_diagonal():
    rows = torch.randn(50, 7, dtype=torch.float64) @ torch.randn(7, 7, dtype=torch.float64)
    covariance = _covariance(rows)
    factor, residual = low_rank_factor(rows - rows.mean(0), rank=9)  # 9 > 7: zero-padded
    assert factor.shape == (7, 9) and torch.equal(factor[:, 7:], torch.zeros(7, 2).double())
    assert torch.allclose(factor @ factor.T + torch.diag(residual), covariance, atol=1e-10)
    factor, residual = low_rank_factor(rows - rows.mean(0), rank=2)
    approximation = factor @ factor.T + torch.diag(residual)
    assert torch.allclose(approximation.diagonal(), covariance.diagonal(), atol=1e-10)
    assert (residual >= 0).all() and not torch.allclose(approximation, covariance, atol=1e-3)


def test_merging_clients_equals_the_statistics_of_their_union():
    model = Body()
    x, y = _classes()
    parts = [low_rank_class_stats(model, x[i::3], y[i::3], 3, rank=8) for i in range(3)]
    merged = merge_low_rank(parts, rank=8)
    union = low_rank_class_stats(model, x, y, 3, rank=8)
    assert torch.equal(merged.counts, union.counts)
    assert torch.allclose(merged.means, union.means, atol=1e-10)
    for label in range(3):  # rank 8 = dim: exact
        assert torch.allclose(
            _model_covariance(merged, label), _model_covariance(union, label), atol=1e-8
        )
    truncated = merge_low_rank(parts, rank=2)  # the dropped part joins the diagonal
    for label in range(3):
        assert torch.allclose(
            _model_covariance(truncated, label).diagonal(),
            _model_covariance(union, label).diagonal(),
            atol=1e-8,
        )


def test_draws_follow_the_pooled_moments_and_class_shares():
    model = Body()
    x, y = _classes()
    stats = low_rank_class_stats(model, x, y, 3, rank=8)
    features, labels = sample_low_rank(stats, 30_000, torch.Generator().manual_seed(1))
    shares = torch.bincount(labels, minlength=3).double() / len(labels)
    assert torch.allclose(shares, stats.counts / stats.counts.sum(), atol=1e-3)
    for label in range(3):
        rows = features[labels == label].double()
        assert torch.allclose(rows.mean(0), stats.means[label], atol=0.1)
        assert torch.allclose(_covariance(rows), _model_covariance(stats, label), atol=0.15)


def test_wire_round_trip_and_rejections():
    model = Body()
    x, y = _classes()
    stats = low_rank_class_stats(model, x[y < 2], y[y < 2], 3, rank=4)
    arrays = low_rank_to_arrays(stats)
    assert arrays["classes"].tolist() == [0, 1]  # only the classes seen travel
    back = low_rank_from_arrays(arrays, num_classes=3, dim=8, rank=4)
    assert torch.allclose(back.factors, stats.factors.float().double())
    assert back.counts[2] == 0

    def spoiled(key, value):
        broken = {k: v.copy() for k, v in arrays.items()}
        broken[key] = value
        return broken

    cases = {
        "shape": spoiled("factors", arrays["factors"][:, :, :3]),
        "non-finite": spoiled("means", np.full_like(arrays["means"], np.nan)),
        "negative": spoiled("residuals", -np.ones_like(arrays["residuals"])),
        "outside": spoiled("classes", np.array([0, 3])),
        "lack": {k: v for k, v in arrays.items() if k != "factors"},
    }
    for reason, broken in cases.items():
        with pytest.raises(ValueError, match=reason):
            low_rank_from_arrays(broken, num_classes=3, dim=8, rank=4)


def test_dense_calibration_repairs_a_broken_head_and_leaves_the_body_alone():
    torch.manual_seed(0)
    model = Body()
    x, y = _classes()
    with torch.no_grad():  # a head that predicts class 0 whatever the input
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    body = {k: v.clone() for k, v in model.body.state_dict().items()}
    stats = merge_low_rank(
        [low_rank_class_stats(model, x[i::2], y[i::2], 3, rank=4) for i in range(2)], rank=4
    )
    before = (model(x).argmax(1) == y).float().mean()
    settings = CalibrationSettings(samples=3000, epochs=5, lr=1e-2, layers="dense", rank=4)
    calibrate_dense_head(model, stats, settings, seed=0)
    after = (model(x).argmax(1) == y).float().mean()
    assert before < 0.5 and after > 0.95
    assert all(torch.equal(v, model.body.state_dict()[k]) for k, v in body.items())


def test_dispatch_follows_the_settings_and_names_the_fix_for_a_model_without_a_head():
    model = Body()
    assert calibrated_layers(model, CalibrationSettings()) is model.classifier
    dense = calibrated_layers(model, CalibrationSettings(layers="dense"))
    assert {id(p) for p in dense.parameters()} == {
        id(p) for layer in (model.fc1, model.classifier) for p in layer.parameters()
    }

    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(4, 3)

    with pytest.raises(ValueError, match='calibration-layers="classifier"'):
        calibrated_layers(NoHead(), CalibrationSettings(layers="dense"))
    with pytest.raises(ValueError, match="choose one of classifier, dense"):
        CalibrationSettings(layers="conv")
    x, y = _classes()
    stats = low_rank_class_stats(model, x, y, 3, rank=2)
    with pytest.raises(ValueError, match="head takes 3"):  # stats of another width
        calibrate(Body(dim=3), stats, CalibrationSettings(layers="dense", rank=2))
