"""FedHCE with a user's own model class (no fl-ec spec) and a stock ClientApp's two lines.

The models are Flower's quickstart-pytorch ``Net`` (it reshapes the last conv output
to a hard-coded size) and the same net with ``torch.flatten``. Messages are built as
FedHCE's ``configure_train`` builds them, answered through ``receive_variant`` /
``reply_variant``, and parsed by FedHCE's ``aggregate_train``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (as in the tutorial)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn

from fl_ec.clients import receive_variant, reply_variant
from fl_ec.compression import probe_prunable_layers, prune_structured, replay_pruning
from fl_ec.compression.quantization import weight_bits
from fl_ec.data.sources import make_synthetic
from fl_ec.distill import DistillSettings
from fl_ec.errors import ModelSpecError
from fl_ec.models import ArchSpec, build_model
from fl_ec.protocol import PRUNING_KEY
from fl_ec.strategies import FedEC, FedHCE, TierPolicy
from tests.conftest import FakeGrid

PRUNED = "prune-0.5+int4"
VARIANTS = ["full", "int8", "int4", "prune-0.5", PRUNED]
TIERS = {1: "gpu", 2: "edge", 3: "phone"}
POLICY = TierPolicy({"gpu": "full", "edge": PRUNED, "phone": "int4"}, default="int8")


class Net(nn.Module):
    """quickstart-pytorch's model (from 'PyTorch: A 60 Minute Blitz'), for 1x28x28 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 4 * 4)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class FlattenNet(Net):
    """The same layers; the flatten follows the conv's width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class ViewOnlyNet(nn.Module):
    """One conv reshaped to a fixed size, then the output layer: nothing can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=4)
        self.out = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.conv(x)).view(-1, 4 * 6 * 6))


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    train, val = make_synthetic(num_train=200, num_test=100, seed=3)
    return train.normalize(train.images), (val.normalize(val.images), val.labels)


def _strategy(data, builder: type[nn.Module], variants=VARIANTS) -> FedHCE:  # noqa: ANN001
    proxy, validation = data
    small = DistillSettings(steps=4, batch_size=32, eval_every=2, patience=10)
    return FedHCE(
        variants=variants,
        assignment_policy=POLICY,
        model_builder=builder,
        proxy_data=proxy,
        validation_data=validation,
        distill=small,
        variant_distill=small,
        client_start="student",  # clients train the served variants themselves
        min_train_nodes=2,
        min_available_nodes=2,
    )


def _requests(strategy: FedHCE, builder: type[nn.Module], server_round: int = 1):
    torch.manual_seed(0)
    arrays = ArrayRecord(builder().state_dict())
    config = ConfigRecord({"lr": 0.01})  # what quickstart's ServerApp sends
    messages = strategy.configure_train(server_round, arrays, config, FakeGrid(list(TIERS)))
    return {m.metadata.dst_node_id: m for m in messages}


def _stock_client(msg: Message, builder: type[nn.Module], context: Context) -> Message:
    """quickstart's ClientApp train() with its two changed lines, one SGD step for training."""
    model = receive_variant(msg, builder)
    optimizer = torch.optim.SGD(model.parameters(), lr=msg.content["config"]["lr"])
    inputs, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss = F.cross_entropy(model(inputs), labels)
    loss.backward()
    optimizer.step()
    metrics = {"train_loss": loss.item(), "num-examples": 8}
    return reply_variant(msg, model, metrics, context)


def _context(tier: str) -> Context:
    return Context(
        1, 0, {"partition-id": 0, "num-partitions": 3, "device-tier": tier}, RecordDict(), {}
    )


def test_strategies_are_exported():
    assert issubclass(FedHCE, FedEC)


@pytest.mark.parametrize("builder", [Net, FlattenNet])
def test_a_pruning_decision_round_trips_through_json_to_the_same_model(builder):
    torch.manual_seed(0)
    model = builder().eval()
    full_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 1, 28, 28)
    blocked = probe_prunable_layers(builder(), x[:2], 0.5).blocked
    structure = prune_structured(model, x[:2], 0.5, keep=blocked)
    wire = json.dumps(json.loads(structure.decision_json()))  # what the config carries
    fresh = builder()
    replayed = replay_pruning(fresh, wire)
    assert replayed.kept == structure.kept
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    fresh.load_state_dict(structure.slice(full_state))
    assert torch.equal(fresh.eval()(x), model(x))
    assert model.fc3.out_features == 10 and model.fc1.out_features == 60


def test_the_view_model_keeps_the_reshaped_conv_and_the_output_layer_whole():
    probe = probe_prunable_layers(Net(), torch.randn(2, 1, 28, 28), 0.5)
    assert sorted(probe.blocked) == ["conv2", "fc3"]  # .view(-1, 16*4*4); the logits
    assert sorted(probe.prunable) == ["conv1", "fc1", "fc2"]
    flatten = probe_prunable_layers(FlattenNet(), torch.randn(2, 1, 28, 28), 0.5)
    assert flatten.blocked == ["fc3"]


@pytest.mark.parametrize("builder", [Net, FlattenNet])
def test_fedhce_builds_its_variants_from_model_builder(task_identity, data, builder):
    strategy = _strategy(data, builder)
    requests = _requests(strategy, builder)
    assert {m.content["config"]["variant"] for m in requests.values()} == {"int8"}  # default
    pruned = strategy.bank.models[PRUNED]
    assert pruned.fc1.out_features == 60 and pruned.fc3.out_features == 10
    assert pruned.conv2.out_channels == (16 if builder is Net else 8)
    assert weight_bits(pruned) == 4
    outputs = pruned(torch.randn(3, 1, 28, 28))
    assert outputs.shape == (3, 10)


def test_a_model_that_cannot_be_pruned_fails_in_one_line_naming_what_works(data):
    with pytest.raises(ValueError) as caught:
        _strategy(data, ViewOnlyNet, variants=["full", "int8", "prune-0.5"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("prune-0.5 cannot be built from this model")
    assert message.endswith("variants that work with it: full, int8")


@pytest.mark.parametrize("builder", [Net, FlattenNet])
def test_receive_variant_gives_the_model_the_server_sent(task_identity, data, builder):
    strategy = _strategy(data, builder)
    requests = _requests(strategy, builder)  # round 1: every node gets the default
    strategy.aggregate_train(
        1, [_stock_client(m, builder, _context(TIERS[n])) for n, m in requests.items()]
    )
    requests = _requests(strategy, builder, server_round=2)  # by the tiers reported
    x = torch.randn(5, 1, 28, 28)
    received = {}
    for node, request in requests.items():
        name = request.content["config"]["variant"]
        assert name == POLICY({"device-tier": TIERS[node]})
        model = receive_variant(request, builder).eval()
        received[name] = model
        server = strategy.bank.sent_models[name].eval()
        assert weight_bits(model) == 0  # trained in fp32 on the unpacked weights
        with torch.no_grad():
            assert torch.allclose(model(x), server(x), atol=1e-5), name
    assert PRUNING_KEY in requests[2].content["config"]  # the pruned variant's decision
    assert PRUNING_KEY not in requests[1].content["config"]
    assert received[PRUNED].fc1.out_features == 60


@pytest.mark.parametrize("builder", [Net, FlattenNet])
def test_reply_variant_is_parsed_by_fedhce_and_drives_the_assignment(task_identity, data, builder):
    strategy = _strategy(data, builder)
    for server_round in (1, 2):
        requests = _requests(strategy, builder, server_round)
        replies = [_stock_client(m, builder, _context(TIERS[n])) for n, m in requests.items()]
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert arrays is not None and metrics is not None
        stats = strategy.server_metrics[server_round]
        assert stats["valid-replies"] == 3.0
    # Round 2's replies: each node's variant came back under its name, and round 1's
    # reported tiers picked it.
    assert stats["returned-variant-by-node"] == {"1": "full", "2": PRUNED, "3": "int4"}
    assert {n: c["device-tier"] for n, c in strategy.capabilities.items()} == TIERS
    assert set(arrays.to_torch_state_dict()) == set(builder().state_dict())


def test_reply_variant_tier_argument_and_default(task_identity, data):
    strategy = _strategy(data, FlattenNet)
    request = _requests(strategy, FlattenNet)[1]
    model = receive_variant(request, FlattenNet)
    metrics = {"num-examples": 4}
    explicit = reply_variant(request, model, metrics, _context("gpu"), tier="edge")
    assert explicit.content["capability"]["device-tier"] == "edge"
    detected = reply_variant(request, model, metrics, class_counts=[1] * 10)
    assert detected.content["capability"]["device-tier"] == "cpu"  # where the model is
    assert detected.content["train-info"]["variant"] == "int8"
    assert list(detected.content["train-info"]["class-counts"]) == [1] * 10


def test_receive_variant_rejects_a_decision_for_another_model_in_one_line(task_identity, data):
    strategy = _strategy(data, FlattenNet)
    request = _requests(strategy, FlattenNet)[1]
    request.content["config"][PRUNING_KEY] = json.dumps({"conv9": {"out": [0, 1]}})
    with pytest.raises(ModelSpecError, match="conv9") as caught:
        receive_variant(request, FlattenNet)
    assert "\n" not in str(caught.value)


def test_a_plain_fedavg_message_gives_the_plain_model(task_identity):
    torch.manual_seed(0)
    sent = Net().state_dict()
    content = RecordDict({"arrays": ArrayRecord(sent), "config": ConfigRecord({"lr": 0.1})})
    message = Message(content, dst_node_id=1, message_type="train")
    model = receive_variant(message, Net)
    assert weight_bits(model) == 0
    assert all(torch.equal(v, sent[k]) for k, v in model.state_dict().items())


def test_a_spec_built_model_sends_no_pruning_decision(task_identity, data):
    spec = ArchSpec("cnn", (1, 28, 28), 10)
    strategy = FedHCE(
        variants=["full", PRUNED],
        assignment_policy=TierPolicy({}, default=PRUNED),
        arch_spec=spec,
        proxy_data=data[0],
        distill=DistillSettings(steps=0),
        variant_distill=DistillSettings(steps=0),
        min_available_nodes=2,
    )
    arrays = ArrayRecord(build_model(spec).state_dict())
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({}), FakeGrid([1, 2])))
    assert {m.content["config"]["variant"] for m in messages} == {PRUNED}
    assert all(PRUNING_KEY not in m.content["config"] for m in messages)
