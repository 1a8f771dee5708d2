"""The diversity-aware variant distillation objective."""

import pytest
import torch
from torch import nn

from fl_ec.distill import DistillSettings, distill, kd_loss
from fl_ec.diversity import VariantEnsemble, disagreement, diversity_kd_loss, diversity_loss_fn


def _members(k: int = 3):
    torch.manual_seed(0)
    return [nn.Linear(5, 4) for _ in range(k)]


def test_decomposition_ensemble_loss_is_average_loss_minus_disagreement():
    torch.manual_seed(1)
    member_logits = torch.randn(3, 7, 4)
    target = torch.randint(0, 4, (7,))
    ce = nn.functional.cross_entropy
    average = torch.stack([ce(z, target, reduction="none") for z in member_logits]).mean(0)
    ensemble = ce(member_logits.mean(0), target, reduction="none")
    assert torch.allclose(ensemble, average - disagreement(member_logits), atol=1e-5)
    assert (disagreement(member_logits) >= 0).all()
    assert torch.allclose(
        disagreement(member_logits[:1].repeat(3, 1, 1)), torch.zeros(7), atol=1e-6
    )


def test_weight_zero_is_plain_distillation_of_each_variant():
    members = _members()
    x, teacher = torch.randn(16, 5), torch.randn(16, 4)
    stacked = torch.stack([m(x) for m in members])
    plain = sum(kd_loss(z, teacher, 2.0) for z in stacked) / len(members)
    assert torch.allclose(diversity_kd_loss(stacked, teacher, 2.0, 0.0), plain, atol=1e-6)


def test_diversity_term_changes_gradients_where_the_teacher_is_uncertain():
    members = _members()
    x = torch.randn(16, 5)
    uncertain_teacher = torch.zeros(16, 4)  # flat: maximal entropy
    grads = []
    for weight in (0.0, 0.8):
        for m in members:
            m.zero_grad()
        diversity_kd_loss(
            torch.stack([m(x) for m in members]), uncertain_teacher, 1.0, weight
        ).backward()
        grads.append(torch.cat([m.weight.grad.flatten() for m in members]))
    assert not torch.allclose(grads[0], grads[1])
    # A confident (one-hot-like) teacher leaves almost no room for the diversity term.
    sure = torch.full((16, 4), -30.0)
    sure[:, 0] = 30.0
    stacked = torch.stack([m(x) for m in members])
    off, on = (diversity_kd_loss(stacked, sure, 1.0, w) for w in (0.0, 1.0))
    assert torch.allclose(off, on, rtol=1e-4)


def test_weight_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="diversity_weight"):
        diversity_kd_loss(torch.zeros(2, 3, 4), torch.zeros(3, 4), 1.0, 1.5)


def test_joint_distillation_of_a_variant_ensemble_reduces_the_loss():
    members = _members()
    ensemble = VariantEnsemble(members)
    torch.manual_seed(2)
    proxy = torch.randn(256, 5)
    teacher = proxy @ torch.randn(5, 4)
    loss_fn = diversity_loss_fn(1.0, 0.5)
    before = loss_fn(ensemble, proxy, teacher).item()
    settings = DistillSettings(steps=150, batch_size=64, lr=0.02, recalibrate_bn=False)
    distill(ensemble, proxy, teacher, None, settings, loss_fn=loss_fn)
    assert loss_fn(ensemble, proxy, teacher).item() < 0.5 * before
