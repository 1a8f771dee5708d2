"""The pure pieces of ``simulations/hce_ensemble_bounds.py``."""

from __future__ import annotations

import torch
from hce_ensemble_bounds import line_group, row, weighted_average
from torch import nn


def test_weighted_average_weighs_states_by_examples() -> None:
    template = nn.Linear(2, 1)
    first = {"weight": torch.tensor([[1.0, 0.0]]), "bias": torch.tensor([0.0])}
    second = {"weight": torch.tensor([[4.0, 2.0]]), "bias": torch.tensor([3.0])}
    averaged = weighted_average(template, [first, second], [1, 2])
    assert torch.allclose(averaged.weight, torch.tensor([[3.0, 4.0 / 3.0]]))
    assert torch.allclose(averaged.bias, torch.tensor([2.0]))
    assert averaged is not template


def test_lines_partition_the_nodes_and_take_turns() -> None:
    nodes, num_lines = 10, 3
    for server_round in range(1, 4):
        groups = [line_group(line, server_round, nodes, num_lines) for line in range(num_lines)]
        assert sorted(sum(groups, [])) == list(range(nodes))  # every node trains one line
    # Over num_lines rounds every node trains every line once.
    for node in range(nodes):
        lines = {
            line
            for server_round in range(1, num_lines + 1)
            for line in range(num_lines)
            if node in line_group(line, server_round, nodes, num_lines)
        }
        assert lines == set(range(num_lines))


def test_row_scores_the_mean_logit_ensemble() -> None:
    labels = torch.tensor([0, 1, 1, 0])
    # Member A is right on samples 0-2, member B on 0, 1 and 3; their mean is right on all.
    member_a = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 1.0]])
    member_b = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [2.0, 0.0]])
    result = row("arm", "two", [member_a, member_b], labels, reference=50.0, compute="1x")
    assert result["member acc"] == "75.00 / 75.00"
    assert result["ensemble acc"] == "100.00"
    assert result["ensemble - mean member"] == "+25.00"
    assert result["ensemble - reference"] == "+50.00"
    assert result["disagreement"] == "0.500"
