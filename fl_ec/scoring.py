"""Top-1 correctness: of logits already computed, and of a model over a labelled dataset.

Every accuracy fl-ec reports or compares is the fraction of samples whose largest
logit is the label's: :func:`accuracy` of logits, :func:`model_accuracy` of a model
run over inputs in batches. Paired tests (McNemar's, :func:`fl_ec.calibration.paired_z`)
need the per-sample outcomes instead: :func:`hits` and :func:`model_hits`. A fraction
is an exact count ratio (:func:`hit_rate`), NaN over no samples.
"""

from __future__ import annotations

import torch
from torch import nn

from fl_ec.models.layout import channels_last


def hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample top-1 correctness ``argmax(logits) == labels``: bool, one per row."""
    return logits.argmax(dim=1) == labels.to(logits.device)


def hit_rate(correct: torch.Tensor) -> float:
    """The fraction of ``True`` in a correctness mask (NaN when it is empty)."""
    count = correct.numel()
    return int(correct.sum()) / count if count else float("nan")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` (N, C) against ``labels`` (N,)."""
    return hit_rate(hits(logits, labels))


def model_hits(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-sample correctness of ``model`` (eval mode) on normalised ``inputs``, on CPU."""
    model.to(device).eval()
    batches = []
    with torch.inference_mode(), channels_last(model):
        for x, y in zip(inputs.split(batch_size), labels.split(batch_size), strict=True):
            batches.append(hits(model(x.to(device)), y).cpu())
    return torch.cat(batches) if batches else torch.zeros(0, dtype=torch.bool)


def model_accuracy(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on normalised ``inputs``."""
    return hit_rate(model_hits(model, inputs, labels, batch_size, device))
