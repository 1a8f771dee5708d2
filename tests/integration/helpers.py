"""Helpers for tests that drive the real Flower engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fl_ec.launch import FlowerCli, merge_overrides
from tests.conftest import ROOT

# Small but real: Fashion-MNIST, 2 clients, 1 round on a fixed 2k-sample client pool;
# FedAvg on every client for one local epoch unless a test says otherwise, whatever the
# app's defaults are.
SMALL_RUN = (
    'strategy="fedavg" fraction-train=1.0 local-epochs=1 alpha=0.5 simulated-tiers="" '
    "num-server-rounds=1 train-subset=2000 proxy-size=500 validation-size=500 client-threads=1"
)


def run_config(results_dir: Path, run_name: str, extra: str = "") -> str:
    return merge_overrides(SMALL_RUN, f'results-dir="{results_dir}" run-name="{run_name}"', extra)


def completed_run(
    cli: FlowerCli,
    results_dir: Path,
    run_name: str,
    extra: str = "",
    num_supernodes: int = 2,
    federation_config: str = "",
) -> dict:
    """Run the fl-ec app under `flwr run`; its metrics.json once it finished:completed.

    ``metrics["_run_dir"]`` is the run folder (for :func:`model_bytes` and saved models).
    """
    config = run_config(results_dir, run_name, extra)
    run_id = cli.submit(ROOT, config, num_supernodes, federation_config)
    outcome = cli.wait(run_id, timeout=600)
    assert outcome.completed, f"{outcome.status}: {outcome.details}\n{cli.logs(run_id)[-3000:]}"
    run_dir = results_dir / run_name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["_run_dir"] = str(run_dir)
    return metrics


def quickstart_app(tmp_path: Path, serverapp: str, clientapp: str = "client_app") -> Path:
    """A copy of tests/quickstart_app whose components are the named modules."""
    app = tmp_path / "quickstart_app"
    shutil.copytree(ROOT / "tests" / "quickstart_app", app)
    pyproject = app / "pyproject.toml"
    text = pyproject.read_text()
    text = text.replace("quickstart_app.server_app:app", f"quickstart_app.{serverapp}:app")
    text = text.replace("quickstart_app.client_app:app", f"quickstart_app.{clientapp}:app")
    pyproject.write_text(text)
    return app


def model_bytes(metrics: dict) -> int:
    """Serialised bytes of one copy of the global model, from the saved final model."""
    import numpy as np
    import torch
    from flwr.app import Array

    run_dir = Path(metrics["_run_dir"])
    state = torch.load(run_dir / "final_model.pt", weights_only=True)
    return sum(len(Array(np.asarray(t.numpy())).data) for t in state.values())


__all__ = ["FlowerCli", "completed_run", "model_bytes", "quickstart_app", "run_config"]
