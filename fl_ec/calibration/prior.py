"""Label-prior correction of a global model on the server's unlabeled proxy set.

Why: at strong label skew (Dirichlet alpha=0.1) the aggregated model -- a parameter
average or a student distilled from specialist clients -- carries a class bias that
moves from round to round. On Fashion-MNIST, final models predicted some classes of the
balanced test set up to 2.2x as often as they occur and one 20-45x less often (4
rounds x 5 local epochs). Their features are better than their decisions.

What: find per-class logit offsets ``delta`` so that the model's mean predicted
distribution over the proxy inputs equals a target prior (the federation's label
distribution, pooled from the class counts the clients report), and add ``delta`` to
the classifier's bias. This is the label-shift EM of Saerens et al. (2002) with the
prior fixed, i.e. one Sinkhorn-style marginal scaling. It uses no labels: the proxy set
is unlabeled, and the target comes from counts the clients already send. It assumes
the proxy inputs follow the federation's input distribution -- the same assumption
ensemble distillation on that proxy set makes.

Nothing here knows about Flower; FedEC applies it to the served model after
distillation (``calibration="prior"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fl_ec.ensemble import teacher_logits


@dataclass(frozen=True)
class PriorCorrection:
    offsets: torch.Tensor  # (C,) added to the logits / the classifier's bias
    iterations: int
    max_prior_error: float  # max |mean softmax - target| after the offsets


def target_prior(class_counts: Sequence[Sequence[float]], smoothing: float = 1.0) -> torch.Tensor:
    """The federation's label distribution: pooled per-class counts, Laplace-smoothed.

    Smoothing keeps a class no client reported at a small non-zero mass, so its offset
    stays finite.
    """
    counts = torch.tensor([list(c) for c in class_counts], dtype=torch.float64).sum(0)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError("class_counts must be a non-empty list of per-class count lists")
    if (counts < 0).any():
        raise ValueError("class counts must be non-negative")
    counts = counts + smoothing
    return counts / counts.sum()


def prior_offsets(
    logits: torch.Tensor,
    prior: torch.Tensor,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
) -> PriorCorrection:
    """Offsets ``delta`` with ``softmax(logits + delta).mean(0) ~= prior``.

    Fixed-point iteration ``delta -= log(mean_softmax / prior)``: a class predicted more
    often than its prior loses logit mass, a rarer one gains it (iterative proportional
    fitting of one marginal). It stops at ``tolerance`` or after ``max_iterations``;
    ``max_prior_error`` reports how close it got.
    """
    if logits.ndim != 2 or logits.shape[1] != prior.numel():
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match a prior over {prior.numel()} classes"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or inf")
    logits = logits.double()
    prior = prior.double().clamp_min(1e-12)
    offsets = torch.zeros_like(prior)
    iterations = 0
    while True:
        predicted = torch.softmax(logits + offsets, dim=1).mean(0)
        error = float((predicted - prior).abs().max())
        if error <= tolerance or iterations == max_iterations:
            return PriorCorrection(offsets.float(), iterations, error)
        offsets -= torch.log(predicted.clamp_min(1e-12) / prior)
        offsets -= offsets.mean()  # softmax is shift-invariant: keep the offsets centred
        iterations += 1


def classifier_of(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` that has a bias: the layer whose bias the offsets shift."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].bias is None:
        raise ValueError(
            "prior correction and feature calibration need a model whose last layer is "
            'nn.Linear with a bias; set calibration="none"'
        )
    return linears[-1]


def model_logits(
    model: nn.Module,
    inputs: torch.Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits of ``model`` over ``inputs`` in eval mode, on CPU: a one-member teacher pass."""
    return teacher_logits([model], inputs, batch_size=batch_size, device=device).logits


def correct_prior(
    model: nn.Module,
    proxy_inputs: torch.Tensor,
    prior: torch.Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> PriorCorrection:
    """Shift ``model``'s classifier bias (in place) so its proxy predictions match ``prior``."""
    classifier = classifier_of(model)
    correction = prior_offsets(model_logits(model, proxy_inputs, batch_size, device), prior)
    with torch.no_grad():
        classifier.bias += correction.offsets.to(classifier.bias.device, classifier.bias.dtype)
    return correction


def paired_z(reference_correct: torch.Tensor, candidate_correct: torch.Tensor) -> float:
    """McNemar's z for "the reference is more accurate than the candidate".

    Both are per-sample correctness masks over the *same* labelled samples
    (:func:`fl_ec.scoring.model_hits`). Only the samples the two disagree on carry
    information: ``(ref_only - cand_only) / sqrt(ref_only + cand_only)``, ~N(0, 1) when
    both are equally accurate. Why not the plain accuracy difference: on 1,000
    validation samples a correction that flips 40 predictions moves accuracy by a few
    tenths of a point either way by chance alone.
    """
    if reference_correct.shape != candidate_correct.shape:
        raise ValueError("correctness masks must cover the same samples")
    reference = reference_correct.bool()
    candidate = candidate_correct.bool()
    reference_only = int((reference & ~candidate).sum())
    candidate_only = int((candidate & ~reference).sum())
    if reference_only + candidate_only == 0:
        return 0.0
    return (reference_only - candidate_only) / math.sqrt(reference_only + candidate_only)
