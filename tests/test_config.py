import re
import tomllib

import pytest

from fl_ec.config import ExperimentConfig, NodeSettings
from fl_ec.errors import ConfigError
from fl_ec.launch import app_defaults
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
    assert config.alpha == 1.0 and isinstance(config.alpha, float)
    assert config.num_server_rounds == 3 and config.download is True and config.seed == 7


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"alpha": 0.0}, "alpha=0.0 must be > 0"),
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
        ({"variants": "full,int3"}, "variants='full,int3': variant 'int3'"),
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
    from fl_ec.config import RETIRED_KEYS

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
    assert config.lp_stages == 4


def test_settings_objects_are_built_from_the_run_config():
    config = ExperimentConfig.from_run_config(
        {"lp-stages": 3, "lp-boundary-bits": 6, "batch-size": 16, "distill-steps": 7}
    )
    settings = config.lp_settings(epochs=2)
    assert (settings.stages, settings.boundary_bits, settings.batch_size) == (3, 6, 16)
    assert (settings.epochs, settings.lr, settings.weight_decay) == (2, config.lr, 0.0)
    assert config.distill_settings().steps == 7
    assert config.variant_distill_settings().steps == config.variant_distill_steps
    # A bad override is named by its settings field: no run-config key set it.
    with pytest.raises(ConfigError, match="^LPSettings.epochs=0 must be >= 1"):
        config.lp_settings(epochs=0)


def test_dataclass_defaults_equal_pyprojects():
    defaults = app_defaults(ROOT)
    config = ExperimentConfig().to_dict()
    assert {k: (type(v), v) for k, v in config.items()} == {
        k: (type(v), v) for k, v in defaults.items()
    }


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
    from fl_ec.config import parse_tier_counts

    assert parse_tier_counts("gpu=1,edge=2", 3) == ["gpu", "edge", "edge"]
    scaled = parse_tier_counts("gpu=3,edge=7", 20)
    assert scaled == ["gpu"] * 6 + ["edge"] * 14
    assert parse_tier_counts("gpu=3,edge=7", 2) == ["gpu", "edge"]
    with pytest.raises(ConfigError, match="tier=count"):
        parse_tier_counts("gpu")
    with pytest.raises(ConfigError, match="names no node"):
        parse_tier_counts("gpu=0")
