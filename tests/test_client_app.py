"""The ClientApp's handlers, called directly with hand-built Messages on synthetic data."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fl_ec.clients.client_app import FL_EC_ERROR_CODE, evaluate_handler, train
from fl_ec.launch import app_defaults
from fl_ec.models import ArchSpec, build_model
from tests.conftest import ROOT

SPEC = ArchSpec("cnn", (1, 28, 28), 10)


def _context(**overrides):
    run_config = {
        **app_defaults(ROOT),
        "dataset": "synthetic",
        "proxy-size": 200,
        "validation-size": 100,
        "client-threads": 1,
        **overrides,
    }
    node_config = {"partition-id": 1, "num-partitions": 4, "device-tier": "edge"}
    return Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def _message(kind, model, **config):
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord({"arch-spec": SPEC.to_json(), "server-round": 1, **config}),
        }
    )
    return Message(content=content, dst_node_id=7, message_type=kind)


def test_train_returns_trained_arrays_metrics_and_capability(task_identity):
    torch.manual_seed(0)
    model = build_model(SPEC)
    reply = train(_message("train", model, lr=0.05, **{"local-epochs": 1}), _context())
    assert not reply.has_error()
    trained = reply.content["arrays"].to_torch_state_dict()
    assert trained.keys() == model.state_dict().keys()
    assert not torch.equal(trained["conv1.weight"], model.state_dict()["conv1.weight"])
    metrics = reply.content["metrics"]
    # 2000 synthetic samples - 300 held out by the server = 1700 over 4 partitions,
    # 10% of each kept for local evaluation.
    assert 200 < metrics["num-examples"] < 700
    assert metrics["train-loss"] > 0
    capability = reply.content["capability"]
    assert capability["device-tier"] == "edge" and capability["device-kind"] in ("cpu", "cuda")


def test_evaluate_reports_loss_and_accuracy(task_identity):
    model = build_model(SPEC)
    reply = evaluate_handler(_message("evaluate", model), _context())
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and 0.0 <= metrics["eval-acc"] <= 1.0


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"alpha": 0.0}, "alpha=0.0 must be > 0"),
        ({"proxy-size": 5000}, "leave no training data"),
    ],
)
def test_misconfiguration_becomes_a_one_line_error_reply(task_identity, overrides, fragment):
    reply = train(_message("train", build_model(SPEC)), _context(**overrides))
    assert reply.has_error()
    assert reply.error.code == FL_EC_ERROR_CODE
    assert fragment in reply.error.reason and "Traceback" not in reply.error.reason


def test_query_returns_the_class_feature_statistics_of_the_sent_model(task_identity):
    from fl_ec.calibration import ClassifierGaussian
    from fl_ec.clients.client_app import query_handler

    model = build_model(SPEC)
    reply = query_handler(_message("query", model, **{"feature-stats": True}), _context())
    assert not reply.has_error()
    arrays = {k: a.numpy() for k, a in reply.content["feature-stats"].items()}
    stats = ClassifierGaussian().parse(arrays, num_classes=10, dim=model.classifier.in_features)
    assert stats.counts.sum() == reply.content["metrics"]["num-examples"]
    assert (stats.covariances.diagonal(dim1=1, dim2=2) >= 0).all()


def test_query_for_dense_statistics_returns_low_rank_ones_of_the_dense_head(task_identity):
    from fl_ec.calibration import DenseMixture, LowRankDense
    from fl_ec.clients.client_app import query_handler

    model = build_model(SPEC)
    ask = {"feature-stats": True, "feature-stats-layers": "dense", "feature-stats-rank": 3}
    reply = query_handler(_message("query", model, **ask), _context())
    assert not reply.has_error()
    arrays = {k: a.numpy() for k, a in reply.content["feature-stats"].items()}
    stats = LowRankDense(rank=3).parse(arrays, num_classes=10, dim=model.fc1.in_features)
    assert stats.counts.sum() == reply.content["metrics"]["num-examples"]
    mixed = query_handler(
        _message("query", model, **{**ask, "feature-stats-components": 3}), _context()
    )
    arrays = {k: a.numpy() for k, a in mixed.content["feature-stats"].items()}
    mixture = DenseMixture(rank=3, components=3).parse(arrays, 10, model.fc1.in_features)
    assert mixture.counts.sum() == stats.counts.sum()
    assert len(mixture.labels) > int((stats.counts > 0).sum())  # some class was split
    wrong = query_handler(
        _message("query", model, **{**ask, "feature-stats-layers": "conv"}), _context()
    )
    assert wrong.has_error() and "layers='conv' is unknown" in wrong.error.reason


def test_query_without_a_known_request_is_a_one_line_error(task_identity):
    from fl_ec.clients.client_app import query_handler

    reply = query_handler(_message("query", build_model(SPEC)), _context())
    assert reply.has_error() and reply.error.code == FL_EC_ERROR_CODE
    assert "feature-stats" in reply.error.reason


def test_simulated_tiers_apply_in_a_simulation_only():
    from fl_ec.clients.client_app import in_simulation, with_simulated_tier
    from fl_ec.clients.settings import NodeSettings

    node = NodeSettings(partition_id=1, num_partitions=4)
    assert with_simulated_tier(node, "gpu=1,edge=3", simulation=True).device_tier == "edge"
    # A deployed SuperNode keeps the tier it reports (none here), whatever the run-config says.
    assert with_simulated_tier(node, "gpu=1,edge=3", simulation=False).device_tier == ""
    tiered = NodeSettings(partition_id=1, num_partitions=4, device_tier="gpu")
    assert with_simulated_tier(tiered, "gpu=1,edge=3", simulation=True).device_tier == "gpu"
    assert not in_simulation()  # pytest runs no Ray


def test_describe_reports_the_partition_and_the_capability_a_train_reply_would(task_identity):
    from fl_ec.clients.client_app import query_handler

    content = RecordDict({"config": ConfigRecord({"describe": True})})
    query = Message(content, dst_node_id=7, message_type="query")
    reply = query_handler(query, _context())
    assert not reply.has_error()
    assert reply.content["node-info"]["partition-id"] == 1
    assert sum(reply.content["node-info"]["class-counts"]) > 0
    capability = reply.content["capability"]
    assert capability["device-tier"] == "edge" and capability["cpu-threads"] == 1.0
