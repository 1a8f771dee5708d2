"""The device-constrained fleet's baselines: a quantized downlink, training by some
tiers only, a narrower model, and their run-config keys."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fl_ec.clients.client_app import received_model
from fl_ec.config import ExperimentConfig
from fl_ec.errors import ConfigError
from fl_ec.models import ArchSpec, build_model
from fl_ec.models.spec import scaled_widths
from fl_ec.run.downlink import QuantizedDownlink
from fl_ec.run.tiers import TrainTiers
from fl_ec.run.wrapper import innermost
from tests.conftest import FakeGrid

SPEC = ArchSpec("cnn", (1, 28, 28), 10)


def _messages(strategy, nodes):
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model(SPEC).state_dict())
    config = ConfigRecord({"arch-spec": SPEC.to_json()})
    return list(strategy.configure_train(1, arrays, config, FakeGrid(nodes))), arrays


def _reply(request: Message, tier: str, shift: float) -> Message:
    state = request.content["arrays"].to_torch_state_dict()
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v + shift for k, v in state.items()}),
            "metrics": MetricRecord({"num-examples": 10}),
            "capability": ConfigRecord({"device-tier": tier}),
        }
    )
    return Message(content, reply_to=request)


def test_quantized_downlink_sends_int8_weights_the_client_app_unpacks(task_identity):
    strategy = QuantizedDownlink(FedAvg(fraction_train=1.0, min_available_nodes=2), bits=8)
    messages, arrays = _messages(strategy, [1, 2])
    assert len(messages) == 2
    sent = sum(a.numpy().nbytes for a in messages[0].content["arrays"].values())
    fp32 = sum(a.numpy().nbytes for a in arrays.values())
    assert sent < 0.3 * fp32  # int8 weights plus per-channel scales and fp32 biases
    _, model = received_model(messages[1].content)  # what fl-ec's ClientApp rebuilds
    original = arrays.to_torch_state_dict()
    for key, value in model.state_dict().items():
        step = original[key].abs().amax() / 127
        assert torch.allclose(value, original[key], atol=float(step)), key
    assert not any(p.dtype == torch.int8 for p in model.parameters())  # trains in fp32


def test_quantized_downlink_rejects_unsupported_bits():
    with pytest.raises(ValueError, match="bits=3"):
        QuantizedDownlink(FedAvg(), bits=3)


def test_train_tiers_leave_other_tiers_out_once_known(task_identity):
    strategy = TrainTiers(FedAvg(fraction_train=1.0, min_available_nodes=2), ["gpu"])
    first, arrays = _messages(strategy, [1, 2, 3])
    assert sorted(m.metadata.dst_node_id for m in first) == [1, 2, 3]  # tiers unknown yet
    tiers = {1: "gpu", 2: "edge", 3: "gpu"}
    shifts = {1: 1.0, 2: 100.0, 3: 3.0}
    replies = [_reply(m, tiers[m.metadata.dst_node_id], shifts[m.metadata.dst_node_id])
               for m in first]
    aggregated, _ = strategy.aggregate_train(1, replies)
    start = arrays.to_torch_state_dict()["conv1.bias"]
    # The edge node's x100 shift is left out: the mean of the gpu nodes' 1 and 3.
    assert torch.allclose(aggregated.to_torch_state_dict()["conv1.bias"], start + 2.0)
    second, _ = _messages(strategy, [1, 2, 3])
    assert sorted(m.metadata.dst_node_id for m in second) == [1, 3]
    assert innermost(strategy).__class__ is FedAvg


def test_train_tiers_leave_a_described_edge_node_out_of_its_first_round(task_identity):
    strategy = TrainTiers(FedAvg(fraction_train=1.0, min_available_nodes=2), ["gpu"])
    strategy.note_capability(2, ConfigRecord({"device-tier": "edge"}))
    with pytest.raises(ValueError, match="device-tier"):
        strategy.note_capability(3, ConfigRecord({"device-kind": "cpu"}))
    first, _ = _messages(strategy, [1, 2, 3])
    assert sorted(m.metadata.dst_node_id for m in first) == [1, 3]


def test_model_width_scales_the_spec_and_the_parameters():
    assert scaled_widths("cnn", 0.5) == (16, 32, 64)
    narrow = build_model(ArchSpec("cnn", (1, 28, 28), 10, scaled_widths("cnn", 0.5)))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert 0.24 < count(narrow) / count(build_model(SPEC)) < 0.27


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "fedec", "downlink-bits": 8}, "downlink-bits.*strategy=fedavg"),
        ({"strategy": "fedavg", "downlink-bits": 3}, "downlink-bits"),
        ({"model-width": 0.0}, "model-width"),
    ],
)
def test_fleet_keys_fail_fast_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_run_config(overrides)


def test_fleet_keys_reach_the_config():
    config = ExperimentConfig.from_run_config(
        {"strategy": "fedavg", "downlink-bits": 8, "train-tiers": "gpu, tpu", "model-width": 0.5}
    )
    assert config.federation.tier_list() == ["gpu", "tpu"]
    assert config.federation.downlink_bits == 8 and config.training.model_width == 0.5
