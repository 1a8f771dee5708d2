"""The HCE ensemble as the paper claims it: accuracy against bytes and CPU latency.

    python simulations/hce_frontier.py results/fleet/<fedhce run> [<run> ...]

For each finished ``strategy=fedhce`` run, every saved variant and every ensemble of
two or more of them (mean logits) is scored on the run's test set, with its bytes on
the wire (the members' payloads added up) and its CPU latency at batch 1 and 64 (the
members run one after another, so latencies add up). An ensemble *pays* when it beats
the best single variant of equal or fewer bytes; the table gives, per run, the best
such margin, the ensemble that reaches it and how often its members disagree (an
ensemble of models that agree can gain nothing). One plot per section: accuracy
against bytes and against batch-1 latency, single variants and ensembles.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from benchkit import PLOTS  # noqa: E402
from benchkit.report import command_line, date_line, machine_line, write_section  # noqa: E402

from fl_ec.hce import load_variants, report_model  # noqa: E402
from fl_ec.hce_eval import run_test_set  # noqa: E402
from fl_ec.scoring import accuracy  # noqa: E402
from fl_ec.strategies.fedhce_utils import prediction_disagreement  # noqa: E402

GAIN_TARGET = 1.0  # points over the best single model at equal or fewer bytes


@dataclass(frozen=True)
class Point:
    """One single variant or one ensemble: its members, accuracy (%), bytes, latency."""

    members: tuple[str, ...]
    accuracy: float
    wire_bytes: int
    latency_b1_ms: float
    latency_b64_ms: float
    disagreement: float = 0.0


def frontier(run_dir: Path, latency: bool = True) -> list[Point]:
    """Every variant of ``run_dir`` and every ensemble of two or more of them."""
    models, index = load_variants(run_dir)
    test_x, test_y = run_test_set(run_dir)
    entries = {entry["name"]: entry for entry in index}
    logits, singles = {}, {}
    for name, model in models.items():
        report, logits[name] = report_model(
            name, model, test_x, test_y, int(entries[name]["wire-bytes"]), None, latency
        )
        singles[name] = report
    points = []
    for size in range(1, len(models) + 1):
        for members in itertools.combinations(models, size):
            member_logits = [logits[m] for m in members]
            points.append(
                Point(
                    members,
                    100 * accuracy(torch.stack(member_logits).mean(0), test_y),
                    sum(singles[m].wire_bytes for m in members),
                    sum(singles[m].latency_b1_ms for m in members),
                    sum(singles[m].latency_b64_ms for m in members),
                    prediction_disagreement(member_logits),
                )
            )
    return points


def best_margin(points: list[Point]) -> tuple[float, Point | None, Point | None]:
    """The largest gain of an ensemble over the best single variant of no more bytes."""
    singles = [p for p in points if len(p.members) == 1]
    best: tuple[float, Point | None, Point | None] = (float("-inf"), None, None)
    for ensemble in (p for p in points if len(p.members) > 1):
        rivals = [s for s in singles if s.wire_bytes <= ensemble.wire_bytes]
        rival = max(rivals, key=lambda s: s.accuracy)
        margin = ensemble.accuracy - rival.accuracy
        if margin > best[0]:
            best = (margin, ensemble, rival)
    return best


def plot_frontier(runs: dict[str, list[Point]], path: Path) -> None:
    """Accuracy against bytes and against batch-1 latency, one colour per run."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for colour, (label, points) in zip(plt.cm.tab10.colors, runs.items(), strict=False):
        for axis, x in ((axes[0], "wire_bytes"), (axes[1], "latency_b1_ms")):
            for size, marker in ((1, "o"), (2, "x")):
                chosen = [p for p in points if (len(p.members) == 1) == (size == 1)]
                axis.scatter(
                    [getattr(p, x) for p in chosen],
                    [p.accuracy for p in chosen],
                    marker=marker,
                    color=colour,
                    label=f"{label}: {'single variants' if size == 1 else 'ensembles'}",
                    alpha=0.8,
                )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bytes on the wire")
    axes[1].set_xlabel("CPU latency, batch 1 (ms, members added up)")
    for axis in axes:
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Score every variant and ensemble of each run, then write the section and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished strategy=fedhce runs")
    parser.add_argument("--labels", nargs="*", default=None, help="one per run")
    parser.add_argument("--section", default="hce-frontier")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for latency")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = dt.datetime.now()
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("hce_frontier: give one --labels entry per run")
    pairs = zip(labels, args.runs, strict=True)
    runs = {label: frontier(run, not args.no_latency) for label, run in pairs}
    plot_path = PLOTS / f"{args.section}.png"
    plot_frontier(runs, plot_path)
    head = [
        "run",
        "best single variant: acc, bytes, ms b1",
        f"best ensemble margin over the best single at <= its bytes (target +{GAIN_TARGET:g})",
        "that ensemble: acc, bytes, ms b1",
        "its members' disagreement",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, points in runs.items():
        single = max((p for p in points if len(p.members) == 1), key=lambda p: p.accuracy)
        margin, ensemble, rival = best_margin(points)
        lines.append(
            f"| {label} | {single.members[0]}: {single.accuracy:.2f}, {single.wire_bytes:,}, "
            f"{single.latency_b1_ms:.3f} | {margin:+.2f} (vs {rival.members[0]}) | "
            f"{{{', '.join(ensemble.members)}}}: {ensemble.accuracy:.2f}, "
            f"{ensemble.wire_bytes:,}, {ensemble.latency_b1_ms:.3f} | "
            f"{ensemble.disagreement:.3f} |"
            if ensemble is not None and rival is not None
            else f"| {label} | {single.members[0]}: {single.accuracy:.2f} | one variant: no "
            "ensemble | - | - |"
        )
    body = "\n".join(
        [
            f"## {args.section} (HCE ensembles against single variants: accuracy, bytes, "
            "CPU latency)",
            "",
            command_line("hce_frontier.py"),
            date_line(started),
            machine_line("CPU only", cores=args.threads),
            "- Every saved variant of each run and every ensemble of two or more (mean "
            "logits), on the 10k test set; bytes and batch-1 latency of an ensemble are its "
            "members' added up.",
            "",
            *lines,
            "",
            f"![accuracy vs bytes and latency](simulations/plots/{plot_path.name})",
        ]
    )
    write_section(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
