"""Helpers for tests that drive the real Flower engine."""

from __future__ import annotations

from pathlib import Path

from fl_ec.launch import FlowerCli, merge_overrides

# Small but real: Fashion-MNIST, 2 clients, 1 round on a fixed 2k-sample client pool.
SMALL_RUN = (
    "num-server-rounds=1 train-subset=2000 proxy-size=500 validation-size=500 client-threads=1"
)


def run_config(results_dir: Path, run_name: str, extra: str = "") -> str:
    return merge_overrides(SMALL_RUN, f'results-dir="{results_dir}" run-name="{run_name}"', extra)


def model_bytes(metrics: dict) -> int:
    """Serialised bytes of one copy of the global model, from the saved final model."""
    import numpy as np
    import torch
    from flwr.app import Array

    run_dir = Path(metrics["_run_dir"])
    state = torch.load(run_dir / "final_model.pt", weights_only=True)
    return sum(len(Array(np.asarray(t.numpy())).data) for t in state.values())


__all__ = ["FlowerCli", "model_bytes", "run_config"]
