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
from pathlib import Path

from benchkit import PLOTS, ROOT
from benchkit.drift import TAIL, drift_table, round_table, sampling_check
from benchkit.plots import plot, plot_teacher_vs_average
from benchkit.report import command_line, date_line, detected_device, machine_line, write_section
from benchkit.runs import REGIMES, STANDARD_SETTINGS, parse_method, run_name, run_one, strategy_of
from benchkit.tables import posthoc_table, seed_summary, table
from benchkit.throughput import teacher_throughput

from fl_ec.launch import format_overrides


def main() -> None:
    """Run every method at every alpha (and seed), then rewrite the section and its plots."""
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
        command_line("standard_benchmark.py"),
        date_line(started, minutes, prefix="total ", suffix=" for all runs"),
        machine_line(detected_device()),
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


if __name__ == "__main__":
    main()
