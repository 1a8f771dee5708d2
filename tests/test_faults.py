"""Simulated node failures: a seeded, exact share of the partitions fails each round."""

from __future__ import annotations

import pytest

from fl_ec.clients.faults import InjectedFaultError, failing_partitions, inject_fault
from fl_ec.config import ExperimentConfig
from fl_ec.errors import ConfigError, FlEcError


def test_the_share_of_failing_partitions_is_exact_and_seeded():
    rounds = [failing_partitions(7, r, 10, 0.3) for r in range(1, 21)]
    assert all(len(failed) == 3 and failed <= set(range(10)) for failed in rounds)
    assert rounds == [failing_partitions(7, r, 10, 0.3) for r in range(1, 21)]  # reproducible
    assert len(set(rounds)) > 10  # drawn anew every round
    assert [failing_partitions(8, r, 10, 0.3) for r in range(1, 21)] != rounds  # per seed
    assert failing_partitions(7, 1, 10, 0.0) == frozenset()
    assert len(failing_partitions(7, 1, 3, 0.3)) == 1  # rounded: 0.9 of a node is one


def test_a_failing_partition_raises_what_the_client_app_turns_into_an_error_reply():
    failed = sorted(failing_partitions(0, 4, 10, 0.3))
    with pytest.raises(InjectedFaultError, match="fails round 4") as caught:
        inject_fault(0, 4, failed[0], 10, 0.3)
    assert isinstance(caught.value, FlEcError)  # train() replies with an Error for these
    healthy = next(p for p in range(10) if p not in failed)
    inject_fault(0, 4, healthy, 10, 0.3)  # no exception


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_fail_fraction_is_checked(fraction):
    with pytest.raises(ConfigError, match="fail-fraction"):
        ExperimentConfig.from_run_config({"fail-fraction": fraction})
