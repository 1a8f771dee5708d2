"""What a round's checkpoint costs: its size, and the seconds to write and to read it back.

    python simulations/checkpoint_cost.py [--repeats 5]

For each model (the small CNN, ResNet-20) and strategy, the state a real run
checkpoints after a round: FedAvg's global model alone; FedEC's global model and the
parameter average its clients train from (``client-start="average"``, the default);
FedHCE's, plus its five default variants as served and as sent and their pruning index
maps. Each checkpoint is written ``--repeats`` times (temporary folder, fsync, rename,
as the ServerApp does after every round) and read back (checksums, ``weights_only``
load); the median seconds are reported. The section ``checkpoint-cost`` of
BENCHMARKS.md is rewritten.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchkit.report import command_line, date_line, machine_line, write_section
from flwr.app import ArrayRecord

from fl_ec.checkpoint import Checkpoint, StrategyState, read_checkpoint, write_checkpoint
from fl_ec.compression import parse_variants
from fl_ec.config import ExperimentConfig
from fl_ec.data.sources import make_synthetic
from fl_ec.models.spec import ArchSpec, build_model
from fl_ec.strategies.fedhce import FedHCE

MODELS = {"cnn": (1, 28, 28), "resnet20": (3, 32, 32)}


def strategy_states(model: str) -> dict[str, tuple[dict, StrategyState]]:
    """(global model, strategy state) after a round, per strategy, for ``model``."""
    spec = ArchSpec(model, MODELS[model], 10)
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    average = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    proxy = torch.randn(8, *MODELS[model])
    fedhce = FedHCE(
        variants=parse_variants(ExperimentConfig().fedhce.variants),
        proxy_data=proxy,
        arch_spec=spec,
        client_start="average",
    )
    fedhce.client_start_arrays = ArrayRecord(average)
    # What the round's _compress leaves: variants served from the student, sent from
    # the average the clients train (client_start="average" keeps both).
    fedhce._derive_variants(state, 1, {}, train_state=average)
    fedec = StrategyState(
        {f"client-start/{k}": v for k, v in average.items()}, {"client-start": True}
    )
    return {
        "fedavg": (state, StrategyState()),
        "fedec": (state, fedec),
        "fedhce": (state, fedhce.checkpoint_state()),
    }


def measure(repeats: int) -> list[dict]:
    rows = []
    for model in MODELS:
        for strategy, (state, strategy_state) in strategy_states(model).items():
            writes, reads, size = [], [], 0
            with tempfile.TemporaryDirectory() as folder:
                for server_round in range(1, repeats + 1):
                    checkpoint = Checkpoint(server_round, state, strategy_state, {"rounds": []})
                    start = time.perf_counter()
                    path = write_checkpoint(Path(folder), checkpoint)
                    writes.append(time.perf_counter() - start)
                    size = sum(f.stat().st_size for f in path.iterdir())
                    start = time.perf_counter()
                    read_checkpoint(path)
                    reads.append(time.perf_counter() - start)
            rows.append(
                {
                    "model": model,
                    "strategy": strategy,
                    "mb": size / 1e6,
                    "write": statistics.median(writes),
                    "read": statistics.median(reads),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    make_synthetic(num_train=8, num_test=8, seed=0)  # warm the imports outside the timing
    rows = measure(args.repeats)
    lines = [
        "## checkpoint-cost (one round's checkpoint: its size, seconds to write and to read)",
        "",
        command_line("checkpoint_cost.py"),
        date_line(dt.datetime.now()),
        machine_line(),
        "- Write: temporary folder, fsync, rename (what the ServerApp does after every "
        "round); read: checksums and `weights_only` loads. Medians of "
        f"{args.repeats} repeats.",
        "",
        "| model | strategy | checkpoint size | write | read back |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['strategy']} | {row['mb']:.2f} MB | "
            f"{row['write']:.3f} s | {row['read']:.3f} s |"
        )
    write_section("checkpoint-cost", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
