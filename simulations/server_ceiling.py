"""How far could any server-side fix of a finished run's final model go? An oracle bound.

    python simulations/server_ceiling.py --runs RUN_DIR [RUN_DIR ...]

FedEC's server sees unlabelled proxy images and a 1k validation split; its fixes of the
averaged model (the label-prior correction, distillation from the client ensemble) can
only re-weigh what the clients' models already know. This command asks what a server
with *every* label of the clients' data could get by retraining parts of the final model
with its convolutions frozen:

* ``classifier``: the last linear layer only. No fix of the classifier alone -- the
  prior correction, classifier calibration with client feature statistics (CCVR), any
  re-weighting of the output -- can beat this, up to the optimiser's noise;
* ``dense``: every ``nn.Linear`` layer (for the small CNN: fc1 and the classifier).

Both are oracles -- they use labels no server has -- so they bound what is reachable,
not what FedEC should do. Next to them: the run's final accuracy and the post-hoc prior
correction (:mod:`benchkit.posthoc`), so the share of the classifier-only headroom the
correction already takes is read off one row. Training: Adam 1e-3, batch 128,
``--epochs`` passes over the client pool (the rows the clients train on), fixed seed.
The section ``server-ceiling`` of BENCHMARKS.md is rewritten.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch
from benchkit.posthoc import posthoc_prior_correction, run_data
from benchkit.report import command_line, date_line, machine_line, mean_sd, write_section
from torch import nn

from fl_ec.calibration import classifier_of
from fl_ec.results import load_saved_model
from fl_ec.scoring import model_accuracy

PARTS = ("classifier", "dense")


def trainable_layers(model: nn.Module, part: str) -> list[nn.Module]:
    """The layers ``part`` names: the classifier, or every linear layer."""
    if part == "classifier":
        return [classifier_of(model)]
    if part == "dense":
        return [m for m in model.modules() if isinstance(m, nn.Linear)]
    raise ValueError(f"part {part!r}: choose one of {', '.join(PARTS)}")


def oracle_retrain(
    model: nn.Module,
    part: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> nn.Module:
    """Retrain only ``part`` of ``model`` (in place) with cross-entropy on labelled data."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    params = [p for layer in trainable_layers(model, part) for p in layer.parameters()]
    for parameter in params:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    # eval(): no layer of the frozen feature extractor (BatchNorm, dropout) may change.
    model.eval()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(batch_size):
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def measure(run_dir: Path, metrics: dict, epochs: int, seed: int) -> dict[str, float] | None:
    """Final, post-hoc corrected and oracle accuracies of one run; None without a model."""
    if not (run_dir / "final_model.pt").exists():
        return None
    data = run_data(metrics)  # loaded once, for the correction and the oracles
    corrected = posthoc_prior_correction(run_dir, metrics, data)
    _, server, train, pool = data
    pool = torch.as_tensor(pool)
    inputs, labels = server.test.normalize(train.images[pool]), train.labels[pool]
    test_x, test_y = server.test.normalize(server.test.images), server.test.labels
    row = {"final": corrected[0], "corrected": corrected[1]}
    for part in PARTS:
        torch.manual_seed(seed)
        model = oracle_retrain(load_saved_model(run_dir), part, inputs, labels, epochs, seed=seed)
        row[part] = model_accuracy(model, test_x, test_y)
    return row


def regime_of(metrics: dict) -> str:
    """``"20 x 1"``: rounds x local epochs, the grouping of the table's means."""
    config = metrics["config"]
    return f"{config['num-server-rounds']} x {config['local-epochs']}"


def table(rows: dict[str, dict[str, float]], regimes: dict[str, str]) -> str:
    """One row per run, then mean ± sd per regime (rounds x local epochs)."""
    head = [
        "run",
        "rounds x epochs",
        "final acc",
        "+ prior correction (pts)",
        "oracle: classifier retrained (pts)",
        "oracle: dense layers retrained (pts)",
        "correction / classifier headroom",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    gains: dict[str, dict[str, list[float]]] = {}
    for name, row in rows.items():
        regime = gains.setdefault(regimes[name], {k: [] for k in ("corrected", *PARTS, "share")})
        for key in ("corrected", *PARTS):
            regime[key].append(100 * (row[key] - row["final"]))
        share = (row["corrected"] - row["final"]) / max(row["classifier"] - row["final"], 1e-9)
        regime["share"].append(share)
        lines.append(
            f"| {name} | {regimes[name]} | {100 * row['final']:.2f} | "
            f"{regime['corrected'][-1]:+.2f} | {regime['classifier'][-1]:+.2f} | "
            f"{regime['dense'][-1]:+.2f} | {share:.2f} |"
        )
    for name, regime in gains.items():
        if len(regime["share"]) > 1:
            lines.append(
                f"| mean ± sd | {name} | - | {mean_sd(regime['corrected'], '{:+.2f}')} | "
                f"{mean_sd(regime['classifier'], '{:+.2f}')} | "
                f"{mean_sd(regime['dense'], '{:+.2f}')} | {mean_sd(regime['share'], '{:.2f}')} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--section", default="server-ceiling")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows, regimes = {}, {}
    for run_dir in args.runs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        row = measure(run_dir, metrics, args.epochs, args.seed)
        if row is None:
            print(f"{run_dir}: no final_model.pt, skipped", file=sys.stderr)
            continue
        rows[run_dir.name] = row
        regimes[run_dir.name] = regime_of(metrics)
        print(run_dir.name, {k: round(100 * v, 2) for k, v in row.items()}, flush=True)
    if not rows:
        raise SystemExit("none of --runs has a final_model.pt: nothing to measure")
    body = "\n".join(
        [
            "## server-ceiling (oracle bound on server-side fixes of a final model)",
            "",
            command_line("server_ceiling.py"),
            date_line(dt.datetime.now(), (time.perf_counter() - started) / 60),
            machine_line("CPU only", cores=False),
            f"- Oracle training: convolutions frozen, Adam 1e-3, batch 128, {args.epochs} "
            f"epochs over every labelled row of the clients' pool, seed {args.seed}. Gains "
            "are test-set points over the run's final model; the last column is the "
            "correction's gain divided by the classifier oracle's.",
            "",
            table(rows, regimes),
        ]
    )
    write_section(args.section, body)


if __name__ == "__main__":
    main()
