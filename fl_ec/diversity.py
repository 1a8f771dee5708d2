"""Diversity-aware distillation of several variants at once (the HCE step).

The HCE paper's exact objective is not available, so fl-ec uses one with a clean
justification. For members with logits ``z_v`` and their mean-logit ensemble
``z_bar = mean_v z_v`` (how the HCE ensemble predicts), the cross-entropy to any
target ``p`` decomposes exactly as

    CE(p, softmax(z_bar)) = mean_v CE(p, softmax(z_v)) - D,
    D = mean_v logsumexp(z_v) - logsumexp(z_bar)  >= 0   (convexity of logsumexp),

so the ensemble's loss is the members' average loss minus a *diversity* term D that
grows with their disagreement (the log-sum-exp analogue of Krogh & Vedelsby's
ambiguity decomposition). Negative-correlation learning trades the two off:

    L = mean_v KL(p_T || q_v) - a(x) * D(x)
      = (1 - a(x)) * mean_v KL(p_T || q_v) + a(x) * KL(p_T || softmax(z_bar)),

with ``a(x) = lambda * H(p_T(x)) / log C``: disagreement is rewarded only where the
teacher itself is uncertain (high normalised entropy), and never where it is sure --
there every member should simply match it. Because ``0 <= a <= 1`` the loss is a
per-sample convex combination of two KL terms, so it stays bounded below and members
cannot "win" by diverging. ``lambda = 0`` is plain, independent distillation of each
variant; ``lambda = 1`` trains only the combined output where the teacher is flat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the universal alias

from fl_ec.errors import SettingError


class VariantEnsemble(nn.Module):
    """Several models trained together; ``forward`` is their mean-logit ensemble."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a variant ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(V, B, C)`` logits of every member."""
        return torch.stack([member(x) for member in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits(x).mean(0)


def disagreement(member_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample diversity ``D = mean_v lse(z_v) - lse(mean_v z_v)`` (>= 0), shape (B,)."""
    return member_logits.logsumexp(-1).mean(0) - member_logits.mean(0).logsumexp(-1)


def check_diversity_weight(diversity_weight: float) -> None:
    """Raise :class:`~fl_ec.errors.SettingError` unless ``0 <= diversity_weight <= 1``."""
    if not 0.0 <= diversity_weight <= 1.0:
        raise SettingError("", "diversity_weight", diversity_weight, "must be within [0, 1]")


def diversity_kd_loss(
    member_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    diversity_weight: float,
) -> torch.Tensor:
    """The diversity-aware KD loss above for ``(V, B, C)`` member logits, times T^2."""
    check_diversity_weight(diversity_weight)
    t = temperature
    teacher_log_probs = F.log_softmax(teacher_logits.float() / t, dim=-1)
    teacher_probs = teacher_log_probs.exp()

    def kl_to_teacher(logits: torch.Tensor) -> torch.Tensor:  # per sample
        return (teacher_probs * (teacher_log_probs - F.log_softmax(logits / t, -1))).sum(-1)

    individual = torch.stack([kl_to_teacher(z) for z in member_logits]).mean(0)
    if diversity_weight == 0.0:
        return individual.mean() * t * t
    joint = kl_to_teacher(member_logits.mean(0))
    entropy = -(teacher_probs * teacher_log_probs).sum(-1)
    uncertainty = entropy / math.log(teacher_logits.shape[-1])
    weight = (diversity_weight * uncertainty).clamp(0.0, 1.0)
    return ((1 - weight) * individual + weight * joint).mean() * t * t


def diversity_loss_fn(temperature: float, diversity_weight: float):
    """A ``loss_fn`` for :func:`fl_ec.distill.distill` on a :class:`VariantEnsemble`."""

    def loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return diversity_kd_loss(model.member_logits(x), target, temperature, diversity_weight)

    return loss
