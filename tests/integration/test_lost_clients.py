"""Nodes that fail mid-run in a real `flwr run` simulation: the run goes on without them."""

from __future__ import annotations

import pytest

from tests.conftest import requires_fashion_mnist
from tests.integration.helpers import completed_run

pytestmark = pytest.mark.integration


@requires_fashion_mnist
def test_a_third_of_the_nodes_failing_every_round_leaves_the_run_complete(cli, tmp_path):
    # fail-fraction=0.34 of 3 nodes: one node (a different one as the seed draws) answers
    # each training round with an error; FedEC averages and calibrates the other two.
    extra = (
        'strategy="fedec" distill-steps=0 calibration="classifier" '
        "num-server-rounds=3 fail-fraction=0.34"
    )
    metrics = completed_run(cli, tmp_path / "results", "faults", extra, num_supernodes=3)
    trained = metrics["rounds"][1:]
    assert len(trained) == 3
    assert all(r["train-replies"] == 2 and r["rejected-replies"] == 1 for r in trained)
    assert trained[-1]["test-accuracy"] > 0.5  # two honest nodes still learn


@pytest.mark.slow  # about 1 minute: two rounds that each wait out a 15 s timeout
@requires_fashion_mnist
def test_a_node_that_never_answers_is_waited_for_until_the_timeout_then_recorded_lost(
    cli, tmp_path
):
    # fail-mode="silent": one of 3 nodes answers each round only after round-timeout.
    # Two simulation workers, so the silent one does not hold up the others.
    timeout = 15
    extra = f'num-server-rounds=2 fail-fraction=0.34 fail-mode="silent" round-timeout={timeout}'
    metrics = completed_run(
        cli,
        tmp_path / "results",
        "silent",
        extra,
        num_supernodes=3,
        federation_config="client-resources-num-cpus=1",
    )
    trained = metrics["rounds"][1:]
    assert len(trained) == 2
    for record in trained:
        assert record["train-replies"] == 2 and record["rejected-replies"] == 0
        assert len(record["lost-nodes"]) == 1
        assert record["train-seconds"] >= timeout - 1  # it waited for the silent node
    assert trained[-1]["test-accuracy"] > 0.4
