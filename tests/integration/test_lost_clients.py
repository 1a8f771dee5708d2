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
