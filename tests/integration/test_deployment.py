"""A real deployment on 127.0.0.1: flower-superlink + 2 flower-supernode processes."""

from __future__ import annotations

import json
import os

import pytest

from fl_ec.deploy import CONNECTION, down, up
from tests.conftest import ROOT, requires_fashion_mnist
from tests.integration.helpers import FlowerCli, model_bytes, run_config

pytestmark = [pytest.mark.integration, requires_fashion_mnist]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().split()[2] != "Z"


def test_superlink_and_two_supernodes_complete_one_round(tmp_path):
    home, results = tmp_path / "flwr-home", tmp_path / "results"
    state = up(2, tmp_path / "deploy", home)
    try:
        assert len(state.supernode_pids) == 2
        assert all(_alive(p) for p in [state.superlink_pid, *state.supernode_pids])
        cli = FlowerCli(home=home, superlink=CONNECTION)
        run_id = cli.submit(ROOT, run_config(results, "deployed"))
        outcome = cli.wait(run_id, timeout=600)
        assert outcome.completed, f"{outcome.status}: {outcome.details}"
        metrics = json.loads((results / "deployed" / "metrics.json").read_text())
        metrics["_run_dir"] = str(results / "deployed")
        last = metrics["rounds"][-1]
        assert last["round"] == 1 and last["train-replies"] == 2
        assert last["bytes-down"] == 2 * model_bytes(metrics)
        assert last["test-accuracy"] > 0.4
    finally:
        pids = down(state)
    assert not any(_alive(p) for p in pids)
