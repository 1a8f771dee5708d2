"""Classifier calibration from full-covariance Gaussians of the classifier's inputs.

Why: at strong label skew (Dirichlet alpha=0.1) the aggregated model's features are
better than its classifier. The label-prior correction (:mod:`fl_ec.calibration.prior`)
moves only the classifier's bias; retraining the weights needs labelled features, which
only the clients have.

What (CCVR, Luo et al. 2021, "No Fear of Heterogeneity"): each client runs the global
model over its own data and reports, per class it holds, the count, mean and covariance
of the classifier's *input* features -- one forward pass, no training. The server pools
them exactly into the federation's class-conditional Gaussians, draws labelled virtual
features from them, in proportion to the pooled class counts, and fine-tunes the
classifier on those. Only the last layer changes, so the same feature extractor serves.

Choices, and why:

* **Full covariance at the classifier input** (d = 128 for the small CNN: 64 KB per
  class in fp32). Full covariances of deeper layers' inputs are too large to send
  (39 MB per class for the small CNN's conv features): :mod:`fl_ec.calibration.low_rank`
  sends low-rank ones instead.
* **Proportional sampling**: the virtual set follows the pooled label distribution, so
  the calibrated classifier targets the same prior as the label-prior correction.
* **Fine-tuning from the current classifier** (Adam, a few epochs), not a fresh one:
  it keeps what the weights already encode wherever the virtual features say nothing.

Why these choices: the probes in ``docs/calibration.md``. Nothing here knows about
Flower.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fl_ec.calibration.prior import classifier_of
from fl_ec.calibration.statistics import (
    FeatureStatistics,
    check_class_arrays,
    layer_inputs,
    scatter_classes,
)


@dataclass(frozen=True)
class ClassFeatureStats:
    """Per-class count, mean and (population) covariance of the classifier's inputs."""

    counts: torch.Tensor  # (C,) float64; 0 for a class not seen
    means: torch.Tensor  # (C, d) float64
    covariances: torch.Tensor  # (C, d, d) float64

    @property
    def num_classes(self) -> int:
        return int(self.counts.numel())

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])


def classifier_inputs(
    model: nn.Module,
    inputs: torch.Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """What the model's classifier layer receives for ``inputs`` (eval mode), on CPU."""
    return layer_inputs(model, classifier_of(model), inputs, batch_size, device)


@dataclass(frozen=True)
class ClassifierGaussian(FeatureStatistics[ClassFeatureStats]):
    """One full-covariance Gaussian per class of the classifier's inputs; retrains it.

    The run-config's ``calibration="classifier"``.
    """

    layers_name: ClassVar[str] = "classifier"

    def layers(self, model: nn.Module) -> nn.Module:
        """The classifier: the last ``nn.Linear`` with a bias."""
        return classifier_of(model)

    def measure(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        batch_size: int = 512,
        device: torch.device | str = "cpu",
    ) -> ClassFeatureStats:
        """The class-conditional statistics of ``model``'s classifier inputs over a dataset."""
        features, labels = self.labelled_inputs(model, inputs, labels, batch_size, device)
        dim = features.shape[1]
        counts = torch.zeros(num_classes, dtype=torch.float64)
        means = torch.zeros(num_classes, dim, dtype=torch.float64)
        covariances = torch.zeros(num_classes, dim, dim, dtype=torch.float64)
        for label in labels.unique().tolist():
            rows = features[labels == label]
            counts[label] = len(rows)
            means[label] = rows.mean(0)
            centred = rows - means[label]
            covariances[label] = centred.T @ centred / len(rows)
        return ClassFeatureStats(counts, means, covariances)

    def to_arrays(
        self, stats: ClassFeatureStats, budget_bytes: int | None = None
    ) -> dict[str, np.ndarray]:
        """The wire form: only the classes seen, means and covariances in float32.

        ``budget_bytes`` is not applied: a full covariance has no cheaper exact form, and
        the classifier's inputs are narrow (the small CNN: 128 features, 0.66 MB for ten
        classes, under the model's 1.7 MB).
        """
        present = torch.nonzero(stats.counts > 0).flatten()
        return {
            "classes": present.numpy().astype(np.int64),
            "counts": stats.counts[present].numpy().astype(np.int64),
            "means": stats.means[present].numpy().astype(np.float32),
            "covariances": stats.covariances[present].numpy().astype(np.float32),
        }

    def parse(
        self, arrays: Mapping[str, np.ndarray], num_classes: int, dim: int
    ) -> ClassFeatureStats:
        """Check and rebuild a client's statistics; ``ValueError`` says what is wrong.

        Besides the shared checks, no variance may be negative (beyond float32 rounding).
        """
        index, counts, floats = check_class_arrays(
            arrays, {"means": (dim,), "covariances": (dim, dim)}, num_classes
        )
        covariances = floats["covariances"]
        diagonals = np.diagonal(covariances, axis1=1, axis2=2)
        if (diagonals < -1e-4 * (1.0 + np.abs(diagonals).max())).any():
            raise ValueError("feature statistics covariances have negative variances")
        symmetric = (covariances + covariances.transpose(0, 2, 1)) / 2  # float32 rounding
        return ClassFeatureStats(
            scatter_classes(index, counts, num_classes),
            scatter_classes(index, floats["means"], num_classes),
            scatter_classes(index, symmetric, num_classes),
        )

    def merge(self, parts: Sequence[ClassFeatureStats]) -> ClassFeatureStats:
        """Pool the clients' statistics exactly: as if computed over the union of their data."""
        if not parts:
            raise ValueError("nothing to merge")
        counts = torch.stack([p.counts for p in parts])  # (K, C)
        total = counts.sum(0)
        weights = counts / total.clamp_min(1.0)  # (K, C); a class nobody saw stays all-zero
        means = torch.einsum("kc,kcd->cd", weights, torch.stack([p.means for p in parts]))
        second_moments = torch.stack(
            [p.covariances + torch.einsum("cd,ce->cde", p.means, p.means) for p in parts]
        )
        covariances = torch.einsum("kc,kcde->cde", weights, second_moments) - torch.einsum(
            "cd,ce->cde", means, means
        )
        return ClassFeatureStats(total, means, covariances)

    def sample(
        self,
        stats: ClassFeatureStats,
        num_samples: int,
        generator: torch.Generator,
        ridge: float = 1e-4,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labelled features drawn from the pooled Gaussians, classes in proportion to counts.

        ``ridge`` (relative to the class's mean variance) keeps a class seen only a few
        times, whose covariance is singular, from collapsing onto its mean.
        """
        if stats.counts.sum() <= 0:
            raise ValueError("no class has any example")
        shares = stats.counts / stats.counts.sum()
        per_class = torch.floor(shares * num_samples).long()
        features, labels = [], []
        for label in torch.nonzero(per_class > 0).flatten().tolist():
            covariance = stats.covariances[label]
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
            scale = eigenvalues.clamp_min(0.0) + ridge * covariance.diagonal().mean().clamp_min(
                1e-12
            )
            noise = torch.randn(
                int(per_class[label]), stats.dim, generator=generator, dtype=torch.float64
            )
            features.append(stats.means[label] + (noise * scale.sqrt()) @ eigenvectors.T)
            labels.append(torch.full((int(per_class[label]),), label, dtype=torch.long))
        return torch.cat(features).float(), torch.cat(labels)
