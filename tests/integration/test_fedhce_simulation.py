"""FedHCE under the real `flwr run` simulation engine, with GPU and edge nodes."""

from __future__ import annotations

import json

import pytest
import torch

from fl_ec.hce import evaluate_variants, load_variants
from tests.conftest import requires_fashion_mnist
from tests.integration.helpers import completed_run, quickstart_app

pytestmark = pytest.mark.integration


@requires_fashion_mnist
def test_fedhce_sends_each_node_the_variant_its_policy_names(cli, tmp_path):
    results = tmp_path / "results"
    extra = (
        'strategy="fedhce" num-server-rounds=2 distill-steps=10 variant-distill-steps=5 '
        'simulated-tiers="gpu=1,edge=2" variants="full,int8,prune-0.5+int4" '
        'variant-policy="gpu=full,edge=prune-0.5+int4" calibration="classifier" '
        'calibration-rounds="last"'
    )
    metrics = completed_run(cli, results, "fedhce", extra, num_supernodes=3)
    run_dir = results / "fedhce"
    rounds = {r["round"]: r for r in metrics["rounds"]}
    # Every node described its tier before round 1, so from round 1 on each got,
    # trained and returned its tier's variant (the default would be the last, int4).
    assigned = rounds[2]["variant-by-node"]
    assert sorted(assigned.values()) == ["full", "prune-0.5+int4", "prune-0.5+int4"]
    assert rounds[1]["variant-by-node"] == assigned
    assert rounds[2]["returned-variant-by-node"] == assigned
    sent = rounds[2]["bytes-down-by-node"]
    full_node = next(n for n, v in assigned.items() if v == "full")
    for node, variant in assigned.items():
        if variant != "full":  # the edge nodes' downlink is a fraction of the GPU node's
            assert sent[node] < sent[full_node] / 8
    assert rounds[2]["variant-bytes"]["prune-0.5+int4"] < rounds[2]["variant-bytes"]["full"] / 8
    assert 0.3 < rounds[2]["hce-val-accuracy"] <= 1
    # The last round calibrates the global model, then each compressed variant from
    # its own features: the real ClientApp unpacked every packed variant and answered.
    assert "variant-calibration" not in rounds[1]
    assert rounds[2]["calibration-valid-replies"] == 3
    for variant in ("int8", "prune-0.5+int4"):
        assert rounds[2]["variant-calibration"][variant]["calibration-valid-replies"] == 3
    summary = metrics["summary"]
    assert set(summary["variant-test-accuracy-uncalibrated"]) == {"full", "int8", "prune-0.5+int4"}
    assert 0.0 < summary["hce-test-accuracy-uncalibrated"] <= 1.0
    # The saved variants reload (no pickles) and evaluate as an HCE ensemble.
    models, index = load_variants(run_dir)
    assert {e["name"] for e in index} == {"full", "int8", "prune-0.5+int4"}
    from fl_ec.data.sources import make_synthetic

    test, _ = make_synthetic(num_train=64, num_test=8, seed=0)
    reports = evaluate_variants(
        models, index, test.normalize(test.images), test.labels, latency=False
    )
    assert reports[-1].name == "HCE{int8, prune-0.5+int4}"
    assert reports[-1].wire_bytes == sum(e["wire-bytes"] for e in index if e["hce"])


@requires_fashion_mnist
def test_flowers_quickstart_app_runs_fedhce_with_two_client_lines(cli, tmp_path):
    # Flower's quickstart-pytorch with FedHCE in its ServerApp and receive_variant /
    # reply_variant in its ClientApp: the stock Net (with .view) trains a pruned int4 variant.
    app = quickstart_app(tmp_path, "server_app_fedhce", "client_app_fedhce")
    results = tmp_path / "quickstart"
    run_id = cli.submit(app, f'num-server-rounds=1 results-file="{results}"', num_supernodes=3)
    outcome = cli.wait(run_id, timeout=600)
    logs = cli.logs(run_id)
    assert outcome.completed, f"{outcome.status}: {outcome.details}\n{logs[-3000:]}"
    assert "dropped reply" not in logs  # every pruned, int4-packed variant's reply accepted
    accuracy = json.loads(results.with_suffix(".json").read_text())
    assert accuracy["1"]["accuracy"] > accuracy["0"]["accuracy"] + 0.3
    state = torch.load(results.with_suffix(".pt"), weights_only=True)
    assert state["fc1.weight"].shape == (120, 256)  # the global model stays full width
