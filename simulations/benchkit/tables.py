"""The standard benchmark's tables: one row per run, and means over seeds.

``results`` maps ``(label, alpha)`` or ``(label, alpha, seed)`` to a run's metrics (as
:func:`benchkit.runs.run_one` returns them); Δs and ratios pair a run with FedAvg's run
of the same alpha and seed.
"""

from __future__ import annotations

from pathlib import Path

from benchkit.report import mean_sd
from benchkit.runs import recorded_calibration


def _mean(rounds: list[dict], key: str) -> float:
    values = [r[key] for r in rounds if key in r]
    return sum(values) / len(values) if values else float("nan")


def _first_round_reaching(rounds: list[dict], target: float) -> int | None:
    for r in rounds:
        if r["round"] > 0 and r["test-accuracy"] >= target - 1e-9:
            return r["round"]
    return None


def grouped(results: dict[tuple, dict], part: slice) -> dict[tuple, list[tuple]]:
    """``results``' keys grouped by ``key[part]``: (method, alpha) or (alpha, seed)."""
    groups: dict[tuple, list[tuple]] = {}
    for key in results:
        groups.setdefault(key[part], []).append(key)
    return groups


def fedavg_of(results: dict[tuple, dict], key: tuple) -> dict | None:
    """FedAvg's run at the same alpha (and the same seed, for multi-seed results)."""
    return results.get(("fedavg", *key[1:]))


def _vs_fedavg(results: dict[tuple, dict], key: tuple) -> tuple[float, int | None, float]:
    """A run's Δ final vs FedAvg (pts), first round at FedAvg's final, server/client time.

    Δ and the round are NaN / None without a FedAvg run of the same alpha (and seed);
    the time ratio is NaN when the run recorded no client training seconds.
    """
    metrics = results[key]
    trained = [r for r in metrics["rounds"] if r["round"] > 0]
    client_sum = _mean(trained, "client-train-seconds-sum")
    agg = metrics["summary"]["mean-aggregate-seconds"]
    ratio = agg / client_sum if client_sum == client_sum and client_sum else float("nan")
    base = fedavg_of(results, key)
    if base is None:
        return float("nan"), None, ratio
    target = base["summary"]["final-test-accuracy"]
    delta = 100 * (metrics["summary"]["final-test-accuracy"] - target)
    return delta, _first_round_reaching(metrics["rounds"], target), ratio


def row_label(key: tuple) -> str:
    """The method label, with its seed for multi-seed results."""
    return key[0] if len(key) < 3 else f"{key[0]} (seed {key[2]})"


def table(results: dict[tuple, dict], rounds: int) -> str:
    """One row per run; ``results`` keys are ``(label, alpha)`` or ``(label, alpha, seed)``."""
    checkpoints = sorted(set(range(5, rounds + 1, 5)) | {rounds})
    head = (
        ["method", "alpha"]
        + [f"acc@{r}" for r in checkpoints]
        + [
            "Δ final vs FedAvg (pts)",
            "rounds to FedAvg's final",
            "EC-DNN ensemble acc",
            "s/round",
            "client train s (wall)",
            "server agg s",
            "server s / summed client train s",
            "teacher s",
            "distill s (steps)",
            "MB down/round",
            "MB up/round",
            "run s",
        ]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, metrics in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2:], kv[0][0])):
        alpha = key[1]
        trained = [r for r in metrics["rounds"] if r["round"] > 0]
        by_round = {r["round"]: r for r in metrics["rounds"]}
        accs = [
            100 * by_round[r]["test-accuracy"] if r in by_round else float("nan")
            for r in checkpoints
        ]
        summary = metrics["summary"]
        delta, reach, ratio = _vs_fedavg(results, key)
        agg = summary["mean-aggregate-seconds"]
        ensemble = summary.get("ensemble-test-accuracy")
        lines.append(
            "| "
            + " | ".join(
                [row_label(key), f"{alpha:g}"]
                + [f"{a:.2f}" for a in accs]
                + [
                    f"{delta:+.2f}",
                    f"{reach}/{len(trained)}" if reach else f"-/{len(trained)}",
                    f"{100 * ensemble:.2f}" if ensemble is not None else "-",
                    f"{summary['mean-round-seconds']:.1f}",
                    f"{summary['mean-train-seconds']:.1f}",
                    f"{agg:.2f}",
                    f"{ratio:.2f}" if ratio == ratio else "-",
                    f"{_mean(trained, 'teacher-seconds'):.1f}"
                    if "teacher-seconds" in trained[0]
                    else "-",
                    f"{_mean(trained, 'distill-seconds'):.1f} "
                    f"({_mean(trained, 'distill-steps'):.0f})"
                    if "distill-seconds" in trained[0]
                    else "-",
                    f"{summary['mean-bytes-down'] / 1e6:.2f}",
                    f"{summary['mean-bytes-up'] / 1e6:.2f}",
                    f"{metrics.get('elapsed-seconds') or float('nan'):.0f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def seed_summary(results: dict[tuple, dict]) -> str:
    """Across seeds, per method and alpha: final accuracy and the paired Δ vs FedAvg.

    Δ is taken seed by seed (each seed has its own partitions and initial model, shared
    by every method), so the spread shows whether a lead survives a new federation.
    """
    groups = grouped(results, slice(0, 2))
    head = [
        "method",
        "alpha",
        "seeds",
        "final acc mean ± sd",
        "Δ vs FedAvg mean ± sd (pts)",
        "Δ per seed",
        "rounds to FedAvg's final, per seed",
        "server s / summed client train s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, alpha), keys in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        keys = sorted(keys, key=lambda k: k[2])
        finals = [100 * results[k]["summary"]["final-test-accuracy"] for k in keys]
        deltas, reaches, ratios = [], [], []
        for k in keys:
            if fedavg_of(results, k) is None:
                continue
            delta, reach, ratio = _vs_fedavg(results, k)
            deltas.append(delta)
            reaches.append(str(reach) if reach else "-")
            if ratio == ratio:
                ratios.append(ratio)
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    f"{alpha:g}",
                    ", ".join(str(k[2]) for k in keys),
                    mean_sd(finals, "{:.2f}"),
                    mean_sd(deltas, "{:+.2f}") if deltas else "-",
                    ", ".join(f"{d:+.2f}" for d in deltas) or "-",
                    ", ".join(reaches) or "-",
                    f"{sum(ratios) / len(ratios):.2f}" if ratios else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def posthoc_table(results: dict[tuple, dict], run_dirs: dict[tuple, Path]) -> str:
    """Per run not prior-corrected: final acc, corrected, and Δ vs FedAvg's plain final."""
    from benchkit.posthoc import posthoc_prior_correction

    head = [
        "run",
        "final acc",
        "+ post-hoc prior correction",
        "gain (pts)",
        "corrected Δ vs FedAvg's plain final (pts)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, metrics in sorted(results.items(), key=lambda kv: (kv[0][2:], kv[0][0])):
        if recorded_calibration(metrics.get("config", {})) == "prior":
            continue
        measured = posthoc_prior_correction(run_dirs[key], metrics)
        if measured is None:
            continue
        before, after = measured
        fedavg = fedavg_of(results, key)
        base = fedavg["summary"]["final-test-accuracy"] if fedavg else float("nan")
        lines.append(
            f"| {row_label(key)} | {100 * before:.2f} | {100 * after:.2f} | "
            f"{100 * (after - before):+.2f} | {100 * (after - base):+.2f} |"
        )
    return "\n".join(lines)
