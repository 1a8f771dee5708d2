"""``fl-ec-compare``: FedAvg next to the chosen strategy, one federation, one plot.

Runs the app twice through ``flwr run`` (as ``fl-ec-run`` does, with its pre-flight
check and honest exit code): first FedAvg, then the strategy the run-config chooses
(``strategy="fedec"`` by default), with every other knob the same -- the same
federation, seed and data, and, through seeded sampling, the same clients each round.
FedAvg takes no calibration, so its run sets ``calibration="none"``. Then it draws both
runs' test accuracy per round, and against the bytes sent, into
``<results-dir>/compare-<stamp>/`` and prints a table: final and last-5-round accuracy,
megabytes sent, and wall seconds of each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_ec.errors import FlEcError
from fl_ec.launch import (
    FlowerCli,
    absolute_results_dir,
    add_run_arguments,
    app_defaults,
    leave_local_superlink,
    merge_overrides,
    parse_overrides,
    preflight,
)

BASELINE = 'strategy="fedavg" calibration="none"'
LAST_ROUNDS = 5


@dataclass(frozen=True)
class ComparedRun:
    """One side of the comparison: its label and run folder."""

    label: str
    run_dir: Path

    def rounds(self) -> list[dict[str, Any]]:
        return json.loads((self.run_dir / "metrics.json").read_text())["rounds"]


def summary_rows(runs: list[ComparedRun]) -> list[str]:
    """The printed table: final and last-5 test accuracy, MB sent, wall seconds."""
    rows = [
        f"| method | final acc (%) | last-{LAST_ROUNDS} mean (%) | MB sent (down + up) | seconds |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        rounds = run.rounds()
        accuracy = [100 * r["test-accuracy"] for r in rounds if "test-accuracy" in r]
        last = accuracy[-LAST_ROUNDS:]
        sent = sum(r["bytes-down"] + r["bytes-up"] for r in rounds) / 1e6
        seconds = sum(r["wall-seconds"] for r in rounds)
        rows.append(
            f"| {run.label} | {accuracy[-1]:.2f} | {sum(last) / len(last):.2f} | "
            f"{sent:.1f} | {seconds:.0f} |"
        )
    return rows


def plot_comparison(runs: list[ComparedRun], out_dir: Path) -> list[Path]:
    """``accuracy.png`` (test accuracy per round) and ``accuracy_vs_bytes.png`` (against
    the megabytes sent so far), every run on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, x_label in (
        ("accuracy.png", "round"),
        ("accuracy_vs_bytes.png", "model bytes sent down + up so far (MB)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in runs:
            sent, points = 0.0, []
            for record in run.rounds():
                sent += (record["bytes-down"] + record["bytes-up"]) / 1e6
                if "test-accuracy" in record:
                    x = record["round"] if x_label == "round" else sent
                    points.append((x, 100 * record["test-accuracy"]))
            ax.plot(*zip(*points, strict=True), marker="o", label=run.label)
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fl-ec-compare",
        description="Run FedAvg and the chosen strategy on the same federation and seed "
        "(flwr run, one after the other) and draw both on one accuracy plot.",
    )
    add_run_arguments(
        parser,
        'the chosen strategy\'s run, e.g. \'strategy="fedhce" num-server-rounds=5\'; '
        "FedAvg runs with the same knobs",
    )
    args = parser.parse_args(argv)
    app_dir = Path(args.app).resolve()
    local = args.superlink is None
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        chosen = merge_overrides(args.run_config)
        strategy = str(
            parse_overrides(chosen).get("strategy", app_defaults(app_dir).get("strategy"))
        )
        if strategy == "fedavg":
            raise FlEcError(
                'fl-ec-compare runs FedAvg next to another strategy: set --run-config '
                "'strategy=\"fedec\"' (or fedhce)"
            )
        sides = [("fedavg", merge_overrides(chosen, BASELINE)), (strategy, chosen)]
        configs = []
        for label, config in sides:
            config = merge_overrides(config, f'run-name="compare-{stamp}-{label}"')
            preflight(app_dir, parse_overrides(config), args.supernodes if local else None)
            if local:
                config, results = absolute_results_dir(app_dir, config)
            else:
                results = Path(str(parse_overrides(config).get("results-dir", "results")))
            configs.append((label, config, results / f"compare-{stamp}-{label}"))
        cli = FlowerCli(superlink=args.superlink)
        print(f"fl-ec: results -> {configs[0][2].parent}", flush=True)
    except FlEcError as err:
        print(f"fl-ec error: {err}", file=sys.stderr)
        return 2
    already_running = cli.local_superlink_pids() if local else []
    try:
        for label, config, _ in configs:
            run_id = cli.submit(app_dir, config, args.supernodes if local else None)
            print(f"fl-ec: {label}: submitted run {run_id}; streaming its logs", flush=True)
            cli.stream_logs(run_id)
            outcome = cli.wait(run_id, timeout=120, follow=False)
            if not outcome.completed:
                reason = f"{outcome.status}: {outcome.details}"
                print(f"fl-ec: {label} ended as {reason}", file=sys.stderr)
                return 1
    finally:
        if local:
            leave_local_superlink(cli, already_running, keep=False)
    runs = [ComparedRun(label, run_dir) for label, _, run_dir in configs]
    if not all((run.run_dir / "metrics.json").is_file() for run in runs):
        print(
            "fl-ec: the run folders are not on this machine (a remote SuperLink): "
            f"plot them where the ServerApp wrote {', '.join(str(r.run_dir) for r in runs)}",
            file=sys.stderr,
        )
        return 0
    out_dir = runs[0].run_dir.parent / f"compare-{stamp}"
    plots = plot_comparison(runs, out_dir)
    table = summary_rows(runs)
    (out_dir / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(["", *table, "", *(f"fl-ec: plot -> {path}" for path in plots)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
