"""The standard fl-ec benchmark: methods x alphas on Fashion-MNIST, via real `flwr run`.

    python simulations/standard_benchmark.py                       # FedAvg, alpha 0.1 and 0.5
    python simulations/standard_benchmark.py --methods fedavg fedec --regime comm-limited
    python simulations/standard_benchmark.py --section fedec-ablation --alphas 0.1 \\
        --methods fedavg fedec "fedec:teacher-rule=label-aware"

A method is a strategy name, optionally with run-config overrides of its own:
``fedec:teacher-rule="label-aware",proxy-per-round=2000``. Every run is a real local Flower
simulation (10 SuperNodes by default) with its own FLWR_HOME and ports; the numbers
come from each run's ``metrics.json``. The table (test accuracy every 5 rounds, rounds
to reach FedAvg's final accuracy, seconds per round split into client training and
server aggregation, bytes per round, ratios against FedAvg) and an accuracy-vs-round
plot replace the section ``--section`` of BENCHMARKS.md, with machine, date and command.

Regimes: ``standard`` (1 local epoch, ``--rounds`` rounds) and ``comm-limited``
(5x the local epochs, a fifth of the rounds: the same client compute, 5x less
communication -- where edge federations live), both with 10 clients all training every
round; and ``partial`` (client drift: 20 clients, 4 sampled per round, 5 local epochs,
15 rounds by default), where the accuracy oscillates from round to round, so its tables
add the mean and sd of the last 5 rounds, how often the teacher beat the parameter
average on validation, and a check that every method of a seed trained the same
sampled partitions in every round.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_ec.config import ExperimentConfig
from fl_ec.launch import FlowerCli, format_overrides, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
PLOTS = ROOT / "simulations" / "plots"

# Full Fashion-MNIST minus the server's 5k proxy + 1k validation hold-out (54k client
# samples), 1 local epoch, batch 32, SGD lr 0.05 momentum 0.9, clipping 10, seed 42.
STANDARD_SETTINGS = {
    "dataset": "fashion-mnist",
    "model": "cnn",
    "partitioner": "dirichlet",
    "local-epochs": 1,
    "batch-size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "max-grad-norm": 10.0,
    "proxy-size": 5000,
    "validation-size": 1000,
    "train-subset": 0,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "seed": 42,
}


@dataclass(frozen=True)
class Regime:
    """A benchmark regime: local epochs, default rounds and the federation's shape."""

    local_epochs: int
    rounds: int  # the default of --rounds
    supernodes: int
    fraction_train: float
    round_divisor: int = 1  # runs --rounds // this many rounds

    def num_rounds(self, rounds: int | None) -> int:
        return max(1, (self.rounds if rounds is None else rounds) // self.round_divisor)


REGIMES = {
    "standard": Regime(local_epochs=1, rounds=20, supernodes=10, fraction_train=1.0),
    # The standard client compute: 5x the local epochs, a fifth of the rounds.
    "comm-limited": Regime(
        local_epochs=5, rounds=20, supernodes=10, fraction_train=1.0, round_divisor=5
    ),
    # 4 of 20 clients x 5 epochs is one pass over the 54k client samples per round, as in
    # the other regimes; 15 rounds keep a distilling method within ~15 min on 2 cores.
    "partial": Regime(local_epochs=5, rounds=15, supernodes=20, fraction_train=0.2),
}
TAIL = 5  # the partial regime's targets use the mean of the last this many rounds


def parse_method(text: str) -> tuple[str, str, dict]:
    """``fedec:teacher-rule="label-aware",proxy-per-round=2000`` -> (label, strategy, overrides)."""
    strategy, _, rest = text.partition(":")
    overrides = parse_overrides(_commas_outside_quotes_to_spaces(rest)) if rest else {}
    return text, strategy, overrides


def _commas_outside_quotes_to_spaces(text: str) -> str:
    """Overrides are comma-separated, but a quoted value may hold commas."""
    out, quote = [], ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == ",":
            char = " "
        out.append(char)
    return "".join(out)


def run_one(
    label: str,
    strategy: str,
    method_overrides: dict,
    alpha: float,
    rounds: int,
    local_epochs: int,
    supernodes: int,
    results_dir: Path,
    extra: str,
    reuse: bool = False,
    seed: int | None = None,
) -> dict:
    """One ``flwr run`` of ``label``; its metrics (plus the run's wall seconds).

    ``reuse``: a finished run with the same name in ``results_dir`` (every round
    recorded) is read instead of run again, e.g. after a run was cut off.
    ``seed``: replaces the shared seed (partitions, initial model, client batch
    order, proxy subsets) and names the run after it.
    """
    name = run_name(label, alpha, local_epochs, seed)
    settings = {
        **STANDARD_SETTINGS,
        "strategy": strategy,
        "alpha": alpha,
        "num-server-rounds": rounds,
        "local-epochs": local_epochs,
        "run-name": name,
        "results-dir": str(results_dir),
        **parse_overrides(extra),
        # A method's own overrides are more specific than the settings shared by all.
        **method_overrides,
        **({"seed": seed} if seed is not None else {}),
    }
    metrics_path = results_dir / name / "metrics.json"
    if reuse and metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        if _same_config(metrics.get("config", {}), _as_config(settings)) and (
            len(metrics.get("rounds", [])) == rounds + 1
        ):
            print(f"[bench] {label} alpha={alpha}: reusing {metrics_path}", flush=True)
            metrics["elapsed-seconds"] = None  # not recorded in metrics.json
            return metrics
    with tempfile.TemporaryDirectory(prefix="flec-bench-") as home:
        cli = FlowerCli(home=Path(home), isolated=True)
        try:
            run_id = cli.submit(ROOT, format_overrides(settings), supernodes)
            print(f"[bench] {label} alpha={alpha} epochs={local_epochs}: run {run_id}", flush=True)
            outcome = cli.wait(run_id, timeout=3 * 3600, poll=5)
        finally:
            cli.stop_local_superlink()
    if not outcome.completed:
        raise SystemExit(f"[bench] {label} alpha={alpha} ended {outcome.status}: {outcome.details}")
    metrics = json.loads(metrics_path.read_text())
    metrics["elapsed-seconds"] = outcome.info.get("elapsed")
    return metrics


def run_name(label: str, alpha: float, local_epochs: int, seed: int | None = None) -> str:
    """The run folder's name: the method label, alpha, local epochs and the seed, if set."""
    return (
        "bench-"
        + "".join(c if c.isalnum() or c in ".-" else "_" for c in label)
        + f"-a{alpha:g}-e{local_epochs}"
        + (f"-s{seed}" if seed is not None else "")
    )


# Where a run was written is not part of the experiment: a run moved or copied into
# another results folder (e.g. to combine seeds run on several days) is still reusable.
_OUTPUT_KEYS = frozenset({"results-dir", "run-name"})
# Knobs that runs may have recorded but the code no longer has, each with the value
# whose behaviour the code kept: a run recorded with another value cannot be repeated.
# (trim-ratio acted only through the retired teacher rules, which teacher-rule records.)
_RETIRED_KNOBS = {
    "teacher-includes-average": False,
    "augment-copies": 0,
    "student-init": "average",
    "prior-correction-revert-z": 1.96,
    "prior-aware-distillation": False,
    "tail-average-rounds": 1,
    "variant-client-start": "tuned",
    "downlink-rounding": "nearest",
    "prune-importance": "magnitude",
    "prune-steps": 1,
    "lp-aux-resolution": "full",
    "teacher-includes-previous": False,
    "calibration-samples": 20000,
    "distill-batch-size": 128,
    "distill-lr": 0.001,
    "distill-temperature": 1.0,
    "distill-eval-every": 50,
    "distill-patience": 100,
    "default-variant": "",
    "rebase-updates": True,
    "eval-batch-size": 512,
    "weight-decay": 0.0,
    "local-loss": "ce",
    "client-test-fraction": 0.1,
    "lp-threads-per-worker": 1,
    "min-train-nodes": 2,  # now min-available-nodes, 2 by default
    "min-evaluate-nodes": 2,
}
# (calibration-layers, calibration-rank, calibration-components) of a run recorded with
# feature-calibration=true, before one ``calibration`` preset replaced those knobs.
_DENSE_PRESETS = {("dense", 64, 1): "dense", ("dense", 32, 8): "dense-mixture"}


def recorded_calibration(recorded: dict) -> str | None:
    """The ``calibration`` preset of a recorded config, also of one recorded before it.

    Older runs recorded prior-correction, feature-calibration, calibration-layers,
    calibration-rank and calibration-components instead. None: a combination that no
    preset reproduces (e.g. a dense calibration of rank 16).
    """
    if "calibration" in recorded:
        return recorded["calibration"]
    if not recorded.get("feature-calibration"):
        return "prior" if recorded.get("prior-correction") else "none"
    layers = recorded.get("calibration-layers", "classifier")
    if layers == "classifier":
        return "classifier"
    shape = (
        layers,
        recorded.get("calibration-rank", 64),
        recorded.get("calibration-components", 1),
    )
    return _DENSE_PRESETS.get(shape)


def _same_config(recorded: dict, expected: dict) -> bool:
    """A recorded run matches ``expected``; a knob added since it ran counts as it behaved."""
    as_run = {**ExperimentConfig().to_dict(), **recorded}
    as_run["calibration"] = recorded_calibration(recorded)
    if as_run["calibration"] is None:
        return False
    if recorded.get("prior-correction") and "prior-correction-revert-z" not in recorded:
        as_run["prior-correction-revert-z"] = 0.0  # it reverted on any validation drop
    ignored = set(_OUTPUT_KEYS)
    if as_run["calibration"] in ("none", "prior"):
        ignored.add("calibration-samples")  # virtual features of a feature calibration
    if "layer-parallel" not in (as_run.get("trainer"), as_run.get("distill-trainer")):
        # The layer-parallel knobs act only through those trainers (lp-method's default
        # changed once; runs without the trainer are unaffected).
        ignored |= {key for key in as_run if key.startswith("lp-")}
    if any(
        as_run.get(key, kept) != kept
        for key, kept in _RETIRED_KNOBS.items()
        if key not in ignored and key not in expected
    ):
        return False
    return all(as_run.get(key) == value for key, value in expected.items() if key not in ignored)


def _as_config(settings: dict) -> dict:
    """``settings`` as a run's recorded config (the typed, validated values)."""
    return ExperimentConfig.from_run_config(settings).to_dict()


def _mean(rounds: list[dict], key: str) -> float:
    values = [r[key] for r in rounds if key in r]
    return sum(values) / len(values) if values else float("nan")


def _first_round_reaching(rounds: list[dict], target: float) -> int | None:
    for r in rounds:
        if r["round"] > 0 and r["test-accuracy"] >= target - 1e-9:
            return r["round"]
    return None


def _grouped(results: dict[tuple, dict], part: slice) -> dict[tuple, list[tuple]]:
    """``results``' keys grouped by ``key[part]``: (method, alpha) or (alpha, seed)."""
    groups: dict[tuple, list[tuple]] = {}
    for key in results:
        groups.setdefault(key[part], []).append(key)
    return groups


def _fedavg_of(results: dict[tuple, dict], key: tuple) -> dict | None:
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
    base = _fedavg_of(results, key)
    if base is None:
        return float("nan"), None, ratio
    target = base["summary"]["final-test-accuracy"]
    delta = 100 * (metrics["summary"]["final-test-accuracy"] - target)
    return delta, _first_round_reaching(metrics["rounds"], target), ratio


def _row_label(key: tuple) -> str:
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
                [_row_label(key), f"{alpha:g}"]
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
    groups = _grouped(results, slice(0, 2))
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
            if _fedavg_of(results, k) is None:
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
    from prior_posthoc import posthoc_prior_correction

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
        fedavg = _fedavg_of(results, key)
        base = fedavg["summary"]["final-test-accuracy"] if fedavg else float("nan")
        lines.append(
            f"| {_row_label(key)} | {100 * before:.2f} | {100 * after:.2f} | "
            f"{100 * (after - before):+.2f} | {100 * (after - base):+.2f} |"
        )
    return "\n".join(lines)


def tail_stats(metrics: dict, tail: int = TAIL) -> tuple[float, float, float]:
    """Final accuracy, and mean and sd of the last ``tail`` rounds' accuracy, in %."""
    accs = [100 * r["test-accuracy"] for r in metrics["rounds"] if r["round"] > 0][-tail:]
    return accs[-1], sum(accs) / len(accs), _sd(accs)


def teacher_wins(metrics: dict) -> tuple[int, int]:
    """Rounds where the teacher beat the parameter average on validation, of those measured."""
    measured = [
        r
        for r in metrics["rounds"]
        if "teacher-val-accuracy" in r and "student-start-val-accuracy" in r
    ]
    wins = sum(r["teacher-val-accuracy"] > r["student-start-val-accuracy"] for r in measured)
    return wins, len(measured)


def drift_table(results: dict[tuple, dict]) -> str:
    """Per method and alpha, over seeds: final, mean / sd of the last rounds, Δs paired."""
    groups = _grouped(results, slice(0, 2))
    head = [
        "method",
        "alpha",
        "seeds",
        "final acc",
        f"mean of last {TAIL}",
        f"sd of last {TAIL}",
        f"Δ mean-of-last-{TAIL} vs FedAvg, per seed",
        "Δ mean ± sd",
        "teacher > average (rounds)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, alpha), keys in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        keys = sorted(keys, key=lambda k: k[2:])
        stats = [tail_stats(results[k]) for k in keys]
        deltas = []
        for k, (_, mean, _) in zip(keys, stats, strict=True):
            base = _fedavg_of(results, k)
            if base is not None:
                deltas.append(mean - tail_stats(base)[1])
        wins = [teacher_wins(results[k]) for k in keys]
        won, measured = sum(w for w, _ in wins), sum(n for _, n in wins)
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    f"{alpha:g}",
                    ", ".join(str(k[2]) for k in keys if len(k) > 2) or "-",
                    " / ".join(f"{s[0]:.2f}" for s in stats),
                    " / ".join(f"{s[1]:.2f}" for s in stats),
                    " / ".join(f"{s[2]:.2f}" for s in stats),
                    ", ".join(f"{d:+.2f}" for d in deltas) or "-",
                    mean_sd(deltas, "{:+.2f}") if deltas else "-",
                    f"{won}/{measured} ({100 * won / measured:.0f}%)" if measured else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def sampled_partitions(metrics: dict) -> list[list[int] | None]:
    return [r.get("sampled-partitions") for r in metrics["rounds"] if r["round"] > 0]


def sampling_check(results: dict[tuple, dict]) -> str:
    """One line per (alpha, seed): do all methods' runs record the same sampled partitions?"""
    groups = _grouped(results, slice(1, None))
    lines = []
    for rest, keys in sorted(groups.items()):
        samples = {k[0]: sampled_partitions(results[k]) for k in keys}
        first = next(iter(samples.values()))
        recorded = all(None not in s for s in samples.values())
        same = recorded and all(s == first for s in samples.values())
        verdict = (
            "the same partitions in every round"
            if same
            else "DIFFERENT partitions: "
            + "; ".join(f"{label}: {s}" for label, s in samples.items())
            if recorded
            else "not recorded by every run"
        )
        where = f"alpha={rest[0]:g}" + (f", seed {rest[1]}" if len(rest) > 1 else "")
        lines.append(f"- Sampling, {where}, {len(keys)} methods: {verdict}.")
    return "\n".join(lines)


def round_table(results: dict[tuple, dict]) -> str:
    """Per round of the first (alpha, seed): sampled partitions, their classes, val accs."""
    first = sorted({k[1:] for k in results})[0]
    keys = sorted(k for k in results if k[1:] == first)
    distilling = [k for k in keys if "teacher-val-accuracy" in results[k]["rounds"][-1]]
    reference = results[keys[0]]
    head = ["round", "sampled partitions", "classes held"] + [
        f"{k[0]}: teacher / avg / student val, test" for k in distilling
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_round = {k: {r["round"]: r for r in results[k]["rounds"]} for k in distilling}
    for r in reference["rounds"]:
        if r["round"] == 0:
            continue
        counts = r.get("sampled-class-counts") or []
        total = sum(counts) or 1
        held = [str(c) for c, n in enumerate(counts) if n >= 0.01 * total]
        cells = [
            str(r["round"]),
            " ".join(map(str, r.get("sampled-partitions", []))) or "-",
            " ".join(held) or "-",
        ]
        for k in distilling:
            row = by_round[k].get(r["round"], {})
            cells.append(
                " / ".join(
                    f"{100 * row[name]:.1f}" if name in row else "-"
                    for name in (
                        "teacher-val-accuracy",
                        "student-start-val-accuracy",
                        "student-val-accuracy",
                    )
                )
                + (f", {100 * row['test-accuracy']:.1f}" if "test-accuracy" in row else "")
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_teacher_vs_average(results: dict[tuple, dict], path: Path) -> None:
    """Teacher vs parameter-average validation accuracy per round, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k in results if "teacher-val-accuracy" in results[k]["rounds"][-1])
    labels = sorted({k[0] for k in keys})
    if not labels:
        return
    fig, axes = plt.subplots(
        1, len(labels), figsize=(5 * len(labels), 4), squeeze=False, sharey=True
    )
    for ax, label in zip(axes[0], labels, strict=True):
        for i, key in enumerate(k for k in keys if k[0] == label):
            rounds = [r for r in results[key]["rounds"] if "teacher-val-accuracy" in r]
            x = [r["round"] for r in rounds]
            tag = f"alpha={key[1]:g}" + (f" s{key[2]}" if len(key) > 2 else "")
            ax.plot(
                x,
                [100 * r["teacher-val-accuracy"] for r in rounds],
                color=f"C{i}",
                marker=".",
                label=f"teacher {tag}",
            )
            ax.plot(
                x,
                [100 * r["student-start-val-accuracy"] for r in rounds],
                color=f"C{i}",
                linestyle="--",
                label=f"average {tag}",
            )
        ax.set_title("\n".join(textwrap.wrap(label, 50)), fontsize=8)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("validation accuracy (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _sd(values: list[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def mean_sd(values: list[float], fmt: str) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {_sd(values):.2f}"


def plot(results: dict[tuple, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({key[1] for key in results})
    labels = sorted({key[0] for key in results})
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    styles = ["-", "--", ":", "-."]
    # Method labels are whole run-configs: the legend goes below the axes, wrapped,
    # and the saved image grows to hold it (bbox "tight") instead of covering curves.
    fig, axes = plt.subplots(1, len(alphas), figsize=(7 * len(alphas), 4.5), squeeze=False)
    for ax, alpha in zip(axes[0], alphas, strict=True):
        for key, metrics in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][2:])):
            if key[1] != alpha:
                continue
            # One colour per method; seeds of the same method differ by line style.
            seeds = sorted({k[2] for k in results if len(k) > 2 and k[0] == key[0]})
            style = styles[seeds.index(key[2]) % len(styles)] if len(key) > 2 else "-"
            rounds = [r["round"] for r in metrics["rounds"]]
            ax.plot(
                rounds,
                [100 * r["test-accuracy"] for r in metrics["rounds"]],
                marker=".",
                linestyle=style,
                color=colours[key[0]],
                label="\n".join(textwrap.wrap(_row_label(key), 90)),
            )
        ax.set_title(f"alpha={alpha:g}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(bottom=max(0, ax.get_ylim()[0]))
        ax.grid(alpha=0.3)
    fig.tight_layout()  # before the legends: they hang below, outside the layout
    for ax in axes[0]:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def teacher_throughput(num_models: int = 10, proxy_size: int = 5000) -> str:
    """Teacher pass (num_models CNNs) vs one CNN's batched inference, samples/s.

    The reference is measured twice: in the layout the teacher uses (channels-last,
    so the ratio isolates ensembling overhead) and in PyTorch's default layout (what a
    plain ``model(x)`` loop gets, so the layout's own gain shows).
    """
    from fl_ec.ensemble import teacher_logits
    from fl_ec.models import ArchSpec, build_model, channels_last

    torch.manual_seed(0)
    spec = ArchSpec("cnn", (1, 28, 28), 10)
    models = [build_model(spec).eval() for _ in range(num_models)]
    x = torch.randn(proxy_size, 1, 28, 28)
    teacher_logits(models[:1], x[:512])  # warm-up

    def single_rate() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in x.split(512):
                models[0](batch)
        return proxy_size / (time.perf_counter() - start)

    plain = single_rate()
    with channels_last(models[0]):
        single_rate()  # warm-up of the channels-last kernels
        same_layout = single_rate()
    teacher = teacher_logits(models, x, batch_size=512)
    rate = teacher.samples_per_second
    return (
        f"Teacher pass: {num_models} CNNs x {proxy_size} proxy samples in "
        f"{teacher.seconds:.2f} s = {rate:,.0f} model-samples/s. One CNN's batched "
        f"inference (batch 512): {same_layout:,.0f} samples/s channels-last (ratio "
        f"{rate / same_layout:.2f}; 1.0 = no overhead for ensembling), {plain:,.0f} "
        f"samples/s in PyTorch's default layout (ratio {rate / plain:.2f})."
    )


def write_section(section: str, body: str) -> None:
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["fedavg"])
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.5])
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="default 20 (partial: 15); comm-limited runs a fifth of them",
    )
    parser.add_argument("--regime", choices=list(REGIMES), default="standard")
    parser.add_argument("--supernodes", type=int, default=None, help="default: the regime's")
    parser.add_argument("--section", default="standard-benchmark")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results" / "benchmark")
    parser.add_argument(
        "--extra-run-config", default="", help="applied to every run (same for all methods)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="read finished runs with the same settings"
    )
    parser.add_argument(
        "--posthoc-prior-correction",
        action="store_true",
        help="also apply FedEC's prior correction to each finished run's saved final model "
        "(FedAvg included) and report the accuracies: the fair baseline for "
        'calibration="prior"',
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="repeat every method with each seed (partitions, init, batch order); "
        "adds a table of mean ± sd and the Δ vs FedAvg paired by seed",
    )
    args = parser.parse_args()
    command = "python simulations/standard_benchmark.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    regime = REGIMES[args.regime]
    rounds = regime.num_rounds(args.rounds)
    epochs = regime.local_epochs
    supernodes = args.supernodes if args.supernodes is not None else regime.supernodes
    extra = f"fraction-train={regime.fraction_train:g} {args.extra_run_config}".strip()
    started = dt.datetime.now()
    results = {}
    methods = [parse_method(m) for m in args.methods]  # a malformed one fails before any run
    if args.seeds and any("seed" in overrides for _, _, overrides in methods):
        raise SystemExit("[bench] --seeds sets every run's seed: drop seed= from the methods")
    for alpha in args.alphas:
        for seed in args.seeds or [None]:
            for label, strategy, overrides in methods:
                key = (label, alpha) if seed is None else (label, alpha, seed)
                results[key] = run_one(
                    label,
                    strategy,
                    overrides,
                    alpha,
                    rounds,
                    epochs,
                    supernodes,
                    args.results_dir.resolve(),
                    extra,
                    reuse=args.reuse,
                    seed=seed,
                )
    minutes = (dt.datetime.now() - started).total_seconds() / 60
    plot_path = PLOTS / f"{args.section}.png"
    plot(results, plot_path)
    accelerator = (
        f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only"
    )
    shared = {
        **STANDARD_SETTINGS,
        "local-epochs": epochs,
        "fraction-train": regime.fraction_train,
    }
    if args.seeds:
        shared["seed"] = "/".join(map(str, args.seeds))
    settings = format_overrides(shared).replace('"', "")
    lines = [
        f"## {args.section} ({args.regime} regime: {rounds} rounds x {epochs} local epoch(s); "
        f"Fashion-MNIST, {supernodes} clients, Dirichlet partitions)",
        "",
        f"- Command: `{command.strip()}`",
        f"- Date: {started:%Y-%m-%d %H:%M}; total {minutes:.1f} min for all runs",
        f"- Machine: {platform.platform()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {accelerator}",
        f"- Setup: {supernodes} simulated SuperNodes (`flwr run`, Ray backend), "
        + (
            "all training every round"
            if regime.fraction_train == 1.0
            else f"{max(2, int(supernodes * regime.fraction_train))} sampled per round "
            "(seeded, the same for every method of a seed)"
        )
        + f"; {settings}"
        + (f"; {args.extra_run_config}" if args.extra_run_config else ""),
        "- Accuracy: central test set (10k) after the round. Δ: final accuracy minus "
        "FedAvg's at the same alpha, in points. Rounds to FedAvg's final: first round at "
        "or above FedAvg's final accuracy. s/round: wall time of a round; client train s: "
        "from sending train messages to the last reply; server agg s: `aggregate_train` "
        "(FedEC: reply checks + teacher pass + distillation); its ratio is to the sum of "
        "the clients' own training seconds in that round. Bytes: serialised arrays "
        "actually sent to / received from all clients per round.",
        "",
        table(results, rounds),
        "",
    ]
    if args.seeds:
        lines += [
            f"Across seeds ({', '.join(map(str, args.seeds))}); Δ and rounds are paired "
            "with FedAvg's run of the same seed:",
            "",
            seed_summary(results),
            "",
        ]
    if regime.fraction_train < 1.0:
        teacher_plot = PLOTS / f"{args.section}-teacher.png"
        plot_teacher_vs_average(results, teacher_plot)
        lines += [
            f"Client drift (last {TAIL} rounds; teacher > average: rounds where the "
            "teacher's validation accuracy beat the parameter average's, the start of "
            "distillation; sampling: whether every method of the seed trained the same "
            "partitions in every round):",
            "",
            drift_table(results),
            "",
            sampling_check(results),
            "",
            "Per round, first seed: the sampled partitions, the classes they hold "
            "(>= 1% of their samples), and each distilling method's validation accuracy "
            "of teacher / parameter average / served student:",
            "",
            round_table(results),
            "",
            f"![teacher vs average](simulations/plots/{teacher_plot.name})",
            "",
        ]
    if args.posthoc_prior_correction:
        run_dirs = {
            key: args.results_dir.resolve()
            / run_name(key[0], key[1], epochs, key[2] if len(key) > 2 else None)
            for key in results
        }
        lines += [
            "Post-hoc prior correction of each run's saved final model (the correction "
            '`calibration="prior"` applies every round, applied once after the run; no '
            "re-training):",
            "",
            posthoc_table(results, run_dirs),
            "",
        ]
    lines += [
        f"![accuracy vs round](simulations/plots/{plot_path.name})",
    ]
    if any(strategy_of(key[0]) == "fedec" for key in results):
        lines += ["", "- " + teacher_throughput()]
    write_section(args.section, "\n".join(lines))
    print("\n".join(lines))


def strategy_of(label: str) -> str:
    return label.partition(":")[0]


if __name__ == "__main__":
    main()
