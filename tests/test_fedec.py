"""FedEC.aggregate_train on hand-built replies, the way Flower's strategy tests do."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch_pruning as tp
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg

from fl_ec.calibration import CalibrationSettings
from fl_ec.data.sources import make_synthetic
from fl_ec.distill import DistillSettings
from fl_ec.ensemble import teacher_logits
from fl_ec.models import ArchSpec, build_model
from fl_ec.protocol import TRAIN_INFO_KEY
from fl_ec.results import RunRecorder
from fl_ec.run.reporting import RunReporter
from fl_ec.scoring import accuracy
from fl_ec.strategies import fedec_calibration
from fl_ec.strategies.fedec import FedEC
from tests.conftest import FakeGrid, FeatureStatsGrid, aggregate_round

SPEC = ArchSpec("cnn", (1, 28, 28), 10)


@pytest.fixture(scope="module")
def data():
    train, val = make_synthetic(num_train=400, num_test=200, seed=2)
    return train.normalize(train.images), (val.normalize(val.images), val.labels)


def _strategy(data, **kwargs):
    proxy, validation = data
    kwargs.setdefault(
        "distill", DistillSettings(steps=20, batch_size=32, eval_every=10, patience=20)
    )
    return FedEC(
        proxy_data=proxy, arch_spec=SPEC, validation_data=validation, min_train_nodes=2, **kwargs
    )


def _calibrating(proxy, **kwargs):
    """FedEC serving the clients' average (no distillation), feature-calibrated."""
    kwargs.setdefault("calibration", "classifier")
    return FedEC(
        proxy_data=proxy,
        arch_spec=SPEC,
        distill=DistillSettings(steps=0),
        min_train_nodes=2,
        **kwargs,
    )


def _global(seed=0):
    torch.manual_seed(seed)
    return build_model(SPEC)


def _request():
    return Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )


def _reply(node, model, spec=SPEC, num_examples=100, class_counts=None, state=None):
    info = {"arch-spec": spec.to_json()}
    if class_counts is not None:
        info["class-counts"] = class_counts
    request = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN
    )
    arrays = ArrayRecord(state if state is not None else model.state_dict())
    return Message(
        RecordDict(
            {
                "arrays": arrays,
                "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 0.5}),
                TRAIN_INFO_KEY: ConfigRecord(info),
            }
        ),
        reply_to=request,
    )


def _start_round(strategy, global_model):
    strategy.global_arrays = ArrayRecord(global_model.state_dict())


def test_aggregate_returns_a_distilled_model_and_round_metrics(task_identity, data):
    strategy = _strategy(data)
    _start_round(strategy, _global())
    replies = [_reply(n, _global(seed=n), num_examples=50 * n) for n in (1, 2, 3)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["train-loss"] == pytest.approx(0.5)
    assert set(arrays.keys()) == set(build_model(SPEC).state_dict())
    stats = strategy.server_metrics[1]
    assert stats["valid-replies"] == 3 and stats["rejected-replies"] == 0
    assert 0 < stats["distill-steps"] <= 20
    assert stats["student-val-accuracy"] >= stats["student-start-val-accuracy"]
    assert stats["teacher-seconds"] > 0 and stats["teacher-samples-per-second"] > 0
    assert len(strategy.ensemble_members()) == 3


def test_save_artifacts_writes_the_last_rounds_client_ensemble(task_identity, data, tmp_path):
    strategy = _strategy(data)
    assert isinstance(strategy, RunReporter) and not isinstance(FedAvg(), RunReporter)
    _, test = make_synthetic(num_train=10, num_test=60, seed=4)
    recorder = RunRecorder(tmp_path, {}, SPEC, 1)
    strategy.save_artifacts(recorder, test)  # no round yet: nothing to save
    assert "ensemble-members" not in recorder.summary()
    _start_round(strategy, _global())
    strategy.aggregate_train(1, [_reply(n, _global(seed=n)) for n in (1, 2)])
    strategy.save_artifacts(recorder, test)
    summary = recorder.summary()
    assert summary["ensemble-members"] == 2
    members = strategy.ensemble_members()
    logits = teacher_logits(members, test.normalize(test.images), "mean-logits").logits
    assert summary["ensemble-test-accuracy"] == accuracy(logits, test.labels)
    assert {p.name for p in (tmp_path / "ensemble").iterdir()} == {
        "member-0.pt",
        "member-0.json",
        "member-1.pt",
        "member-1.json",
    }


def test_bad_replies_are_dropped_and_the_round_goes_on(task_identity, data, caplog):
    strategy = _strategy(data)
    _start_round(strategy, _global())
    good = [_reply(n, _global(seed=n)) for n in (1, 2)]
    nan_state = {k: v.clone() for k, v in _global(seed=3).state_dict().items()}
    nan_state["fc1.weight"][0, 0] = float("nan")
    wrong_shape = dict(_global(seed=4).state_dict())
    wrong_shape["conv2.weight"] = torch.zeros(64, 5, 3, 3)
    missing_key = {k: v for k, v in _global(seed=5).state_dict().items() if k != "fc1.bias"}
    request = Message(RecordDict(), dst_node_id=9, message_type=MessageType.TRAIN)
    bad = [
        _reply(3, None, state=nan_state),
        _reply(4, None, state=wrong_shape),
        _reply(5, None, state=missing_key),
        Message(Error(code=100, reason="client crashed"), reply_to=request),
        _reply(6, _global(), num_examples=0),
    ]
    caplog.set_level(logging.WARNING, logger="flwr")
    arrays, _ = strategy.aggregate_train(1, good + bad)
    assert arrays is not None
    stats = strategy.server_metrics[1]
    assert stats["valid-replies"] == 2 and stats["rejected-replies"] == 5
    assert stats["error-replies"] == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    for node, reason in (
        (3, "non-finite"),
        (4, "inconsistent"),
        (5, "missing"),
        (9, "client crashed"),
        (6, "num-examples=0"),
    ):
        assert f"node {node}" in text and reason in text, (node, reason, text)


def test_a_round_aggregates_what_arrives_unless_a_quorum_is_asked_for(task_identity, data, caplog):
    state = {k: v.clone() for k, v in _global(seed=3).state_dict().items()}
    state["conv1.weight"].fill_(float("inf"))
    replies = [_reply(1, _global(1)), _reply(2, None, state=state)]
    # As FedAvg: min_train_nodes=2 samples two nodes; the one valid reply is aggregated.
    strategy = _strategy(data, distill=DistillSettings(steps=0))
    _start_round(strategy, _global())
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert strategy.server_metrics[1]["valid-replies"] == 1
    assert torch.equal(arrays.to_torch_state_dict()["fc1.weight"], _global(1).fc1.weight)
    assert metrics["train-loss"] == pytest.approx(0.5)
    # min_valid_replies: a round with fewer accepted replies keeps the global model.
    quorum = _strategy(data, min_valid_replies=2)
    _start_round(quorum, _global())
    with caplog.at_level(logging.WARNING):
        assert quorum.aggregate_train(1, replies) == (None, None)
    assert quorum.server_metrics[1]["valid-replies"] == 1
    assert "1 of 2 replies accepted, fewer than min_valid_replies=2" in caplog.text
    with pytest.raises(ValueError, match="min_valid_replies=0"):
        _strategy(data, min_valid_replies=0)


def test_mixed_architectures_join_the_teacher_but_not_the_average(task_identity, data):
    strategy = _strategy(data, teacher_rule="label-aware")
    global_model = _global()
    _start_round(strategy, global_model)
    pruned = _global(seed=7)
    tp.pruner.MagnitudePruner(
        pruned,
        torch.randn(1, 1, 28, 28),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[pruned.classifier],
    ).step()
    narrow_spec = ArchSpec("cnn", (1, 28, 28), 10, widths=(16, 32, 64))
    torch.manual_seed(8)
    narrow = build_model(narrow_spec)
    counts = [10.0] * 10
    replies = [
        _reply(1, _global(1), class_counts=counts),
        _reply(2, _global(2), class_counts=counts),
        _reply(3, pruned, class_counts=counts),
        _reply(4, narrow, spec=narrow_spec, class_counts=counts),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert strategy.server_metrics[1]["valid-replies"] == 4
    members = strategy.ensemble_members()
    # The pruned CNN and the narrow one have 16 channels where the others have 32.
    assert sorted(m.conv1.out_channels for m in members) == [16, 16, 32, 32]
    # The global student keeps the full architecture.
    assert tuple(arrays["conv1.weight"].shape) == (32, 1, 3, 3)


def test_student_starts_from_the_weighted_average(task_identity, data):
    strategy = _strategy(data, distill=DistillSettings(steps=0))
    _start_round(strategy, _global())
    a, b = _global(1), _global(2)
    arrays, _ = strategy.aggregate_train(
        1, [_reply(1, a, num_examples=30), _reply(2, b, num_examples=10)]
    )
    expected = 0.75 * a.state_dict()["fc1.weight"] + 0.25 * b.state_dict()["fc1.weight"]
    assert torch.allclose(arrays.to_torch_state_dict()["fc1.weight"], expected, atol=1e-6)


def test_an_accepted_reply_is_held_once_by_its_state_and_its_model(task_identity, data):
    strategy = _strategy(data, distill=DistillSettings(steps=0))
    _start_round(strategy, _global())
    client = strategy.read_reply(_reply(1, _global(1)))
    held = client.model.state_dict()
    assert all(held[k].data_ptr() == v.data_ptr() for k, v in client.state.items())
    assert torch.equal(client.state["fc1.weight"], _global(1).state_dict()["fc1.weight"])


def test_without_distillation_no_client_model_runs_over_the_proxy(task_identity, data, monkeypatch):
    import fl_ec.strategies.steps as steps_module

    passes = []
    real_teacher_logits = steps_module.teacher_logits

    def spy(models, inputs, *args, **kwargs):
        passes.append(len(inputs))
        return real_teacher_logits(models, inputs, *args, **kwargs)

    monkeypatch.setattr(steps_module, "teacher_logits", spy)
    proxy, (val_x, _) = data
    replies = [_reply(n, _global(seed=n)) for n in (1, 2)]
    for steps, proxy_passes in ((0, 0), (5, 1)):
        passes.clear()
        strategy = _strategy(data, distill=DistillSettings(steps=steps, eval_every=5))
        _start_round(strategy, _global())
        strategy.aggregate_train(1, replies)
        stats = strategy.server_metrics[1]
        assert passes.count(len(proxy)) == proxy_passes
        assert passes.count(len(val_x)) == 1  # the teacher's validation accuracy stays
        assert 0 <= stats["teacher-val-accuracy"] <= 1
        assert (strategy.serving.outcome.teacher is None) == (steps == 0)
        assert (stats["teacher-seconds"] == 0) == (steps == 0)


def test_model_builder_replaces_the_spec_for_plain_flower_replies(task_identity, data):
    proxy, validation = data
    strategy = FedEC(
        proxy_data=torch.utils.data.TensorDataset(proxy, proxy[:, 0, 0, 0]),
        model_builder=lambda: build_model(SPEC),
        validation_data=validation,
        distill=DistillSettings(steps=5, batch_size=16, eval_every=5),
    )
    _start_round(strategy, _global())
    request = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord(_global(n).state_dict()),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
            reply_to=request,
        )
        for n in (1, 2)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None


def test_constructor_rejects_misconfiguration(data):
    proxy, _ = data
    with pytest.raises(ValueError, match="arch_spec or model_builder"):
        FedEC(proxy_data=proxy)
    with pytest.raises(ValueError, match="teacher_rule"):
        FedEC(proxy_data=proxy, arch_spec=SPEC, teacher_rule="vote")


def test_array_payloads_with_unexpected_dtype_are_rejected(task_identity, data):
    strategy = _strategy(data)
    _start_round(strategy, _global())
    state = {k: Array(np.asarray(v.numpy())) for k, v in _global(3).state_dict().items()}
    state["fc1.weight"] = Array(np.zeros((2, 2), dtype=np.float32))
    request = Message(RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)
    broken = Message(
        RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 5})}),
        reply_to=request,
    )
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _global(1)), _reply(2, _global(2)), broken])
    assert arrays is not None and strategy.server_metrics[1]["rejected-replies"] == 1


def test_an_external_student_trainer_replaces_distillation_but_never_hurts(task_identity, data):
    calls = []

    def ruin(student, proxy, teacher):  # a trainer that makes things worse
        calls.append((len(proxy), tuple(teacher.shape)))
        with torch.no_grad():
            for p in student.parameters():
                p.zero_()

    strategy = _strategy(data, student_trainer=ruin)
    _start_round(strategy, _global())
    arrays, _ = strategy.aggregate_train(1, [_reply(n, _global(seed=n)) for n in (1, 2)])
    assert calls == [(400, (400, 10))]
    stats = strategy.server_metrics[1]
    # Validation caught the ruined student: the start (the average) was kept.
    assert stats["student-val-accuracy"] == stats["student-start-val-accuracy"]
    assert any(float(v.abs().sum()) > 0 for v in arrays.to_torch_state_dict().values())


def test_client_start_average_trains_the_average_and_serves_the_student(task_identity, data):
    # No validation data: distillation runs every step and keeps the last student.
    strategy = FedEC(
        proxy_data=data[0],
        arch_spec=SPEC,
        distill=DistillSettings(steps=5, batch_size=32),
        client_start="average",
        teacher_rule="mean-logits",
        min_train_nodes=2,
    )
    _start_round(strategy, _global())
    a, b = _global(1), _global(2)
    served, _ = strategy.aggregate_train(
        1, [_reply(1, a, num_examples=30), _reply(2, b, num_examples=10)]
    )
    expected = {
        k: 0.75 * a.state_dict()[k].double() + 0.25 * b.state_dict()[k].double()
        for k in ("conv1.weight", "fc1.weight")
    }
    sent = strategy.client_start_arrays.to_torch_state_dict()
    for key, value in expected.items():
        assert torch.allclose(sent[key].double(), value, atol=1e-6)
    # The returned (served, evaluated) model is the distilled student, not the average.
    served_state = served.to_torch_state_dict()
    assert strategy.server_metrics[1]["distill-steps"] == 5
    assert not torch.allclose(served_state["fc1.weight"], sent["fc1.weight"])
    # Next round: the train messages carry the average; the served model stays the
    # previous global model.
    grid = FakeGrid(nodes=[7, 8])
    messages = list(strategy.configure_train(2, served, ConfigRecord({"lr": 0.1}), grid))
    assert len(messages) == 2
    for message in messages:
        got = message.content["arrays"].to_torch_state_dict()
        assert torch.equal(got["fc1.weight"], sent["fc1.weight"])
    assert torch.equal(
        strategy.global_arrays.to_torch_state_dict()["fc1.weight"], served_state["fc1.weight"]
    )


def test_client_start_must_be_known(data):
    with pytest.raises(ValueError, match="client_start"):
        _strategy(data, client_start="teacher")


def test_prior_correction_matches_the_served_model_to_the_federations_labels(task_identity, data):
    # No validation data: the correction is always kept.
    strategy = _calibrating(data[0], calibration="prior")
    _start_round(strategy, _global())
    counts_a = [90, 10] + [0] * 8
    counts_b = [0] * 8 + [50, 50]
    served, _ = strategy.aggregate_train(
        1,
        [
            _reply(1, _global(1), num_examples=100, class_counts=counts_a),
            _reply(2, _global(2), num_examples=100, class_counts=counts_b),
        ],
    )
    model = build_model(SPEC)
    model.load_state_dict(served.to_torch_state_dict())
    model.eval()
    with torch.no_grad():
        predicted = torch.softmax(model(data[0]), 1).mean(0)
    pooled = torch.tensor([a + b + 1.0 for a, b in zip(counts_a, counts_b, strict=True)])
    assert torch.allclose(predicted, pooled / pooled.sum(), atol=1e-3)
    stats = strategy.server_metrics[1]
    assert stats["prior-correction-applied"] == 1.0
    assert stats["prior-correction-max-offset"] > 0


def _warnings(caplog, text):
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and text in r.getMessage()
    ]


def test_prior_correction_is_skipped_without_class_counts(task_identity, data, caplog):
    strategy = _strategy(data, calibration="prior", teacher_rule="mean-logits")
    counts = [10.0] * 10
    with caplog.at_level(logging.WARNING):
        for server_round in (1, 2):  # said once per run, not every round
            _start_round(strategy, _global())
            replies = [_reply(1, _global(1), class_counts=counts), _reply(2, _global(2))]
            strategy.aggregate_train(server_round, replies)
            assert strategy.server_metrics[server_round]["prior-correction-applied"] == 0.0
    (warning,) = _warnings(caplog, "calibration 'prior' is skipped")
    assert "node(s) [2] carry no class counts" in warning
    assert "'train-info'" in warning and "'class-counts'" in warning


@pytest.mark.parametrize("rule", ["label-aware", "gated"])
def test_count_weighted_rules_fall_back_to_the_mean_without_class_counts(
    task_identity, data, caplog, rule
):
    strategy = _strategy(data, teacher_rule=rule, distill=DistillSettings(steps=0))
    expected = f"teacher rule '{rule}' runs as 'mean-logits'"
    with caplog.at_level(logging.WARNING):
        for run in range(2):
            strategy.begin_run(2)  # as start() does: each run says it once
            for server_round in (1, 2):
                _start_round(strategy, _global())
                replies = [_reply(n, _global(seed=n)) for n in (1, 2)]
                arrays, _ = strategy.aggregate_train(server_round, replies)
                assert arrays is not None
            assert len(_warnings(caplog, expected)) == run + 1
    warning = _warnings(caplog, expected)[0]
    assert "node(s) [1, 2] carry no class counts" in warning
    assert "'train-info'" in warning and "'class-counts'" in warning


def _trained_clients():
    from fl_ec.training import train_supervised

    train, _ = make_synthetic(num_train=400, num_test=200, seed=2)  # the fixture's proxy
    clients = []
    for seed in (1, 2):
        model = _global(seed)
        train_supervised(model, train, epochs=2, batch_size=32, lr=0.05, seed=seed)
        clients.append(model)
    return clients


@pytest.mark.parametrize("revert_z", [0.0, fedec_calibration.REVERT_Z, 1e9])
def test_prior_correction_is_reverted_only_on_significant_validation_evidence(
    task_identity, data, revert_z, monkeypatch
):
    from fl_ec.scoring import model_accuracy

    monkeypatch.setattr(fedec_calibration, "REVERT_Z", revert_z)
    strategy = _strategy(data, calibration="prior")
    _start_round(strategy, _global())
    counts = [[100] + [0] * 9, [0] * 9 + [100]]  # a prior far from the data's: it hurts
    served, _ = strategy.aggregate_train(
        1, [_reply(n + 1, m, class_counts=counts[n]) for n, m in enumerate(_trained_clients())]
    )
    model = build_model(SPEC)
    model.load_state_dict(served.to_torch_state_dict())
    stats = strategy.server_metrics[1]
    assert stats["prior-correction-val-z"] > 3  # the uncorrected model is clearly better
    reverted = revert_z < 1e9
    assert stats["prior-correction-applied"] == float(not reverted)
    assert model_accuracy(model, *data[1]) == pytest.approx(
        stats["prior-correction-val-before" if reverted else "prior-correction-val-after"]
    )


def test_prior_correction_serves_the_corrected_average_when_distillation_hurt(
    task_identity, data, monkeypatch
):
    from fl_ec.distill import DistillResult
    from fl_ec.scoring import model_accuracy

    _, (val_x, val_y) = data
    clients = _trained_clients()
    strategy = _strategy(data, calibration="prior")

    def ruin(student, *_, **__):  # a distillation that made the student worse (a stand-in)
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.add_(torch.randn_like(parameter))
        return DistillResult(0.0, 0.0, 1, 1, 0.0)

    import fl_ec.strategies.fedec as fedec_module

    monkeypatch.setattr(fedec_module, "distill_student", ruin)
    _start_round(strategy, _global())
    counts = [[10] * 10, [10] * 10]
    served, _ = strategy.aggregate_train(
        1, [_reply(n + 1, m, class_counts=counts[n]) for n, m in enumerate(clients)]
    )
    stats = strategy.server_metrics[1]
    assert stats["prior-correction-served-start"] == 1.0
    model = build_model(SPEC)
    model.load_state_dict(served.to_torch_state_dict())
    assert model_accuracy(model, val_x, val_y) == pytest.approx(stats["prior-correction-val-after"])
    assert stats["prior-correction-val-after"] > stats["prior-correction-val-before"]


def test_feature_calibration_retrains_only_the_classifier_from_valid_stats(
    task_identity, data, caplog
):
    proxy, (val_x, val_y) = data
    node_data = {n: (val_x[n::3], val_y[n::3]) for n in (1, 2, 3)}
    node_data[4] = node_data[1]
    replies = [_reply(n, _global(seed=n)) for n in (1, 2, 3, 4)]

    def nan_means(arrays):
        arrays["means"][0, 0] = np.nan

    outcomes = {}
    for calibrate in (False, True):
        strategy = _calibrating(proxy, calibration="classifier" if calibrate else None)
        _start_round(strategy, _global())
        grid = FeatureStatsGrid(node_data, broken={3: nan_means, 4: "no query handler"})
        grid = grid
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            served, _ = aggregate_round(grid, strategy, 1, replies)
        outcomes[calibrate] = (served.to_torch_state_dict(), strategy.server_metrics[1], grid)
    plain, _, plain_grid = outcomes[False]
    calibrated, stats, grid = outcomes[True]
    assert not plain_grid.queries  # off: nothing is asked of the clients
    assert {m.metadata.dst_node_id for m in grid.queries} == {1, 2, 3, 4}
    assert all(m.metadata.message_type == MessageType.QUERY for m in grid.queries)
    assert stats["calibration-valid-replies"] == 2 and stats["calibration-rejected-replies"] == 2
    assert stats["feature-calibration-applied"] == 1.0  # no validation data: always kept
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "node 3" in text and "non-finite" in text
    assert "node 4" in text and "no query handler" in text
    for key, value in plain.items():
        if key.startswith("classifier."):
            assert not torch.allclose(value, calibrated[key]), key
        else:
            assert torch.equal(value, calibrated[key]), key


def test_dense_calibration_retrains_every_dense_layer_and_no_convolution(task_identity, data):
    proxy, (val_x, val_y) = data
    node_data = {n: (val_x[n::2], val_y[n::2]) for n in (1, 2)}
    replies = [_reply(n, _global(seed=n)) for n in (1, 2)]
    served, replied = {}, {}
    for layers, components in (("classifier", 1), ("dense", 1), ("dense", 3)):
        strategy = _calibrating(
            proxy,
            calibration=CalibrationSettings(
                samples=500, layers=layers, rank=4, components=components
            ),
        )
        _start_round(strategy, _global())
        grid = FeatureStatsGrid(node_data)
        grid = grid
        arrays, _ = aggregate_round(grid, strategy, 1, replies)
        served[layers, components] = arrays.to_torch_state_dict()
        replied[layers, components] = grid.replies
        asked = {
            (query["feature-stats-layers"], query["feature-stats-components"])
            for query in (m.content["config"] for m in grid.queries)
        }
        assert asked == {(layers, components)}
        assert strategy.server_metrics[1]["calibration-rejected-replies"] == 0
    dim = build_model(SPEC).fc1.in_features
    for dense in [("dense", 1), ("dense", 3)]:
        assert all(r["factors"].shape[1] == dim for r in replied[dense])
        assert all(0 < r["ranks"].max() <= 4 for r in replied[dense])
        for key, value in served["classifier", 1].items():
            if key.startswith("fc1."):  # classifier CCVR leaves fc1 alone, the dense one not
                assert not torch.allclose(value, served[dense][key]), key
            elif key.startswith("conv"):
                assert torch.equal(value, served[dense][key]), key


def test_feature_calibration_without_valid_stats_serves_the_uncalibrated_model(task_identity, data):
    strategy = _calibrating(data[0])
    _start_round(strategy, _global())
    grid = FeatureStatsGrid({}, broken={1: "crashed", 2: "crashed"})
    served, _ = aggregate_round(grid, strategy, 1, [_reply(n, _global(seed=n)) for n in (1, 2)])
    assert served is not None
    assert strategy.server_metrics[1]["feature-calibration-applied"] == 0.0
    assert strategy.server_metrics[1]["calibration-valid-replies"] == 0


def test_the_statistics_query_waits_as_long_as_a_training_round(task_identity, data):
    proxy, (val_x, val_y) = data
    strategy = _calibrating(proxy)
    strategy.begin_run(1, timeout=42.0)  # what start(..., timeout=42.0) calls
    _start_round(strategy, _global())
    grid = FeatureStatsGrid({1: (val_x, val_y), 2: (val_x, val_y)})
    # run_rounds hands the query phase the timeout every phase of its rounds waits.
    replies = [_reply(n, _global(seed=n)) for n in (1, 2)]
    arrays, _ = aggregate_round(grid, strategy, 1, replies, timeout=42.0)
    assert grid.timeouts == [42.0] and arrays is not None
    assert strategy.server_metrics[1]["feature-calibration-applied"] == 1.0


def test_clients_without_a_statistics_query_handler_are_reported_once(task_identity, data, caplog):
    # A stock ClientApp registers no query function: Flower answers with this error.
    no_handler = "<class 'ValueError'>:<'No query function registered with name 'default''>"
    proxy, (val_x, val_y) = data
    strategy = _calibrating(proxy, teacher_rule="mean-logits")
    grid = FeatureStatsGrid({1: (val_x, val_y)}, broken={2: no_handler, 3: no_handler})
    with caplog.at_level(logging.WARNING):
        for server_round in (1, 2):
            _start_round(strategy, _global())
            served, _ = aggregate_round(grid, strategy,
                server_round, [_reply(n, _global(seed=n)) for n in (1, 2, 3)]
            )
            stats = strategy.server_metrics[server_round]
            assert served is not None and stats["feature-calibration-applied"] == 1.0
            assert stats["calibration-valid-replies"] == 1
    (warning,) = _warnings(caplog, "answer no feature-statistics query")
    assert "node(s) [2, 3]" in warning and "no query handler" in warning
    assert "@app.query()" in warning and "'feature-stats'" in warning
    assert not _warnings(caplog, "rejected feature statistics")  # not per node, per round
    # Without any client that answers, rounds serve the uncalibrated model, said once.
    caplog.clear()
    strategy.begin_run(4)  # a new run: said once again
    grid = FeatureStatsGrid({}, broken={1: no_handler, 2: no_handler})
    with caplog.at_level(logging.WARNING):
        for server_round in (3, 4):
            _start_round(strategy, _global())
            replies = [_reply(n, _global(seed=n)) for n in (1, 2)]
            aggregate_round(grid, strategy, server_round, replies)
            assert strategy.server_metrics[server_round]["feature-calibration-applied"] == 0.0
    assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == [logging.WARNING]


def test_calibration_takes_a_preset_name_or_settings(data):
    def fedec(calibration):
        return FedEC(proxy_data=data[0], arch_spec=SPEC, calibration=calibration)

    assert fedec(None).calibration == CalibrationSettings.preset("none")
    assert fedec("none").calibration.method == "none"
    assert fedec("prior").calibration.method == "prior"
    mixture = fedec("dense-mixture").calibration
    assert (mixture.method, mixture.layers, mixture.rank, mixture.components) == (
        "features",
        "dense",
        32,
        8,
    )
    dense = CalibrationSettings.preset("dense", rounds="last", nodes="all")
    assert (dense.rank, dense.components, dense.rounds, dense.nodes) == (64, 1, "last", "all")
    assert fedec(dense).calibration is dense
    assert CalibrationSettings.preset("classifier") == CalibrationSettings()
    with pytest.raises(ValueError, match="choose one of none, prior, classifier, dense"):
        fedec("ccvr")


def test_calibration_rounds_last_queries_only_in_the_last_round(task_identity, data):
    proxy, (val_x, val_y) = data
    strategy = _calibrating(proxy, calibration=CalibrationSettings(rounds="last"))
    strategy.num_rounds = 2  # as start(num_rounds=2) records it
    grid = FeatureStatsGrid({n: (val_x[n::2], val_y[n::2]) for n in (0, 1)})
    for server_round in (1, 2):
        _start_round(strategy, _global())
        aggregate_round(grid, strategy, server_round, [_reply(n, _global(seed=n)) for n in (0, 1)])
    assert "feature-calibration-applied" not in strategy.server_metrics[1]
    assert strategy.server_metrics[2]["feature-calibration-applied"] == 1.0
    assert len(grid.queries) == 2  # one per node, in round 2 only
    for wrong in ("first", "every-0", "every-x", "every"):
        with pytest.raises(ValueError, match="choose one of all, last, every-N"):
            CalibrationSettings(rounds=wrong)
    for rounds, calibrated in [("every-5", [5, 10, 12]), ("all", list(range(1, 13)))]:
        every = FedEC(
            proxy_data=proxy, arch_spec=SPEC, calibration=CalibrationSettings(rounds=rounds)
        )
        every.num_rounds = 12  # as start(num_rounds=12) records it
        calibrates = every.calibrator.calibrates
        assert [r for r in range(1, 13) if calibrates(r, every.num_rounds)] == calibrated


def test_feature_calibration_from_mislabelled_stats_is_reverted(task_identity, data):
    # Statistics whose labels are shifted by one class teach the classifier the wrong
    # names: validation drops significantly, and the uncalibrated classifier is served.
    proxy, (val_x, val_y) = data
    clients = _trained_clients()
    replies = [_reply(n + 1, m) for n, m in enumerate(clients)]
    served = {}
    for calibrate in (False, True):
        strategy = _strategy(
            data, distill=DistillSettings(steps=0), calibration="classifier" if calibrate else None
        )
        _start_round(strategy, _global())
        grid = FeatureStatsGrid({n: (val_x, (val_y + 1) % 10) for n in (1, 2)})
        result, _ = aggregate_round(grid, strategy, 1, replies)
        served[calibrate] = result.to_torch_state_dict()
    stats = strategy.server_metrics[1]
    assert stats["calibration-valid-replies"] == 2 and stats["calibration-val-gain"] < -0.1
    assert stats["feature-calibration-applied"] == 0.0
    for key, value in served[False].items():
        assert torch.equal(value, served[True][key]), key


def test_without_distillation_fedec_serves_fedavgs_average_bit_for_bit(task_identity, data):
    replies = [_reply(n, _global(seed=n), num_examples=97 + 31 * n) for n in (1, 2, 3, 4)]
    expected, _ = FedAvg().aggregate_train(1, replies)
    strategy = _strategy(data, distill=DistillSettings(steps=0), client_start="average")
    _start_round(strategy, _global())
    served, _ = strategy.aggregate_train(1, replies)
    for key, array in expected.to_torch_state_dict().items():
        assert torch.equal(served.to_torch_state_dict()[key], array), key
        assert torch.equal(strategy.client_start_arrays.to_torch_state_dict()[key], array), key


def test_calibration_nodes_all_queries_every_node_not_only_the_sampled(task_identity, data):
    proxy, (val_x, val_y) = data
    node_data = {n: (val_x[n::5], val_y[n::5]) for n in range(1, 6)}
    replies = [_reply(n, _global(seed=n)) for n in (1, 2)]  # 2 of 5 nodes trained
    queried = {}
    for nodes in ("sampled", "all"):
        strategy = _calibrating(proxy, calibration=CalibrationSettings(nodes=nodes))
        _start_round(strategy, _global())
        grid = FeatureStatsGrid(node_data)
        aggregate_round(grid, strategy, 1, replies)
        queried[nodes] = sorted(m.metadata.dst_node_id for m in grid.queries)
        assert strategy.server_metrics[1]["calibration-valid-replies"] == len(queried[nodes])
    assert queried == {"sampled": [1, 2], "all": [1, 2, 3, 4, 5]}
    with pytest.raises(ValueError, match="nodes='some' is unknown"):
        CalibrationSettings(nodes="some")
