"""The device-constrained fleet: FedHCE against what an edge device can actually run.

    python simulations/fleet_benchmark.py --seeds 42 1 2
    python simulations/fleet_benchmark.py --seeds 42 --methods fedavg-small fedhce

The partial regime (20 nodes, 4 sampled per round, 5 local epochs, alpha 0.1, 15
rounds) with 6 ``gpu`` and 14 ``edge`` nodes (``simulated-tiers="gpu=6,edge=14"``). An
edge node may train a model of at most :data:`EDGE_PARAMS` of the full model's
parameters and receive at most :data:`EDGE_BYTES` of its fp32 bytes per round; gpu nodes
have no limit. Every method of a seed samples the same nodes in every round (checked).

The table gives each method's mean test accuracy of the last 5 rounds per seed, its Δ
paired by seed against the best edge-respecting baseline and against FedEC with the
full model everywhere, the largest download an edge node got in any round and the
edge model's parameters (both as a share of the full fp32 model's, with whether the
limits hold), and the server's seconds against the clients' summed training.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import torch
from benchkit import PLOTS, ROOT
from benchkit.drift import TAIL, sampling_check, tail_stats
from benchkit.plots import plot
from benchkit.report import command_line, date_line, machine_line, mean_sd, write_section
from benchkit.runs import REGIMES, STANDARD_SETTINGS, parse_method, run_one

from fl_ec.clients.settings import parse_tier_counts
from fl_ec.compression import prune_structured
from fl_ec.launch import format_overrides
from fl_ec.models.spec import ArchSpec, build_model, count_parameters, scaled_widths

TIERS = "gpu=6,edge=14"
EDGE_PARAMS = 0.3  # of the full model's parameters
EDGE_BYTES = 0.1  # of the full model's fp32 bytes, per round
GATED = 'teacher-rule="gated",client-start="average"'


@dataclass(frozen=True)
class Method:
    """One row: the run's ``strategy:overrides``, what the edge trains, the paper."""

    run: str
    edge_model: str  # "full", "width-0.5", "prune-0.5" or "none" (left out)
    respects_limit: bool  # an edge-respecting method (else a reference)
    about: str
    edge_variant: str = ""  # FedHCE: the variant edge nodes run (else the global model)


def _fedhce(variants: str, policy: str, *extra: str) -> str:
    parts = [GATED, f'variants="{variants}"', f'variant-policy="{policy}"', *extra]
    return "fedhce:" + ",".join(parts)


_HETEROFL = ("distill-steps=0", "variant-distill-steps=0")
METHODS = {
    "fedavg-full": Method("fedavg", "full", False, "FedAvg, the full model everywhere"),
    "fedec-full": Method(f"fedec:{GATED}", "full", False, "FedEC, the full model everywhere"),
    "fedavg-small": Method(
        "fedavg:model-width=0.5,downlink-bits=8",
        "width-0.5",
        True,
        "FedAvg of the half-width model on every node, int8 down",
    ),
    "fedec-gpu-only": Method(
        f'fedec:{GATED},train-tiers="gpu"', "none", True, "FedEC trained by the gpu tier only"
    ),
    "heterofl": Method(
        _fedhce("full,prune-0.5+int8", "gpu=full,edge=prune-0.5+int8", *_HETEROFL),
        "prune-0.5",
        True,
        "HeteroFL: static half-width slice on edge nodes, folded; int8 down",
        "prune-0.5+int8",
    ),
    "fiarse": Method(
        _fedhce("full,prune-0.5+int8", "gpu=full,edge=prune-0.5+int8", *_HETEROFL, "reprune=true"),
        "prune-0.5",
        True,
        "the edge slice re-chosen by magnitude every round (FIARSE-style), folded; int8 down",
        "prune-0.5+int8",
    ),
    "fedhce": Method(
        _fedhce("full,prune-0.5+int4", "gpu=full,edge=prune-0.5+int4"),
        "prune-0.5",
        True,
        "FedHCE: edge half-width, int4 on the wire, fp32 local training",
        "prune-0.5+int4",
    ),
    "fedhce-reprune": Method(
        _fedhce(
            "full,prune-0.5+int4",
            "gpu=full,edge=prune-0.5+int4",
            "reprune=true",
        ),
        "prune-0.5",
        True,
        "FedHCE, the edge's channels re-chosen by magnitude every round",
        "prune-0.5+int4",
    ),
    "fedhce-bounded": Method(
        _fedhce(
            "full,prune-0.5+int4",
            "gpu=full,edge=prune-0.5+int4",
            "reprune=true",
            "distill-steps=100",
            "variant-distill-steps=30",
        ),
        "prune-0.5",
        True,
        "fedhce-reprune with the server's distillation capped (100 + 30 steps)",
        "prune-0.5+int4",
    ),
    "fedhce-student": Method(
        _fedhce("full,prune-0.5+int4", "gpu=full,edge=prune-0.5+int4").replace(
            'client-start="average"', 'client-start="student"'
        ),
        "prune-0.5",
        True,
        "FedHCE, clients train the variants distilled from the teacher (not the average's)",
        "prune-0.5+int4",
    ),
    "fedhce-fp32-wire": Method(
        _fedhce("full,prune-0.5", "gpu=full,edge=prune-0.5"),
        "prune-0.5",
        False,
        "control: FedHCE with fp32 on the wire (breaks the bytes limit)",
        "prune-0.5",
    ),
}


def edge_parameters(edge_model: str) -> float:
    """The edge model's parameters as a share of the full CNN's (0 for no edge model)."""
    spec = ArchSpec("cnn", (1, 28, 28), 10)
    full = count_parameters(build_model(spec))
    if edge_model == "none":
        return 0.0
    if edge_model == "full":
        return 1.0
    if edge_model.startswith("width-"):
        width = float(edge_model.removeprefix("width-"))
        small = build_model(ArchSpec("cnn", (1, 28, 28), 10, scaled_widths("cnn", width)))
        return count_parameters(small) / full
    ratio = float(edge_model.removeprefix("prune-"))
    pruned = build_model(spec)
    prune_structured(pruned, torch.zeros(2, 1, 28, 28), ratio, ("classifier",))
    return count_parameters(pruned) / full


def edge_download(metrics: dict, edge_partitions: set[int]) -> int:
    """The most bytes any edge node received for training in one round of the run
    (``ValueError`` for a run that did not record which node held which partition)."""
    most = 0
    recorded = [r for r in metrics["rounds"] if "partition-by-node" in r]
    if not recorded:
        raise ValueError("the run recorded no partition-by-node: rerun it with today's code")
    for record in recorded:
        partition_of = record["partition-by-node"]
        for node, nbytes in record.get("bytes-down-by-node", {}).items():
            if partition_of.get(node) in edge_partitions:
                most = max(most, int(nbytes))
    return most


def edge_model_accuracy(metrics: dict, variant: str) -> float:
    """Mean accuracy (%) of the model edge nodes run over the last rounds: a FedHCE
    variant's on the validation set (no test pass per variant and round), else the
    global model's test accuracy."""
    rounds = [r for r in metrics["rounds"] if r["round"] > 0][-TAIL:]
    if not variant:  # the global model: its test accuracy, as in the first column
        return tail_stats(metrics)[1]
    return sum(100 * r["variant-val-accuracy"][variant] for r in rounds) / len(rounds)


def server_ratio(metrics: dict) -> float:
    """The server's aggregation seconds over the clients' summed training, whole run."""
    rounds = [r for r in metrics["rounds"] if r["round"] > 0]
    server = sum(r.get("aggregate-seconds", 0.0) for r in rounds)
    clients = sum(r.get("client-train-seconds-sum", 0.0) for r in rounds)
    return server / clients if clients else float("nan")


def fleet_table(results: dict[tuple[str, int], dict], seeds: list[int]) -> str:
    """One row per method: last-5 means per seed, paired Δs, edge limits, server time."""
    names = list(dict.fromkeys(name for name, _ in results))
    tail = {key: tail_stats(metrics)[1] for key, metrics in results.items()}
    full_bytes = 4 * count_parameters(build_model(ArchSpec("cnn", (1, 28, 28), 10)))
    tiers = parse_tier_counts(TIERS, REGIMES["partial"].supernodes)
    edge = {partition for partition, tier in enumerate(tiers) if tier == "edge"}

    def per_seed(name: str) -> list[float] | None:
        values = [tail.get((name, seed)) for seed in seeds]
        return None if None in values else values  # type: ignore[return-value]

    respecting = [n for n in names if METHODS[n].respects_limit and not n.startswith("fedhce")]
    best = max(respecting, key=lambda n: sum(per_seed(n) or [-1.0]), default=None)
    head = [
        "method",
        f"mean of last {TAIL}, per seed ({', '.join(map(str, seeds))})",
        "mean ± sd",
        f"Δ vs best edge baseline ({best or '-'}), per seed",
        "Δ vs fedec-full, per seed",
        f"edge model's accuracy, mean of last {TAIL}, per seed (FedHCE's variant: validation)",
        "edge download, max per round (x full fp32)",
        "edge params (x full)",
        "edge limits met",
        "server s / summed client train s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        values = per_seed(name)
        if values is None:
            continue
        method = METHODS[name]

        def deltas(other: str | None, values: list[float] = values) -> str:
            base = per_seed(other) if other else None
            if base is None:
                return "-"
            diff = [v - b for v, b in zip(values, base, strict=True)]
            return ", ".join(f"{d:+.2f}" for d in diff) + f" (mean {sum(diff) / len(diff):+.2f})"

        download = max(edge_download(results[(name, s)], edge) for s in seeds) / full_bytes
        params = edge_parameters(method.edge_model)
        met = download <= EDGE_BYTES and params <= EDGE_PARAMS
        ratio = sum(server_ratio(results[(name, s)]) for s in seeds) / len(seeds)
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{name}`: {method.about}",
                    " / ".join(f"{v:.2f}" for v in values),
                    mean_sd(values, "{:.2f}"),
                    deltas(best) if name != best else "-",
                    deltas("fedec-full") if name != "fedec-full" else "-",
                    "-"
                    if method.edge_model == "none"
                    else " / ".join(
                        f"{edge_model_accuracy(results[(name, s)], method.edge_variant):.2f}"
                        for s in seeds
                    ),
                    f"{download:.3f}",
                    f"{params:.3f}",
                    "yes" if met else "no",
                    f"{ratio:.2f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run every method at every seed, then rewrite the section and its plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--section", default="fleet")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results" / "fleet")
    parser.add_argument("--reuse", action="store_true", help="read finished runs again")
    parser.add_argument("--rounds", type=int, default=None, help="default 15 (a quick check: 2)")
    args = parser.parse_args()
    regime = REGIMES["partial"]
    rounds = regime.num_rounds(args.rounds)
    extra = f'fraction-train={regime.fraction_train:g} simulated-tiers="{TIERS}"'
    started = dt.datetime.now()
    results: dict[tuple[str, int], dict] = {}
    for seed in args.seeds:
        for name in args.methods:
            label, strategy, overrides = parse_method(METHODS[name].run)
            results[(name, seed)] = run_one(
                label, strategy, overrides, 0.1, rounds, regime.local_epochs,
                regime.supernodes, args.results_dir.resolve(), extra, reuse=args.reuse, seed=seed,
            )
    minutes = (dt.datetime.now() - started).total_seconds() / 60
    plot_path = PLOTS / f"{args.section}.png"
    plot({(name, 0.1, seed): m for (name, seed), m in results.items()}, plot_path)
    settings = format_overrides(
        {**STANDARD_SETTINGS, "local-epochs": regime.local_epochs, "fraction-train": 0.2}
    ).replace('"', "")
    body = [
        f"## {args.section} (the device-constrained fleet: partial regime, {rounds} rounds x "
        f"{regime.local_epochs} local epochs, 6 gpu + 14 edge nodes)",
        "",
        command_line("fleet_benchmark.py"),
        date_line(started, minutes, prefix="total ", suffix=" for all runs"),
        machine_line("CPU only"),
        f"- Setup: {regime.supernodes} simulated SuperNodes, 4 sampled per round (seeded, the "
        f"same for every method of a seed); {settings} alpha=0.1 simulated-tiers={TIERS}",
        f"- Edge limits: at most {EDGE_PARAMS:g}x the full model's parameters trained, at most "
        f"{EDGE_BYTES:g}x its fp32 bytes received per round. Runs: "
        + "; ".join(f"`{n}` = `{METHODS[n].run}`" for n in args.methods),
        "",
        fleet_table(results, args.seeds),
        "",
        sampling_check({(name, 0.1, seed): m for (name, seed), m in results.items()}),
        "",
        f"![accuracy vs round](simulations/plots/{plot_path.name})",
    ]
    write_section(args.section, "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
