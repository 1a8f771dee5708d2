"""Byzantine clients: FedAvg, FedEC and robust FedEC under each simulated attack, per seed.

    python simulations/byzantine_benchmark.py --seeds 42 1 2

Every run is a real local Flower simulation (``flwr run``, 10 SuperNodes, Dirichlet
alpha=0.1 partitions of Fashion-MNIST, all clients training every round). In each
attacked run, simulated partitions 0 and 1 (``--attackers``) are Byzantine
(``attack="<kind>:2"``, see ``fl_ec/clients/attacks.py``); they report honest example
and class counts, so they pass every reply check. Methods, side by side on the same
partitions and seeds:

- ``fedavg``: Flower's FedAvg;
- ``fedec``: FedEC as the README recommends it (no distillation, dense-mixture feature
  calibration every 5 rounds and at the last);
- ``fedec-robust``: the same with ``robust-start`` (``--robust``, default a
  coordinate-wise trimmed mean dropping 2 clients per side).

The summary compares every final accuracy with FedEC's clean run of the same seed: the
robust configuration under attack should stay within 2 points of it, and cost at most
0.5 points when nobody attacks. The table replaces the section ``--section`` of
BENCHMARKS.md, with machine, date and command.

The runs are small (``--train-subset`` client samples, ``--rounds`` rounds of one local
epoch) so that 3 seeds x 5 attack settings x 3 methods fit in well under two hours on 2
cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from benchkit import ROOT
from benchkit.report import (
    command_line,
    date_line,
    detected_device,
    machine_line,
    mean_sd,
    write_section,
)
from benchkit.runs import run_one

from fl_ec.clients.attacks import ATTACKS

ALPHA = 0.1
SUPERNODES = 10
CLEAN = "none"
HEADLINE = {
    "distill-steps": 0,
    "calibration": "dense-mixture",
    "calibration-rounds": "every-5",
}
MAX_ATTACK_GAP = 2.0  # points below FedEC's clean run, under attack
MAX_CLEAN_COST = 0.5  # points below FedEC's clean run, nobody attacking


def methods(robust: str) -> dict[str, tuple[str, dict]]:
    """Method label -> (strategy, its run-config overrides)."""
    return {
        "fedavg": ("fedavg", {}),
        "fedec": ("fedec", dict(HEADLINE)),
        "fedec-robust": ("fedec", {**HEADLINE, "robust-start": robust}),
    }


def final_accuracy(metrics: dict) -> float:
    """The last round's central test accuracy, in percent."""
    return 100.0 * metrics["rounds"][-1]["test-accuracy"]


def rejected(metrics: dict) -> int:
    """Train replies rejected over the whole run (attackers pass every check: 0)."""
    return sum(r.get("rejected-replies", 0) for r in metrics["rounds"])


def gap_cell(gaps: list[float], limit: float) -> str:
    """Mean ± sd of ``gaps`` (points below the clean run), the worst seed and the verdicts."""
    mean, worst = sum(gaps) / len(gaps), max(gaps)
    verdict = "every seed" if worst <= limit else "the mean" if mean <= limit else "no"
    return f"{mean_sd(gaps, '{:+.2f}')} (worst {worst:+.2f}; ≤ {limit:g}: {verdict})"


def summary(
    finals: dict[tuple[str, str, int], float], attacks: list[str], seeds: list[int]
) -> str:
    """One row per attack: each method's mean ± sd, and robust FedEC's gap to clean FedEC."""
    lines = [
        "| attack | FedAvg | FedEC | FedEC robust | robust FedEC below clean FedEC (pts) |",
        "|---|---|---|---|---|",
    ]
    for attack in attacks:
        cells = [
            mean_sd([finals[(attack, method, seed)] for seed in seeds], "{:.2f}")
            for method in ("fedavg", "fedec", "fedec-robust")
        ]
        gaps = [finals[(CLEAN, "fedec", s)] - finals[(attack, "fedec-robust", s)] for s in seeds]
        limit = MAX_CLEAN_COST if attack == CLEAN else MAX_ATTACK_GAP
        lines.append(f"| {attack} | " + " | ".join(cells) + f" | {gap_cell(gaps, limit)} |")
    return "\n".join(lines)


def per_seed(
    finals: dict[tuple[str, str, int], float],
    rejections: dict[tuple[str, str, int], int],
    attacks: list[str],
    seeds: list[int],
) -> str:
    """Every run's final accuracy and its rejected replies."""
    lines = [
        "| attack | seed | FedAvg | FedEC | FedEC robust | rejected replies (all runs) |",
        "|---|---|---|---|---|---|",
    ]
    for attack in attacks:
        for seed in seeds:
            keys = [(attack, method, seed) for method in ("fedavg", "fedec", "fedec-robust")]
            accuracies = " | ".join(f"{finals[key]:.2f}" for key in keys)
            lines.append(
                f"| {attack} | {seed} | {accuracies} | {sum(rejections[k] for k in keys)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument(
        "--attacks",
        nargs="+",
        default=[CLEAN, *ATTACKS],
        choices=[CLEAN, *ATTACKS],
        help=f"'{CLEAN}' is the clean run every gap is measured against",
    )
    parser.add_argument("--attackers", type=int, default=2)
    parser.add_argument("--robust", default="trimmed-mean:2", help="robust-start of fedec-robust")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--section", default="byzantine-clients")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results" / "byzantine")
    parser.add_argument(
        "--reuse", action="store_true", help="read finished runs with the same settings"
    )
    args = parser.parse_args()
    if CLEAN not in args.attacks:
        raise SystemExit(f"[byzantine] --attacks must include '{CLEAN}': gaps are measured to it")
    started = dt.datetime.now()
    finals: dict[tuple[str, str, int], float] = {}
    rejections: dict[tuple[str, str, int], int] = {}
    for seed in args.seeds:
        for attack in args.attacks:
            extra = f"train-subset={args.train_subset}"
            if attack != CLEAN:
                extra += f' attack="{attack}:{args.attackers}"'
            for label, (strategy, overrides) in methods(args.robust).items():
                metrics = run_one(
                    label,
                    strategy,
                    overrides,
                    ALPHA,
                    args.rounds,
                    1,
                    SUPERNODES,
                    # run_one names a run by method, alpha, epochs and seed: one folder
                    # per attack keeps the attacks' runs apart.
                    args.results_dir.resolve() / attack,
                    extra,
                    reuse=args.reuse,
                    seed=seed,
                )
                finals[(attack, label, seed)] = final_accuracy(metrics)
                rejections[(attack, label, seed)] = rejected(metrics)
                print(
                    f"[byzantine] seed {seed} {attack} {label}: "
                    f"{finals[(attack, label, seed)]:.2f}",
                    flush=True,
                )
    minutes = (dt.datetime.now() - started).total_seconds() / 60
    lines = [
        f"## {args.section} (Byzantine clients: {args.attackers} of {SUPERNODES} attack; "
        f"alpha={ALPHA:g}, {args.rounds} rounds x 1 local epoch, "
        f"{args.train_subset} client samples)",
        "",
        command_line("byzantine_benchmark.py"),
        date_line(started, minutes, prefix="total ", suffix=" for all runs"),
        machine_line(detected_device()),
        f"- Setup: {SUPERNODES} simulated SuperNodes (`flwr run`, Ray backend), all training "
        f"every round; partitions 0-{args.attackers - 1} attack. FedEC: "
        + ", ".join(f"{k}={v}" for k, v in HEADLINE.items())
        + f"; FedEC robust: the same with robust-start={args.robust}.",
        "- Final central test accuracy (10k), mean ± sd over seeds "
        f"{', '.join(map(str, args.seeds))}. Gap: FedEC's clean run minus robust FedEC's, "
        "paired by seed (positive = below clean).",
        "",
        summary(finals, args.attacks, args.seeds),
        "",
        "Every run:",
        "",
        per_seed(finals, rejections, args.attacks, args.seeds),
    ]
    write_section(args.section, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
