"""Fixtures shared by the tests that drive the real Flower engine."""

import pytest

from tests.integration.helpers import FlowerCli


@pytest.fixture
def cli(tmp_path):
    """A `flwr` CLI with its own FLWR_HOME and ports; stops the local SuperLink after."""
    cli = FlowerCli(home=tmp_path / "flwr-home", isolated=True)
    yield cli
    cli.stop_local_superlink()
