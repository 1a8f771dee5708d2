"""Screen teacher rules on one finished run's trajectory, without Flower.

    python simulations/teacher_screen.py --run results/benchmark/bench-fedavg-a0.1-e5-s42

Distillation can only add to the parameter average in rounds where its teacher is the
better model. This replays a finished FedAvg run (its config, and the partitions it
sampled in each round, from ``metrics.json``): every round the sampled clients train
from the round's global model exactly as the ClientApp does (same data, seeds and
trainer), their example-weighted average becomes the next global model -- checked
against the test accuracy the run recorded -- and every teacher candidate is scored on
the server's validation set next to that average. One pass answers, for every rule at
once and on identical client models, in how many rounds the teacher beats the average.

Candidates: the teacher rules of :mod:`fl_ec.ensemble` over the round's clients, and
``label-aware`` with the previous global model as one more member voting like one of
this round's clients (FedEC has no such option: it did not gain here). The replay is
not bit for bit the run's: the run's clients train in Ray workers with other thread
counts, and float reductions differ with them; its test accuracy tracks the run's
within a few points, so read the table as a screen on a trajectory like the run's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch
from benchkit.report import command_line, date_line, machine_line, write_section
from torch import nn

from fl_ec.clients.client_app import train_locally
from fl_ec.config import ExperimentConfig
from fl_ec.data.federated import load_client_data, load_server_data
from fl_ec.ensemble import teacher_logits, with_extra_members
from fl_ec.models.spec import ArchSpec, build_from_state_dict, build_model
from fl_ec.scoring import accuracy, model_accuracy
from fl_ec.strategies.fedec_utils import ClientModel, weighted_average

# (label, rule, whether the previous global model is one more member)
CANDIDATES = (
    ("mean-logits", "mean-logits", False),
    ("label-aware", "label-aware", False),
    ("gated", "gated", False),
    ("label-aware + previous", "label-aware", True),
)


def teacher_accuracy(
    rule: str,
    with_previous: bool,
    clients: list[ClientModel],
    previous: nn.Module,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
) -> float:
    """Validation accuracy of one candidate teacher, with FedEC's member weights."""
    members = [c.model for c in clients] + ([previous] if with_previous else [])
    counts = with_extra_members(
        [c.class_counts for c in clients],
        extra=int(with_previous),  # it votes like an average client, as in FedEC
    )
    out = teacher_logits(members, val_x, rule, class_counts=counts)
    return accuracy(out.logits, val_y)


def replay(run_dir: Path, num_partitions: int) -> tuple[list[dict], ExperimentConfig]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = ExperimentConfig.from_run_config(metrics["config"], allow_retired=True)
    server = load_server_data(config.data, config.seed)
    spec = ArchSpec(config.training.model, server.test.input_shape, server.test.num_classes)
    torch.manual_seed(config.seed)
    global_model = build_model(spec)
    val_x = server.validation.normalize(server.validation.images)
    val_y = server.validation.labels
    test_x, test_y = server.test.normalize(server.test.images), server.test.labels
    rows = []
    for record in metrics["rounds"]:
        if record["round"] == 0:
            continue
        start = time.perf_counter()
        clients = []
        for partition in record["sampled-partitions"]:
            data = load_client_data(config.data, config.seed, partition, num_partitions)
            model = build_from_state_dict(spec, global_model.state_dict())
            train_locally(model, data, config, partition, record["round"])
            clients.append(
                ClientModel(
                    node_id=partition,
                    spec=spec,
                    state={k: v.detach().clone() for k, v in model.state_dict().items()},
                    model=model.eval(),
                    num_examples=len(data.train),
                    class_counts=data.train.class_counts(),
                    metrics={},
                )
            )
        average = build_from_state_dict(spec, weighted_average(clients)).eval()
        row = {
            "round": record["round"],
            "recorded test": 100 * record["test-accuracy"],
            "replayed test": 100 * model_accuracy(average, test_x, test_y, batch_size=1000),
            "average val": 100 * model_accuracy(average, val_x, val_y, batch_size=1000),
        }
        for label, rule, with_previous in CANDIDATES:
            row[label] = 100 * teacher_accuracy(
                rule, with_previous, clients, global_model.eval(), val_x, val_y
            )
        global_model = average
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
    return rows, config


def table(rows: list[dict]) -> str:
    keys = ["round", "recorded test", "replayed test", "average val"] + [c[0] for c in CANDIDATES]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append(
            "| " + " | ".join(str(row[k]) if k == "round" else f"{row[k]:.1f}" for k in keys) + " |"
        )
    wins = ["**teacher > average**", "", "", ""]
    for label, _, _ in CANDIDATES:
        won = sum(row[label] > row["average val"] for row in rows)
        mean = sum(row[label] - row["average val"] for row in rows) / len(rows)
        wins.append(f"{won}/{len(rows)} (mean {mean:+.1f})")
    lines.append("| " + " | ".join(wins) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished FedAvg run folder")
    parser.add_argument("--partitions", type=int, default=20, help="the run's SuperNodes")
    parser.add_argument("--section", default="teacher-screen")
    args = parser.parse_args()
    started = dt.datetime.now()
    rows, config = replay(args.run, args.partitions)
    minutes = (dt.datetime.now() - started).total_seconds() / 60
    body = "\n".join(
        [
            f"## {args.section} (teacher candidates on a replayed FedAvg trajectory; "
            f"Fashion-MNIST, alpha={config.data.alpha:g}, "
            f"{config.training.local_epochs} local epochs)",
            "",
            command_line("teacher_screen.py"),
            date_line(started, minutes),
            machine_line("CPU", cores=False),
            "- Each round: the run's sampled clients retrained from the replayed global "
            "model (recorded vs replayed test accuracy checks the replay), the parameter "
            "average's and each teacher's accuracy on the 1k validation set, in %.",
            "",
            table(rows),
        ]
    )
    write_section(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
