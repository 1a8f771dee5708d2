import re
import tomllib

import pytest

from fl_ec.clients.settings import TrainingSection, parse_tier_counts
from fl_ec.config import REGENERATE_COMMAND, ExperimentConfig, NodeSettings, with_app_config
from fl_ec.data.settings import DataSection
from fl_ec.errors import ConfigError, SettingError
from fl_ec.launch import app_defaults
from fl_ec.strategies.sections import FedECSection, FederationSection
from tests.conftest import ROOT


def test_pyproject_defaults_parse_and_cover_every_field():
    defaults = app_defaults(ROOT)
    config = ExperimentConfig.from_run_config(defaults)
    assert config.extra == {}, "every [tool.flwr.app.config] key must be a typed field"
    fields = {k for k in config.to_dict()}
    assert fields == set(defaults), "every typed field must have a pyproject default"


def test_values_are_coerced_to_declared_types():
    config = ExperimentConfig.from_run_config(
        {"alpha": 1, "num-server-rounds": 3.0, "download": "true", "seed": "7"}
    )
    assert config.data.alpha == 1.0 and isinstance(config.data.alpha, float)
    assert config.federation.num_server_rounds == 3 and config.data.download is True
    assert config.seed == 7


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"alpha": 0.0}, "alpha=0.0 must be > 0"),
        ({"fraction-train": 0}, "fraction-train=0.0 trains no client: set it within (0, 1]"),
        ({"device": "tpu"}, "device='tpu' is unknown: choose one of auto, cpu, cuda"),
        ({"momentum": 1}, "momentum=1.0 must be within [0, 1)"),
        ({"teacher-rule": "vote"}, "teacher-rule='vote' is unknown: choose one of"),
        ({"teacher-trim": 1.5}, "teacher-trim=1.5 is neither a number of clients"),
        ({"proxy-per-round": -1}, "proxy-per-round=-1 must be >= 0"),
        ({"robust-start": "mode"}, "robust-start='mode' is invalid: robust start rule 'mode'"),
        ({"distill-trainer": "sgd"}, "distill-trainer='sgd' is unknown: choose one of adam"),
        ({"trainer": "adam"}, "trainer='adam' is unknown: choose one of sgd, layer-parallel"),
        ({"simulated-tiers": "gpu"}, "simulated-tiers entry 'gpu' must look like tier=count"),
        ({"attack": "sign-flip"}, "attack='sign-flip' must look like kind:count"),
        ({"alpha": -1}, "alpha=-1.0 must be > 0"),
        ({"round-timeout": 0}, "round-timeout=0.0 must be > 0"),
        ({"min-train-replies": 0}, "min-train-replies=0 must be > 0"),
        ({"fail-mode": "sometimes"}, "fail-mode='sometimes' is unknown: choose one of error"),
        ({"strategy": "fedfoo"}, "strategy='fedfoo' is unknown"),
        ({"model": "resnet9"}, "model='resnet9' is unknown"),
        ({"partitioner": "zipf"}, "partitioner='zipf' is unknown"),
        ({"fraction-train": 1.5}, "fraction-train=1.5 must be within [0, 1]"),
        ({"num-server-rounds": 2.5}, "num-server-rounds=2.5 is not a valid int"),
        ({"lr": "fast"}, "lr='fast' is not a valid float"),
        ({"proxy-size": -5}, "proxy-size=-5 must be >= 0"),
        ({"local-loss": "ce"}, "local-loss no longer exists"),
        ({"min-train-nodes": 3}, "min-train-nodes no longer exists: min-available-nodes"),
        ({"client-start": "teacher"}, "client-start='teacher' is unknown"),
        ({"strategy": "fedavg", "calibration": "prior"}, 'strategy="fedec", distill-steps=0'),
        ({"strategy": "fedavg", "calibration": "dense"}, "calibration='dense' is a FedEC step"),
        ({"calibration": "ccvr"}, "calibration='ccvr' is unknown: choose one of none, prior"),
        ({"calibration-rounds": "first"}, "calibration-rounds='first' is unknown"),
        ({"calibration-rounds": "every-0"}, "choose one of all, last, every-N"),
        ({"calibration-nodes": "some"}, "calibration-nodes='some' is unknown"),
        ({"feature-calibration": True}, 'feature-calibration no longer exists: use calibration="'),
        ({"prior-correction": True}, 'prior-correction no longer exists: use calibration="prior"'),
        ({"distill-lr": 0.01}, "distill-lr no longer exists"),
        # Knobs checked by the settings object they fill, named by their run-config key.
        ({"distill-steps": -1}, "distill-steps=-1 must be >= 0"),
        ({"variant-distill-steps": -2}, "variant-distill-steps=-2 must be >= 0"),
        ({"lp-boundary-bits": 5}, "lp-boundary-bits=5 is not offered: set 32 (fp32 on the wire)"),
        ({"lp-method": "admm"}, "lp-method='admm' is unknown: choose one of penalty, al"),
        ({"lp-stages": 0}, "lp-stages=0 must be >= 1"),
        ({"lp-downsample": 0}, "lp-downsample=0 must be >= 1"),
        ({"lp-parallel-epochs": 0}, "lp-parallel-epochs=0 must be >= 1"),
        ({"lp-serial-epochs": -1}, "lp-serial-epochs=-1 must be >= 0"),
        ({"diversity-weight": 1.5}, "diversity-weight=1.5 must be within [0, 1]"),
        ({"variants": "full,int3"}, "variants='full,int3' is invalid: variant 'int3'"),
        ({"variant-policy": "gpu"}, "variant-policy entry 'gpu' must look like tier=variant"),
        ({"variant-policy": "gpu=int3"}, "variant-policy names 'int3', which is not among"),
        ({"hce-ensemble": "int3"}, "hce-ensemble names 'int3', which is not among the variants"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_run_config(overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_retired_keys_fail_but_recorded_configs_of_older_runs_still_parse():
    from fl_ec.retired_keys import RETIRED_KEYS

    defaults = app_defaults(ROOT)
    assert not set(RETIRED_KEYS) & set(defaults), "a retired key is still a knob"
    old = ExperimentConfig.from_run_config(
        {"feature-calibration": True, "calibration-rank": 32}, allow_retired=True
    )
    assert old.extra == {"feature-calibration": True, "calibration-rank": 32}


def test_node_settings_require_partition_keys():
    settings = NodeSettings.from_node_config(
        {"partition-id": 3, "num-partitions": 10, "device-tier": "edge", "memory-mb": 512}
    )
    assert (settings.partition_id, settings.num_partitions, settings.device_tier) == (3, 10, "edge")
    with pytest.raises(ConfigError, match="partition-id"):
        NodeSettings.from_node_config({"num-partitions": 2})
    with pytest.raises(ConfigError, match="within"):
        NodeSettings.from_node_config({"partition-id": 2, "num-partitions": 2})


def test_layer_parallel_needs_a_resnet_and_says_so():
    with pytest.raises(ConfigError, match='model="resnet20"'):
        ExperimentConfig.from_run_config({"trainer": "layer-parallel", "model": "cnn"})
    config = ExperimentConfig.from_run_config(
        {"distill-trainer": "layer-parallel", "model": "resnet20", "lp-stages": 4}
    )
    assert config.layer_parallel.lp_stages == 4 and config.uses_layer_parallel


def test_settings_objects_are_built_from_the_run_config():
    config = ExperimentConfig.from_run_config(
        {"lp-stages": 3, "lp-boundary-bits": 6, "batch-size": 16, "distill-steps": 7}
    )
    settings = config.lp_settings(epochs=2)
    assert (settings.stages, settings.boundary_bits, settings.batch_size) == (3, 6, 16)
    assert (settings.epochs, settings.lr, settings.weight_decay) == (2, config.training.lr, 0.0)
    assert settings.seed == config.seed
    assert config.fedec.distill_settings().steps == 7
    variant_steps = config.fedhce.variant_distill_settings().steps
    assert variant_steps == config.fedhce.variant_distill_steps
    assert config.fedec.settings().teacher_rule == config.fedec.teacher_rule
    # A bad override is named by its settings field: no run-config key set it.
    with pytest.raises(ConfigError, match="^LPSettings.epochs=0 must be >= 1"):
        config.lp_settings(epochs=0)


def test_pyproject_table_is_generated_from_the_sections():
    text = (ROOT / "pyproject.toml").read_text()
    assert with_app_config(text) == text, (
        "pyproject.toml's [tool.flwr.app.config] is stale (the sections' defaults are the "
        f"source): regenerate it with `.venv/bin/{REGENERATE_COMMAND}`"
    )


def test_regenerating_the_table_keeps_its_order_and_restores_what_changed():
    text = (ROOT / "pyproject.toml").read_text()
    stale = text.replace("\nalpha = 0.1\n", "\nalpha = 0.5\n").replace("\nseed = 42\n", "\n")
    assert stale != text and with_app_config(stale) == text
    without = text.replace("[tool.flwr.app.config]", "[tool.other]")
    assert "[tool.flwr.app.config]\nstrategy = " in with_app_config(without)


def test_sections_check_their_own_values_and_the_config_what_spans_them():
    with pytest.raises(SettingError, match="^DataSection.alpha=0 must be > 0"):
        DataSection(alpha=0)
    with pytest.raises(SettingError, match="^FederationSection.strategy='fedsgd' is unknown"):
        FederationSection(strategy="fedsgd")
    # FedEC's choices are FedECSettings' checks, reported for the section's field.
    with pytest.raises(SettingError, match="^FedECSettings.client_start='teacher' is unknown"):
        FedECSection(client_start="teacher")
    with pytest.raises(ConfigError, match="calibration='prior' is a FedEC step"):
        ExperimentConfig(
            federation=FederationSection(strategy="fedavg"),
            fedec=FedECSection(calibration="prior"),
        )
    with pytest.raises(ConfigError, match='set model="resnet20"'):
        ExperimentConfig(training=TrainingSection(trainer="layer-parallel"))
    config = ExperimentConfig(data=DataSection(alpha=0.5), seed=7)
    assert config.to_dict()["alpha"] == 0.5 and config.to_dict()["seed"] == 7


def test_to_dict_round_trips_through_the_run_config():
    config = ExperimentConfig.from_run_config(
        {"alpha": 0.5, "lp-stages": 3, "attack": "scale:1", "resume": "r", "my-key": 1}
    )
    flat = config.to_dict()
    assert flat["lp-stages"] == 3 and flat["my-key"] == 1 and config.extra == {"my-key": 1}
    assert ExperimentConfig.from_run_config(flat) == config
    assert config.output.resume == "r" and config.simulation.attack_settings() == ("scale", 1)


def _knob_table() -> list[tuple[list[str], list[str]]]:
    """The knob table of docs/configuration.md: per row, its keys and default literals."""
    rows = []
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        cells = line.split("|")
        if not line.startswith("| `") or len(cells) < 4:
            continue
        keys, defaults = (re.findall(r"`([^`]*)`", cell) for cell in cells[1:3])
        rows.append((keys, defaults))
    return rows


def test_docs_knob_table_matches_pyproject():
    defaults = app_defaults(ROOT)
    rows = _knob_table()
    named = [key for keys, _ in rows for key in keys]
    assert sorted(set(named)) == sorted(named), "a key documented in two rows"
    assert set(named) - set(defaults) == set(), "rows for keys the run-config lacks"
    assert set(defaults) - set(named) == set(), "run-config keys without a row"
    for keys, literals in rows:
        assert len(literals) == len(keys), f"{keys}: one default per key"
        for key, literal in zip(keys, literals, strict=True):
            documented = tomllib.loads(f"value = {literal}")["value"]
            assert (type(documented), documented) == (type(defaults[key]), defaults[key]), key


def test_simulated_tier_counts_scale_to_the_federation():
    assert parse_tier_counts("gpu=1,edge=2", 3) == ["gpu", "edge", "edge"]
    scaled = parse_tier_counts("gpu=3,edge=7", 20)
    assert scaled == ["gpu"] * 6 + ["edge"] * 14
    assert parse_tier_counts("gpu=3,edge=7", 2) == ["gpu", "edge"]
    with pytest.raises(ConfigError, match="tier=count"):
        parse_tier_counts("gpu")
    with pytest.raises(ConfigError, match="names no node"):
        parse_tier_counts("gpu=0")
