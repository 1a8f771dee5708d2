import json

import torch

from fl_ec.models import ArchSpec, build_model
from fl_ec.results import RunRecorder, load_saved_model, safe_run_name


def test_final_model_saves_as_tensors_and_reloads_without_pickle(tmp_path):
    spec = ArchSpec("resnet8", (1, 28, 28), 10)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    recorder = RunRecorder(tmp_path, {}, spec, num_rounds=1)
    path = recorder.write_model(model.state_dict())
    state = torch.load(path, weights_only=True)  # would raise on pickled modules
    assert set(state) == set(model.state_dict())
    reloaded = load_saved_model(tmp_path).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), reloaded(x))
    assert json.loads((tmp_path / "final_model.json").read_text())["name"] == "resnet8"


def test_plot_and_summary(tmp_path):
    recorder = RunRecorder(tmp_path, {}, ArchSpec("cnn", (1, 28, 28), 10), num_rounds=2)
    for rnd, acc in ((0, 0.1), (1, 0.6), (2, 0.7)):
        recorder.record_for(rnd).bytes_down = 1000 * rnd
        recorder.close_round(rnd, {"test-accuracy": acc})
    assert (recorder.write_plot()).stat().st_size > 1000
    assert recorder.write_bytes_plot().name == "accuracy_vs_bytes.png"
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 1000
    summary = recorder.summary()
    assert summary["rounds-completed"] == 2 and summary["final-test-accuracy"] == 0.7
    assert summary["mean-bytes-down"] == 1500


def test_run_names_cannot_escape_the_results_dir():
    assert safe_run_name("../../etc") == "etc"
    assert "/" not in safe_run_name("a/b c")
