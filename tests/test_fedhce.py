"""FedHCE on hand-built replies: per-node variants, capability policy, variant replies."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl_ec.calibration import CalibrationSettings
from fl_ec.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from fl_ec.compression import fake_quantize, unpack_state_dict
from fl_ec.data.sources import make_synthetic
from fl_ec.distill import DistillSettings
from fl_ec.models import ArchSpec, build_from_state_dict, build_model
from fl_ec.protocol import TRAIN_INFO_KEY
from fl_ec.results import RunRecorder
from fl_ec.run.reporting import RunReporter
from fl_ec.strategies import fedec_calibration
from fl_ec.strategies.fedhce import FedHCE
from fl_ec.strategies.fedhce_utils import TierPolicy, parse_tier_policy, sent_state
from tests.conftest import FakeGrid, FeatureStatsGrid, aggregate_round

SPEC = ArchSpec("cnn", (1, 28, 28), 10)
POLICY = TierPolicy({"gpu": "full", "edge": "prune-0.5+int4"}, default="int8")


@pytest.fixture(scope="module")
def data():
    train, val = make_synthetic(num_train=300, num_test=200, seed=3)
    return train.normalize(train.images), (val.normalize(val.images), val.labels)


def _strategy(data, **kwargs):
    proxy, validation = data
    small = DistillSettings(steps=10, batch_size=32, eval_every=5, patience=10)
    kwargs.setdefault("distill", small)
    kwargs.setdefault("client_start", "student")  # clients train the variants themselves
    return FedHCE(
        variants=["full", "int8", "prune-0.5+int4"],
        assignment_policy=POLICY,
        proxy_data=proxy,
        arch_spec=SPEC,
        validation_data=validation,
        variant_distill=small,
        min_train_nodes=2,
        min_available_nodes=2,
        **kwargs,
    )


def _configure(strategy, nodes, server_round=1):
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model(SPEC).state_dict())
    config = ConfigRecord({"arch-spec": SPEC.to_json()})
    messages = list(strategy.configure_train(server_round, arrays, config, FakeGrid(nodes)))
    return {m.metadata.dst_node_id: m for m in messages}


def _client_reply(request: Message, tier: str) -> Message:
    """What fl-ec's ClientApp sends back: the variant it received, 'trained' a little."""
    config = request.content["config"]
    state = unpack_state_dict(
        {k: a.numpy() for k, a in request.content["arrays"].items()},
        json.loads(str(config["wire-manifest"])),
    )
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    info = {"arch-spec": SPEC.to_json(), "class-counts": [10] * 10, "variant": config["variant"]}
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"num-examples": 100, "train-loss": 0.3}),
            "capability": ConfigRecord({"device-tier": tier, "device-kind": "cpu"}),
            TRAIN_INFO_KEY: ConfigRecord(info),
        }
    )
    return Message(content, reply_to=request)


def test_policy_maps_each_capability_as_configured():
    policy = parse_tier_policy("gpu=full, edge=prune-0.5+int4", default="int8")
    assert policy({"device-tier": "gpu"}) == "full"
    assert policy({"device-tier": "edge", "memory-mb": 512.0}) == "prune-0.5+int4"
    assert policy({"device-tier": "tpu"}) == "int8"  # unlisted tier
    assert policy(None) == "int8"  # before the node's first reply
    with pytest.raises(ValueError, match="tier=variant"):
        parse_tier_policy("gpu", default="int8")


def test_each_node_gets_its_own_variant_after_reporting_its_capability(task_identity, data):
    strategy = _strategy(data)
    tiers = {1: "gpu", 2: "edge", 3: "edge"}
    first = _configure(strategy, tiers)
    assert {m.content["config"]["variant"] for m in first.values()} == {"int8"}  # default
    replies = [_client_reply(first[n], tier) for n, tier in tiers.items()]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    stats = strategy.server_metrics[1]
    assert stats["returned-variant-by-node"] == {"1": "int8", "2": "int8", "3": "int8"}
    assert set(stats["variant-val-accuracy"]) == {"full", "int8", "prune-0.5+int4"}
    assert 0 <= stats["hce-val-accuracy"] <= 1 and stats["variants-distill-steps"] > 0

    second = _configure(strategy, tiers, server_round=2)
    assert {n: m.content["config"]["variant"] for n, m in second.items()} == {
        1: "full",
        2: "prune-0.5+int4",
        3: "prune-0.5+int4",
    }
    sent = {n: sum(len(a.data) for a in m.content["arrays"].values()) for n, m in second.items()}
    assert sent[2] < sent[1] / 8  # half the channels, 4-bit packed: far fewer bytes
    # The edge node's arrays rebuild into the pruned architecture.
    edge_request = second[2]
    edge_state = unpack_state_dict(
        {k: a.numpy() for k, a in edge_request.content["arrays"].items()},
        json.loads(str(edge_request.content["config"]["wire-manifest"])),
    )
    edge_model = build_from_state_dict(SPEC, edge_state)
    assert edge_model.conv2.out_channels == 32 and edge_model.classifier.out_features == 10

    # Mixed variants come back; all join the teacher, the round produces a model.
    replies = [_client_reply(second[n], tier) for n, tier in tiers.items()]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None and len(strategy.ensemble_members()) == 3
    assert strategy.server_metrics[2]["returned-variant-by-node"]["2"] == "prune-0.5+int4"


def test_a_capability_described_before_training_assigns_the_first_round(task_identity, data):
    strategy = _strategy(data)
    strategy.note_capability(1, ConfigRecord({"device-tier": "gpu"}))
    strategy.note_capability(2, ConfigRecord({"device-tier": "edge"}))
    with pytest.raises(ValueError, match="capability"):
        strategy.note_capability(3, ConfigRecord({"device-tier": "x" * 300}))
    first = _configure(strategy, {1: "gpu", 2: "edge", 3: "edge"})
    assert {n: m.content["config"]["variant"] for n, m in first.items()} == {
        1: "full",
        2: "prune-0.5+int4",
        3: "int8",  # nothing valid known yet: the default
    }


def test_a_reply_with_an_unknown_or_misshaped_variant_is_dropped(task_identity, data, caplog):
    strategy = _strategy(data)
    requests = _configure(strategy, {1: "gpu", 2: "edge", 3: "edge"})
    good = [_client_reply(requests[n], "edge") for n in (1, 2)]
    bad = _client_reply(requests[3], "edge")
    bad.content[TRAIN_INFO_KEY]["variant"] = "prune-0.9"
    caplog.set_level(logging.WARNING, logger="flwr")
    arrays, _ = strategy.aggregate_train(1, good + [bad])
    assert arrays is not None
    assert strategy.server_metrics[1]["rejected-replies"] == 1
    assert "node 3" in caplog.text and "returned variant 'prune-0.9', but was sent" in caplog.text


def test_fold_pruned_updates_into_full_coordinates(task_identity, data):
    strategy = _strategy(data, fold_pruned=True, distill=DistillSettings(steps=0))
    tiers = {1: "gpu", 2: "edge"}
    first = _configure(strategy, tiers)
    strategy.aggregate_train(1, [_client_reply(first[n], t) for n, t in tiers.items()])
    second = _configure(strategy, tiers, server_round=2)
    sent_full = second[1].content["arrays"].to_torch_state_dict()
    replies = [_client_reply(second[n], t) for n, t in tiers.items()]
    arrays, _ = strategy.aggregate_train(2, replies)
    folded = arrays.to_torch_state_dict()
    structure = strategy.bank.factory.structure(strategy.bank.variants["prune-0.5+int4"])
    dropped = [i for i in range(32) if i not in structure.kept["conv1.bias"][0]]
    kept = structure.kept["conv1.bias"][0]
    # Channels only the full client has: its update alone (what it got + 0.01) ...
    assert torch.allclose(
        folded["conv1.bias"][dropped], sent_full["conv1.bias"][dropped] + 0.01, atol=1e-5
    )
    # ... channels both have: the mean of the two clients' values.
    edge = replies[1].content["arrays"].to_torch_state_dict()["conv1.bias"]
    expected = (sent_full["conv1.bias"][kept] + 0.01 + edge) / 2
    assert torch.allclose(folded["conv1.bias"][kept], expected, atol=1e-5)


def test_rebased_updates_keep_the_rounding_of_quantized_copies_out(task_identity, data):
    # Round 1: both nodes get the int8 default; each returns what it received + 0.01.
    strategy = _strategy(data, distill=DistillSettings(steps=0))
    requests = _configure(strategy, {1: "edge", 2: "edge"})
    torch.manual_seed(0)
    initial = build_model(SPEC).state_dict()  # what _configure sent, at full precision
    arrays, _ = strategy.aggregate_train(1, [_client_reply(requests[n], "edge") for n in (1, 2)])
    start = arrays.to_torch_state_dict()
    error = max(
        float((start[k] - (initial[k] + 0.01)).abs().max()) for k in ("conv1.weight", "fc1.weight")
    )
    # The clients' change is applied to the server's fp32 weights: the int8 rounding of
    # the copy they started from stays out of the average.
    assert error < 1e-5


def _fine_tuning_strategy(data, **kwargs):
    """Variants fine-tuned for 10 steps, no early stopping: the fine-tuning always moves them."""
    proxy, _ = data
    return FedHCE(
        variants=["full", "int8"],
        assignment_policy=TierPolicy({}, default="int8"),
        proxy_data=proxy,
        arch_spec=SPEC,
        validation_data=None,
        distill=DistillSettings(steps=0),
        variant_distill=DistillSettings(steps=10, batch_size=32, lr=1e-2),
        min_train_nodes=2,
        min_available_nodes=2,
        **{"client_start": "student", **kwargs},  # clients train the fine-tuned variants
    )


def test_changes_are_rebased_on_the_variant_as_sent_not_on_the_student(task_identity, data):
    # From round 2 on, the int8 variant a client trains was fine-tuned by distillation
    # after it was derived from the student. A client's change must be applied where
    # it was computed: the server's fp32 copy of that variant.
    strategy = _fine_tuning_strategy(data)
    nodes = {1: "cpu", 2: "cpu"}
    first = _configure(strategy, nodes)
    arrays, _ = strategy.aggregate_train(1, [_client_reply(first[n], t) for n, t in nodes.items()])
    student = arrays.to_torch_state_dict()
    second = _configure(strategy, nodes, server_round=2)
    assert all(m.content["config"]["variant"] == "int8" for m in second.values())
    variant = strategy.bank.models["int8"].state_dict()
    variant_as_sent = {k: v.detach().clone() for k, v in variant.items()}
    moved = max(float((variant_as_sent[k] - student[k]).abs().max()) for k in student)
    assert moved > 1e-3  # the fine-tuning moved the variant away from the student
    arrays, _ = strategy.aggregate_train(2, [_client_reply(second[n], t) for n, t in nodes.items()])
    start = arrays.to_torch_state_dict()  # distill steps=0: the rebased average itself
    for key in ("conv1.weight", "fc1.weight", "classifier.bias"):
        assert torch.allclose(start[key], variant_as_sent[key] + 0.01, atol=1e-5), key


def _untuned_strategy(data, variant, nodes, **kwargs):
    """Every node gets ``variant``; nothing is distilled: exact, checkable arithmetic."""
    proxy, _ = data
    return FedHCE(
        variants=["full", variant],
        assignment_policy=TierPolicy({}, default=variant),
        proxy_data=proxy,
        arch_spec=SPEC,
        distill=DistillSettings(steps=0),
        variant_distill=DistillSettings(steps=0),
        min_train_nodes=nodes,
        min_available_nodes=nodes,
        **kwargs,
    )


def test_every_node_gets_the_same_rounded_copy_and_its_change_is_rebased(task_identity, data):
    strategy = _untuned_strategy(data, "int4", nodes=3)
    nodes = {1: "edge", 2: "edge", 3: "edge"}
    first = _configure(strategy, nodes)
    arrays, _ = strategy.aggregate_train(1, [_client_reply(first[n], t) for n, t in nodes.items()])
    student = arrays.to_torch_state_dict()
    second = _configure(strategy, nodes, server_round=2)
    received = {
        node: unpack_state_dict(
            {k: a.numpy() for k, a in m.content["arrays"].items()},
            json.loads(str(m.content["config"]["wire-manifest"])),
        )
        for node, m in second.items()
    }
    sizes = {sum(len(a.data) for a in m.content["arrays"].values()) for m in second.values()}
    assert len(sizes) == 1  # same bytes for every node
    assert torch.equal(received[1]["conv1.weight"], received[2]["conv1.weight"])
    # Each client's change is applied to the fp32 weights, not to the rounded copy.
    arrays, _ = strategy.aggregate_train(2, [_client_reply(second[n], t) for n, t in nodes.items()])
    start = arrays.to_torch_state_dict()
    for key in ("conv1.weight", "fc1.weight", "classifier.weight"):
        assert torch.allclose(start[key], student[key] + 0.01, atol=1e-5), key


def test_bad_settings_fail_fast(data):
    proxy, _ = data
    with pytest.raises(ValueError, match="not among the variants"):
        FedHCE(variants=["full"], hce_ensemble=["int4"], proxy_data=proxy, arch_spec=SPEC)
    with pytest.raises(ValueError, match="diversity_weight"):
        FedHCE(variants=["full"], diversity_weight=2.0, proxy_data=proxy, arch_spec=SPEC)


@pytest.fixture
def calibration_always_kept(monkeypatch):
    """A huge revert threshold: the calibration is always kept, whatever validation says."""
    monkeypatch.setattr(fedec_calibration, "REVERT_Z", 1e9)


def test_variants_derive_from_the_calibrated_model(task_identity, data, calibration_always_kept):
    tiers = {1: "gpu", 2: "edge"}
    served = {}
    for calibrate in (False, True):
        strategy = _strategy(data, calibration="classifier" if calibrate else None)
        torch.manual_seed(0)
        arrays = ArrayRecord(build_model(SPEC).state_dict())
        grid = FeatureStatsGrid({node: data[1] for node in tiers})
        requests = strategy.configure_train(1, arrays, ConfigRecord({}), grid)
        replies = [_client_reply(m, tiers[m.metadata.dst_node_id]) for m in requests]
        result, _ = aggregate_round(grid, strategy, 1, replies)
        served[calibrate] = result.to_torch_state_dict()
        full_variant = strategy.bank.models["full"].state_dict()
        for key, value in served[calibrate].items():
            assert torch.equal(full_variant[key], value), key  # what was served, calibrated
    assert strategy.server_metrics[1]["feature-calibration-applied"] == 1.0
    assert torch.equal(served[False]["conv1.weight"], served[True]["conv1.weight"])
    assert not torch.equal(served[False]["classifier.weight"], served[True]["classifier.weight"])


def _calibrated_round(data, tiers, **kwargs):
    """One round of FedHCE with feature calibration (kept, under calibration_always_kept)."""
    kwargs.setdefault("calibration", "classifier")
    strategy = _strategy(data, **kwargs)
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model(SPEC).state_dict())
    grid = FeatureStatsGrid({node: data[1] for node in tiers})
    requests = strategy.configure_train(1, arrays, ConfigRecord({}), grid)
    replies = [_client_reply(m, tiers[m.metadata.dst_node_id]) for m in requests]
    aggregate_round(grid, strategy, 1, replies)
    return strategy, grid


def test_each_variant_is_calibrated_from_statistics_of_its_own_features(
    task_identity, data, calibration_always_kept
):
    tiers = {1: "gpu", 2: "edge"}
    inherited, _ = _calibrated_round(data, tiers, calibrate_variants=False)
    strategy, grid = _calibrated_round(data, tiers)
    pruned = "prune-0.5+int4"
    # One query for the global model, then one per compressed variant, to every node.
    asked = [m.content["config"].get("variant", "full") for m in grid.queries]
    assert asked == ["full"] * 2 + ["int8"] * 2 + [pruned] * 2
    # The pruned variant's clients measured its own, narrower classifier inputs.
    width = strategy.bank.models[pruned].classifier.in_features
    assert width < strategy.bank.models["full"].classifier.in_features
    assert {r["means"].shape[1] for r in grid.replies[-2:]} == {width}
    report = strategy.server_metrics[1]["variant-calibration"]
    assert set(report) == {"int8", pruned}
    assert report[pruned]["feature-calibration-applied"] == 1.0
    assert report[pruned]["calibration-valid-replies"] == 2.0
    # Before its own calibration the variant is exactly what calibrate_variants=False
    # serves; the calibration changed its classifier and nothing else.
    before = strategy.bank.uncalibrated[pruned].state_dict()
    after = strategy.bank.models[pruned].state_dict()
    for key, value in inherited.bank.models[pruned].state_dict().items():
        assert torch.equal(before[key], value), key
        assert torch.equal(after[key], value) != key.startswith("classifier."), key
    # What the next round's clients would receive is the calibrated variant.
    sent = sent_state(strategy.bank.payloads[pruned])
    sent_inherited = sent_state(inherited.bank.payloads[pruned])
    assert torch.equal(sent["conv1.weight"], sent_inherited["conv1.weight"])
    assert not torch.equal(sent["classifier.weight"], sent_inherited["classifier.weight"])
    assert not inherited.bank.uncalibrated
    assert "variant-calibration" not in inherited.server_metrics[1]


def test_dense_calibration_of_a_pruned_variant_uses_its_own_conv_width(
    task_identity, data, calibration_always_kept
):
    tiers = {1: "gpu", 2: "edge"}
    settings = CalibrationSettings(samples=500, layers="dense", rank=4)
    inherited, _ = _calibrated_round(data, tiers, calibrate_variants=False, calibration=settings)
    strategy, grid = _calibrated_round(data, tiers, calibration=settings)
    pruned = "prune-0.5+int4"
    width = strategy.bank.models[pruned].fc1.in_features
    assert width < strategy.bank.models["full"].fc1.in_features
    assert {r["factors"].shape[1] for r in grid.replies[-2:]} == {width}
    assert {int(r["ranks"].max()) for r in grid.replies[-2:]} == {4}
    after = strategy.bank.models[pruned].state_dict()
    for key, value in inherited.bank.models[pruned].state_dict().items():
        dense = key.startswith(("fc1.", "classifier."))
        assert torch.equal(after[key], value) != dense, key  # dense layers only


def _shift_student(student, proxy, teacher_logits):
    """A stand-in for distillation that moves every weight of the student by 0.005."""
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.005)


def test_client_start_average_trains_copies_of_the_average_and_serves_the_student(
    task_identity, data
):
    strategy = _untuned_strategy(
        data, "int8", nodes=2, client_start="average", student_trainer=_shift_student
    )
    torch.manual_seed(0)
    initial = build_model(SPEC).state_dict()  # what _configure sends in round 1
    nodes = {1: "cpu", 2: "cpu"}
    served: dict[str, torch.Tensor] = {}  # the previous round's served model ...
    average: dict[str, torch.Tensor] = {}  # ... and its average, the clients' start
    for server_round in (1, 2, 3):
        requests = _configure(strategy, nodes, server_round=server_round)
        if server_round == 3:
            # Clients train the int8 copy of round 2's average (initial + 0.02), not of
            # the student served from it (initial + 0.025).
            request = requests[1]
            received = unpack_state_dict(
                {k: a.numpy() for k, a in request.content["arrays"].items()},
                json.loads(str(request.content["config"]["wire-manifest"])),
            )
            for key in ("conv1.weight", "fc1.weight"):
                assert torch.allclose(received[key], fake_quantize(average[key], 8)), key
                assert not torch.allclose(received[key], fake_quantize(served[key], 8)), key
        replies = [_client_reply(requests[n], t) for n, t in nodes.items()]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        served = arrays.to_torch_state_dict()
        average = strategy.client_start_arrays.to_torch_state_dict()
    # Each round adds 0.01 (rebased on the fp32 copy sent); served = round 3's average
    # moved by the stand-in distillation.
    trained = average
    for key in ("conv1.weight", "fc1.weight", "classifier.bias"):
        assert torch.allclose(trained[key], initial[key] + 0.03, atol=1e-5), key
        assert torch.allclose(served[key], initial[key] + 0.035, atol=1e-5), key
        # Served variants derive from the served model, sent ones from the average.
        assert torch.allclose(strategy.bank.models["full"].state_dict()[key], served[key])
        assert torch.allclose(strategy.bank.sent_models["full"].state_dict()[key], trained[key])


def test_save_artifacts_writes_the_client_ensemble_and_the_variants(task_identity, data, tmp_path):
    strategy = _strategy(data)
    assert isinstance(strategy, RunReporter)
    _, test = make_synthetic(num_train=10, num_test=60, seed=4)
    recorder = RunRecorder(tmp_path, {}, SPEC, 1)
    requests = _configure(strategy, {1: "gpu", 2: "edge"})
    strategy.aggregate_train(1, [_client_reply(requests[n], "edge") for n in (1, 2)])
    strategy.save_artifacts(recorder, test)
    summary = recorder.summary()
    assert summary["ensemble-members"] == 2 and 0 <= summary["ensemble-test-accuracy"] <= 1
    assert (tmp_path / "ensemble" / "member-1.pt").exists()
    index = json.loads((tmp_path / "variants" / "index.json").read_text())
    assert [entry["name"] for entry in index] == ["full", "int8", "prune-0.5+int4"]
    assert set(summary["variant-test-accuracy"]) == {"full", "int8", "prune-0.5+int4"}
    assert 0 <= summary["hce-test-accuracy"] <= 1 and summary["hce-wire-bytes"] > 0


@pytest.mark.parametrize("client_start", ["student", "average"])
def test_restored_from_a_checkpoint_round_two_runs_exactly_as_without_a_restart(
    task_identity, data, tmp_path, client_start
):
    tiers = {1: "gpu", 2: "edge", 3: "edge"}
    original = _strategy(data, client_start=client_start)
    first = _configure(original, tiers)
    arrays, _ = original.aggregate_train(1, [_client_reply(first[n], t) for n, t in tiers.items()])
    state = Checkpoint(1, arrays.to_torch_state_dict(), original.checkpoint_state(), {})
    restored = _strategy(data, client_start=client_start)  # a new server process
    restored.restore_state(read_checkpoint(write_checkpoint(tmp_path, state)).strategy)
    assert restored.bank.factory.structures.keys() == {"prune-0.5+int4"}
    assert restored.capabilities == original.capabilities  # the tiers nodes reported

    outcomes = []
    for strategy in (original, restored):
        torch.manual_seed(5)
        requests = _configure(strategy, tiers, server_round=2)
        sent = {
            n: (m.content["config"]["variant"], [a.data for a in m.content["arrays"].values()])
            for n, m in requests.items()
        }
        served, _ = strategy.aggregate_train(
            2, [_client_reply(requests[n], t) for n, t in tiers.items()]
        )
        outcomes.append((sent, served.to_torch_state_dict()))
    (sent_a, served_a), (sent_b, served_b) = outcomes
    assert {n: v for n, (v, _) in sent_a.items()} == {
        1: "full",
        2: "prune-0.5+int4",
        3: "prune-0.5+int4",
    }
    assert sent_a == sent_b  # the same bytes to every node
    assert all(torch.equal(served_a[k], served_b[k]) for k in served_a)


def test_quantization_is_on_the_wire_and_in_the_served_copy_only(task_identity, data):
    from fl_ec.clients.client_app import received_model
    from fl_ec.compression import weight_bits

    strategy = _strategy(data)
    first = _configure(strategy, {1: "edge", 2: "edge"})
    config = first[1].content["config"]
    assert config["variant"] == "int8" and "wire-manifest" in config  # packed
    sent_bytes = sum(a.numpy().nbytes for a in first[1].content["arrays"].values())
    assert sent_bytes < 0.3 * 4 * sum(p.numel() for p in build_model(SPEC).parameters())
    _, model = received_model(first[1].content)  # what fl-ec's ClientApp trains: fp32
    assert weight_bits(model) == 0
    served = strategy.bank.models["int8"]
    assert weight_bits(served) == 8  # the served copy stays quantized
    x = data[0][:8]
    with torch.no_grad():  # the unpacked weights are the served copy's int8 values
        assert torch.allclose(model.eval()(x), served.eval()(x), atol=1e-4)
    replies = [_client_reply(m, "edge") for m in first.values()]
    strategy.aggregate_train(1, replies)
    # The teacher runs each returned model as it was trained.
    assert {weight_bits(m.model) for m in strategy.last_client_models} == {0}


def test_the_retired_quantized_training_key_fails_in_one_line():
    from fl_ec.config import ExperimentConfig
    from fl_ec.errors import ConfigError

    with pytest.raises(ConfigError, match="quantized-training no longer exists: clients"):
        ExperimentConfig.from_run_config({"strategy": "fedhce", "quantized-training": True})


def test_reprune_folds_each_reply_by_the_cut_it_was_sent(task_identity, data):
    strategy = _strategy(data, reprune=True)
    tiers = {1: "gpu", 2: "edge", 3: "edge"}
    for server_round in (1, 2, 3):
        sent = _configure(strategy, tiers, server_round)
        cut = strategy.bank.factory.structures.get("prune-0.5+int4")
        replies = [_client_reply(sent[n], tier) for n, tier in tiers.items()]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert arrays is not None and strategy.server_metrics[server_round]["valid-replies"] == 3
        if server_round > 1:  # the edge replies were folded by the cut they were sent
            assert cut is not None
    full_shapes = {k: v.shape for k, v in build_model(SPEC).state_dict().items()}
    assert {k: v.shape for k, v in arrays.to_torch_state_dict().items()} == full_shapes
