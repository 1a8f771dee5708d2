"""The teacher rules, on hand-made models with known logits."""

import pytest
import torch
from torch import nn

from fl_ec.ensemble import client_weights, combine, teacher_logits


class FixedLogits(nn.Module):
    """Returns x @ W: a linear 'model' whose logits we can compute by hand."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return x @ self.weight


def _models(k=5, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [FixedLogits(torch.randn(d, c, generator=g)) for _ in range(k)]


def test_teacher_is_the_exact_mean_of_logits_and_batching_does_not_matter():
    models = _models()
    x = torch.randn(103, 4)
    expected = torch.stack([m(x) for m in models]).mean(0).detach()
    for batch_size in (7, 512):
        out = teacher_logits(models, x, "mean-logits", batch_size=batch_size)
        assert torch.allclose(out.logits, expected, atol=1e-6)


def test_label_aware_gives_a_class_to_the_clients_that_saw_it():
    weights = client_weights("label-aware", 2, 3, class_counts=[[10, 0, 5], [0, 10, 5]])
    assert weights.tolist() == [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]
    stacked = torch.tensor([[[1.0, 9.0, 2.0]], [[7.0, 3.0, 4.0]]])  # (K=2, B=1, C=3)
    assert combine(stacked, "label-aware", weights).tolist() == [[1.0, 3.0, 3.0]]
    # A class no client saw: everyone votes equally instead of dividing by zero.
    unseen = client_weights("label-aware", 2, 2, class_counts=[[1, 0], [1, 0]])
    assert unseen[:, 1].tolist() == [0.5, 0.5]


def test_each_model_runs_once_per_proxy_sample():
    calls = []

    class Counting(FixedLogits):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    models = [Counting(torch.randn(4, 3)) for _ in range(3)]
    teacher_logits(models, torch.randn(50, 4), "mean-logits", batch_size=16)
    assert sum(calls) == 3 * 50


def test_fp16_storage_bounds_memory_and_stays_close():
    models = _models()
    x = torch.randn(64, 4)
    full = teacher_logits(models, x).logits
    half = teacher_logits(models, x, storage_dtype=torch.float16).logits
    assert half.dtype == torch.float16 and torch.allclose(half.float(), full, atol=1e-2)


@pytest.mark.parametrize("rule", ["label-aware", "gated"])
def test_weighted_rules_need_their_inputs(rule):
    with pytest.raises(ValueError, match=rule):
        teacher_logits(_models(k=2), torch.randn(4, 4), rule)


def test_gated_corrects_each_clients_prior_and_lets_the_confident_client_win():
    # Two classes. Client 0 trained only on class 0, client 1 on both classes equally.
    counts = [[99.0, 0.0], [50.0, 50.0]]
    log_prior = client_weights("gated", 2, 2, class_counts=counts)
    assert torch.allclose(log_prior[0].exp(), torch.tensor([100 / 101, 1 / 101]))
    # On one sample: client 0 leans to its own class by exactly its prior bias; client 1
    # is confident about class 1. After the correction client 0 is indifferent, so the
    # confident client decides the vote.
    bias = log_prior[0] - log_prior[0].mean()
    stacked = torch.stack([bias.unsqueeze(0), torch.tensor([[0.0, 4.0]])])
    combined = combine(stacked, "gated", log_prior).exp()
    assert torch.allclose(combined.sum(-1), torch.ones(1))
    # The plain mean of the probabilities would say ~0.98 / 0.02 -> 0.5 / 0.5.
    assert combined[0, 1] > 0.75
    assert stacked.softmax(-1).mean(0)[0, 1] < combined[0, 1]


def test_extra_members_vote_like_an_average_client():
    from fl_ec.ensemble import with_extra_members

    counts = with_extra_members([[1, 3], [5, 1]], extra=2)
    assert counts == [[1, 3], [5, 1], [3.0, 2.0], [3.0, 2.0]]
    assert with_extra_members(None, extra=1) is None
    assert with_extra_members([[1, 2]], extra=0) == [[1, 2]]


def test_a_trimmed_teacher_leaves_out_the_member_farthest_from_the_median():
    honest = torch.tensor([[2.0, 0.0, -1.0]]).expand(4, 1, 3)
    attacker = torch.tensor([[[-200.0, 300.0, 0.0]]])
    stacked = torch.cat([honest + 0.1 * torch.arange(4.0).view(4, 1, 1), attacker])
    for rule, weights in (
        ("mean-logits", None),
        ("label-aware", torch.full((5, 3), 0.2)),
        ("gated", torch.zeros(5, 3)),
    ):
        trimmed = combine(stacked, rule, weights, trim=1)
        plain = combine(stacked, rule, weights)
        assert trimmed.argmax(-1).item() == 0, rule  # the honest members' class
        assert plain.argmax(-1).item() == 1 or rule == "gated", rule
    # Too few members to tell an outlier: nothing is left out.
    assert torch.equal(combine(stacked[:2], "mean-logits", trim=1), stacked[:2].mean(0))


def test_trimming_spares_the_sole_holder_of_a_rare_class_but_not_the_attackers():
    from fl_ec.ensemble import holder_shares

    # One sample of class 2. Member 0 alone trained on class 2 and says so; members
    # 1-7 never saw it and agree on class 0; members 8-9 attack. Trimming 3: without
    # the class counts the holder is as far from the median as the attackers.
    holder = torch.tensor([[[0.0, 0.0, 5.0]]])
    others = torch.tensor([[2.0, 0.0, -1.0]]).expand(7, 1, 3) + 0.05 * torch.arange(7.0).view(
        7, 1, 1
    )
    attackers = torch.tensor([[[-200.0, 300.0, 0.0]]]).expand(2, 1, 3)
    stacked = torch.cat([holder, others, attackers])
    counts = [[0, 0, 100]] + [[50, 50, 0]] * 9
    weights = client_weights("label-aware", 10, 3, counts)
    shares = holder_shares(counts, 10, 3)
    spared = combine(stacked, "label-aware", weights, trim=3, shares=shares)
    blind = combine(stacked, "label-aware", weights, trim=3)
    assert spared.argmax(-1).item() == 2  # the holder's vote on its class stays
    assert blind.argmax(-1).item() == 0  # the holder was trimmed with the attackers
    assert spared[0, 1] < 1.0 and blind[0, 1] < 1.0  # the attackers' class 1 is gone
    # A fraction of the members trims the same number.
    assert torch.equal(combine(stacked, "label-aware", weights, trim=0.3, shares=shares), spared)


def test_an_inflated_count_does_not_buy_a_larger_share_of_a_class():
    from fl_ec.ensemble import holder_shares

    honest = [[60, 40]] * 4
    shares = holder_shares([*honest, [1e8, 0]], 5, 2)
    # Capped at the median client's 100 examples: 100 of 340 class-0 examples.
    assert shares[4, 0].item() == pytest.approx(100 / 340)
    assert torch.allclose(shares.sum(0), torch.ones(2))
