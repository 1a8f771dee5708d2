"""The standard fl-ec benchmark: strategies x alphas on Fashion-MNIST, via real `flwr run`.

    python simulations/standard_benchmark.py                  # FedAvg, alpha 0.1 and 0.5
    python simulations/standard_benchmark.py --strategies fedavg fedec --rounds 20

Every run is a real local Flower simulation (10 SuperNodes by default) with its own
FLWR_HOME and ports; the numbers come from each run's ``metrics.json``. The table
(test accuracy every 5 rounds, seconds per round split into client training and
server aggregation, bytes per round, and accuracy ratios against FedAvg) replaces this
benchmark's section of BENCHMARKS.md, with the machine, date and command.

Settings shared by every method live in ``STANDARD_SETTINGS`` below so that later
strategies are compared on exactly the same data, partitions and seeds.
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
from pathlib import Path

import torch

from fl_ec.launch import FlowerCli, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SECTION = "standard-benchmark"

# Full Fashion-MNIST minus the server's 5k proxy + 1k validation hold-out (54k client
# samples), 1 local epoch, batch 32, SGD lr 0.05 momentum 0.9, seed 42.
STANDARD_SETTINGS = {
    "dataset": '"fashion-mnist"',
    "model": '"cnn"',
    "partitioner": '"dirichlet"',
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


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def run_one(
    strategy: str, alpha: float, rounds: int, supernodes: int, results_dir: Path, extra: str
) -> dict:
    run_name = f"bench-{strategy}-a{alpha:g}"
    settings = {
        **STANDARD_SETTINGS,
        "strategy": f'"{strategy}"',
        "alpha": alpha,
        "num-server-rounds": rounds,
        "run-name": f'"{run_name}"',
        "results-dir": f'"{results_dir}"',
    }
    # Extras override the standard settings (a TOML string must not repeat a key).
    settings.update({k: toml_value(v) for k, v in parse_overrides(extra).items()})
    run_config = " ".join(f"{k}={v}" for k, v in settings.items())
    with tempfile.TemporaryDirectory(prefix="flec-bench-") as home:
        cli = FlowerCli(home=Path(home), isolated=True)
        try:
            run_id = cli.submit(ROOT, run_config, supernodes)
            print(f"[bench] {strategy} alpha={alpha}: run {run_id}", flush=True)
            outcome = cli.wait(run_id, timeout=3 * 3600, poll=5)
        finally:
            cli.stop_local_superlink()
    if not outcome.completed:
        raise SystemExit(
            f"[bench] {strategy} alpha={alpha} ended {outcome.status}: {outcome.details}"
        )
    metrics = json.loads((results_dir / run_name / "metrics.json").read_text())
    metrics["elapsed-seconds"] = outcome.info.get("elapsed")
    return metrics


def table(results: dict[tuple[str, float], dict], rounds: int) -> str:
    checkpoints = sorted({r for r in range(5, rounds + 1, 5)} | {rounds})
    head = (
        ["method", "alpha"]
        + [f"acc@{r}" for r in checkpoints]
        + [
            "acc ratio vs FedAvg",
            "s/round",
            "client train s",
            "server agg s",
            "MB down/round",
            "MB up/round",
            "run s (incl. start-up)",
        ]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (strategy, alpha), metrics in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        by_round = {r["round"]: r for r in metrics["rounds"]}
        accs = [
            100 * by_round[r]["test-accuracy"] if r in by_round else float("nan")
            for r in checkpoints
        ]
        base = results.get(("fedavg", alpha))
        ratio = (
            (metrics["summary"]["final-test-accuracy"] / base["summary"]["final-test-accuracy"])
            if base
            else float("nan")
        )
        summary = metrics["summary"]
        lines.append(
            "| "
            + " | ".join(
                [strategy, f"{alpha:g}"]
                + [f"{a:.2f}" for a in accs]
                + [
                    f"{ratio:.3f}",
                    f"{summary['mean-round-seconds']:.1f}",
                    f"{summary['mean-train-seconds']:.1f}",
                    f"{summary['mean-aggregate-seconds']:.2f}",
                    f"{summary['mean-bytes-down'] / 1e6:.2f}",
                    f"{summary['mean-bytes-up'] / 1e6:.2f}",
                    f"{metrics.get('elapsed-seconds') or float('nan'):.0f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def write_section(body: str) -> None:
    begin, end = f"<!-- {SECTION}:begin -->", f"<!-- {SECTION}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", default=["fedavg"])
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.5])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--supernodes", type=int, default=10)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results" / "benchmark")
    parser.add_argument(
        "--extra-run-config",
        default="",
        help="appended to every run's --run-config (same for all methods)",
    )
    args = parser.parse_args()
    command = "python simulations/standard_benchmark.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    started = dt.datetime.now()
    results = {}
    for alpha in args.alphas:
        for strategy in args.strategies:
            results[(strategy, alpha)] = run_one(
                strategy,
                alpha,
                args.rounds,
                args.supernodes,
                args.results_dir.resolve(),
                args.extra_run_config,
            )
    minutes = (dt.datetime.now() - started).total_seconds() / 60
    accelerator = (
        f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only"
    )
    settings = ", ".join(f"{k}={v}".replace('"', "") for k, v in STANDARD_SETTINGS.items())
    body = "\n".join(
        [
            f"## Standard benchmark (Fashion-MNIST, {args.supernodes} clients, "
            "Dirichlet partitions)",
            "",
            f"- Command: `{command.strip()}`",
            f"- Date: {started:%Y-%m-%d %H:%M}; total {minutes:.1f} min for all runs",
            f"- Machine: {platform.platform()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {accelerator}",
            f"- Setup: {args.supernodes} simulated SuperNodes (`flwr run`, Ray backend), "
            f"{args.rounds} rounds, {settings}"
            + (f", {args.extra_run_config}" if args.extra_run_config else ""),
            "- Accuracy: central test set (10k) after the round. s/round: wall time of a round; "
            "client train s: from sending train messages to the last reply; server agg s: "
            "`aggregate_train`. Bytes: serialised arrays actually sent to / received from "
            "all clients in a round. Ratio: final accuracy / FedAvg's at the same alpha.",
            "",
            table(results, args.rounds),
        ]
    )
    write_section(body)
    print(body)


if __name__ == "__main__":
    main()
