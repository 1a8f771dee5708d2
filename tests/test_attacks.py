"""Simulated Byzantine clients: each attack's effect, and that only simulations attack."""

from __future__ import annotations

import pytest
import torch

from fl_ec.clients.attacks import ATTACKS, attack_for
from fl_ec.clients.settings import parse_attack
from fl_ec.config import ConfigError, ExperimentConfig
from fl_ec.models import ArchSpec, build_model

SPEC = ArchSpec("cnn", (1, 28, 28), 10)


def _poisoned(name):
    torch.manual_seed(0)
    model = build_model(SPEC)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ATTACKS[name].poison(model, before, seed=3)
    return before, model.state_dict()


def test_sign_flip_negates_and_scale_multiplies_every_weight():
    before, after = _poisoned("sign-flip")
    assert torch.equal(after["fc1.weight"], -before["fc1.weight"])
    before, after = _poisoned("scale")
    assert torch.allclose(after["conv1.weight"], 100 * before["conv1.weight"])


def test_random_weights_keep_each_tensors_spread_but_not_its_values():
    before, after = _poisoned("random")
    weight, noise = before["fc1.weight"], after["fc1.weight"]
    assert not torch.allclose(weight, noise)
    assert noise.std().item() == pytest.approx(weight.std().item(), rel=0.05)
    assert all(bool(torch.isfinite(v).all()) for v in after.values())


def test_label_flip_trains_on_mirrored_labels():
    labels = torch.tensor([0, 3, 9])
    assert ATTACKS["label-flip"].labels(labels, 10).tolist() == [9, 6, 0]
    assert ATTACKS["sign-flip"].labels(labels, 10).tolist() == [0, 3, 9]


def test_only_the_first_partitions_of_a_simulation_attack():
    assert attack_for(1, 2, "scale", simulation=True) is ATTACKS["scale"]
    assert attack_for(2, 2, "scale", simulation=True) is None
    assert attack_for(0, 2, "scale", simulation=False) is None  # a deployed SuperNode


@pytest.mark.parametrize("text", ["sign-flip", "flip:2", "scale:0", "scale:x"])
def test_a_malformed_attack_fails_the_run_in_one_line(text):
    with pytest.raises(ConfigError, match="kind:count"):
        ExperimentConfig.from_run_config({"attack": text})
    assert parse_attack("label-flip:3") == ("label-flip", 3) and parse_attack("") == ("", 0)
