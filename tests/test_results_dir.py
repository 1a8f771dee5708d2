"""Where a run's folder goes: fl-ec-run passes it absolute, the ServerApp says where."""

from __future__ import annotations

import logging
from pathlib import Path

from fl_ec.launch import absolute_results_dir, leave_local_superlink, parse_overrides
from fl_ec.run.recorded import announce_results_dir
from tests.conftest import ROOT


def test_fl_ec_run_makes_results_dir_absolute_under_the_app(tmp_path):
    config, results = absolute_results_dir(ROOT, "alpha=0.5")
    assert results == ROOT / "results"  # the app's default, under the app's folder
    assert parse_overrides(config) == {"alpha": 0.5, "results-dir": str(ROOT / "results")}
    _, results = absolute_results_dir(ROOT, 'results-dir="runs/a"')
    assert results == ROOT / "runs" / "a"
    _, results = absolute_results_dir(ROOT, f'results-dir="{tmp_path}"')
    assert results == tmp_path  # an absolute folder is kept


def test_the_server_logs_the_absolute_folder_and_warns_on_a_relative_one(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)  # the ServerApp's working directory: the SuperLink's
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="flwr"):
            assert announce_results_dir("results") == tmp_path / "results"
            assert f"results -> {tmp_path / 'results'}" in caplog.text
            assert "is relative to the ServerApp's working directory" in caplog.text
            caplog.clear()
            assert announce_results_dir(str(tmp_path / "abs")) == tmp_path / "abs"
            assert "relative" not in caplog.text
    finally:
        flwr_logger.removeHandler(caplog.handler)
    assert not Path("results").exists()  # announcing creates nothing


class _LocalSuperLink:
    """The two calls fl-ec-run makes on its CLI at the end of a run, recorded."""

    def __init__(self, pids):
        self.pids, self.stopped = list(pids), []

    def local_superlink_pids(self):
        return list(self.pids)

    def stop_local_superlink(self):
        self.stopped, self.pids = self.pids, []
        return self.stopped


def test_fl_ec_run_stops_only_a_local_superlink_it_started(capsys):
    started_here = _LocalSuperLink([41])
    leave_local_superlink(started_here, already_running=[], keep=False)
    assert started_here.stopped == [41]
    assert "stopped the local SuperLink this run started (pid 41)" in capsys.readouterr().out

    kept = _LocalSuperLink([42])
    leave_local_superlink(kept, already_running=[], keep=True)
    assert kept.stopped == [] and "--keep-superlink" in capsys.readouterr().out

    older = _LocalSuperLink([43])
    leave_local_superlink(older, already_running=[43], keep=False)
    assert older.stopped == [] and "left running" in capsys.readouterr().out
