"""Experiment trackers: each completed round's numbers to TensorBoard or MLflow.

A tracker receives, after every round, the round's record as numbers (central
evaluation, the clients' aggregated metrics, bytes, seconds, and what an fl-ec
strategy measured on the server: FedEC's teacher, parameter-average and student
accuracies), one scalar per metric, stepped by the round. Each backend is an optional
extra (``pip install "fl-ec[tensorboard]"``, ``"fl-ec[mlflow]"``), imported only when a
run asks for it; a run that asks for one that is not installed fails before its first
round with the line that installs it.

- :class:`TensorBoardTracker` writes event files into ``<run folder>/tensorboard/``
  (``tensorboard --logdir <results-dir>`` shows every run side by side).
- :class:`MlflowTracker` logs one MLflow run per fl-ec run, its run-config as the
  parameters, into ``MLFLOW_TRACKING_URI`` when set, else the SQLite store
  ``<results-dir>/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///...``). A
  resumed run goes on logging into the same MLflow run.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fl_ec.errors import ConfigError

MLFLOW_EXPERIMENT = "fl-ec"
_MLFLOW_PARAM_LIMIT = 6000  # characters MLflow keeps of a parameter's value


class Tracker(Protocol):
    """Where each completed round's numbers go."""

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        """Log ``scalars`` (one per metric) at step ``server_round``; durable on return."""
        ...

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to go on logging where this one did (JSON)."""
        ...

    def close(self) -> None:
        """Flush and release the backend at the end of the run."""
        ...


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker is told about the run it logs."""

    run_dir: Path
    run_name: str
    config: Mapping[str, Any]
    # The tracker's state() from the run this one resumes (empty for a new run).
    previous: Mapping[str, Any]


class TensorBoardTracker:
    """Scalars into TensorBoard event files under ``<run folder>/tensorboard/``."""

    def __init__(self, run: TrackedRun) -> None:
        writer_class = _import("torch.utils.tensorboard", "tensorboard").SummaryWriter
        self.log_dir = run.run_dir / "tensorboard"
        self.writer = writer_class(log_dir=str(self.log_dir))

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=server_round)
        self.writer.flush()  # a killed run keeps every round it completed

    def state(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per fl-ec run: the run-config as parameters, rounds as steps."""

    def __init__(self, run: TrackedRun) -> None:
        mlflow = _import("mlflow", "mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (
            f"sqlite:///{(run.run_dir.parent / 'mlflow.db').resolve()}"
        )
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        self.tracking_uri = uri
        run_id = run.previous.get("run-id")
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(name)
            )
            run_id = self.client.create_run(experiment_id, run_name=run.run_name).info.run_id
            params = [
                mlflow.entities.Param(key, _param_value(value))
                for key, value in sorted(run.config.items())
            ]
            self.client.log_batch(run_id, params=params)
        self.run_id = run_id
        self._metric = mlflow.entities.Metric

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        now = _millis()
        metrics = [
            self._metric(_mlflow_key(name), float(value), now, server_round)
            for name, value in scalars.items()
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def state(self) -> dict[str, Any]:
        return {"run-id": self.run_id}

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# tracking= name -> the tracker class, and the extra that installs its backend.
TRACKERS: dict[str, Callable[[TrackedRun], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
}


def build_trackers(names: list[str], run: TrackedRun) -> dict[str, Tracker]:
    """The trackers ``names`` lists, each given its state from the run resumed."""
    trackers: dict[str, Tracker] = {}
    for name in names:
        previous = run.previous.get(name, {})
        trackers[name] = TRACKERS[name](
            TrackedRun(run.run_dir, run.run_name, run.config, previous)
        )
    return trackers


def _import(module: str, extra: str) -> Any:
    """``module``, or a one-line ConfigError that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f'tracking="{extra}" needs its backend: pip install "fl-ec[{extra}]" '
            f"(or remove {extra} from tracking)"
        ) from None


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_MLFLOW_PARAM_LIMIT]


def _mlflow_key(name: str) -> str:
    """MLflow keys allow letters, digits, ``_-./`` and spaces; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _millis() -> int:
    return int(time.time() * 1000)
