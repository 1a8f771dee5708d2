"""Dense-head calibration from low-rank class-conditional statistics (no Flower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fl_ec.calibration import (
    MIN_CLUSTER_ROWS,
    CalibrationSettings,
    ClassifierGaussian,
    DenseMixture,
    LowRankDense,
    LowRankMixture,
    kmeans_clusters,
    low_rank_factor,
)
from fl_ec.scoring import accuracy


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
    parts = [LowRankDense(rank=8).measure(model, x[i::3], y[i::3], 3) for i in range(3)]
    merged = LowRankDense(rank=8).merge(parts)
    union = LowRankDense(rank=8).measure(model, x, y, 3)
    assert torch.equal(merged.counts, union.counts)
    assert torch.allclose(merged.means, union.means, atol=1e-10)
    for label in range(3):  # rank 8 = dim: exact
        assert torch.allclose(
            _model_covariance(merged, label), _model_covariance(union, label), atol=1e-8
        )
    truncated = LowRankDense(rank=2).merge(parts)  # the dropped part joins the diagonal
    for label in range(3):
        assert torch.allclose(
            _model_covariance(truncated, label).diagonal(),
            _model_covariance(union, label).diagonal(),
            atol=1e-8,
        )


def test_draws_follow_the_pooled_moments_and_class_shares():
    model = Body()
    x, y = _classes()
    stats = LowRankDense(rank=8).measure(model, x, y, 3)
    features, labels = LowRankDense(rank=8).sample(stats, 30_000, torch.Generator().manual_seed(1))
    shares = torch.bincount(labels, minlength=3).double() / len(labels)
    assert torch.allclose(shares, stats.counts / stats.counts.sum(), atol=1e-3)
    for label in range(3):
        rows = features[labels == label].double()
        assert torch.allclose(rows.mean(0), stats.means[label], atol=0.1)
        assert torch.allclose(_covariance(rows), _model_covariance(stats, label), atol=0.15)


def test_wire_round_trip_and_rejections():
    model = Body()
    x, y = _classes()
    stats = LowRankDense(rank=4).measure(model, x[y < 2], y[y < 2], 3)
    arrays = LowRankDense(rank=4).to_arrays(stats)
    assert arrays["classes"].tolist() == [0, 1]  # only the classes seen travel
    assert arrays["factors"].dtype == np.int8 and arrays["means"].dtype == np.float16
    back = LowRankDense(rank=4).parse(arrays, num_classes=3, dim=8)
    for label in (0, 1):  # the covariance survives int8 columns (and their reordering)
        assert torch.allclose(
            _model_covariance(back, label), _model_covariance(stats, label), atol=2e-2
        )
        assert torch.allclose(back.means[label], stats.means[label], rtol=1e-3, atol=1e-3)
    assert back.counts[2] == 0

    def spoiled(key, value):
        broken = {k: v.copy() for k, v in arrays.items()}
        broken[key] = value
        return broken

    cases = {
        "shape": spoiled("factors", arrays["factors"][:, :3]),
        r"ranks must be within \[0, 4\]": spoiled("ranks", arrays["ranks"] + 1),
        "ranks must be integers": spoiled("ranks", arrays["ranks"].astype(np.float32)),
        "scales must be finite": spoiled("factor-scales", -arrays["factor-scales"]),
        "non-finite": spoiled("means", np.full_like(arrays["means"], np.nan)),
        "negative": spoiled("residuals", -np.ones_like(arrays["residuals"])),
        "outside": spoiled("classes", np.array([0, 3])),
        "lack": {k: v for k, v in arrays.items() if k != "factors"},
        "lack.*ranks": {k: v for k, v in arrays.items() if k != "ranks"},
    }
    for reason, broken in cases.items():
        with pytest.raises(ValueError, match=reason):
            LowRankDense(rank=4).parse(broken, num_classes=3, dim=8)


def test_under_a_byte_budget_the_weakest_columns_move_into_the_residual():
    # Four classes of 3136-d features, eight components each at rank 32: 13.6 MB in
    # float32. Within a copy of the small CNN's 1.7 MB every component keeps its mean and
    # its total variance, and the columns kept are the strongest of the whole client.
    generator = torch.Generator().manual_seed(0)
    n, dim, rank = 32, 3136, 32
    decay = 0.8 ** torch.arange(rank, dtype=torch.float64)  # each factor's columns weaken
    factors = torch.randn(n, dim, rank, generator=generator, dtype=torch.float64) * decay
    factors = factors[:, :, torch.randperm(rank, generator=generator)]  # any column order
    counts = torch.randint(20, 600, (n,), generator=generator).double()
    mixture = LowRankMixture(
        torch.arange(n) % 4,
        counts,
        torch.rand(n, dim, generator=generator, dtype=torch.float64),
        factors,
        torch.rand(n, dim, generator=generator, dtype=torch.float64),
    )
    kind = DenseMixture(rank=rank, components=8)
    budget = 1_700_000
    unlimited = kind.to_arrays(mixture)
    wire = kind.to_arrays(mixture, budget_bytes=budget)
    assert sum(a.nbytes for a in unlimited.values()) > 2 * budget  # int8 alone is not enough
    assert budget - 3200 < sum(a.nbytes for a in wire.values()) <= budget
    ranks = wire["ranks"]
    assert ranks.min() > 0 and ranks.max() < rank
    # Larger components keep more columns: the same column explains more of the client.
    assert ranks[counts.argmax()] > ranks[counts.argmin()]
    back = kind.parse(wire, num_classes=10, dim=dim)
    total = factors.pow(2).sum((1, 2)) + mixture.residuals.sum(1)
    kept = back.factors.pow(2).sum((1, 2)) + back.residuals.sum(1)
    assert torch.allclose(kept, total, rtol=1e-2)
    assert torch.allclose(back.means, mixture.means, atol=1e-3)


def test_dense_calibration_repairs_a_broken_head_and_leaves_the_body_alone():
    torch.manual_seed(0)
    model = Body()
    x, y = _classes()
    with torch.no_grad():  # a head that predicts class 0 whatever the input
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    body = {k: v.clone() for k, v in model.body.state_dict().items()}
    dense = LowRankDense(rank=4)
    stats = dense.merge([dense.measure(model, x[i::2], y[i::2], 3) for i in range(2)])
    before = accuracy(model(x), y)
    settings = CalibrationSettings(samples=3000, epochs=5, lr=1e-2, layers="dense", rank=4)
    settings.statistics().calibrate(model, stats, settings, seed=0)
    after = accuracy(model(x), y)
    assert before < 0.5 and after > 0.95
    assert all(torch.equal(v, model.body.state_dict()[k]) for k, v in body.items())


def test_dispatch_follows_the_settings_and_names_the_fix_for_a_model_without_a_head():
    model = Body()
    assert CalibrationSettings().statistics() == ClassifierGaussian()
    assert CalibrationSettings.preset("dense").statistics() == LowRankDense(rank=64)
    assert CalibrationSettings.preset("dense-mixture").statistics() == DenseMixture(32, 8)
    assert CalibrationSettings().statistics().layers(model) is model.classifier
    dense = CalibrationSettings(layers="dense").statistics().layers(model)
    assert {id(p) for p in dense.parameters()} == {
        id(p) for layer in (model.fc1, model.classifier) for p in layer.parameters()
    }

    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(4, 3)

    with pytest.raises(ValueError, match='calibration="classifier"'):
        CalibrationSettings(layers="dense").statistics().layers(NoHead())
    with pytest.raises(ValueError, match="choose one of classifier, dense"):
        CalibrationSettings(layers="conv")
    x, y = _classes()
    stats = LowRankDense(rank=2).measure(model, x, y, 3)
    settings = CalibrationSettings(layers="dense", rank=2)
    with pytest.raises(ValueError, match="head takes 3"):  # stats of another width
        settings.statistics().calibrate(Body(dim=3), stats, settings)


# --- Mixtures: several Gaussians per class (CalibrationSettings.components > 1) ---


def _blobs(sizes, dim=5, seed=0):
    """Rows of well-separated blobs (distance ~20, spread 1) and each row's blob."""
    generator = torch.Generator().manual_seed(seed)
    centres = 20 * torch.randn(len(sizes), dim, generator=generator, dtype=torch.float64)
    blob = torch.cat([torch.full((n,), b) for b, n in enumerate(sizes)])
    rows = centres[blob] + torch.randn(len(blob), dim, generator=generator, dtype=torch.float64)
    return rows, blob


def test_kmeans_finds_separated_blobs_and_never_leaves_a_cluster_below_the_minimum():
    rows, blob = _blobs([40, 60, 50])
    clusters = kmeans_clusters(rows, 3, seed=0)
    pairs = set(zip(blob.tolist(), clusters.tolist(), strict=True))
    assert len(pairs) == 3 and len({c for _, c in pairs}) == 3  # one cluster per blob
    assert torch.equal(clusters, kmeans_clusters(rows, 3, seed=0))  # seeded
    # A blob smaller than the minimum joins its nearest neighbour instead of standing alone.
    rows, blob = _blobs([40, 60, MIN_CLUSTER_ROWS - 5])
    clusters = kmeans_clusters(rows, 3, seed=0)
    assert clusters.max() == 1
    assert torch.bincount(clusters).min() >= MIN_CLUSTER_ROWS
    # Never more clusters than rows // MIN_CLUSTER_ROWS.
    assert kmeans_clusters(rows[: 2 * MIN_CLUSTER_ROWS - 1], 8).max() == 0


def test_a_class_mixture_keeps_the_class_moments_exactly_at_full_rank():
    model = Body()
    x, y = _classes(n=900)
    mixture = DenseMixture(rank=8, components=3).measure(model, x, y, 3)
    union = LowRankDense(rank=8).measure(model, x, y, 3)
    assert len(mixture.labels) > 3  # some class was split
    assert torch.bincount(mixture.labels, minlength=3).max() <= 3
    for label in range(3):
        mine = mixture.labels == label
        weights = mixture.counts[mine] / mixture.counts[mine].sum()
        assert mixture.counts[mine].sum() == union.counts[label]
        mean = (weights[:, None] * mixture.means[mine]).sum(0)
        assert torch.allclose(mean, union.means[label], atol=1e-10)
        spread = mixture.means[mine] - mean
        covariance = sum(
            w * (f @ f.T + torch.diag(r) + torch.outer(s, s))
            for w, f, r, s in zip(
                weights, mixture.factors[mine], mixture.residuals[mine], spread, strict=True
            )
        )
        assert torch.allclose(covariance, _model_covariance(union, label), atol=1e-8)


def test_mixtures_travel_merge_by_concatenation_and_draw_per_component():
    model = Body()
    x, y = _classes(n=900)
    settings = CalibrationSettings(layers="dense", rank=4, components=2)
    kind = settings.statistics()
    wires = [kind.to_arrays(kind.measure(model, x[i::2], y[i::2], 3)) for i in range(2)]
    assert any(len(set(w["classes"].tolist())) < len(w["classes"]) for w in wires)
    parts = [kind.parse(w, 3, 8) for w in wires]
    merged = kind.merge(parts)
    assert isinstance(merged, LowRankMixture)
    assert len(merged.labels) == sum(len(w["classes"]) for w in wires)
    assert torch.allclose(merged.factors[: len(parts[0].labels)], parts[0].factors)
    features, labels = kind.sample(merged, 20_000, torch.Generator().manual_seed(0))
    shares = torch.bincount(labels, minlength=3).double() / len(labels)
    counts = torch.zeros(3, dtype=torch.float64).index_add_(0, merged.labels, merged.counts)
    assert torch.allclose(shares, counts / counts.sum(), atol=1e-3)
    # Draws of one class follow its components' mixture mean.
    for label in range(3):
        mine = merged.labels == label
        mean = (merged.counts[mine, None] * merged.means[mine]).sum(0) / merged.counts[mine].sum()
        assert torch.allclose(features[labels == label].double().mean(0), mean, atol=0.1)
    # A client without data sends an empty mixture, rejected as covering no class.
    empty = kind.to_arrays(kind.measure(model, x[:0], y[:0], 3))
    with pytest.raises(ValueError, match="cover no class"):
        kind.parse(empty, 3, 8)
    # More components of one class than the query asked for is a malformed reply.
    one = CalibrationSettings(layers="dense", rank=4, components=1).statistics()
    with pytest.raises(ValueError, match="distinct"):  # the one-Gaussian format
        one.parse(wires[0], 3, 8)
    with pytest.raises(ValueError, match="at most 2 were asked"):
        tripled = {k: np.concatenate([v, v[:1], v[:1]]) for k, v in wires[0].items()}
        kind.parse(tripled, 3, 8)
    # The mixture calibrates the head like the pooled statistics do.
    broken = Body()
    with torch.no_grad():
        broken.load_state_dict(model.state_dict())
        broken.classifier.weight.zero_()
        broken.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    kind.calibrate(
        broken, merged, CalibrationSettings(samples=3000, lr=1e-2, layers="dense", rank=4)
    )
    assert (broken(x).argmax(1) == y).float().mean() > 0.95


def test_components_need_the_dense_calibration():
    with pytest.raises(ValueError, match='set layers="dense"'):
        CalibrationSettings(components=2)
    with pytest.raises(ValueError, match="must be >= 1"):
        CalibrationSettings(layers="dense", components=0)
