"""Checkpoint and resume in a real `flwr run` simulation.

A run stopped after round 2 and resumed to round 3 must end exactly where a run of 3
rounds does: same global model bit for bit, every round recorded once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import requires_fashion_mnist
from tests.integration.helpers import completed_run

pytestmark = [pytest.mark.integration, requires_fashion_mnist]

# FedEC with everything that carries state between rounds: the clients train from last
# round's parameter average (client-start="average"), the student is distilled (torch
# random state), and the test accuracy is recorded each round.
FEDEC = 'strategy="fedec" distill-steps=20 client-start="average" local-epochs=1'


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def assert_same_run(resumed: dict, uninterrupted: dict) -> None:
    rounds = [r["round"] for r in resumed["rounds"]]
    assert rounds == [0, 1, 2, 3]  # every round exactly once
    for left, right in zip(resumed["rounds"], uninterrupted["rounds"], strict=True):
        assert left["test-accuracy"] == right["test-accuracy"], left["round"]
        assert left["bytes-down"] == right["bytes-down"]
    a = final_model(Path(resumed["_run_dir"]))
    b = final_model(Path(uninterrupted["_run_dir"]))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_fedec_run_resumed_after_round_two_ends_bitwise_where_an_uninterrupted_one_does(
    cli, tmp_path
):
    results = tmp_path / "results"
    whole = completed_run(cli, results, "whole", f"{FEDEC} num-server-rounds=3")
    cut = completed_run(cli, results, "cut", f"{FEDEC} num-server-rounds=2")
    checkpoints = sorted(p.name for p in (results / "cut" / "checkpoints").iterdir())
    assert checkpoints == ["round-000001", "round-000002"]  # the two newest are kept

    # run-name is the folder's own: completed_run reads results/cut/metrics.json.
    resumed = completed_run(
        cli, results, "cut", f'{FEDEC} num-server-rounds=3 resume="{results / "cut"}"'
    )
    assert_same_run(resumed, whole)
    # Rounds 1-2 come from the checkpoint, not from training them again: their records
    # (wall time included) are the interrupted run's own.
    assert resumed["started"] == cut["started"]
    assert resumed["rounds"][:3] == cut["rounds"]
