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
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from standard_benchmark import (  # noqa: E402
    PLOTS,
    ROOT,
    STANDARD_SETTINGS,
    parse_method,
    plot,
    run_one,
    table,
    write_section,
)

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


def _bytes_plot(points: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, nbytes, accuracy in points:
        marker = "*" if label.startswith("HCE") else "o"
        ax.scatter(nbytes / 1e6, 100 * accuracy, marker=marker, s=80 if marker == "*" else 30)
        ax.annotate(
            label,
            (nbytes / 1e6, 100 * accuracy),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("model bytes on the wire (MB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
    args = parser.parse_args()
    command = "python simulations/hce_benchmark.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    extra = f"{HCE_SETTINGS} {args.extra_run_config}".strip()
    started = dt.datetime.now()
    results = {}
    # Parse every method first: a malformed override fails before an hour of runs.
    for label, strategy, overrides in [parse_method(m) for m in args.methods]:
        metrics = run_one(
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
        )
        results[(label, args.alpha)] = metrics
    minutes = (dt.datetime.now() - started).total_seconds() / 60

    torch.set_num_threads(1)  # latency of one inference thread, as on a small edge CPU
    config = ExperimentConfig.from_run_config({**STANDARD_SETTINGS, "alpha": args.alpha})
    test = load_server_data(config).test
    test_x, test_y = test.normalize(test.images), test.labels
    down = {label: _mean_bytes_down(m) for (label, _), m in results.items()}
    final = {label: m["rounds"][-1]["test-accuracy"] for (label, _), m in results.items()}
    lines_variants, summary, points, fp32_rows = [], [], [], []
    fedec_label = next((label for label in down if label.startswith("fedec")), None)
    fp32_bytes = 0
    for label in down:
        run_dir = args.results_dir.resolve() / _run_name(label, args.alpha)
        if label.startswith("fedhce"):
            models, index = load_variants(run_dir)
            reports = evaluate_variants(models, index, test_x, test_y)
            members = [e["name"] for e in index if e["hce"]]
            member_logits = [teacher_logits([models[m]], test_x).logits for m in members]
            lines_variants += [f"**{label}** (its final variants)", "", markdown_table(reports), ""]
            summary.append((label, reports[-1], prediction_disagreement(member_logits)))
            points += [(f"{label}: {r.name}", r.wire_bytes, r.accuracy) for r in reports]
        else:
            model = load_saved_model(run_dir).eval()
            params = count_parameters(model)
            report, _ = report_model(
                f"{label}: fp32 global model", model, test_x, test_y, 4 * params
            )
            fp32_rows.append(report)
            points.append((f"{label} fp32", report.wire_bytes, report.accuracy))
            if label == fedec_label:
                fp32_bytes = report.wire_bytes
    if fp32_rows:
        lines_variants = ["**FedAvg / FedEC**", "", markdown_table(fp32_rows), ""] + lines_variants
    plot_rounds = PLOTS / f"{args.section}-rounds.png"
    plot_bytes = PLOTS / f"{args.section}-accuracy-vs-bytes.png"
    plot(results, plot_rounds)
    _bytes_plot(points, plot_bytes)

    fedavg_down = down.get("fedavg")
    target_lines = []
    for label, hce, disagreement in summary:
        base = final.get(fedec_label, float("nan")) if fedec_label else float("nan")
        target_lines.append(
            f"- **{label}**: HCE ensemble {100 * hce.accuracy:.2f}% with {hce.wire_bytes:,} "
            f"bytes = {hce.wire_bytes / max(fp32_bytes, 1):.3f}x FedEC's fp32 model "
            f"({fp32_bytes:,} B, {100 * base:.2f}%): {100 * (hce.accuracy - base):+.2f} pts "
            f"(target >= +1.0 at <= 0.25x). Global model {100 * final[label]:.2f}% vs FedEC "
            f"{100 * base:.2f}% ({100 * (final[label] - base):+.2f} pts, target within 0.5). "
            f"Downlink {down[label] / 1e6:.2f} MB/round = "
            f"{down[label] / fedavg_down:.3f}x FedAvg's (target <= 0.25x). "
            f"Test-set prediction disagreement between HCE members: {disagreement:.3f}."
        )
    accelerator = (
        f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only"
    )
    body = [
        f"## {args.section} (FedAvg vs FedEC vs FedHCE; Fashion-MNIST, alpha={args.alpha:g}, "
        f"10 clients = 3 gpu + 7 edge, {args.rounds} rounds)",
        "",
        f"- Command: `{command.strip()}`",
        f"- Date: {started:%Y-%m-%d %H:%M}; total {minutes:.1f} min for all runs",
        f"- Machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{accelerator}",
        f"- Setup: standard client training (1 local epoch, SGD 0.05/0.9, clipping 10, seed 42) "
        f"for every method; every run gets `{extra}`. FedAvg and FedEC send every node the "
        "full fp32 model; FedHCE sends each node the variant `variant-policy` names for its "
        "tier, packed. Latency: median of 30 forward passes, 1 CPU thread.",
        "",
        table(results, args.rounds),
        "",
        *target_lines,
        "",
        "Per variant (test set, 10k):",
        "",
        *lines_variants,
        f"![accuracy vs round](simulations/plots/{plot_rounds.name})",
        f"![accuracy vs bytes](simulations/plots/{plot_bytes.name})",
    ]
    write_section(args.section, "\n".join(body))
    print("\n".join(body))


def _run_name(label: str, alpha: float) -> str:
    return (
        "bench-"
        + "".join(c if c.isalnum() or c in ".-" else "_" for c in label)
        + f"-a{alpha:g}-e1"
    )


def _mean_bytes_down(metrics: dict) -> float:
    rounds = [r for r in metrics["rounds"] if r["round"] > 0]
    return sum(r["bytes-down"] for r in rounds) / len(rounds)


if __name__ == "__main__":
    main()
