"""fl-ec-run's pre-flight: bad input fails in seconds, with one line and exit code 2."""

import subprocess
import sys

import pytest

from fl_ec.errors import FlEcError
from fl_ec.launch import parse_overrides, preflight
from tests.conftest import ROOT, requires_fashion_mnist


def _fl_ec_run(*args):
    return subprocess.run(
        [sys.executable, "-m", "fl_ec.launch", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("run_config", "fragment"),
    [
        ('strategy="fedfoo"', "strategy='fedfoo' is unknown"),
        ("alpha=0", "alpha=0.0 must be > 0"),
        ('data-dir="/nonexistent/fmnist"', "data-dir=/nonexistent/fmnist does not exist"),
        ("unknown-knob=1", "unknown run-config key(s) unknown-knob"),
    ],
)
def test_bad_input_exits_2_with_one_line(run_config, fragment):
    proc = _fl_ec_run("--run-config", run_config)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


@requires_fashion_mnist
def test_more_partitions_than_samples_is_caught_before_flower_starts():
    with pytest.raises(FlEcError, match="num-partitions=50 exceeds the 20"):
        preflight(ROOT, {"train-subset": 20}, num_partitions=50)


def test_overrides_parse_like_flwr():
    assert parse_overrides('num-server-rounds=3 alpha=0.1 run-name="x"') == {
        "num-server-rounds": 3,
        "alpha": 0.1,
        "run-name": "x",
    }
    with pytest.raises(FlEcError, match="malformed"):
        parse_overrides("strategy=fedavg")
