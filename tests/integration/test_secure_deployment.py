"""A deployment over TLS with authenticated SuperNodes, and the nodes it must refuse.

One deployment (``fl_ec.deploy.up(tls=True, auth=True)``: a new CA, two SuperNodes
whose keys are registered with ``flwr supernode register``). Before the run, three
SuperNodes try to join and fail: one with a key that was never registered, one without
the CA certificate, one ``--insecure``. Then a run completes on the two registered
nodes alone. About 1.5 minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fl_ec.credentials import make_supernode_key
from fl_ec.deploy import CONNECTION, down, start_supernode, up
from tests.conftest import ROOT, requires_fashion_mnist
from tests.integration.helpers import FlowerCli, run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, requires_fashion_mnist]


def _refused(node: subprocess.Popen, log: Path, timeout: float = 60) -> str:
    """Wait for a SuperNode that must not get in to give up; its log."""
    try:
        code = node.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait()
        raise AssertionError(f"the SuperNode was not refused within {timeout:.0f}s") from None
    text = log.read_text()
    assert code != 0, text[-2000:]
    assert "Receiving" not in text  # it never got a message
    return text


def test_tls_with_authenticated_supernodes_runs_and_refuses_every_other_node(tmp_path):
    home, results = tmp_path / "flwr-home", tmp_path / "results"
    state = up(2, tmp_path / "deploy", home, tls=True, auth=True)
    logs = Path(state.state_dir)
    try:
        assert (logs / "certificates" / "ca.crt").is_file()
        assert "--ssl-certfile" in Path(f"/proc/{state.superlink_pid}/cmdline").read_text()
        config = f"partition-id=0 num-partitions={2}"

        # A well-formed key that nobody registered.
        stranger = make_supernode_key(tmp_path / "stranger", "node")
        node = start_supernode(state, "stranger", config, stranger.private_key)
        assert "Failed to activate SuperNode" in _refused(node, logs / "stranger.log")

        # TLS without the deployment's CA: the SuperLink's certificate is not trusted.
        node = start_supernode(state, "no-ca", config, transport=[])
        assert "CERTIFICATE_VERIFY_FAILED" in _refused(node, logs / "no-ca.log")

        # A plain-text SuperNode cannot speak to a TLS SuperLink (it retries, then quits).
        node = start_supernode(
            state, "insecure", config, transport=["--insecure", "--max-retries", "2"]
        )
        assert "Giving up reconnection" in _refused(node, logs / "insecure.log")

        cli = FlowerCli(home=home, superlink=CONNECTION)
        run_id = cli.submit(ROOT, run_config(results, "secure"))
        outcome = cli.wait(run_id, timeout=600)
        assert outcome.completed, f"{outcome.status}: {outcome.details}"
    finally:
        down(state)
    rounds = json.loads((results / "secure" / "metrics.json").read_text())["rounds"]
    assert rounds[-1]["train-replies"] == 2  # the two registered nodes, no one else
    assert rounds[-1]["test-accuracy"] > 0.4
