"""The oracle of ``simulations/server_ceiling.py``: retrains only the layers it names."""

from __future__ import annotations

import pytest
import torch
from server_ceiling import oracle_retrain, table, trainable_layers
from torch import nn

from fl_ec.scoring import model_accuracy


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (300,), generator=generator)
    images = torch.randn(300, 1, 6, 6, generator=generator) * 0.3
    images[:, 0, 0, :] += labels.unsqueeze(1).float()  # a learnable signal per class
    return images, labels


@pytest.mark.parametrize("part", ["classifier", "dense"])
def test_only_the_named_layers_change(part: str) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    oracle_retrain(model, part, *_data(), epochs=2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    expected = {"5.weight", "5.bias"} | ({"3.weight", "3.bias"} if part == "dense" else set())
    assert changed == expected
    assert all(p.requires_grad for p in model.parameters())  # the model is left trainable


def test_retraining_the_classifier_repairs_a_scrambled_one() -> None:
    images, labels = _data()
    model = _model()
    oracle_retrain(model, "dense", images, labels, epochs=20, lr=1e-2)
    trained = model_accuracy(model, images, labels)
    with torch.no_grad():
        model[5].weight.copy_(model[5].weight[torch.tensor([2, 0, 1])])  # rotate the classes
    assert model_accuracy(model, images, labels) < trained - 0.3
    oracle_retrain(model, "classifier", images, labels, epochs=40, lr=1e-2)
    assert model_accuracy(model, images, labels) >= trained - 0.05


def test_unknown_part_is_rejected() -> None:
    with pytest.raises(ValueError, match="choose one of classifier, dense"):
        trainable_layers(_model(), "everything")


def test_table_reports_gains_and_means_per_regime() -> None:
    rows = {
        "a": {"final": 0.80, "corrected": 0.82, "classifier": 0.83, "dense": 0.85},
        "b": {"final": 0.80, "corrected": 0.81, "classifier": 0.83, "dense": 0.86},
        "c": {"final": 0.70, "corrected": 0.75, "classifier": 0.80, "dense": 0.90},
    }
    lines = table(rows, {"a": "20 x 1", "b": "20 x 1", "c": "4 x 5"}).splitlines()
    assert lines[2].rstrip(" |").split(" | ")[3:7] == ["+2.00", "+3.00", "+5.00", "0.67"]
    means = [line for line in lines if line.startswith("| mean")]
    # One mean row per regime with more than one run; never a mean across regimes.
    assert len(means) == 1 and "| 20 x 1 |" in means[0] and "+1.50 ± 0.71" in means[0]
