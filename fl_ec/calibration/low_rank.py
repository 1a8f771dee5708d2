"""Dense-head calibration: CCVR one layer deeper, from low-rank class statistics.

Classifier CCVR (:mod:`fl_ec.calibration.gaussian`) retrains the classifier on virtual
features. The kinds here retrain every dense layer of the model (its ``dense_head()``;
for the small CNN fc1 -> ReLU -> classifier) on virtual inputs of the first dense
layer -- the 3136-d flattened conv features -- drawn from the federation's
class-conditional Gaussians. The convolutions, and so the features, do not change.

* **Low rank plus a diagonal** (:class:`LowRankDense`). Per class a client sends the
  top-r factor ``F`` of its covariance (``F @ F.T``) and the diagonal of the rest:
  (r + 2) d floats instead of a full d x d covariance (39 MB per class at d=3136).
* **No clamping** of the draws at zero, though the real features are post-ReLU.
* **Pooling** is exact on what the clients send (mixture moments) and truncated back
  to rank r, the dropped part's diagonal moved into the residual.
* **Mixtures** (:class:`DenseMixture`). One Gaussian per class smooths a class's
  several modes (sandals and sneakers, say) into one blob between them, so each client
  splits each class it holds by k-means (seeded k-means++; clusters of at least
  ``MIN_CLUSTER_ROWS`` rows) and sends one low-rank Gaussian per cluster; the server
  keeps every component (no pooling) and samples their mixture.

Why these choices (rank, clamping, pooling, the number of clusters): the probes in
``docs/calibration.md``. Nothing here knows about Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from fl_ec.calibration.low_rank_wire import pack_components, unpack_factors
from fl_ec.calibration.statistics import (
    FeatureStatistics,
    check_class_arrays,
    scatter_classes,
)


class _LowRankShape:
    """``dim`` and ``rank`` of any statistics holding ``means`` (n, d), ``factors`` (n, d, r)."""

    means: torch.Tensor
    factors: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def rank(self) -> int:
        return int(self.factors.shape[2])


@dataclass(frozen=True)
class LowRankClassStats(_LowRankShape):
    """Per-class count, mean, and covariance ``factors @ factors.T + diag(residuals)``."""

    counts: torch.Tensor  # (C,) float64; 0 for a class not seen
    means: torch.Tensor  # (C, d) float64
    factors: torch.Tensor  # (C, d, r) float64; zero columns where a class has fewer
    residuals: torch.Tensor  # (C, d) float64, >= 0: the covariance's diagonal rest

    @property
    def num_classes(self) -> int:
        return int(self.counts.numel())


@dataclass(frozen=True)
class LowRankMixture(_LowRankShape):
    """Gaussian components, each of one class: count, mean, ``F @ F.T + diag(residual)``.

    A class may have several components (the clusters :class:`DenseMixture` measures);
    :class:`LowRankClassStats` is the one-component-per-class case (:func:`as_mixture`).
    """

    labels: torch.Tensor  # (M,) long: each component's class
    counts: torch.Tensor  # (M,) float64, > 0
    means: torch.Tensor  # (M, d) float64
    factors: torch.Tensor  # (M, d, r) float64
    residuals: torch.Tensor  # (M, d) float64, >= 0


def as_mixture(stats: LowRankClassStats | LowRankMixture) -> LowRankMixture:
    """A mixture as it is; per-class statistics as one component per class seen."""
    if isinstance(stats, LowRankMixture):
        return stats
    present = torch.nonzero(stats.counts > 0).flatten()
    return LowRankMixture(
        present,
        stats.counts[present],
        stats.means[present],
        stats.factors[present],
        stats.residuals[present],
    )


def dense_head(model: nn.Module) -> nn.Module:
    """The model's dense layers as one module: first dense layer's input -> logits."""
    builder = getattr(model, "dense_head", None)
    if builder is None:
        raise ValueError(
            f"{type(model).__name__} has no dense_head(): "
            'set calibration="classifier" to calibrate only its classifier'
        )
    return builder()


def low_rank_factor(centred: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor (d, rank), residual (d,)) of the population covariance of ``centred`` rows.

    The factor's columns are the top principal directions scaled by their standard
    deviations (zero columns past the data's rank); the residual is the diagonal the
    factor leaves out. Randomized SVD (seeded: the same rows give the same factor) for
    large inputs, exact SVD for small ones.
    """
    rows, dim = centred.shape
    variances = (centred * centred).sum(0) / rows
    keep = min(rank, rows, dim)
    oversampled = keep + 10
    if oversampled >= min(rows, dim):
        _, singular, right_t = torch.linalg.svd(centred, full_matrices=False)
        right = right_t.T
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _, singular, right = torch.svd_lowrank(centred, q=oversampled, niter=4)
    factor = torch.zeros(dim, rank, dtype=centred.dtype)
    factor[:, :keep] = right[:, :keep] * (singular[:keep] / math.sqrt(rows))
    residual = (variances - (factor * factor).sum(1)).clamp_min(0.0)
    return factor, residual


# A cluster smaller than this joins its nearest neighbour: its covariance would be
# noise, and its mean close to single examples' features.
MIN_CLUSTER_ROWS = 16


def kmeans_clusters(
    rows: torch.Tensor, clusters: int, seed: int = 0, iterations: int = 25
) -> torch.Tensor:
    """Cluster index (0..k-1) of each row: seeded k-means++ then Lloyd iterations.

    At most ``clusters`` clusters and at most one per ``MIN_CLUSTER_ROWS`` rows; a
    cluster left smaller than that is folded into the nearest other one.
    """
    clusters = max(1, min(clusters, len(rows) // MIN_CLUSTER_ROWS))
    if clusters == 1:
        return torch.zeros(len(rows), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    centres = rows[torch.randint(len(rows), (1,), generator=generator)]
    nearest = torch.cdist(rows, centres).squeeze(1).pow(2)
    while len(centres) < clusters and nearest.sum() > 0:  # k-means++ seeding
        pick = torch.multinomial(nearest / nearest.sum(), 1, generator=generator)
        centres = torch.cat([centres, rows[pick]])
        nearest = torch.minimum(nearest, torch.cdist(rows, rows[pick]).squeeze(1).pow(2))
    assignment = torch.cdist(rows, centres).argmin(1)
    for _ in range(iterations):
        sizes = torch.bincount(assignment, minlength=len(centres))
        sums = torch.zeros_like(centres).index_add_(0, assignment, rows)
        centres = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1)[:, None], centres)
        updated = torch.cdist(rows, centres).argmin(1)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    # Each row's centre is its nearest, so folding the small clusters only grows the
    # others; one at least holds MIN_CLUSTER_ROWS, as clusters <= rows // that.
    large = torch.bincount(assignment, minlength=len(centres)) >= MIN_CLUSTER_ROWS
    assignment = torch.cdist(rows, centres[large]).argmin(1)
    return torch.unique(assignment, return_inverse=True)[1]


DenseStatsT = TypeVar("DenseStatsT", LowRankClassStats, LowRankMixture)


class _DenseHeadStatistics(FeatureStatistics[DenseStatsT]):
    """What the two dense-head kinds share: the layers, the wire form and the draws."""

    rank: int
    layers_name: ClassVar[str] = "dense head"

    def layers(self, model: nn.Module) -> nn.Module:
        """The model's ``dense_head()``: every dense layer, first one's input -> logits."""
        return dense_head(model)

    def to_arrays(
        self, stats: DenseStatsT, budget_bytes: int | None = None
    ) -> dict[str, np.ndarray]:
        """The wire form, one row per component (per class seen), within ``budget_bytes``:
        float16 means and variances, ragged int8 factor columns, the weakest columns
        moved into the residual (:mod:`fl_ec.calibration.low_rank_wire`)."""
        mixture = as_mixture(stats)
        packed = pack_components(
            mixture.counts, mixture.means, mixture.factors, mixture.residuals, budget_bytes
        )
        return {"classes": mixture.labels.numpy().astype(np.int64), **packed}

    def _parse_components(
        self, arrays: Mapping[str, np.ndarray], num_classes: int, dim: int, components: int
    ) -> LowRankMixture:
        """Check and rebuild a client's components (up to ``components`` rows per class).

        Every check runs before the dense ``(rows, dim, rank)`` factors are built
        (:func:`~fl_ec.calibration.low_rank_wire.unpack_factors`).
        """
        index, counts, floats = check_class_arrays(
            arrays,
            {"means": (dim,), "residuals": (dim,), "ranks": ()},
            num_classes,
            rows_per_class=components,
        )
        if (floats["residuals"] < 0).any():
            raise ValueError("feature statistics residual variances are negative")
        factors = unpack_factors(arrays, dim, self.rank)
        return LowRankMixture(
            index,
            torch.as_tensor(counts, dtype=torch.float64),
            torch.as_tensor(floats["means"]),
            factors,
            torch.as_tensor(floats["residuals"]),
        )

    def sample(
        self,
        stats: DenseStatsT,
        num_samples: int,
        generator: torch.Generator,
        ridge: float = 1e-4,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labelled draws ``mean + F z + sqrt(residual) e``, components in proportion to counts.

        ``ridge`` (relative to the component's mean variance) keeps a class seen once from
        collapsing onto its mean.
        """
        mixture = as_mixture(stats)
        if mixture.counts.sum() <= 0:
            raise ValueError("no class has any example")
        shares = torch.floor(mixture.counts / mixture.counts.sum() * num_samples).long()
        features, labels = [], []
        for component in torch.nonzero(shares > 0).flatten().tolist():
            count = int(shares[component])
            factor, residual = mixture.factors[component], mixture.residuals[component]
            mean_variance = (residual.sum() + factor.pow(2).sum()) / mixture.dim
            scale = (residual + ridge * mean_variance.clamp_min(1e-12)).sqrt()
            low_rank = torch.randn(count, mixture.rank, generator=generator, dtype=torch.float64)
            diagonal = torch.randn(count, mixture.dim, generator=generator, dtype=torch.float64)
            features.append(mixture.means[component] + low_rank @ factor.T + diagonal * scale)
            labels.append(torch.full((count,), int(mixture.labels[component]), dtype=torch.long))
        return torch.cat(features).float(), torch.cat(labels)


@dataclass(frozen=True)
class LowRankDense(_DenseHeadStatistics[LowRankClassStats]):
    """One rank-``rank`` Gaussian per class of the dense head's inputs; retrains the head.

    The run-config's ``calibration="dense"``.
    """

    rank: int

    def measure(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        batch_size: int = 512,
        device: torch.device | str = "cpu",
    ) -> LowRankClassStats:
        """Rank-``rank`` class statistics of the inputs of ``model``'s dense head."""
        features, labels = self.labelled_inputs(model, inputs, labels, batch_size, device)
        dim = features.shape[1]
        counts = torch.zeros(num_classes, dtype=torch.float64)
        means = torch.zeros(num_classes, dim, dtype=torch.float64)
        factors = torch.zeros(num_classes, dim, self.rank, dtype=torch.float64)
        residuals = torch.zeros(num_classes, dim, dtype=torch.float64)
        for label in labels.unique().tolist():
            rows = features[labels == label]
            counts[label] = len(rows)
            means[label] = rows.mean(0)
            factors[label], residuals[label] = low_rank_factor(rows - means[label], self.rank)
        return LowRankClassStats(counts, means, factors, residuals)

    def parse(
        self, arrays: Mapping[str, np.ndarray], num_classes: int, dim: int
    ) -> LowRankClassStats:
        """Check and rebuild a client's statistics; ``ValueError`` says what is wrong.

        One row per class (a repeated class is malformed), scattered to its class.
        """
        mixture = self._parse_components(arrays, num_classes, dim, components=1)
        return LowRankClassStats(
            *(
                scatter_classes(mixture.labels, getattr(mixture, key).numpy(), num_classes)
                for key in ("counts", "means", "factors", "residuals")
            )
        )

    def merge(self, parts: Sequence[LowRankClassStats]) -> LowRankClassStats:
        """Pool the clients' statistics exactly, then truncate each class back to ``rank``.

        The pooled covariance of a class is the count-weighted mean of the clients'
        covariances plus the spread of their means: ``sum_k w_k (F_k F_k^T + D_k +
        (m_k - m)(m_k - m)^T)``. Its low-rank part is one SVD of the stacked columns
        ``sqrt(w_k) [F_k, m_k - m]``; what the truncation drops joins the diagonal.
        """
        if not parts:
            raise ValueError("nothing to merge")
        counts = torch.stack([p.counts for p in parts])  # (K, C)
        total = counts.sum(0)
        weights = counts / total.clamp_min(1.0)
        means = torch.einsum("kc,kcd->cd", weights, torch.stack([p.means for p in parts]))
        num_classes, dim = means.shape
        factors = torch.zeros(num_classes, dim, self.rank, dtype=torch.float64)
        residuals = torch.zeros(num_classes, dim, dtype=torch.float64)
        for label in torch.nonzero(total > 0).flatten().tolist():
            columns, diagonal = [], torch.zeros(dim, dtype=torch.float64)
            for k, part in enumerate(parts):
                weight = float(weights[k, label])
                if weight > 0:
                    spread = (part.means[label] - means[label]).unsqueeze(1)
                    columns.append(math.sqrt(weight) * torch.cat([part.factors[label], spread], 1))
                    diagonal += weight * part.residuals[label]
            left, singular, _ = torch.linalg.svd(torch.cat(columns, 1), full_matrices=False)
            keep = min(self.rank, len(singular))
            factors[label, :, :keep] = left[:, :keep] * singular[:keep]
            dropped = (left[:, keep:] * singular[keep:]).pow(2).sum(1)
            residuals[label] = diagonal + dropped
        return LowRankClassStats(total, means, factors, residuals)


@dataclass(frozen=True)
class DenseMixture(_DenseHeadStatistics[LowRankMixture]):
    """Up to ``components`` rank-``rank`` Gaussians per class of the dense head's inputs.

    The run-config's ``calibration="dense-mixture"``: each client splits each class it
    holds by :func:`kmeans_clusters`; the server samples the mixture of every client's
    components.
    """

    rank: int
    components: int

    def measure(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        batch_size: int = 512,
        device: torch.device | str = "cpu",
    ) -> LowRankMixture:
        """Each class's rows split by :func:`kmeans_clusters`; one component per cluster.

        Each cluster gets its own count, mean, factor and residual (:func:`low_rank_factor`).
        """
        features, labels = self.labelled_inputs(model, inputs, labels, batch_size, device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels outside [0, {num_classes})")
        parts: list[tuple[int, torch.Tensor]] = []
        for label in labels.unique().tolist():
            rows = features[labels == label]
            assignment = kmeans_clusters(rows, self.components)
            parts += [(label, rows[assignment == cluster]) for cluster in assignment.unique()]
        if not parts:  # no data: an empty mixture, which the server rejects as covering no class
            dim = features.shape[1]
            empty = torch.zeros(0, dim, dtype=torch.float64)
            return LowRankMixture(
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.float64),
                empty,
                torch.zeros(0, dim, self.rank, dtype=torch.float64),
                empty,
            )
        factored = [low_rank_factor(rows - rows.mean(0), self.rank) for _, rows in parts]
        return LowRankMixture(
            torch.tensor([label for label, _ in parts], dtype=torch.long),
            torch.tensor([float(len(rows)) for _, rows in parts], dtype=torch.float64),
            torch.stack([rows.mean(0) for _, rows in parts]),
            torch.stack([factor for factor, _ in factored]),
            torch.stack([residual for _, residual in factored]),
        )

    def parse(self, arrays: Mapping[str, np.ndarray], num_classes: int, dim: int) -> LowRankMixture:
        """Check and rebuild a client's mixture (up to ``components`` rows per class)."""
        return self._parse_components(arrays, num_classes, dim, self.components)

    def merge(self, parts: Sequence[LowRankMixture]) -> LowRankMixture:
        """The federation's mixture: every client's components side by side.

        Not pooled per class as :meth:`LowRankDense.merge` does: pooling would average
        the clusters back into one Gaussian, the shape the mixture exists to avoid.
        """
        if not parts:
            raise ValueError("nothing to merge")
        return LowRankMixture(
            *(
                torch.cat([getattr(p, field.name) for p in parts])
                for field in fields(LowRankMixture)
            )
        )
