"""A Byzantine node in a real `flwr run` simulation: its reply is well-formed, and felt."""

from __future__ import annotations

import pytest

from tests.conftest import requires_fashion_mnist
from tests.integration.helpers import completed_run

pytestmark = pytest.mark.integration


@requires_fashion_mnist
def test_a_sign_flipping_node_passes_the_checks_and_the_median_of_three_outvotes_it(
    cli, tmp_path
):
    # Partition 0 negates its weights: every check passes (it is a finite model of the
    # right shapes with honest counts), so plain averaging takes it in and only robust
    # aggregation stops it.
    attack = 'attack="sign-flip:1" local-epochs=2 train-subset=6000 '
    plain = completed_run(cli, tmp_path / "results", "mean", attack, num_supernodes=3)
    robust = completed_run(
        cli,
        tmp_path / "results",
        "median",
        attack + 'strategy="fedec" distill-steps=0 robust-start="median"',
        num_supernodes=3,
    )
    final = plain["rounds"][-1]
    assert final["train-replies"] == 3 and final["rejected-replies"] == 0
    plain_accuracy = final["test-accuracy"]
    assert robust["rounds"][-1]["train-replies"] == 3
    assert robust["rounds"][-1]["test-accuracy"] > plain_accuracy + 0.15
