"""The fleet benchmark's table: pure logic over hand-built metrics (no runs)."""

from __future__ import annotations

import pytest
from fleet_benchmark import EDGE_BYTES, edge_download, fleet_table

# Partitions 0-5 are gpu, 6-19 edge (simulated-tiers="gpu=6,edge=14" on 20 nodes).
FULL_BYTES = 4 * 421_642  # the CNN's parameters in fp32


def _metrics(accuracies: list[float], edge_bytes: int, gpu_bytes: int = FULL_BYTES) -> dict:
    rounds = [{"round": 0, "test-accuracy": 0.1}]
    for i, accuracy in enumerate(accuracies):
        rounds.append(
            {
                "round": i + 1,
                "test-accuracy": accuracy,
                "aggregate-seconds": 2.0,
                "client-train-seconds-sum": 4.0,
                "partition-by-node": {"11": 3, "12": 7},  # a gpu and an edge node
                "bytes-down-by-node": {"11": gpu_bytes, "12": edge_bytes},
                "variant-val-accuracy": {"prune-0.5+int4": accuracy - 0.1, "prune-0.5": accuracy},
            }
        )
    return {"rounds": rounds}


def _row(text: str, name: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| `{name}`"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_edge_download_counts_only_edge_partitions():
    metrics = _metrics([0.5], edge_bytes=1000, gpu_bytes=10**7)
    assert edge_download(metrics, {7}) == 1000
    assert edge_download(metrics, {3}) == 10**7
    unrecorded = {"rounds": [{k: v for k, v in r.items() if k != "partition-by-node"}
                             for r in metrics["rounds"]]}
    with pytest.raises(ValueError, match="partition-by-node"):
        edge_download(unrecorded, {7})


def test_fleet_table_pairs_deltas_by_seed_and_checks_the_edge_limits():
    small = int(0.05 * FULL_BYTES)
    results = {
        ("fedavg-small", 1): _metrics([0.60] * 5, small),
        ("fedavg-small", 2): _metrics([0.70] * 5, small),
        ("fedec-gpu-only", 1): _metrics([0.50] * 5, 0),
        ("fedec-gpu-only", 2): _metrics([0.50] * 5, 0),
        ("fedec-full", 1): _metrics([0.80] * 5, FULL_BYTES),
        ("fedec-full", 2): _metrics([0.82] * 5, FULL_BYTES),
        ("fedhce", 1): _metrics([0.66] * 5, small),
        ("fedhce", 2): _metrics([0.75] * 5, small),
        ("fedhce-fp32-wire", 1): _metrics([0.67] * 5, int(0.25 * FULL_BYTES)),
        ("fedhce-fp32-wire", 2): _metrics([0.76] * 5, int(0.25 * FULL_BYTES)),
    }
    text = fleet_table(results, [1, 2])
    assert "best edge baseline (fedavg-small)" in text  # 65 on average beats 50
    fedhce = _row(text, "fedhce")
    assert fedhce[1] == "66.00 / 75.00"
    assert fedhce[3].startswith("+6.00, +5.00")  # vs fedavg-small, seed by seed
    assert fedhce[4].startswith("-14.00, -7.00")  # vs fedec-full
    assert fedhce[5] == "56.00 / 65.00"  # the edge variant's validation accuracy
    assert float(fedhce[6]) <= EDGE_BYTES and fedhce[8] == "yes"
    assert _row(text, "fedhce-fp32-wire")[8] == "no"  # 0.25x the bytes breaks the limit
    assert _row(text, "fedec-full")[8] == "no"
    assert _row(text, "fedhce")[9] == "0.50"  # server 2 s against 4 s of client training


def test_an_ensemble_is_compared_with_the_best_single_of_no_more_bytes():
    from hce_frontier import Point, best_margin

    points = [
        Point(("full",), 80.0, 1000, 1.0, 1.0),
        Point(("small",), 70.0, 100, 0.3, 0.3),
        Point(("tiny",), 65.0, 50, 0.2, 0.2),
        Point(("small", "tiny"), 73.0, 150, 0.5, 0.5, 0.2),  # rival: small (70)
        Point(("full", "small"), 80.5, 1100, 1.3, 1.3, 0.05),  # rival: full (80)
    ]
    margin, ensemble, rival = best_margin(points)
    assert ensemble.members == ("small", "tiny") and rival.members == ("small",)
    assert abs(margin - 3.0) < 1e-9
