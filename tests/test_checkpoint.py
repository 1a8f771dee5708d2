"""Checkpoints: atomic files read back without unpickling, fallback past broken ones."""

from __future__ import annotations

import hashlib
import json
import logging
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from fl_ec.checkpoint import (
    Checkpoint,
    CheckpointError,
    StrategyState,
    load_latest,
    read_checkpoint,
    restore_rng,
    write_checkpoint,
)
from fl_ec.config import ExperimentConfig, check_resumable
from fl_ec.errors import ConfigError
from fl_ec.models.spec import ArchSpec
from fl_ec.results import RoundRecord, RunRecorder
from fl_ec.run.recorded import RecordedRun, RunFolder


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("unpickled!",))


def _checkpoint(server_round: int) -> Checkpoint:
    model = {"w": torch.full((3, 2), float(server_round)), "b": torch.arange(3)}
    strategy = StrategyState({"client-start/w": torch.ones(2)}, {"tiers": {"7": "edge"}})
    return Checkpoint(server_round, model, strategy, {"rounds": [{"round": server_round}]})


def test_a_checkpoint_reads_back_exactly_with_the_random_states(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    path = write_checkpoint(tmp_path, _checkpoint(4))
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # draw something else

    back = read_checkpoint(path)
    assert path.name == "round-000004" and back.round == 4
    assert torch.equal(back.model["w"], torch.full((3, 2), 4.0))
    assert back.model["b"].dtype == torch.int64
    assert torch.equal(back.strategy.tensors["client-start/w"], torch.ones(2))
    assert back.strategy.meta == {"tiers": {"7": "edge"}}
    assert back.run == {"rounds": [{"round": 4}]}
    restore_rng(back.rng, back.rng["torch"])
    assert torch.equal(torch.rand(2), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_only_the_two_newest_are_kept_and_no_temporary_folder_is_left(tmp_path):
    for server_round in range(1, 5):
        write_checkpoint(tmp_path, _checkpoint(server_round))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["round-000003", "round-000004"]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: _truncate(p / "model.pt"), "model.pt does not match its checksum"),
        (lambda p: (p / "state.json").write_text('{"format": 1, "rou'), "state.json is unreadable"),
        (lambda p: (p / "state.pt").unlink(), "state.pt is unreadable"),
        (
            lambda p: (p / "state.json").write_text('{"format": 1, "round": 2, "sha256": []}'),
            "not an fl-ec checkpoint",
        ),
    ],
)
def test_a_broken_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, damage, reason):
    write_checkpoint(tmp_path, _checkpoint(1))
    newest = write_checkpoint(tmp_path, _checkpoint(2))
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        checkpoint = load_latest(tmp_path)
    assert checkpoint.round == 1
    assert reason in caplog.text and "round-000002" in caplog.text


def test_a_tensor_file_that_is_not_only_tensors_is_refused_not_unpickled(tmp_path):
    path = write_checkpoint(tmp_path, _checkpoint(1))
    # Someone rewrites model.pt with a pickled object and fixes the checksum too.
    torch.save({"w": torch.ones(1), "x": RunsCodeWhenUnpickled()}, path / "model.pt")
    document = json.loads((path / "state.json").read_text())
    document["sha256"]["model.pt"] = hashlib.sha256((path / "model.pt").read_bytes()).hexdigest()
    (path / "state.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="model.pt is not a tensor file"):
        read_checkpoint(path)


def test_resume_without_a_usable_checkpoint_fails_in_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="resume= must name the run folder"):
        load_latest(tmp_path)
    only = write_checkpoint(tmp_path, _checkpoint(1))
    _truncate(only / "state.pt")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*state.pt does not match"):
        load_latest(tmp_path)


def test_a_half_written_checkpoint_is_never_read(tmp_path):
    write_checkpoint(tmp_path, _checkpoint(1))
    # A crash between creating the temporary folder and renaming it leaves this behind.
    (tmp_path / "checkpoints" / ".tmp-round-000002-1234").mkdir()
    assert load_latest(tmp_path).round == 1


def test_a_resumed_run_may_only_change_its_length_timeout_and_name():
    def config(**knobs: object) -> dict:
        return ExperimentConfig.from_run_config(knobs).to_dict()

    saved = config(**{"alpha": 0.1, "num-server-rounds": 10})
    check_resumable(saved, config(**{"alpha": 0.1, "num-server-rounds": 20, "resume": "r"}))
    with pytest.raises(ConfigError, match=r"alpha \(0.1 -> 0.5\).*set them back"):
        check_resumable(saved, config(alpha=0.5, resume="r"))
    # A run checkpointed before a knob existed resumes with that knob at its default.
    older = {k: v for k, v in saved.items() if k != "min-train-replies"}
    check_resumable(older, config(alpha=0.1, resume="r"))


def test_a_round_record_reads_back_from_metrics_json():
    record = RoundRecord(3, bytes_down=10, train_seconds=1.25, train_replies=2, lost_nodes={9})
    record.bytes_down_by_node = {4: 6, 5: 4}
    record.metrics = {"test-accuracy": 0.75, "variant-by-node": {"4": "int8"}}
    back = RoundRecord.from_dict(record.to_dict())
    assert back == record


def test_a_checkpoint_whose_state_does_not_fit_the_run_fails_in_one_line(tmp_path):
    recorder = RunRecorder(tmp_path, {}, ArchSpec("cnn", (1, 28, 28), 10), 3)
    broken = Checkpoint(2, {"w": torch.ones(1)}, StrategyState(), {"rounds": [{"no": "round"}]})
    run = RecordedRun(FedAvg(), RunFolder(recorder, {}, broken))
    with pytest.raises(CheckpointError, match="round 2 holds a state this run cannot take back"):
        run.start(None, ArrayRecord({}), 3)
