"""The teacher's half of Byzantine robustness: teacher rules and trims under each attack.

    python simulations/byzantine_teacher.py --seeds 42 1 2

FedEC's recommended configuration serves the parameter average (no distillation), so
:mod:`simulations.byzantine_benchmark` measures the student's start; this measures the
teacher that distillation would learn from, without Flower. Per seed: 10 clients on
Dirichlet alpha=0.1 partitions of a Fashion-MNIST subset train ``--warmup-rounds``
honest FedAvg rounds exactly as the ClientApp does; then, from that global model, one
more round in which partitions 0 and 1 attack (each kind of
:mod:`fl_ec.clients.attacks`, with the same honest class counts they would report).
Every teacher candidate combines the round's 10 models on the 10k test set:

- each rule of :mod:`fl_ec.ensemble` (``mean-logits``, ``label-aware``, ``gated``);
- untrimmed, trimmed by 2 per sample without class counts (``trim 2, blind``), and
  trimmed by 2 sparing the holders of each sample's class (``trim 2``: what FedEC's
  ``teacher-trim=2`` does when replies carry class counts);

next to the example-weighted parameter average and the trimmed mean of parameters
(``robust-start="trimmed-mean:2"``). Reported: test accuracy, and the worst class's
accuracy -- what trimming a rare class's few holders away would cost.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time

import torch
from benchkit.report import command_line, date_line, machine_line, mean_sd, write_section
from benchkit.runs import STANDARD_SETTINGS
from torch import nn

from fl_ec.clients.attacks import ATTACKS
from fl_ec.clients.client_app import local_seed, train_locally
from fl_ec.config import ExperimentConfig
from fl_ec.data.federated import load_client_data, load_server_data
from fl_ec.ensemble import client_weights, combine, holder_shares
from fl_ec.models.spec import ArchSpec, build_from_state_dict, build_model
from fl_ec.robust import TrimmedMean, WeightedMean

CLIENTS = 10
TRIM = 2
CLEAN = "none"
RULES = ("mean-logits", "label-aware", "gated")
# (label, trim, whether the holders of each sample's class are spared)
TRIMS = (("", 0, False), (f"trim {TRIM}, blind", TRIM, False), (f"trim {TRIM}", TRIM, True))
AVERAGES = ("parameter average", f"trimmed-mean:{TRIM} of parameters")

State = dict[str, torch.Tensor]


def candidates() -> list[str]:
    return list(AVERAGES) + [
        f"{rule}, {label}" if label else rule for rule in RULES for label, _, _ in TRIMS
    ]


def train_client(
    spec: ArchSpec,
    start: State,
    data,
    config: ExperimentConfig,
    partition: int,
    server_round: int,
    attack: str = CLEAN,
) -> nn.Module:
    """One client trained one round from ``start``, as the ClientApp does, attacking or not."""
    model = build_from_state_dict(spec, start)
    hostile = ATTACKS.get(attack)
    if hostile is not None:
        data = hostile.training_data(data)
    train_locally(model, data, config, partition, server_round)
    if hostile is not None:
        hostile.poison(model, start, local_seed(config, partition, server_round))
    return model.eval()


@torch.inference_mode()
def logits_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(batch) for batch in inputs.split(1000)]).float()


def scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """Test accuracy and the worst class's accuracy, in percent."""
    right = logits.argmax(-1) == labels
    per_class = [right[labels == c].float().mean().item() for c in range(num_classes)]
    return 100 * right.float().mean().item(), 100 * min(per_class)


def evaluate(
    spec: ArchSpec, models: list[nn.Module], counts: list[list[float]], weights: list[float], test
) -> dict[str, tuple[float, float]]:
    """Every candidate's (test accuracy, worst class accuracy) for one round's models."""
    x, y, classes = test.normalize(test.images), test.labels, test.num_classes
    states = [m.state_dict() for m in models]
    out = {}
    for label, rule in zip(AVERAGES, (WeightedMean(), TrimmedMean(TRIM)), strict=True):
        average = build_from_state_dict(spec, rule.combine(states, weights, None)).eval()
        out[label] = scores(logits_of(average, x), y, classes)
    stacked = torch.stack([logits_of(m, x) for m in models])
    shares = holder_shares(counts, len(models), classes)
    for rule in RULES:
        rule_weights = client_weights(rule, len(models), classes, counts)
        for label, trim, spared in TRIMS:
            combined = combine(stacked, rule, rule_weights, trim, shares if spared else None)
            out[f"{rule}, {label}" if label else rule] = scores(combined, y, classes)
    return out


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, dict[str, tuple[float, float]]]:
    """attack -> candidate -> (accuracy, worst class accuracy) for one seed."""
    settings = {
        **STANDARD_SETTINGS,
        "alpha": 0.1,
        "train-subset": args.train_subset,
        "seed": seed,
    }
    config = ExperimentConfig.from_run_config(settings)
    server = load_server_data(config.data, config.seed)
    spec = ArchSpec(config.training.model, server.test.input_shape, server.test.num_classes)
    datas = [load_client_data(config.data, config.seed, p, CLIENTS) for p in range(CLIENTS)]
    counts = [d.train.class_counts() for d in datas]
    weights = [float(len(d.train)) for d in datas]
    torch.manual_seed(seed)
    state = build_model(spec).state_dict()
    for server_round in range(1, args.warmup_rounds + 2):
        honest = [
            train_client(spec, state, data, config, partition, server_round)
            for partition, data in enumerate(datas)
        ]
        if server_round <= args.warmup_rounds:
            state = WeightedMean().combine([m.state_dict() for m in honest], weights, None)
    results = {}
    for attack in [CLEAN, *ATTACKS]:
        started = time.perf_counter()
        # The honest clients' models are the same under every attack: only the
        # attackers' are trained (or poisoned) again.
        models = [
            train_client(spec, state, data, config, partition, server_round, attack)
            if attack != CLEAN and partition < args.attackers
            else honest[partition]
            for partition, data in enumerate(datas)
        ]
        results[attack] = evaluate(spec, models, counts, weights, server.test)
        seconds = time.perf_counter() - started
        print(f"[teacher] seed {seed} {attack}: {seconds:.0f} s {results[attack]}", flush=True)
    return results


def table(per_seed: list[dict], which: int) -> str:
    """attack x candidate, mean ± sd over seeds of score ``which`` (0: accuracy, 1: worst)."""
    names = candidates()
    lines = ["| attack | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for attack in per_seed[0]:
        cells = [mean_sd([r[attack][n][which] for r in per_seed], "{:.1f}") for n in names]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--warmup-rounds", type=int, default=4)
    parser.add_argument("--attackers", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--section", default="byzantine-teacher")
    args = parser.parse_args()
    started = dt.datetime.now()
    per_seed = [run_seed(seed, args) for seed in args.seeds]
    minutes = (dt.datetime.now() - started).total_seconds() / 60
    body = "\n".join(
        [
            f"## {args.section} (teacher rules and trims under attack: {args.attackers} of "
            f"{CLIENTS} clients, alpha=0.1, {args.train_subset} client samples)",
            "",
            command_line("byzantine_teacher.py"),
            date_line(started, minutes),
            machine_line("CPU", cores=False),
            f"- {args.warmup_rounds} honest FedAvg rounds, then one round in which partitions "
            f"0-{args.attackers - 1} attack; every candidate combines that round's 10 models. "
            f"Mean ± sd over seeds {', '.join(map(str, args.seeds))}.",
            "",
            "Test accuracy (%, 10k):",
            "",
            table(per_seed, 0),
            "",
            "Worst class's test accuracy (%): what trimming a rare class's holders costs:",
            "",
            table(per_seed, 1),
        ]
    )
    write_section(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
