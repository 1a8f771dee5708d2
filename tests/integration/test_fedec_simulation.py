"""FedEC under the real `flwr run` simulation engine."""

from __future__ import annotations

import json

import pytest
import torch

from fl_ec.results import load_saved_model
from tests.conftest import requires_fashion_mnist
from tests.integration.helpers import completed_run, model_bytes, quickstart_app

pytestmark = pytest.mark.integration


@requires_fashion_mnist
def test_fedec_two_rounds_records_teacher_and_student(cli, tmp_path):
    results = tmp_path / "results"
    extra = 'strategy="fedec" num-server-rounds=2 distill-steps=20'
    metrics = completed_run(cli, results, "fedec", extra)
    run_dir = results / "fedec"
    rounds = {r["round"]: r for r in metrics["rounds"]}
    assert set(rounds) == {0, 1, 2}
    for r in (1, 2):
        assert 0 < rounds[r]["distill-steps"] <= 20
        assert rounds[r]["student-val-accuracy"] >= rounds[r]["student-start-val-accuracy"]
        assert rounds[r]["teacher-val-accuracy"] > 0.3
        assert rounds[r]["teacher-seconds"] > 0 and rounds[r]["distill-seconds"] > 0
        assert rounds[r]["train-replies"] == 2
    assert rounds[2]["test-accuracy"] > 0.4
    summary = metrics["summary"]
    assert summary["ensemble-members"] == 2 and summary["ensemble-test-accuracy"] > 0.4
    member = load_saved_model(run_dir, "ensemble/member-0")
    assert member(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


@requires_fashion_mnist
def test_flowers_quickstart_app_runs_with_fedec_swapped_in(cli, tmp_path):
    # Flower's own quickstart-pytorch: dict batches from a flwr-datasets partitioner, a Net
    # whose forward calls .view(), a stock ClientApp; only the ServerApp's strategy changed.
    app = quickstart_app(tmp_path, serverapp="server_app_fedec")
    results = tmp_path / "quickstart"
    run_id = cli.submit(app, f'num-server-rounds=2 results-file="{results}"', num_supernodes=3)
    outcome = cli.wait(run_id, timeout=600)
    logs = cli.logs(run_id)
    assert outcome.completed, f"{outcome.status}: {outcome.details}\n{logs[-3000:]}"
    assert "FedEC: teacher=" in logs  # FedEC, not FedAvg, ran the rounds
    # A stock client sends no class counts: said once, not every round.
    assert logs.count("carry no class counts") == 1
    accuracy = json.loads(results.with_suffix(".json").read_text())
    assert set(accuracy) == {"0", "1", "2"} and accuracy["2"]["accuracy"] > 0.6
    state = torch.load(results.with_suffix(".pt"), weights_only=True)
    assert state["fc1.weight"].shape == (120, 256)  # the example's Net, unchanged


@requires_fashion_mnist
def test_feature_calibration_in_the_last_round_queries_every_client(cli, tmp_path):
    results = tmp_path / "results"
    extra = (
        'strategy="fedec" num-server-rounds=2 distill-steps=0 client-start="average" '
        'calibration="classifier" calibration-rounds="last"'
    )
    metrics = completed_run(cli, results, "calibrated", extra)
    first, last = metrics["rounds"][1:]
    # start() told FedEC how many rounds there are: round 1 asks the clients for no
    # statistics (its only query is the sampler's describe, which carries no arrays).
    assert "calibration-valid-replies" not in first and "calibration-query-seconds" not in first
    # Both clients answered the query through the real engine, and the server used it.
    assert last["calibration-valid-replies"] == 2 and last["calibration-rejected-replies"] == 0
    assert last["client-query-seconds"] > 0 and last["calibration-seconds"] > 0
    assert "calibration-val-gain" in last
    # The query's arrays (the served model, to both nodes) are metered.
    assert last["bytes-down"] == first["bytes-down"] + 2 * model_bytes(metrics)
