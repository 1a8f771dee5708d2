"""The teacher: combine several models' outputs on the proxy set into one target per sample.

EC-DNN aggregates by *averaging outputs* rather than parameters. Here the server runs
every client model over its unlabeled proxy set and combines their logits with a rule:

* ``mean-logits`` -- the plain average (FedDF's teacher; the default);
* ``label-aware`` -- per class c, client k's vote is weighted by how many examples of c
  it trained on (``class_counts[k][c]``); a client that never saw class c has no say
  on it. This targets the non-IID failure of the plain mean, where clients that never
  saw a class still push confident (wrong) logits for it;
* ``gated`` -- prior-corrected, confidence-gated probabilities (below).

``gated`` targets strongly non-IID clients. A model fine-tuned on a skewed label
distribution ``p_k(y)`` learns logits ~ ``log p(x|y) + log p_k(y)``: it is biased
towards its own classes. Subtracting ``log p_k(y)`` (Laplace-smoothed class counts,
the logit adjustment of Menon et al. 2021) makes the clients' outputs comparable;
each client's corrected softmax then votes with a per-sample weight equal to its
own confidence (max probability), so on each image the clients that recognise it
dominate the ones that are guessing. Measured on a FedAvg trajectory at alpha=0.1
(rounds 4-10), this teacher beat the parameter average on validation in 6 of 7
rounds, where ``label-aware`` did in none.

Every model runs exactly once per proxy sample, one proxy batch at a time, under
``torch.inference_mode``. The rule is applied per batch, so memory is bounded by
``batch x clients x classes`` and by the ``N x classes`` result; the result can be
stored in fp16 for very large proxy sets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fl_ec.models.layout import channels_last
from fl_ec.robust import trim_count

RULES = ("mean-logits", "label-aware", "gated")
# Rules whose per-model weights come from class_counts.
WEIGHTED_RULES = ("label-aware", "gated")


@dataclass
class TeacherOutputs:
    """Combined teacher logits over the proxy set, plus how long the pass took."""

    logits: torch.Tensor  # (N, C), on CPU
    seconds: float
    samples_per_second: float  # proxy samples x models / seconds


def client_weights(
    rule: str,
    num_models: int,
    num_classes: int,
    class_counts: Sequence[Sequence[float]] | None = None,
) -> torch.Tensor | None:
    """Per-(model, class) weights ``(K, C)``, or None (unweighted).

    For ``label-aware`` they sum to 1 over models; for ``gated`` they are each model's
    smoothed log class prior ``log p_k(c)``, subtracted from its logits.
    """
    if rule == "label-aware":
        counts = _count_matrix(rule, class_counts, num_models, num_classes)
        totals = counts.sum(0, keepdim=True)
        # A class nobody trained on: fall back to an equal vote rather than 0/0.
        uniform = torch.full_like(counts, 1.0 / num_models)
        return torch.where(totals > 0, counts / totals.clamp_min(1e-12), uniform)
    if rule == "gated":
        return log_class_prior(_count_matrix(rule, class_counts, num_models, num_classes))
    return None


def with_extra_members(
    class_counts: Sequence[Sequence[float]] | None, extra: int
) -> list[list[float]] | None:
    """The clients' class counts plus ``extra`` members that vote like an average client.

    Members that are not clients (the previous global model) trained on no data of
    their own: each gets the mean class counts of the clients.
    """
    if class_counts is None:
        return None
    counts = [list(c) for c in class_counts]
    if extra:
        mean = torch.tensor(counts, dtype=torch.float32).mean(0).tolist()
        counts += [mean] * extra
    return counts


def log_class_prior(
    class_counts: Sequence[float] | torch.Tensor, smoothing: float = 1.0
) -> torch.Tensor:
    """Laplace-smoothed log label frequencies over the last dim: ``(C,)`` or ``(K, C)``.

    One definition for both places that correct a client's label skew: the client's
    logit-adjusted loss and the ``gated`` teacher. Smoothing keeps an unseen class
    rare rather than impossible (no ``log 0``).
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float32).clamp_min(0) + smoothing
    return (counts / counts.sum(-1, keepdim=True)).log()


def _count_matrix(
    rule: str,
    class_counts: Sequence[Sequence[float]] | None,
    num_models: int,
    num_classes: int,
) -> torch.Tensor:
    """``class_counts`` as a checked ``(K, C)`` float tensor."""
    if class_counts is None or len(class_counts) != num_models:
        raise ValueError(f"rule {rule!r} needs class_counts for every model")
    counts = torch.as_tensor([list(c) for c in class_counts], dtype=torch.float32)
    if counts.shape != (num_models, num_classes):
        raise ValueError(f"class_counts must be {num_models}x{num_classes}, got {counts.shape}")
    return counts


def holder_shares(
    class_counts: Sequence[Sequence[float]], num_models: int, num_classes: int
) -> torch.Tensor:
    """``(K, C)``: each model's share of all the models' examples of each class.

    What keeps the few holders of a rare class from being trimmed (:func:`combine`).
    Each model's counts are first capped at the median model's total, so a client that
    reports an inflated ``num-examples`` cannot make itself a class's main holder. A
    class nobody holds gives nobody a share.
    """
    counts = _count_matrix("teacher-trim", class_counts, num_models, num_classes).clamp_min(0)
    capped = counts.clamp(max=float(counts.sum(1).median()))
    return capped / capped.sum(0, keepdim=True).clamp_min(1e-12)


def combine(
    stacked: torch.Tensor,
    rule: str,
    weights: torch.Tensor | None = None,
    trim: float = 0,
    shares: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``rule`` over dim 0 of ``stacked`` logits ``(K, B, C)`` -> ``(B, C)``.

    ``trim``: per sample, that many members (a count, or a fraction of the ``K``)
    whose outputs lie farthest (L1) from the members' coordinate-wise median are left
    out (:func:`kept_members`); the rule combines the rest, its weights renormalised
    over them. ``shares`` (:func:`holder_shares`): a member's distance shrinks by its
    share of the sample's class -- the class the members' share-weighted vote picks --
    so a rare class's few holders, who disagree with the median on exactly its
    samples, are not the ones trimmed.
    """
    if rule not in RULES:
        raise ValueError(f"teacher rule {rule!r} is unknown: choose one of {', '.join(RULES)}")
    if rule in WEIGHTED_RULES and weights is None:
        raise ValueError(f"rule {rule!r} needs the models' class-count weights")
    count = trim_count(trim, stacked.shape[0]) if trim else 0
    protection = None
    if count and shares is not None:
        shares = shares.to(stacked)
        consensus = (stacked.softmax(-1) * shares.unsqueeze(1)).sum(0).argmax(-1)  # (B,)
        protection = shares[:, consensus]  # (K, B)
    if rule == "mean-logits":
        if not count:
            return stacked.mean(0)
        keep = kept_members(stacked, count, protection)
        return (stacked * keep).sum(0) / keep.sum(0)
    if rule == "label-aware":
        votes = weights.to(stacked).unsqueeze(1)  # type: ignore[union-attr]  # sum to 1
        if not count:
            return (stacked * votes).sum(0)
        votes = votes * kept_members(stacked, count, protection)
        return (stacked * votes).sum(0) / votes.sum(0).clamp_min(1e-12)
    # gated: prior-corrected probabilities, each voting with its own confidence.
    probs = (stacked - weights.to(stacked).unsqueeze(1)).softmax(-1)  # type: ignore[union-attr]
    confidence = probs.amax(-1, keepdim=True)  # (K, B, 1)
    if count:
        confidence = confidence * kept_members(probs, count, protection)
    combined = (probs * confidence).sum(0) / confidence.sum(0)
    return combined.clamp_min(1e-12).log()


def kept_members(
    outputs: torch.Tensor, trim: int, protection: torch.Tensor | None = None
) -> torch.Tensor:
    """``(K, B, 1)`` mask: 0 for each sample's ``trim`` members farthest from the median.

    The median is coordinate-wise over the members; with ``2 * trim >= K`` nothing is
    left out (the median of too few members says nothing about which are outliers).
    ``protection`` ``(K, B)`` in [0, 1] scales each member's distance by ``1 - it``.
    """
    members = outputs.shape[0]
    if trim < 1 or 2 * trim >= members:
        return torch.ones_like(outputs[..., :1])
    median = outputs.median(0).values
    distance = (outputs - median).abs().sum(-1)  # (K, B)
    if protection is not None:
        distance = distance * (1 - protection)
    farthest = distance.topk(trim, dim=0).indices
    mask = torch.ones_like(distance).scatter_(0, farthest, 0.0)
    return mask.unsqueeze(-1)


@torch.inference_mode()
def teacher_logits(
    models: Sequence[nn.Module],
    proxy_batches: Sequence[torch.Tensor] | torch.Tensor,
    rule: str = "mean-logits",
    *,
    class_counts: Sequence[Sequence[float]] | None = None,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    storage_dtype: torch.dtype = torch.float32,
    trim: float = 0,
) -> TeacherOutputs:
    """Run every model once over the proxy inputs and combine their logits with ``rule``.

    ``proxy_batches`` is a normalised input tensor ``(N, ...)`` (split into
    ``batch_size`` chunks here) or an iterable of ready batches. Models are put in
    eval mode: BatchNorm uses each client's running statistics, as at inference.
    ``trim`` leaves out, per sample, the members farthest from the median (:func:`combine`),
    sparing the holders of the sample's class when ``class_counts`` are given.
    """
    if not models:
        raise ValueError("the teacher needs at least one model")
    if rule not in RULES:
        raise ValueError(f"teacher rule {rule!r} is unknown: choose one of {', '.join(RULES)}")
    start = time.perf_counter()
    for model in models:
        model.to(device).eval()
    if isinstance(proxy_batches, torch.Tensor):
        proxy_batches = proxy_batches.split(batch_size)
    weights: torch.Tensor | None = None
    shares: torch.Tensor | None = None
    outputs: list[torch.Tensor] = []
    seen = 0
    with channels_last(*models):
        for batch in proxy_batches:
            batch = batch.to(device, non_blocking=True)
            stacked = torch.stack([model(batch).float() for model in models])
            if weights is None and rule in WEIGHTED_RULES:
                weights = client_weights(rule, len(models), stacked.shape[-1], class_counts)
            if shares is None and trim and class_counts is not None:
                shares = holder_shares(class_counts, len(models), stacked.shape[-1])
            outputs.append(combine(stacked, rule, weights, trim, shares).to("cpu", storage_dtype))
            seen += batch.shape[0]
    seconds = time.perf_counter() - start
    logits = torch.cat(outputs)
    return TeacherOutputs(logits, seconds, seen * len(models) / max(seconds, 1e-9))
