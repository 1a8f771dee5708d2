"""fl-ec-run against a local SuperLink another folder started: the run's folder is the
project's own, and the SuperLink it did not start is left running (stopping one it
started: tests/test_results_dir.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fl_ec.launch import FlowerCli, merge_overrides
from tests.conftest import ROOT, requires_fashion_mnist
from tests.integration.helpers import SMALL_RUN, run_config

pytestmark = [pytest.mark.integration, requires_fashion_mnist]


def _other_project(tmp_path: Path) -> Path:
    """A second checkout of the app: its code and pyproject, in another folder."""
    app = tmp_path / "other-project"
    shutil.copytree(ROOT / "fl_ec", app / "fl_ec", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")
    return app


def _fl_ec_run(cli: FlowerCli, app: Path, run_name: str) -> subprocess.CompletedProcess:
    config = merge_overrides(SMALL_RUN, f'run-name="{run_name}"')  # results-dir: the default
    return subprocess.run(
        [sys.executable, "-m", "fl_ec.launch", str(app), "--supernodes", "2", "-c", config],
        env=cli.env,
        cwd=app,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_run_from_another_folder_writes_into_its_own_results(cli, tmp_path):
    # The local SuperLink is started by a run of this checkout, in the test's directory.
    first = cli.submit(ROOT, run_config(tmp_path / "first", "first"), 2)
    assert cli.wait(first, timeout=600).completed
    superlink = cli.local_superlink_pids()
    assert superlink

    app = _other_project(tmp_path)
    proc = _fl_ec_run(cli, app, "second")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == f"fl-ec: results -> {app / 'results'}"
    assert (app / "results" / "second" / "metrics.json").is_file()
    assert not (Path.cwd() / "results" / "second").exists()  # not the SuperLink's folder
    assert "was running before this run and is left running" in proc.stdout
    assert cli.local_superlink_pids() == superlink


def test_fl_ec_compare_draws_fedavg_and_fedec_of_the_same_clients_on_one_plot(cli, tmp_path):
    app = _other_project(tmp_path)
    config = merge_overrides(SMALL_RUN, 'strategy="fedec" num-server-rounds=2 fraction-train=0.5')
    proc = subprocess.run(
        [sys.executable, "-m", "fl_ec.compare", str(app), "--supernodes", "4", "-c", config],
        env=cli.env,
        cwd=app,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plot, *sides = sorted((app / "results").glob("compare-*"))  # the plot's folder first
    runs = {f.name.rsplit("-", 1)[1]: json.loads((f / "metrics.json").read_text()) for f in sides}
    assert sorted(runs) == ["fedavg", "fedec"]
    assert runs["fedavg"]["config"]["strategy"] == "fedavg"
    assert runs["fedec"]["config"]["strategy"] == "fedec"
    # The same clients in every round, so the difference is the aggregation's.
    sampled = {k: [r["sampled-partitions"] for r in m["rounds"][1:]] for k, m in runs.items()}
    assert sampled["fedavg"] == sampled["fedec"] and len(sampled["fedec"][0]) == 2
    drawn = {p.name for p in plot.iterdir()}
    assert {"accuracy.png", "accuracy_vs_bytes.png", "summary.md"} <= drawn
    table = (plot / "summary.md").read_text()
    assert "| fedavg |" in table and "| fedec |" in table
    assert f"fl-ec: plot -> {plot / 'accuracy.png'}" in proc.stdout
