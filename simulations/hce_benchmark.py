"""FedHCE benchmark: FedAvg, FedEC and FedHCE (diversity on and off) with GPU + edge nodes.

    python simulations/hce_benchmark.py

Fashion-MNIST, alpha=0.1, 10 simulated SuperNodes -- 3 report the ``gpu`` tier and 7
the ``edge`` tier (``simulated-tiers="gpu=3,edge=7"``) -- 20 rounds, the standard
client training of ``standard_benchmark.py``, all methods in one command with the same
seeds and the same run-config (``HCE_SETTINGS``: a 2k proxy subset per round, HeteroFL
folding of pruned replies, gpu nodes -> ``int8``, edge nodes -> ``int4``: every client trains
the full-width model, so the global model keeps all clients' data in its average).
Afterwards the FedHCE runs' saved variants are re-loaded and measured on the
test set (accuracy, parameters, wire bytes, CPU latency at batch 1 and 64 in fp32 and
as an exported int8 model), next to FedEC's fp32 model. The section ``fedhce`` of
BENCHMARKS.md and ``simulations/plots/fedhce-*.png`` are rewritten.

``--seeds 42 1 2`` repeats every method per seed (partitions, initial model, batch
order) and adds a table of each target's mean ± sd, paired with FedEC's run of the
same seed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from benchkit import PLOTS, ROOT
from benchkit.plots import plot
from benchkit.report import (
    command_line,
    date_line,
    detected_device,
    machine_line,
    mean_sd,
    write_section,
)
from benchkit.runs import STANDARD_SETTINGS, parse_method, run_name, run_one
from benchkit.tables import table

from fl_ec.config import ExperimentConfig  # noqa: E402
from fl_ec.data.federated import load_server_data  # noqa: E402
from fl_ec.ensemble import teacher_logits  # noqa: E402
from fl_ec.hce import evaluate_variants, load_variants, markdown_table, report_model  # noqa: E402
from fl_ec.models.spec import count_parameters  # noqa: E402
from fl_ec.results import load_saved_model  # noqa: E402
from fl_ec.strategies.fedhce_utils import prediction_disagreement  # noqa: E402

HCE_SETTINGS = (
    'simulated-tiers="gpu=3,edge=7" proxy-per-round=2000 fold-pruned=true '
    'variants="full,int8,int4,prune-0.5+int8,prune-0.5+int4" '
    'variant-policy="gpu=int8,edge=int4" '
    'hce-ensemble="prune-0.5+int8,prune-0.5+int4,int4"'
)
DEFAULT_METHODS = ["fedavg", "fedec", "fedhce", "fedhce:diversity-weight=0.0"]


def _bytes_plot(points: list[tuple[str, str, float, float]], path: Path) -> None:
    """Accuracy vs wire bytes; ``points`` are (method, variant, bytes, accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(method for method, *_ in points))
    colours = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, variant, nbytes, accuracy in points:
        hce = variant.startswith("HCE")
        ax.scatter(
            nbytes / 1e6,
            100 * accuracy,
            marker="*" if hce else "o",
            s=80 if hce else 30,
            color=colours[method],
        )
        # Only the variant by the point: method labels are whole run-configs, which
        # overprint each other; they go in the legend below the axes.
        ax.annotate(
            variant,
            (nbytes / 1e6, 100 * accuracy),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    for method in methods:
        ax.scatter([], [], color=colours[method], label="\n".join(textwrap.wrap(method, 90)))
    ax.set_xscale("log")
    ax.set_xlabel("model bytes on the wire (MB, log scale; * = HCE ensemble)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


@dataclass(frozen=True)
class HceTargets:
    """One FedHCE run against FedEC and FedAvg of the same seed: the targets."""

    label: str
    seed: int
    hce_delta: float  # HCE ensemble minus FedEC's fp32 model, points
    hce_bytes_ratio: float  # HCE ensemble bytes / FedEC fp32 model bytes
    global_delta: float  # FedHCE's global model minus FedEC's, points
    downlink_ratio: float  # FedHCE downlink per round / FedAvg's
    disagreement: float  # test-set prediction disagreement between the HCE members
    # The same HCE ensemble before its variants' own calibration (calibrate-variants;
    # NaN when the run did not calibrate them), points vs FedEC's fp32 model.
    hce_delta_uncalibrated: float = float("nan")


def seed_summary(targets: list[HceTargets]) -> str:
    """Mean ± sd over seeds of each FedHCE method's targets (Δs paired by seed)."""
    head = [
        "method",
        "seeds",
        "HCE ensemble Δ vs FedEC fp32 (pts; target >= +1.0)",
        "HCE bytes / FedEC fp32 (<= 0.25)",
        "global Δ vs FedEC (pts; target within 0.5)",
        "downlink / FedAvg (<= 0.25)",
        "member disagreement",
        "HCE Δ before the variants' own calibration (pts)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels = list(dict.fromkeys(t.label for t in targets))
    for label in labels:
        rows = sorted((t for t in targets if t.label == label), key=lambda t: t.seed)
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    ", ".join(str(t.seed) for t in rows),
                    mean_sd([t.hce_delta for t in rows], "{:+.2f}")
                    + " ("
                    + ", ".join(f"{t.hce_delta:+.2f}" for t in rows)
                    + ")",
                    mean_sd([t.hce_bytes_ratio for t in rows], "{:.3f}"),
                    mean_sd([t.global_delta for t in rows], "{:+.2f}")
                    + " ("
                    + ", ".join(f"{t.global_delta:+.2f}" for t in rows)
                    + ")",
                    mean_sd([t.downlink_ratio for t in rows], "{:.3f}"),
                    mean_sd([t.disagreement for t in rows], "{:.3f}"),
                    mean_sd(before, "{:+.2f}") if (before := _measured(rows)) else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _measured(rows: list[HceTargets]) -> list[float]:
    """The runs' HCE Δ before variant calibration, where they calibrated (not NaN)."""
    return [t.hce_delta_uncalibrated for t in rows if not math.isnan(t.hce_delta_uncalibrated)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--section", default="fedhce")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results" / "benchmark")
    parser.add_argument("--extra-run-config", default="", help="applied to every run")
    parser.add_argument(
        "--reuse", action="store_true", help="read finished runs with the same settings"
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="repeat every method with each seed; adds a table of the targets' mean ± sd",
    )
    args = parser.parse_args()
    extra = f"{HCE_SETTINGS} {args.extra_run_config}".strip()
    # Parse every method first: a malformed override fails before an hour of runs.
    methods = [parse_method(m) for m in args.methods]
    if args.seeds and any("seed" in overrides for _, _, overrides in methods):
        raise SystemExit("[bench] --seeds sets every run's seed: drop seed= from the methods")
    started = dt.datetime.now()
    results: dict[tuple, dict] = {}
    for seed in args.seeds or [None]:
        for label, strategy, overrides in methods:
            key = (label, args.alpha) if seed is None else (label, args.alpha, seed)
            results[key] = run_one(
                label,
                strategy,
                overrides,
                args.alpha,
                args.rounds,
                1,
                10,
                args.results_dir.resolve(),
                extra,
                reuse=args.reuse,
                seed=seed,
            )
    minutes = (dt.datetime.now() - started).total_seconds() / 60

    torch.set_num_threads(1)  # latency of one inference thread, as on a small edge CPU
    config = ExperimentConfig.from_run_config({**STANDARD_SETTINGS, "alpha": args.alpha})
    # the test set does not depend on the seed
    test = load_server_data(config.data, config.seed).test
    test_x, test_y = test.normalize(test.images), test.labels
    lines_variants, target_lines, points, targets = [], [], [], []
    for seed in args.seeds or [None]:
        seed_results = {k: m for k, m in results.items() if (k[2] if len(k) > 2 else None) == seed}
        evaluated = _evaluate_seed(seed_results, seed, args, test_x, test_y)
        lines_variants += evaluated["variant_lines"]
        target_lines += evaluated["target_lines"]
        points += evaluated["points"] if seed == (args.seeds or [None])[0] else []
        targets += evaluated["targets"]
    plot_rounds = PLOTS / f"{args.section}-rounds.png"
    plot_bytes = PLOTS / f"{args.section}-accuracy-vs-bytes.png"
    plot(results, plot_rounds)
    _bytes_plot(points, plot_bytes)

    seeds_text = ", ".join(map(str, args.seeds)) if args.seeds else str(config.seed)
    body = [
        f"## {args.section} (FedAvg vs FedEC vs FedHCE; Fashion-MNIST, alpha={args.alpha:g}, "
        f"10 clients = 3 gpu + 7 edge, {args.rounds} rounds)",
        "",
        command_line("hce_benchmark.py"),
        date_line(started, minutes, prefix="total ", suffix=" for all runs"),
        machine_line(detected_device()),
        f"- Setup: standard client training (1 local epoch, SGD 0.05/0.9, clipping 10, "
        f"seed {seeds_text}) for every method; every run gets `{extra}`. FedAvg and FedEC "
        "send every node the full fp32 model; FedHCE sends each node the variant "
        "`variant-policy` names for its tier, packed. Latency: median of 30 forward passes, "
        "1 CPU thread.",
        "",
        table(results, args.rounds),
        "",
        *target_lines,
        "",
    ]
    if args.seeds:
        body += [
            f"Across seeds ({seeds_text}); each Δ is paired with FedEC's run of the same seed:",
            "",
            seed_summary(targets),
            "",
        ]
    body += [
        "Per variant (test set, 10k):",
        "",
        *lines_variants,
        f"![accuracy vs round](simulations/plots/{plot_rounds.name})",
        f"![accuracy vs bytes](simulations/plots/{plot_bytes.name})"
        + (f" (seed {args.seeds[0]})" if args.seeds else ""),
    ]
    write_section(args.section, "\n".join(body))
    print("\n".join(body))


def _evaluate_seed(results: dict[tuple, dict], seed: int | None, args, test_x, test_y) -> dict:  # noqa: ANN001
    """Re-load one seed's final models, measure them, and check the targets."""
    suffix = f" (seed {seed})" if seed is not None else ""
    down = {key[0]: _mean_bytes_down(m) for key, m in results.items()}
    final = {key[0]: m["rounds"][-1]["test-accuracy"] for key, m in results.items()}
    # The HCE before its variants' own calibration (calibrate-variants); NaN without it.
    uncalibrated_hce = {
        key[0]: m["summary"].get("hce-test-accuracy-uncalibrated", float("nan"))
        for key, m in results.items()
    }
    variant_lines, summary, points, fp32_rows = [], [], [], []
    fedec_label = next((label for label in down if label.startswith("fedec")), None)
    fp32_bytes = 0
    for label in down:
        run_dir = args.results_dir.resolve() / run_name(label, args.alpha, 1, seed)
        if label.startswith("fedhce"):
            models, index = load_variants(run_dir)
            reports = evaluate_variants(models, index, test_x, test_y)
            members = [e["name"] for e in index if e["hce"]]
            member_logits = [teacher_logits([models[m]], test_x).logits for m in members]
            variant_lines += [
                f"**{label}**{suffix} (its final variants)",
                "",
                markdown_table(reports),
                "",
            ]
            summary.append((label, reports[-1], prediction_disagreement(member_logits)))
            points += [(label, r.name, r.wire_bytes, r.accuracy) for r in reports]
        else:
            model = load_saved_model(run_dir).eval()
            params = count_parameters(model)
            report, _ = report_model(
                f"{label}: fp32 global model", model, test_x, test_y, 4 * params
            )
            fp32_rows.append(report)
            points.append((label, "fp32", report.wire_bytes, report.accuracy))
            if label == fedec_label:
                fp32_bytes = report.wire_bytes
    if fp32_rows:
        variant_lines = [
            f"**FedAvg / FedEC**{suffix}",
            "",
            markdown_table(fp32_rows),
            "",
        ] + variant_lines
    fedavg_down = down.get("fedavg", float("nan"))
    base = final.get(fedec_label, float("nan")) if fedec_label else float("nan")
    target_lines, targets = [], []
    for label, hce, disagreement in summary:
        uncalibrated = uncalibrated_hce[label]
        measured = HceTargets(
            label=label,
            seed=seed if seed is not None else -1,
            hce_delta=100 * (hce.accuracy - base),
            hce_bytes_ratio=hce.wire_bytes / max(fp32_bytes, 1),
            global_delta=100 * (final[label] - base),
            downlink_ratio=down[label] / fedavg_down,
            disagreement=disagreement,
            hce_delta_uncalibrated=100 * (uncalibrated - base),
        )
        targets.append(measured)
        target_lines.append(
            f"- **{label}**{suffix}: HCE ensemble {100 * hce.accuracy:.2f}% with "
            f"{hce.wire_bytes:,} bytes = {measured.hce_bytes_ratio:.3f}x FedEC's fp32 model "
            f"({fp32_bytes:,} B, {100 * base:.2f}%): {measured.hce_delta:+.2f} pts "
            f"(target >= +1.0 at <= 0.25x). Global model {100 * final[label]:.2f}% vs FedEC "
            f"{100 * base:.2f}% ({measured.global_delta:+.2f} pts, target within 0.5). "
            f"Downlink {down[label] / 1e6:.2f} MB/round = "
            f"{measured.downlink_ratio:.3f}x FedAvg's (target <= 0.25x). "
            f"Test-set prediction disagreement between HCE members: {disagreement:.3f}."
            + (
                f" Before the variants' own calibration the HCE ensemble scored "
                f"{100 * uncalibrated:.2f}% ({measured.hce_delta_uncalibrated:+.2f} pts)."
                if not math.isnan(uncalibrated)
                else ""
            )
        )
    return {
        "variant_lines": variant_lines,
        "target_lines": target_lines,
        "points": points,
        "targets": targets,
    }


def _mean_bytes_down(metrics: dict) -> float:
    rounds = [r for r in metrics["rounds"] if r["round"] > 0]
    return sum(r["bytes-down"] for r in rounds) / len(rounds)


if __name__ == "__main__":
    main()
