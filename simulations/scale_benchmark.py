"""FedAvg and FedEC as the federation grows: 100 nodes (10% per round), 200 nodes (5%).

    python simulations/scale_benchmark.py --nodes 100 200 --seeds 42

The partial regime's client work and rounds (5 local epochs, alpha 0.1, 15 rounds) on
100 and 200 simulated SuperNodes: the 54k client samples split among more nodes (540
and 270 each) and 10 nodes sampled per round in both, so a run stays within about 15
minutes on 2 cores. Every method of a (nodes, seed) pair samples the same nodes each
round (checked). Recorded per run, from its ``metrics.json``: the mean of the last 5
rounds' test accuracy, the server's seconds per round by phase (reply checks and
aggregation as a whole, of which the teacher pass and distillation), the clients'
summed training seconds, the peak resident memory of the ServerApp's process, and the
bytes per sampled client and in total. The section ``scale`` of BENCHMARKS.md is
rewritten; its plot shows server seconds and peak memory against the number of nodes.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from benchkit import PLOTS, ROOT
from benchkit.drift import TAIL, sampled_partitions, tail_stats
from benchkit.report import command_line, date_line, machine_line, write_section
from benchkit.runs import STANDARD_SETTINGS, run_one

from fl_ec.launch import format_overrides

SECTION = "scale"
SAMPLED = 10  # nodes per round, whatever the federation's size
METHODS = ("fedavg", "fedec")  # each a strategy with its defaults (FedEC: gated teacher)


def per_round(metrics: dict, key: str) -> float:
    """Mean of ``key`` over the training rounds that recorded it."""
    values = [r[key] for r in metrics["rounds"] if r["round"] > 0 and key in r]
    return sum(values) / len(values) if values else 0.0


def client_train_seconds(metrics: dict) -> float:
    """The sampled clients' summed local training per round: FedEC records the sum of
    the seconds each reply reports; Flower's FedAvg their example-weighted mean."""
    summed = per_round(metrics, "client-train-seconds-sum")
    return summed or per_round(metrics, "client-train-seconds") * SAMPLED


def row(nodes: int, seed: int, label: str, metrics: dict, fedavg: float | None) -> str:
    _, tail_mean, _ = tail_stats(metrics)
    delta = f"{tail_mean - fedavg:+.2f}" if fedavg is not None else "-"
    server = per_round(metrics, "aggregate-seconds")
    clients = client_train_seconds(metrics)
    down = per_round(metrics, "bytes-down") / SAMPLED / 1e6
    total = sum(r["bytes-down"] + r["bytes-up"] for r in metrics["rounds"]) / 1e6
    peak = max(r.get("server-peak-rss-mb", 0.0) for r in metrics["rounds"])
    return (
        f"| {nodes} | {seed} | {label} | {tail_mean:.2f} | {delta} | {server:.1f} | "
        f"{per_round(metrics, 'teacher-seconds'):.1f} | "
        f"{per_round(metrics, 'distill-seconds'):.1f} | {clients:.0f} | "
        f"{server / clients if clients else 0:.2f}x | {peak:.0f} | "
        f"{down:.2f} | {total:.0f} |"
    )


def same_clients(results: dict[tuple, dict]) -> list[str]:
    """One line per (nodes, seed): did every method sample the same nodes each round?"""
    lines = []
    for nodes, seed in sorted({key[1:] for key in results}):
        samples = [sampled_partitions(m) for k, m in results.items() if k[1:] == (nodes, seed)]
        same = all(None not in s and s == samples[0] for s in samples)
        verdict = "the same partitions in every round" if same else "DIFFERENT partitions"
        lines.append(f"- Sampling, {nodes} nodes, seed {seed}: {verdict}.")
    return lines


def plot(points: list[tuple[int, str, float, float]], path: Path) -> None:
    """Server seconds per round and peak memory against the number of nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in sorted({p[1] for p in points}):
        mine = sorted(p for p in points if p[1] == method)
        xs = [p[0] for p in mine]
        left.plot(xs, [p[2] for p in mine], marker="o", label=method)
        right.plot(xs, [p[3] for p in mine], marker="o", label=method)
    left.set_ylabel("server seconds per round")
    right.set_ylabel("ServerApp peak RSS (MB)")
    for ax in (left, right):
        ax.set_xlabel("nodes in the federation (10 sampled per round)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results" / "scale")
    parser.add_argument("--reuse", action="store_true", help="read finished runs back")
    args = parser.parse_args()
    started = dt.datetime.now()
    results: dict[tuple, dict] = {}
    lines, points = [], []
    for nodes in args.nodes:
        for seed in args.seeds:
            extra = format_overrides(
                {"fraction-train": SAMPLED / nodes, "seed": seed, "alpha": 0.1}
            )
            fedavg = None
            for label in args.methods:
                metrics = run_one(
                    label,
                    label,
                    {},
                    0.1,
                    args.rounds,
                    5,
                    nodes,
                    args.results_dir / f"n{nodes}",
                    extra,
                    reuse=args.reuse,
                    seed=seed,
                )
                results[(label, nodes, seed)] = metrics
                lines.append(row(nodes, seed, label, metrics, fedavg))
                if label == "fedavg":
                    fedavg = tail_stats(metrics)[1]
                peak = max(r.get("server-peak-rss-mb", 0.0) for r in metrics["rounds"])
                points.append((nodes, label, per_round(metrics, "aggregate-seconds"), peak))
                print(lines[-1], flush=True)
    PLOTS.mkdir(parents=True, exist_ok=True)
    plot_path = PLOTS / "scale.png"
    plot(points, plot_path)
    minutes = (dt.datetime.now() - started).total_seconds() / 60
    body = "\n".join(
        [
            f"## FedAvg and FedEC on 100+ nodes, {SAMPLED} sampled per round",
            "",
            command_line("scale_benchmark.py"),
            date_line(started, minutes),
            machine_line(),
            f"- Settings: {STANDARD_SETTINGS['dataset']}, 5 local epochs, alpha 0.1, "
            f"{args.rounds} rounds, the full 54k client pool split among the nodes.",
            "",
            f"| nodes | seed | method | last-{TAIL} mean (%) | Δ vs FedAvg | server s/round "
            "| teacher s | distill s | clients' training s/round | server / clients | "
            "ServerApp peak RSS (MB) | MB down per client per round | MB total |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *lines,
            "",
            *same_clients(results),
            "",
            f"![server seconds and peak memory against nodes](simulations/plots/{plot_path.name})",
        ]
    )
    write_section(SECTION, body)
    print(body)


if __name__ == "__main__":
    main()
