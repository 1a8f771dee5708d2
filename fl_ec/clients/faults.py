"""Simulated node failures: which partitions fail a training round (simulation only).

For tests and benchmarks of lost clients. ``fail-fraction`` makes that share of the
simulated partitions fail each training round; the failing partitions are drawn anew
every round from the run's seed, so a run is reproducible and every method of a seed
loses the same nodes. How they fail is ``fail-mode``: ``error`` answers with an error
reply, as a node whose ClientApp crashed; ``silent`` answers only after the round's
timeout has passed, as a node that lost its connection -- the server records it lost.
A silent node holds its simulation worker meanwhile, so give the simulation more than
one (``--federation-config "client-resources-num-cpus=1"`` on a 2-core machine). A
deployed SuperNode never fails on purpose, whatever the run-config says.
"""

from __future__ import annotations

import time

import torch

from fl_ec.errors import FlEcError


class InjectedFaultError(FlEcError):
    """A simulated node failure (its reply is an error, like a crashed node's)."""


def failing_partitions(
    seed: int, server_round: int, num_partitions: int, fraction: float
) -> frozenset[int]:
    """The ``round(fraction * num_partitions)`` partitions that fail ``server_round``."""
    count = int(fraction * num_partitions + 0.5)
    if count < 1:
        return frozenset()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + server_round)
    return frozenset(torch.randperm(num_partitions, generator=generator)[:count].tolist())


def inject_fault(
    seed: int,
    server_round: int,
    partition_id: int,
    num_partitions: int,
    fraction: float,
    silent_for: float = 0.0,
) -> None:
    """Raise :class:`InjectedFaultError` if ``partition_id`` fails ``server_round``,
    after ``silent_for`` seconds (a node that does not answer in time)."""
    if partition_id in failing_partitions(seed, server_round, num_partitions, fraction):
        time.sleep(silent_for)
        raise InjectedFaultError(
            f"injected fault: partition {partition_id} fails round {server_round} "
            f"(fail-fraction={fraction:g}, simulation only)"
        )
