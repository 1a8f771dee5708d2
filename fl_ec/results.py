"""The run folder: ``metrics.json`` per round, ``accuracy.png``, and the final model.

:class:`RunRecorder` is fed plain numbers by the server glue (bytes, seconds,
accuracies) and knows nothing about Flower. ``metrics.json`` is rewritten after every
round, so an interrupted run still leaves everything up to its last round.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fl_ec.models.spec import ArchSpec


@dataclass
class RoundRecord:
    """Everything measured in one server round (round 0 = the initial model)."""

    round: int
    bytes_down: int = 0
    bytes_up: int = 0
    train_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    client_evaluate_seconds: float = 0.0
    client_query_seconds: float = 0.0
    server_evaluate_seconds: float = 0.0
    wall_seconds: float = 0.0
    train_replies: int = 0
    rejected_replies: int = 0
    # Per-node payloads differ when a strategy sends each node its own variant.
    bytes_down_by_node: dict[int, int] = field(default_factory=dict)
    # Nodes sent a message this round that did not answer within the round's timeout.
    lost_nodes: set[int] = field(default_factory=set)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "round": self.round,
            "wall-seconds": round(self.wall_seconds, 4),
            "train-seconds": round(self.train_seconds, 4),
            "aggregate-seconds": round(self.aggregate_seconds, 4),
            "client-evaluate-seconds": round(self.client_evaluate_seconds, 4),
            "client-query-seconds": round(self.client_query_seconds, 4),
            "server-evaluate-seconds": round(self.server_evaluate_seconds, 4),
            "bytes-down": self.bytes_down,
            "bytes-up": self.bytes_up,
            "train-replies": self.train_replies,
            "rejected-replies": self.rejected_replies,
        }
        if self.bytes_down_by_node:
            out["bytes-down-by-node"] = {str(k): v for k, v in self.bytes_down_by_node.items()}
        if self.lost_nodes:
            out["lost-nodes"] = sorted(self.lost_nodes)
        out.update(self.metrics)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        """The record :meth:`to_dict` wrote (timings as rounded there)."""
        data = dict(data)
        record = cls(round=int(data.pop("round")))
        for name in list(data):
            attribute = name.replace("-", "_")
            if attribute in _COUNTERS:
                setattr(record, attribute, type(getattr(record, attribute))(data.pop(name)))
        by_node = data.pop("bytes-down-by-node", {})
        record.bytes_down_by_node = {int(k): int(v) for k, v in by_node.items()}
        record.lost_nodes = {int(n) for n in data.pop("lost-nodes", [])}
        record.metrics = data
        return record


# RoundRecord's plain number fields, written by to_dict under their kebab-case names.
_COUNTERS = {
    name
    for name, kind in RoundRecord.__annotations__.items()
    if kind in ("int", "float") and name != "round"
}


def default_run_name(strategy: str, dataset: str, alpha: float) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{strategy}-{dataset}-a{alpha:g}-{stamp}"


def safe_run_name(name: str) -> str:
    """A run name usable as one directory name (no separators, no dot-dot)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return cleaned or "run"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def machine_summary() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu-count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class RunRecorder:
    """Collects per-round records and writes the run folder."""

    def __init__(
        self,
        run_dir: Path,
        config: Mapping[str, Any],
        spec: ArchSpec | None,
        num_rounds: int,
    ) -> None:
        """``spec``: the model's architecture, written next to it (None: a model fl-ec
        cannot rebuild, e.g. an app's own ``Net``; only its tensors are written)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = dict(config)
        self.spec = spec
        self.num_rounds = num_rounds
        self.rounds: list[RoundRecord] = []
        self.started = dt.datetime.now().isoformat(timespec="seconds")
        self._round_start = time.perf_counter()
        self.current = RoundRecord(round=0)
        self.extra_summary: dict[str, Any] = {}

    def restore(self, rounds: list[dict[str, Any]], started: str) -> None:
        """Continue a resumed run: the rounds it completed, as ``metrics.json`` has them."""
        self.rounds = [RoundRecord.from_dict(r) for r in rounds]
        self.started = started
        next_round = self.rounds[-1].round + 1 if self.rounds else 0
        self.current = RoundRecord(round=next_round)
        self._round_start = time.perf_counter()

    def state(self) -> dict[str, Any]:
        """What :meth:`restore` takes back: the completed rounds and the start time."""
        return {"rounds": [r.to_dict() for r in self.rounds], "started": self.started}

    # -- feeding --------------------------------------------------------------
    def record_for(self, server_round: int) -> RoundRecord:
        """The open record for ``server_round`` (opening it when a new round starts)."""
        if server_round != self.current.round:
            self.current = RoundRecord(round=server_round)
        return self.current

    def close_round(self, server_round: int, metrics: Mapping[str, Any]) -> RoundRecord:
        """Finish a round: stamp its wall time, store metrics, rewrite metrics.json."""
        record = self.record_for(server_round)
        now = time.perf_counter()
        record.wall_seconds = now - self._round_start
        self._round_start = now
        # Numbers, plus small per-node / per-variant tables (dicts) from strategies.
        record.metrics.update(
            {k: dict(v) if isinstance(v, Mapping) else float(v) for k, v in metrics.items()}
        )
        self.rounds.append(record)
        self.current = RoundRecord(round=server_round + 1)
        self.write_metrics()
        return record

    # -- writing --------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        trained = [r for r in self.rounds if r.round > 0]
        mean = (
            (lambda key: sum(getattr(r, key) for r in trained) / len(trained))
            if trained
            else (lambda key: 0.0)
        )
        return {
            "rounds-completed": len(trained),
            "final-test-accuracy": self.rounds[-1].metrics.get("test-accuracy")
            if self.rounds
            else None,
            "mean-round-seconds": mean("wall_seconds"),
            "mean-train-seconds": mean("train_seconds"),
            "mean-aggregate-seconds": mean("aggregate_seconds"),
            "mean-bytes-down": mean("bytes_down"),
            "mean-bytes-up": mean("bytes_up"),
            "total-rejected-replies": sum(r.rejected_replies for r in trained),
            **self.extra_summary,
        }

    def write_metrics(self) -> Path:
        payload = {
            "started": self.started,
            "machine": machine_summary(),
            "config": self.config,
            "arch-spec": json.loads(self.spec.to_json()) if self.spec is not None else None,
            "num-rounds": self.num_rounds,
            "rounds": [r.to_dict() for r in self.rounds],
            "summary": self.summary(),
        }
        path = self.run_dir / "metrics.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(path)  # atomic: readers never see a half-written file
        return path

    def write_plot(self, key: str = "test-accuracy") -> Path:
        """The central accuracy ``key`` per round, with FedEC's validation curves."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r.round for r in self.rounds if key in r.metrics]
        accuracy = [100 * r.metrics[key] for r in self.rounds if key in r.metrics]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rounds, accuracy, marker="o", label="global model (test)")
        for key, label in (
            ("teacher-val-accuracy", "teacher ensemble (val)"),
            ("student-start-val-accuracy", "parameter average (val)"),
            ("student-val-accuracy", "distilled student (val)"),
        ):
            points = [(r.round, 100 * r.metrics[key]) for r in self.rounds if key in r.metrics]
            if points:
                ax.plot(*zip(*points, strict=True), linestyle="--", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{key} (%)")
        ax.set_title(self.run_dir.name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.run_dir / "accuracy.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def write_bytes_plot(self, key: str = "test-accuracy") -> Path:
        """The central accuracy ``key`` against the bytes sent so far (down + up), in MB."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sent, points = 0.0, []
        for record in self.rounds:
            sent += (record.bytes_down + record.bytes_up) / 1e6
            if key in record.metrics:
                points.append((sent, 100 * record.metrics[key]))
        fig, ax = plt.subplots(figsize=(6, 4))
        if points:
            ax.plot(*zip(*points, strict=True), marker="o")
        ax.set_xlabel("model bytes sent down + up so far (MB)")
        ax.set_ylabel(f"{key} (%)")
        ax.set_title(self.run_dir.name, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.run_dir / "accuracy_vs_bytes.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def write_model(
        self,
        state_dict: Mapping[str, torch.Tensor],
        name: str = "final_model",
        spec: ArchSpec | None = None,
    ) -> Path:
        """``<name>.pt`` (tensors only: loads with ``torch.load(weights_only=True)``) and,
        when the architecture is known, its spec as ``<name>.json``."""
        path = self.run_dir / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, path)
        if (spec or self.spec) is not None:
            (self.run_dir / f"{name}.json").write_text((spec or self.spec).to_json())
        return path


def load_saved_model(run_dir: Path, name: str = "final_model") -> torch.nn.Module:
    """Rebuild a model written by :meth:`RunRecorder.write_model` (no unpickling)."""
    from fl_ec.models.spec import build_from_state_dict

    spec = ArchSpec.from_json((Path(run_dir) / f"{name}.json").read_text())
    state = torch.load(Path(run_dir) / f"{name}.pt", weights_only=True, map_location="cpu")
    return build_from_state_dict(spec, state)
