"""kill -9 in a real deployment (flower-superlink + flower-supernode processes on 127.0.0.1).

- The server side killed mid-run (the SuperLink and the ServerApp process), the
  deployment restarted, the run resumed: it completes every round exactly once and
  ends on the same global model, bit for bit, as a run that was never interrupted.
- One SuperNode killed mid-run: each round after waits ``round-timeout`` for it, goes
  on with the other nodes, and records the lost node; the run completes.

- Flower's quickstart-pytorch with fl-ec's run machinery around its FedAvg, killed and
  resumed the same way: the same final model, every round in its outputs.

About 2.5, 1.5 and 3 minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from fl_ec.deploy import CONNECTION, down, up
from fl_ec.launch import process_pids
from tests.conftest import ROOT, requires_fashion_mnist
from tests.integration.helpers import FlowerCli, quickstart_app, run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, requires_fashion_mnist]

FEDEC = 'strategy="fedec" distill-steps=20 client-start="average" num-server-rounds=2'


def _wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout:.0f}s"
        time.sleep(0.5)


def _finish(cli: FlowerCli, run_id: int) -> None:
    outcome = cli.wait(run_id, timeout=600)
    assert outcome.completed, f"{outcome.status}: {outcome.details}\n{cli.logs(run_id)[-3000:]}"


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def test_a_server_killed_mid_run_resumes_and_ends_bitwise_where_an_unbroken_run_does(tmp_path):
    home, results = tmp_path / "flwr-home", tmp_path / "results"
    state = up(2, tmp_path / "deploy", home)
    try:
        cli = FlowerCli(home=home, superlink=CONNECTION)
        _finish(cli, cli.submit(ROOT, run_config(results, "unbroken", FEDEC)))
        cli.submit(ROOT, run_config(results, "killed", FEDEC))
        _wait_for(results / "killed" / "checkpoints" / "round-000001")
        # The ServerApp runs in its own process (spawned through flower-superexec).
        serverapps = process_pids("flwr-serverapp", state.address)
        assert serverapps, "no ServerApp process found"
        for pid in [state.superlink_pid, *serverapps]:
            os.kill(pid, signal.SIGKILL)
    finally:
        down(state)
    killed = _metrics(results / "killed")
    assert len(killed["rounds"]) < 3 and not (results / "killed" / "final_model.pt").exists()
    # Rounds 0..k, k the last checkpoint's round (metrics.json may hold one more).
    last = max(p.name for p in (results / "killed" / "checkpoints").glob("round-*"))
    checkpointed = int(last.removeprefix("round-")) + 1

    state = up(2, tmp_path / "deploy-again", home)  # a new SuperLink, new SuperNodes
    try:
        cli = FlowerCli(home=home, superlink=CONNECTION)
        resume = f'{FEDEC} resume="{results / "killed"}"'
        _finish(cli, cli.submit(ROOT, run_config(results, "killed", resume)))
    finally:
        down(state)
    resumed, unbroken = _metrics(results / "killed"), _metrics(results / "unbroken")
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2]
    assert [r["test-accuracy"] for r in resumed["rounds"]] == [
        r["test-accuracy"] for r in unbroken["rounds"]
    ]
    # The rounds before the crash come from the checkpoint, not from training them
    # again: their records (wall time included) are the killed run's own.
    assert resumed["started"] == killed["started"]
    assert resumed["rounds"][:checkpointed] == killed["rounds"][:checkpointed]
    a, b = _model(results / "killed"), _model(results / "unbroken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_supernode_killed_mid_run_is_recorded_lost_and_the_run_completes(tmp_path):
    home, results = tmp_path / "flwr-home", tmp_path / "results"
    state = up(3, tmp_path / "deploy", home)
    # Above the first round's time (each SuperNode starts its ClientApp, loads data).
    timeout = 30
    extra = f"num-server-rounds=3 round-timeout={timeout}"
    try:
        cli = FlowerCli(home=home, superlink=CONNECTION)
        run_id = cli.submit(ROOT, run_config(results, "lost", extra))
        _wait_for(results / "lost" / "checkpoints" / "round-000001")
        os.killpg(state.supernode_pids[0], signal.SIGKILL)  # the node and its ClientApp
        _finish(cli, run_id)
    finally:
        down(state)
    rounds = _metrics(results / "lost")["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[1]["train-replies"] == 3 and "lost-nodes" not in rounds[1]
    # Round 2 was under way when the node died: it waited out the timeout for it.
    assert rounds[2]["train-replies"] == 2 and len(rounds[2]["lost-nodes"]) == 1
    assert rounds[2]["wall-seconds"] >= timeout
    # Later rounds go on with the two nodes left (Flower may still list the dead one).
    assert rounds[3]["train-replies"] == 2
    assert set(rounds[3].get("lost-nodes", [])) <= set(rounds[2]["lost-nodes"])
    assert rounds[3]["test-accuracy"] > 0.4


QUICKSTART = 'num-server-rounds=2 tracking="tensorboard" fraction-evaluate=0.0'


def test_flowers_quickstart_with_the_run_machinery_resumes_bitwise_after_a_kill(tmp_path):
    # Flower's quickstart-pytorch ServerApp with RecordedRun around its FedAvg (two added
    # lines), the server side killed after round 1's checkpoint, then resumed. Its client
    # seeds its training per round (one added line): the stock example draws its shuffle
    # from torch's default generator, which torch seeds at random in every new process, so
    # two unbroken runs of it already differ in round 1 and no resume could match one.
    app = quickstart_app(tmp_path, "server_app_recorded", "client_app_seeded")
    home, results = tmp_path / "flwr-home", tmp_path / "results"

    def config(name: str, extra: str = "") -> str:
        own = f'results-file="{results / name}-result"'  # the example's own output
        return f'{QUICKSTART} results-dir="{results}" run-name="{name}" {own} {extra}'

    # Each node trains a twentieth of Fashion-MNIST: rounds of seconds, not minutes.
    small = ["num-partitions=20"]
    state = up(2, tmp_path / "deploy", home, node_configs=small)
    try:
        cli = FlowerCli(home=home, superlink=CONNECTION)
        _finish(cli, cli.submit(app, config("unbroken")))
        cli.submit(app, config("killed"))
        _wait_for(results / "killed" / "checkpoints" / "round-000001")
        for pid in [state.superlink_pid, *process_pids("flwr-serverapp", state.address)]:
            os.kill(pid, signal.SIGKILL)
    finally:
        down(state)
    assert not (results / "killed" / "final_model.pt").exists()

    state = up(2, tmp_path / "deploy-again", home, node_configs=small)
    try:
        cli = FlowerCli(home=home, superlink=CONNECTION)
        _finish(cli, cli.submit(app, config("killed", f'resume="{results / "killed"}"')))
    finally:
        down(state)
    a, b = _model(results / "killed"), _model(results / "unbroken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The app's own output holds every round, the ones before the kill included.
    own = json.loads((results / "killed-result.json").read_text())
    assert set(own) == {"0", "1", "2"}
    rounds = _metrics(results / "killed")["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["accuracy"] > 0.3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(results / "killed" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("accuracy")] == [0, 1, 2]
