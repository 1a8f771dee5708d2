"""Top-1 correctness of logits and of models over a dataset."""

from __future__ import annotations

import math

import torch

from fl_ec.models import ArchSpec, build_model
from fl_ec.scoring import accuracy, hit_rate, hits, model_accuracy, model_hits


def test_accuracy_is_the_fraction_of_rows_whose_argmax_is_the_label():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 0.0], [0.0, 5.0, 1.0]])
    labels = torch.tensor([0, 2, 1, 1])
    assert hits(logits, labels).tolist() == [True, True, False, True]
    assert accuracy(logits, labels) == 0.75
    assert accuracy(logits.half(), labels) == 0.75
    assert math.isnan(accuracy(logits[:0], labels[:0]))
    assert hit_rate(torch.tensor([True, False, False])) == 1 / 3  # an exact count ratio


def test_a_model_is_scored_in_eval_mode_whatever_the_batch_size():
    torch.manual_seed(0)
    model = build_model(ArchSpec("cnn", (1, 28, 28), 10)).train()
    inputs, labels = torch.randn(50, 1, 28, 28), torch.randint(0, 10, (50,))
    per_sample = model_hits(model, inputs, labels, batch_size=7)
    assert not model.training and per_sample.dtype == torch.bool and per_sample.shape == (50,)
    with torch.no_grad():
        expected = hits(model(inputs), labels)
    assert torch.equal(per_sample, expected)
    assert torch.equal(model_hits(model, inputs, labels, batch_size=64), per_sample)
    assert model_accuracy(model, inputs, labels) == int(expected.sum()) / 50
    assert math.isnan(model_accuracy(model, inputs[:0], labels[:0]))
