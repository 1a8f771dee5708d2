"""`flwr run` local simulations on real Fashion-MNIST (the simulation engine, not mocks)."""

from __future__ import annotations

import pytest

from fl_ec.results import load_saved_model
from tests.conftest import ROOT, requires_fashion_mnist
from tests.integration.helpers import completed_run, model_bytes, run_config

pytestmark = [pytest.mark.integration, requires_fashion_mnist]


def test_one_round_simulation_writes_metrics(cli, tmp_path):
    results = tmp_path / "results"
    metrics = completed_run(cli, results, "sim")
    run_dir = results / "sim"
    rounds = {r["round"]: r for r in metrics["rounds"]}
    assert set(rounds) == {0, 1}
    # One round of FedAvg on 2 clients lifts the untrained model well above chance.
    assert rounds[0]["test-accuracy"] < 0.2
    assert rounds[1]["test-accuracy"] > 0.4
    assert rounds[1]["test-accuracy"] == metrics["summary"]["final-test-accuracy"]
    # Both clients got the full model and each sent one back.
    one_model = model_bytes(metrics)
    assert rounds[1]["bytes-down"] == 2 * one_model
    assert rounds[1]["bytes-up"] == 2 * one_model
    assert rounds[1]["train-replies"] == 2 and rounds[1]["rejected-replies"] == 0
    assert rounds[1]["wall-seconds"] >= rounds[1]["train-seconds"] > 0
    assert metrics["config"]["alpha"] == 0.5 and metrics["arch-spec"]["name"] == "cnn"
    assert (run_dir / "accuracy.png").stat().st_size > 1000
    assert (run_dir / "accuracy_vs_bytes.png").stat().st_size > 1000
    assert load_saved_model(run_dir) is not None


def test_misconfigured_run_fails_with_one_line_and_no_traceback(cli, tmp_path):
    run_id = cli.submit(ROOT, run_config(tmp_path, "bad", "alpha=0.0"), num_supernodes=2)
    outcome = cli.wait(run_id, timeout=300)
    assert outcome.status == "finished:failed"
    assert "alpha=0.0 must be > 0" in outcome.details
    logs = cli.logs(run_id)
    assert "fl-ec error: alpha=0.0 must be > 0" in logs
    assert "Traceback" not in logs


def test_a_client_trains_layer_parallel_under_flwr_run(cli, tmp_path):
    extra = 'model="resnet8" trainer="layer-parallel" lp-stages=2 lp-downsample=2 local-epochs=2'
    round_1 = completed_run(cli, tmp_path, "lp", extra)["rounds"][1]
    # Each client split its ResNet into 2 stages run by 2 gloo worker processes.
    assert round_1["client-trainer-stages"] == 2
    assert round_1["train-replies"] == 2 and round_1["test-accuracy"] > 0.2
