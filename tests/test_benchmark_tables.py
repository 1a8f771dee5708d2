"""The benchmark driver's tables: pure logic over hand-built metrics (no runs)."""

from __future__ import annotations

from benchkit.runs import _as_config, _same_config, recorded_calibration
from benchkit.tables import seed_summary, table


def _metrics(accuracies: list[float], aggregate_seconds: float = 0.0) -> dict:
    rounds = [{"round": 0, "test-accuracy": 0.1}] + [
        {"round": i + 1, "test-accuracy": a, "client-train-seconds-sum": 10.0}
        for i, a in enumerate(accuracies)
    ]
    return {
        "rounds": rounds,
        "summary": {
            "final-test-accuracy": accuracies[-1],
            "mean-aggregate-seconds": aggregate_seconds,
            "mean-round-seconds": 1.0,
            "mean-train-seconds": 1.0,
            "mean-bytes-down": 1e6,
            "mean-bytes-up": 1e6,
        },
    }


def _row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_deltas_are_paired_with_fedavg_of_the_same_seed():
    results = {
        ("fedavg", 0.1, 1): _metrics([0.70, 0.80]),
        ("fedavg", 0.1, 2): _metrics([0.85, 0.90]),
        ("fedec", 0.1, 1): _metrics([0.81, 0.83], aggregate_seconds=5.0),
        ("fedec", 0.1, 2): _metrics([0.86, 0.88], aggregate_seconds=5.0),
    }
    cells = _row(seed_summary(results), "fedec")
    # seeds, mean ± sd of finals, mean ± sd of paired deltas, deltas, rounds, server ratio
    assert cells[2] == "1, 2"
    assert cells[3] == "85.50 ± 3.54"
    assert cells[4] == "+0.50 ± 3.54"
    assert cells[5] == "+3.00, -2.00"
    assert cells[6] == "1, -"  # seed 1 passes FedAvg's 80% in round 1; seed 2 never reaches 90%
    assert cells[7] == "0.50"
    seed_two = _row(table(results, 2), "fedec (seed 2)")
    assert seed_two[3] == "-2.00"  # method, alpha, acc@2, then the delta


def test_single_seed_results_keep_the_plain_labels():
    results = {("fedavg", 0.5): _metrics([0.9]), ("fedec", 0.5): _metrics([0.95])}
    assert _row(table(results, 1), "fedec")[3] == "+5.00"


def test_a_method_without_fedavg_of_its_seed_has_no_delta():
    results = {("fedec", 0.1, 3): _metrics([0.8])}
    assert _row(seed_summary(results), "fedec")[4] == "-"


def test_hce_targets_summarise_per_method_over_seeds():
    from hce_benchmark import HceTargets
    from hce_benchmark import seed_summary as hce_seed_summary

    targets = [
        HceTargets("fedhce", 2, -1.0, 0.221, -0.2, 0.158, 0.07),
        HceTargets("fedhce", 1, +1.0, 0.221, -0.6, 0.158, 0.09),
        HceTargets("fedhce:diversity-weight=0.0", 1, 0.5, 0.221, 0.0, 0.158, 0.05),
    ]
    text = hce_seed_summary(targets)
    cells = _row(text, "fedhce")
    assert cells[1] == "1, 2"  # sorted by seed, and the per-seed values follow that order
    assert cells[2] == "+0.00 ± 1.41 (+1.00, -1.00)"
    assert cells[4] == "-0.40 ± 0.28 (-0.60, -0.20)"
    assert cells[6] == "0.080 ± 0.01"
    # one seed: no spread to report
    assert _row(text, "fedhce:diversity-weight=0.0")[2] == "+0.50 (+0.50)"


def test_posthoc_prior_correction_repairs_a_biased_saved_model(tmp_path):
    import torch
    from benchkit.posthoc import posthoc_prior_correction

    from fl_ec.config import ExperimentConfig
    from fl_ec.data.federated import load_server_data
    from fl_ec.models import ArchSpec, build_model
    from fl_ec.results import RunRecorder
    from fl_ec.training import train_supervised

    config = ExperimentConfig.from_run_config(
        {"dataset": "synthetic", "proxy-size": 400, "validation-size": 200}
    )
    server = load_server_data(config.data, config.seed)
    spec = ArchSpec("cnn", (1, 28, 28), 10)
    torch.manual_seed(0)
    model = build_model(spec)
    train_supervised(model, server.proxy, epochs=2, batch_size=32, lr=0.05)
    with torch.no_grad():
        model.classifier.bias[3] += 20.0  # the model now answers "3" for almost everything
    recorder = RunRecorder(tmp_path / "run", config.to_dict(), spec, 1)
    assert posthoc_prior_correction(recorder.run_dir, {"config": config.to_dict()}) is None
    recorder.write_model(model.state_dict())
    before, after = posthoc_prior_correction(recorder.run_dir, {"config": config.to_dict()})
    assert before < 0.3
    assert after > before + 0.5


def test_reuse_ignores_where_a_run_was_stored_but_not_its_settings():
    recorded = {"seed": 1, "alpha": 0.1, "results-dir": "/tmp/old", "run-name": "bench-x-s1"}
    moved = {**recorded, "results-dir": "/tmp/new", "run-name": "bench-x-s1-copy"}
    assert _same_config(recorded, moved)
    assert not _same_config(recorded, {**moved, "seed": 2})
    # A knob added after the run was recorded counts at its default value.
    assert _same_config(recorded, {**moved, "calibration": "none"})
    assert not _same_config(recorded, {**moved, "calibration": "prior"})


def test_a_run_recorded_with_a_retired_knob_matches_only_the_behaviour_kept():
    # Before the revert threshold existed, the correction reverted on any drop.
    assert not _same_config({"seed": 1, "prior-correction": True}, {"seed": 1})
    assert _same_config(
        {"seed": 1, "prior-correction": True, "prior-correction-revert-z": 1.96}, {"seed": 1}
    )
    # Without the correction the threshold never acted.
    assert _same_config({"seed": 1}, {"seed": 1})
    assert _same_config({"seed": 1, "tail-average-rounds": 1}, {"seed": 1})
    assert not _same_config({"seed": 1, "tail-average-rounds": 3}, {"seed": 1})
    # The layer-parallel knobs count only where a layer-parallel trainer ran.
    assert _same_config({"seed": 1, "lp-aux-resolution": "pooled"}, {"seed": 1})
    assert not _same_config({"seed": 1, "distill-patience": 150}, {"seed": 1})
    assert _same_config({"seed": 1, "distill-patience": 100, "weight-decay": 0.0}, {"seed": 1})
    # Quantization-aware client training acted only on FedHCE's variants.
    fedhce, fedavg = {"seed": 1, "strategy": "fedhce"}, {"seed": 1, "strategy": "fedavg"}
    assert not _same_config({**fedhce, "quantized-training": True}, fedhce)
    assert _same_config({**fedhce, "quantized-training": False}, fedhce)
    assert _same_config({**fedavg, "quantized-training": True}, fedavg)


def test_a_run_recorded_with_the_calibration_knobs_matches_its_preset():
    dense = {"feature-calibration": True, "calibration-layers": "dense"}
    old_runs = {
        "none": {"prior-correction": False, "feature-calibration": False},
        "prior": {"prior-correction": True, "prior-correction-revert-z": 1.96},
        "classifier": {"feature-calibration": True, "calibration-rank": 32},
        "dense": {**dense, "calibration-rank": 64, "calibration-components": 1},
        "dense-mixture": {**dense, "calibration-rank": 32, "calibration-components": 8},
    }
    for preset, recorded in old_runs.items():
        # Runs of that day distilled in batches of 128 (no run-config key then).
        expected = _as_config(
            {"strategy": "fedec", "calibration": preset, "distill-batch-size": 128}
        )
        assert recorded_calibration(recorded) == preset
        for other in old_runs:
            matches = _same_config(
                {**recorded, "strategy": "fedec"}, {**expected, "calibration": other}
            )
            assert matches == (other == preset), (preset, other)
    # A combination that no preset reproduces matches nothing.
    rank16 = {**dense, "calibration-rank": 16, "calibration-components": 8}
    assert recorded_calibration(rank16) is None
    assert not _same_config(rank16, {"seed": 42})
    assert recorded_calibration({"calibration": "dense"}) == "dense"
    # The virtual features' count mattered only to a feature calibration.
    assert _same_config({"calibration-samples": 5000}, {"seed": 42})
    assert not _same_config({**old_runs["dense"], "calibration-samples": 5000}, {"seed": 42})


def test_reuse_ignores_layer_parallel_knobs_unless_a_layer_parallel_trainer_ran():
    recorded = {"seed": 1, "lp-method": "al"}
    assert _same_config(recorded, {"seed": 1, "lp-method": "penalty"})
    recorded_lp = {"seed": 1, "lp-method": "al", "trainer": "layer-parallel"}
    assert not _same_config(recorded_lp, {"seed": 1, "lp-method": "penalty"})
    assert not _same_config(
        recorded, {"seed": 1, "lp-method": "penalty", "trainer": "layer-parallel"}
    )


def test_the_benchmark_knows_the_kept_value_of_every_retired_knob():
    # Every retired key has the value whose behaviour the code kept, which the reuse
    # check compares; the calibration knobs map onto presets instead, and trim-ratio
    # acted only through teacher rules that teacher-rule records.
    from benchkit.runs import _RETIRED_KNOBS

    from fl_ec.retired_keys import RETIRED_KEYS, kept_values

    by_preset = {"prior-correction", "feature-calibration", "calibration-layers"}
    by_preset |= {"calibration-rank", "calibration-components", "trim-ratio"}
    assert set(kept_values()) == set(RETIRED_KEYS) - by_preset
    assert kept_values() == _RETIRED_KNOBS  # the reuse check reads the one registry


def test_compare_runs_leaves_out_time_and_node_ids():
    from compare_runs import flatten

    a, b = {}, {}
    flatten("round1", {"acc": 0.5, "aggregate-seconds": 1.0, "bytes-by-node": {"7": 3}}, a)
    flatten("round1", {"acc": 0.5, "aggregate-seconds": 9.0, "bytes-by-node": {"8": 3}}, b)
    assert a == b == {"round1.acc": 0.5, "round1.bytes-by-node": ["3"]}
    flatten("round1", {"variant": {"int8": {"gain": 0.1, "calibration-seconds": 2.0}}}, b)
    assert b["round1.variant.int8.gain"] == 0.1
    assert "round1.variant.int8.calibration-seconds" not in b


def test_a_run_recorded_without_a_distillation_batch_ran_batches_of_128():
    before = {"strategy": "fedec", "distill-steps": 100}
    assert _same_config(before, _as_config({**before, "distill-batch-size": 128}))
    assert not _same_config(before, _as_config(before))  # today's default is 64
    assert _same_config({"strategy": "fedavg"}, _as_config({"strategy": "fedavg"}))
