"""fl-ec-compare against a local SuperLink another folder started: the runs' folder is
the project's own, and the SuperLink it did not start is left running (stopping one it
started, and fl-ec-run's folder: tests/test_results_dir.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl_ec.launch import merge_overrides
from fl_ec.results import load_saved_model
from tests.conftest import ROOT, requires_fashion_mnist
from tests.integration.helpers import SMALL_RUN, run_config

pytestmark = [pytest.mark.integration, requires_fashion_mnist]


def _other_project(tmp_path: Path) -> Path:
    """A second checkout of the app: its code and pyproject, in another folder."""
    app = tmp_path / "other-project"
    shutil.copytree(ROOT / "fl_ec", app / "fl_ec", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")
    return app


def test_fl_ec_compare_from_another_folder_runs_fedavg_and_fedec_into_one_plot(cli, tmp_path):
    """fl-ec-compare from another folder: FedAvg, then FedEC, 2 of 5 nodes per round.

    The local SuperLink was started by a run of this checkout, in the test's directory:
    the comparison's runs still land in the other project's ``results/``, and the
    SuperLink it did not start is left running.

    Node ids are random per run and Flower samples from the global random state; with
    seeded sampling both runs train the same partitions, both aggregate the replies in
    node order with the same arithmetic, so FedEC without distillation serves FedAvg's
    models bit for bit: the difference fl-ec-compare draws is the strategy's alone.
    """
    first = cli.submit(ROOT, run_config(tmp_path / "first", "first"), 2)
    assert cli.wait(first, timeout=600).completed
    superlink = cli.local_superlink_pids()
    assert superlink
    before = sorted((Path.cwd() / "results").glob("compare-*"))

    app = _other_project(tmp_path)
    chosen = 'strategy="fedec" distill-steps=0 num-server-rounds=2 fraction-train=0.4 alpha=0.1'
    config = merge_overrides(SMALL_RUN, f"{chosen} local-epochs=2")
    proc = subprocess.run(
        [sys.executable, "-m", "fl_ec.compare", str(app), "--supernodes", "5", "-c", config],
        env=cli.env,
        cwd=app,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == f"fl-ec: results -> {app / 'results'}"
    assert sorted((Path.cwd() / "results").glob("compare-*")) == before  # not the SuperLink's
    assert "was running before this run and is left running" in proc.stdout
    assert cli.local_superlink_pids() == superlink
    plot, *sides = sorted((app / "results").glob("compare-*"))  # the plot's folder first
    runs = {f.name.rsplit("-", 1)[1]: json.loads((f / "metrics.json").read_text()) for f in sides}
    assert sorted(runs) == ["fedavg", "fedec"]
    assert runs["fedavg"]["config"]["strategy"] == "fedavg"
    assert runs["fedec"]["config"]["strategy"] == "fedec"
    samples = {k: [r["sampled-partitions"] for r in m["rounds"][1:]] for k, m in runs.items()}
    assert samples["fedavg"] == samples["fedec"]
    assert all(len(s) == 2 and set(s) <= set(range(5)) for s in samples["fedavg"])
    assert all(len(r["sampled-class-counts"]) == 10 for r in runs["fedec"]["rounds"][1:])
    accuracies = {k: [r["test-accuracy"] for r in m["rounds"]] for k, m in runs.items()}
    assert accuracies["fedavg"] == accuracies["fedec"]
    finals = {k: load_saved_model(side) for k, side in zip(sorted(runs), sides, strict=True)}
    fedec_state = finals["fedec"].state_dict()
    for key, tensor in finals["fedavg"].state_dict().items():
        assert torch.equal(tensor, fedec_state[key]), key

    drawn = {p.name for p in plot.iterdir()}
    assert {"accuracy.png", "accuracy_vs_bytes.png", "summary.md"} <= drawn
    table = (plot / "summary.md").read_text()
    assert "| fedavg |" in table and "| fedec |" in table
    assert f"fl-ec: plot -> {plot / 'accuracy.png'}" in proc.stdout
