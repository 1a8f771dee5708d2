"""RecordedRun: the run machinery around any strategy (here Flower's own FedAvg).

On a scripted grid whose clients draw from the server process's random state, so a
resume that did not restore it would train differently: the run folder's files, a run
stopped after round 2 and resumed ending bitwise where an unbroken run does, Flower's
result of the whole run from the resumed one, and the trackers' records read back
from TensorBoard's event files and MLflow's store.
"""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fl_ec.errors import ConfigError
from fl_ec.run.metering import examples_reported
from fl_ec.run.recorded import RecordedRun
from fl_ec.run.settings import OutputSection

NODES = (11, 12, 13, 14)
ROUNDS = 4


class ScriptedGrid:
    """Clients that return the model nudged by noise from the process's torch RNG (as a
    client's shuffle would differ), and evaluate with a fixed loss."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            kind, node = message.metadata.message_type, message.metadata.dst_node_id
            self.sent.append((kind, node))
            if kind == MessageType.TRAIN:
                state = message.content["arrays"].to_torch_state_dict()
                nudged = {k: v + 0.1 * torch.randn(v.shape) for k, v in state.items()}
                metrics = MetricRecord({"num-examples": node, "train_loss": float(node)})
                content = RecordDict({"arrays": ArrayRecord(nudged), "metrics": metrics})
            else:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 1, "eval": 0.5})})
            replies.append(Message(content, reply_to=message))
        return replies


def _evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    weight = arrays.to_torch_state_dict()["w"]
    return MetricRecord({"accuracy": float(torch.sigmoid(weight.mean())), "loss": 1.0})


class ServerDiedError(Exception):
    """The server process dying after a round's checkpoint."""


def _run(run_config: dict, stop_after: int | None = None):
    random.seed(0)
    torch.manual_seed(0)
    strategy = RecordedRun.from_run_config(
        FedAvg(fraction_train=0.5, fraction_evaluate=0.5, min_available_nodes=2), run_config
    )

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if stop_after is not None and server_round == stop_after + 1:
            raise ServerDiedError
        return _evaluate(server_round, arrays)

    result = strategy.start(
        ScriptedGrid(), ArrayRecord({"w": torch.zeros(3, 4)}), ROUNDS, evaluate_fn=evaluate
    )
    return strategy, result


def test_a_stopped_run_resumes_bitwise_with_the_whole_result(task_identity, tmp_path):
    config = {"results-dir": str(tmp_path), "seed": 3}
    _, unbroken = _run({**config, "run-name": "unbroken"})
    with pytest.raises(ServerDiedError):
        _run({**config, "run-name": "stopped"}, stop_after=2)
    stopped = tmp_path / "stopped"
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir())[-1] == "round-000002"
    # Another process would start from other random states: resuming must not depend on them.
    random.seed(99)
    torch.manual_seed(99)
    resumed_run, resumed = _run({**config, "resume": str(stopped)})

    assert torch.equal(
        resumed.arrays.to_torch_state_dict()["w"], unbroken.arrays.to_torch_state_dict()["w"]
    )
    assert sorted(resumed.evaluate_metrics_serverapp) == list(range(ROUNDS + 1))
    assert sorted(resumed.train_metrics_clientapp) == list(range(1, ROUNDS + 1))
    assert resumed.train_metrics_clientapp[1] == unbroken.train_metrics_clientapp[1]
    assert resumed_run.run_dir == stopped
    metrics = json.loads((stopped / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(ROUNDS + 1))
    assert (
        metrics["rounds"][-1]["accuracy"] == unbroken.evaluate_metrics_serverapp[ROUNDS]["accuracy"]
    )
    assert metrics["config"]["seed"] == 3


def test_the_run_folder_has_metrics_plots_the_model_and_bytes(task_identity, tmp_path):
    _run({"results-dir": str(tmp_path), "run-name": "r"})
    run_dir = tmp_path / "r"
    assert {"metrics.json", "accuracy.png", "accuracy_vs_bytes.png", "final_model.pt"} <= {
        p.name for p in run_dir.iterdir()
    }
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert all(r["bytes-down"] > 0 and r["train-replies"] == 2 for r in rounds[1:])
    assert all(r["server-peak-rss-mb"] > 50 for r in rounds)  # at least torch's own
    assert rounds[1]["client-train_loss"] > 0 and rounds[1]["client-eval-eval"] == 0.5
    # What each sampled node said it trained on (ScriptedGrid: its node id).
    assert all(int(n) == count for n, count in rounds[1]["train-examples-by-node"].items())
    saved = torch.load(run_dir / "final_model.pt", weights_only=True)
    assert set(saved) == {"w"}


def test_a_resumed_run_with_other_settings_fails_in_one_line(task_identity, tmp_path):
    _run({"results-dir": str(tmp_path), "run-name": "r", "seed": 1})
    with pytest.raises(ConfigError, match=r"seed \(1 -> 2\)"):
        _run({"resume": str(tmp_path / "r"), "seed": 2})


def test_an_unknown_tracker_fails_naming_the_key():
    with pytest.raises(ConfigError, match="^tracking='wandb' is unknown: choose one of"):
        OutputSection.from_run_config({"tracking": "wandb"})


def test_tensorboard_holds_one_scalar_per_metric_per_round(task_identity, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = {"results-dir": str(tmp_path), "tracking": "tensorboard"}
    with pytest.raises(ServerDiedError):
        _run({**config, "run-name": "r"}, stop_after=2)
    _run({**config, "resume": str(tmp_path / "r")})
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"accuracy", "loss", "bytes-down", "client-train_loss", "wall-seconds"} <= set(tags)
    # Rounds 0..4 once each, across the stop: none lost, none logged twice.
    assert [e.step for e in events.Scalars("accuracy")] == list(range(ROUNDS + 1))
    assert [e.step for e in events.Scalars("bytes-down")] == list(range(ROUNDS + 1))
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())["rounds"]
    assert [e.value for e in events.Scalars("accuracy")] == pytest.approx(
        [r["accuracy"] for r in metrics]
    )


def test_mlflow_keeps_one_run_across_a_resume_with_the_config(task_identity, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"results-dir": str(tmp_path), "tracking": "mlflow", "seed": 5}
    with pytest.raises(ServerDiedError):
        _run({**config, "run-name": "r"}, stop_after=1)
    _run({**config, "resume": str(tmp_path / "r")})
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fl-ec").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "r"
    assert runs[0].data.params["seed"] == "5" and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "accuracy")
    assert sorted(m.step for m in history) == list(range(ROUNDS + 1))


@pytest.mark.parametrize("value", [-1, 1.5, float("nan"), 2.0**60, [3], "7"])
def test_a_reply_counting_its_examples_wrongly_is_not_recorded(task_identity, value):
    from flwr.app import ConfigRecord

    message = Message(RecordDict({"config": ConfigRecord({})}), 5, MessageType.TRAIN)
    metrics = ConfigRecord({"num-examples": value}) if isinstance(value, str) else None
    content = RecordDict({"metrics": metrics or MetricRecord({"num-examples": value})})
    assert examples_reported(Message(content, reply_to=message)) is None
    good = RecordDict({"metrics": MetricRecord({"num-examples": 12})})
    assert examples_reported(Message(good, reply_to=message)) == 12


def test_a_tracker_whose_backend_is_missing_fails_with_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(ConfigError, match=r'^tracking="mlflow" needs its backend: pip install'):
        RecordedRun.from_run_config(FedAvg(), {"results-dir": str(tmp_path), "tracking": "mlflow"})
    assert not (tmp_path / "mlflow.db").exists()
