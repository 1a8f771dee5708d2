"""Where an ensemble's gain comes from: logit ensembles of dense-calibrated models.

The target for an HCE ensemble was 1 point above FedEC's fp32 model. FedHCE's members are
compressed copies of one global model, and they barely disagree. This script measures,
on finished runs and without Flower, how much an ensemble gains when its members differ
in the ways a federation could make them differ. Every member's dense head is
calibrated from the clients' k-means feature statistics (``calibration="dense-mixture"``),
as FedEC's final model is:

- ``heads``: one model, its dense head calibrated from the same statistics with
  different seeds (different virtual features and shuffles);
- ``forks``: one more local epoch on every client from the final model, averaged per
  client group (the first three nodes vs the rest, as the gpu / edge tiers; even vs
  odd nodes), each group's average calibrated;
- ``lines``: M models trained in one federation of the same length from different
  initialisations, every client training one of them per round (rotating), so the
  client compute equals FedAvg's; each line calibrated at the end;
- ``seeds``: separate federations (``--seed-runs``, already calibrated), the bound that
  costs M times the client compute.

Members are fp32 here: int4 weight quantization costs FedHCE's members ~0.0-0.3 points
(BENCHMARKS ``fedhce-dense-calibration``), so bytes are left out.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from benchkit.posthoc import run_data
from benchkit.report import command_line, date_line, machine_line, write_section
from torch import nn

from fl_ec.calibration import CalibrationSettings
from fl_ec.clients.client_app import train_locally
from fl_ec.config import ExperimentConfig
from fl_ec.data.federated import ClientData, load_client_data
from fl_ec.results import load_saved_model
from fl_ec.scoring import accuracy
from fl_ec.strategies.fedhce_utils import prediction_disagreement

Row = dict[str, object]


@torch.inference_mode()
def test_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(batch) for batch in images.split(1000)])


def calibrated_copies(
    model: nn.Module,
    clients: Sequence[ClientData],
    settings: CalibrationSettings,
    seeds: Sequence[int] = (0,),
) -> list[nn.Module]:
    """Copies of ``model``, dense head calibrated from every client's statistics, per seed."""
    statistics = settings.statistics()
    num_classes, dim = statistics.dims(model)
    wires = [
        statistics.to_arrays(
            statistics.measure(
                model, c.train.normalize(c.train.images), c.train.labels, num_classes
            )
        )
        for c in clients
    ]
    stats = statistics.merge([statistics.parse(w, num_classes, dim) for w in wires])
    copies = []
    for seed in seeds:
        calibrated = copy.deepcopy(model)
        statistics.calibrate(calibrated, stats, settings, seed=seed)
        copies.append(calibrated)
    return copies


def local_epoch(
    model: nn.Module, client: ClientData, config: ExperimentConfig, node: int, server_round: int
) -> dict[str, torch.Tensor]:
    """One client's local training, as the ClientApp does it; returns its state."""
    local = copy.deepcopy(model)
    train_locally(local, client, config, node, server_round)
    return local.state_dict()


def weighted_average(
    template: nn.Module, states: Sequence[dict], sizes: Sequence[int]
) -> nn.Module:
    """A copy of ``template`` holding the example-weighted mean of ``states`` (FedAvg)."""
    total = sum(sizes)
    averaged = copy.deepcopy(template)
    averaged.load_state_dict(
        {
            key: sum(s[key].float() * n / total for s, n in zip(states, sizes, strict=True))
            for key in states[0]
        }
    )
    return averaged


def fork_logits(
    final: nn.Module,
    clients: Sequence[ClientData],
    config: ExperimentConfig,
    settings: CalibrationSettings,
    images: torch.Tensor,
    server_round: int,
) -> dict[str, list[torch.Tensor]]:
    """One more round from ``final``, averaged per client group; calibrated test logits."""
    nodes = len(clients)
    sizes = [len(c.train) for c in clients]
    states = [local_epoch(final, c, config, node, server_round) for node, c in enumerate(clients)]
    groups = {
        f"nodes 0-2 / 3-{nodes - 1}": [range(3), range(3, nodes)],
        "even / odd nodes": [range(0, nodes, 2), range(1, nodes, 2)],
    }
    out = {}
    for name, parts in groups.items():
        forks = [
            weighted_average(final, [states[i] for i in part], [sizes[i] for i in part])
            for part in parts
        ]
        out[name] = [test_logits(calibrated_copies(f, clients, settings)[0], images) for f in forks]
    return out


def line_group(line: int, server_round: int, nodes: int, num_lines: int) -> list[int]:
    """The nodes that train ``line`` in ``server_round``: the lines take turns per node."""
    return [node for node in range(nodes) if (node + server_round) % num_lines == line]


def line_logits(
    template: nn.Module,
    clients: Sequence[ClientData],
    config: ExperimentConfig,
    settings: CalibrationSettings,
    images: torch.Tensor,
    num_lines: int,
    rounds: int,
) -> list[torch.Tensor]:
    """``num_lines`` models from fresh initialisations, one federation: in round r, node i
    trains line (i + r) mod num_lines, so each line sees every client over the rounds and
    the clients' compute is FedAvg's. Returns each line's calibrated test logits."""
    nodes = len(clients)
    sizes = [len(c.train) for c in clients]
    lines = []
    for line in range(num_lines):
        torch.manual_seed(config.seed * 7_919 + line)
        model = copy.deepcopy(template)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        lines.append(model)
    for server_round in range(1, rounds + 1):
        for line in range(num_lines):
            group = line_group(line, server_round, nodes, num_lines)
            lines[line] = weighted_average(
                lines[line],
                [local_epoch(lines[line], clients[i], config, i, server_round) for i in group],
                [sizes[i] for i in group],
            )
    return [test_logits(calibrated_copies(m, clients, settings)[0], images) for m in lines]


def row(
    arm: str,
    members: str,
    logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    reference: float,
    compute: str,
) -> Row:
    """One table row: each member's accuracy, the mean-logit ensemble's, and the gains."""
    singles = [100 * accuracy(z, labels) for z in logits]
    ensemble = 100 * accuracy(torch.stack(list(logits)).mean(0), labels)
    mean_single = sum(singles) / len(singles)
    return {
        "arm": arm,
        "members": members,
        "member acc": " / ".join(f"{a:.2f}" for a in singles),
        "ensemble acc": f"{ensemble:.2f}",
        "ensemble - mean member": f"{ensemble - mean_single:+.2f}",
        "ensemble - reference": f"{ensemble - reference:+.2f}",
        "disagreement": f"{prediction_disagreement(list(logits)):.3f}",
        "client compute": compute,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished FedAvg run")
    parser.add_argument("--seed-runs", nargs="*", type=Path, default=[])
    parser.add_argument("--nodes", type=int, default=10, help="the run's number of clients")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lines", type=int, default=2)
    parser.add_argument(
        "--line-rounds", type=int, default=None, help="rounds per line (default: the run's)"
    )
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--section", default="hce-ensemble-bounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    metrics = json.loads((args.run / "metrics.json").read_text())
    config, server, _, _ = run_data(metrics)
    images, labels = server.test.normalize(server.test.images), server.test.labels
    nodes = args.nodes
    clients = [load_client_data(config.data, config.seed, node, nodes) for node in range(nodes)]
    settings = CalibrationSettings(layers="dense", rank=args.rank, components=args.components)
    final = load_saved_model(args.run)
    rows: list[Row] = []

    heads = [
        test_logits(m, images)
        for m in calibrated_copies(final, clients, settings, range(args.heads))
    ]
    reference = 100 * accuracy(heads[0], labels)
    print(f"reference {reference:.2f}", flush=True)
    rows.append(row("heads", f"{args.heads} head seeds, one model", heads, labels, reference, "1x"))

    rounds = config.federation.num_server_rounds
    line_rounds = args.line_rounds or rounds
    for name, logits in fork_logits(final, clients, config, settings, images, rounds + 1).items():
        rows.append(row("forks", f"{name}, one extra round", logits, labels, reference, "1x"))
        print(rows[-1], flush=True)
    logits = line_logits(final, clients, config, settings, images, args.lines, line_rounds)
    members = f"{args.lines} lines, {line_rounds} rounds, rotating"
    rows.append(row("lines", members, logits, labels, reference, "1x"))
    print(rows[-1], flush=True)

    if args.seed_runs:
        logits = [test_logits(load_saved_model(r), images) for r in args.seed_runs]
        seeds = ", ".join(
            str(json.loads((r / "metrics.json").read_text())["config"].get("seed"))
            for r in args.seed_runs
        )
        rows.append(
            row(
                "seeds",
                f"final models of seeds {seeds}",
                logits,
                labels,
                reference,
                f"{len(logits)}x",
            )
        )

    header = list(rows[0])
    table = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows),
    ]
    body = "\n".join(
        [
            "## hce-ensemble-bounds (logit ensembles of dense-calibrated fp32 models; "
            "Fashion-MNIST test set)",
            "",
            command_line("hce_ensemble_bounds.py"),
            date_line(dt.datetime.now(), (time.perf_counter() - started) / 60),
            machine_line(f"CPU only, {args.threads} threads", cores=False),
            f"- Run: `{args.run.name}` (seed {config.seed}, alpha {config.data.alpha}, {rounds} "
            f"rounds, {nodes} clients). Calibration: {args.components} k-means components "
            f"x rank {args.rank} per class, from every client. Reference: the run's final "
            f"model calibrated with seed 0, {reference:.2f}%. `seeds` members were "
            "calibrated by their own runs (settings in their run-config).",
            "",
            *table,
        ]
    )
    write_section(args.section, body)
    print(f"[bounds] wrote {args.section} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
