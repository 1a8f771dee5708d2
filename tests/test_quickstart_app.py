"""The drop-in claim, held against Flower's quickstart-pytorch app in tests/quickstart_app."""

import difflib

from tests.conftest import ROOT

APP = ROOT / "tests" / "quickstart_app" / "quickstart_app"


def _added_lines(before: str, after: str) -> list[str]:
    """Non-blank lines of ``after`` that replace or add to ``before``."""
    a = (APP / before).read_text().splitlines()
    b = (APP / after).read_text().splitlines()
    diff = difflib.unified_diff(a, b, lineterm="", n=0)
    return [d[1:] for d in diff if d.startswith("+") and not d.startswith("+++") and d[1:].strip()]


def test_fedec_replaces_fedavg_in_three_lines_plus_the_hold_out():
    added = _added_lines("server_app.py", "server_app_fedec.py")
    hold_out = [line for line in added if "hold_out" in line]
    assert len(hold_out) == 2  # its import and its call
    assert len(added) - len(hold_out) <= 3, added
    assert any("FedEC(" in line for line in added)


def test_the_test_app_is_flowers_example_not_a_friendlier_one():
    # A Net whose forward calls .view() on a conv output (fails channels-last), and
    # loaders of flwr-datasets dict batches: what tripped FedEC before.
    task = (APP / "task.py").read_text()
    assert "x.view(-1, 16 * 4 * 4)" in task
    assert 'batch["img"]' in task and "IidPartitioner" in task
    assert "fl_ec" not in (APP / "client_app.py").read_text()


def test_fedhce_replaces_fedavg_in_the_same_lines_and_two_client_lines():
    added = _added_lines("server_app.py", "server_app_fedhce.py")
    assert len([line for line in added if "hold_out" not in line]) <= 3, added
    client = _added_lines("client_app.py", "client_app_fedhce.py")
    calls = [line for line in client if not line.startswith("from ")]
    assert len(calls) == 2 and "receive_variant(msg, Net)" in calls[0], client
    assert "reply_variant(" in calls[1]


def test_the_run_machinery_wraps_fedavg_in_at_most_three_server_lines():
    added = _added_lines("server_app.py", "server_app_recorded.py")
    assert len(added) <= 3, added
    assert any("RecordedRun.from_run_config(strategy, context.run_config)" in a for a in added)
