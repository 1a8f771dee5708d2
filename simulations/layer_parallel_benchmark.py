"""Layer-parallel vs serial training of a ResNet on Fashion-MNIST (one command).

    python simulations/layer_parallel_benchmark.py

Serial training uses both cores for intra-op threads; layer-parallel training runs K=2
worker processes (one stage each, gloo) with one thread each. Every configuration
starts from the same initial weights and sees the same fixed training subset, batch
order seed and optimiser (SGD 0.05 / 0.9 with a cosine schedule, weight decay 5e-4,
batch 64). Test accuracy (full 10k test set) is measured after every epoch from
checkpoints, outside the timed region. Writes the ``layer-parallel`` section of BENCHMARKS.md and
``simulations/plots/layer-parallel.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from benchkit import PLOTS
from benchkit.report import command_line, date_line, detected_device, machine_line, write_section

from fl_ec.data.sources import load_dataset  # noqa: E402
from fl_ec.layer_parallel import LPSettings, train_layer_parallel  # noqa: E402
from fl_ec.layer_parallel.trainer import serial_epoch  # noqa: E402
from fl_ec.models import ArchSpec, build_model  # noqa: E402
from fl_ec.training import evaluate  # noqa: E402

CONFIGS = {
    # name: (layer-parallel?, overrides)
    "serial (2 threads)": (False, {}),
    "AL, hybrid 3+1": (True, dict(method="al")),
    "AL, hybrid 3+1, 8-bit boundary": (True, dict(method="al", boundary_bits=8)),
    "AL, hybrid 3+1, downsample 2x2": (True, dict(method="al", downsample=2)),
    "penalty, hybrid 3+1": (True, dict(method="penalty")),
    "penalty, hybrid 3+1, 8-bit boundary": (True, dict(method="penalty", boundary_bits=8)),
    "penalty, hybrid 3+1, downsample 2x2": (True, dict(method="penalty", downsample=2)),
    "AL, parallel only": (True, dict(method="al", serial_epochs=0)),
}
DEFAULT_CONFIGS = list(CONFIGS)
# Half the epochs serial, the last one included: how much of the gap to serial is the
# share of serial epochs (run with --configs; not in the default table).
CONFIGS |= {
    "AL, hybrid 1+1": (True, dict(method="al", parallel_epochs=1)),
    "penalty, hybrid 1+1, 8-bit boundary": (
        True,
        dict(method="penalty", parallel_epochs=1, boundary_bits=8),
    ),
}
# Coded boundaries below 8 bits, each paired with the same method at fp32 ("Δ vs fp32").
CONFIGS |= {
    f"{method}, hybrid 1+1{suffix}": (
        True,
        dict(method=method.lower(), parallel_epochs=1, boundary_bits=bits),
    )
    for method in ("penalty", "AL")
    for bits, suffix in ((32, ""), (6, ", 6-bit boundary"), (4, ", 4-bit boundary"))
    if f"{method}, hybrid 1+1{suffix}" not in CONFIGS
}
# Spatial downsampling under 1+1 (auxiliary variables at full resolution), paired with
# the same method at full-resolution fp32 boundaries.
CONFIGS["penalty, hybrid 1+1, downsample 2x2"] = (
    True,
    dict(method="penalty", parallel_epochs=1, downsample=2),
)


def run_serial(model, x, y, settings: LPSettings, threads: int):  # noqa: ANN001, ANN201
    torch.set_num_threads(threads)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    seconds, checkpoints = [], []
    for epoch in range(settings.epochs):
        settings.apply_lr(optimizer, epoch)
        start = time.perf_counter()
        serial_epoch(model, optimizer, x, y, settings, epoch)
        seconds.append(time.perf_counter() - start)
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    return seconds, checkpoints, [0] * settings.epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--section", default="layer-parallel")
    parser.add_argument(
        "--seed", type=int, default=0, help="initial weights and batch order (0: the tables')"
    )
    parser.add_argument(
        "--lr-schedule",
        default="cosine",
        choices=["cosine", "constant"],
        help="cosine (default): final accuracies stop swinging by epoch, so rows compare",
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    train, test = load_dataset("fashion-mnist")
    subset = np.random.default_rng(0).permutation(len(train))[: args.train_size]
    train = train.subset(subset)
    x, y = train.normalize(train.images), train.labels
    test_x = test
    spec = ArchSpec(args.model, train.input_shape, 10)
    torch.manual_seed(args.seed)
    initial = build_model(spec).state_dict()
    base = LPSettings(
        stages=args.stages,
        epochs=args.epochs,
        parallel_epochs=3,
        serial_epochs=1,
        threads_per_worker=max(1, cores // args.stages),
        serial_threads=cores,
        lr_schedule=args.lr_schedule,
        seed=args.seed,
    )
    started = dt.datetime.now()
    rows = {}
    for name in args.configs:
        parallel, overrides = CONFIGS[name]
        settings = LPSettings(**{**base.__dict__, **overrides})
        model = build_from_initial(spec, initial)
        start = time.perf_counter()
        if parallel:
            result = train_layer_parallel(model, spec, x, y, settings, keep_checkpoints=True)
            seconds, checkpoints, sent = (
                result.epoch_seconds,
                result.checkpoints,
                result.boundary_bytes,
            )
            kinds, stages = result.epoch_kinds, result.stages
        else:
            seconds, checkpoints, sent = run_serial(model, x, y, settings, cores)
            kinds, stages = ["serial"] * settings.epochs, 1
        total = time.perf_counter() - start
        torch.set_num_threads(cores)
        accuracy = [evaluate(build_from_initial(spec, c), test_x).accuracy for c in checkpoints]
        rows[name] = dict(
            seconds=seconds, accuracy=accuracy, bytes=sent, kinds=kinds, stages=stages, total=total
        )
        print(
            f"[lp-bench] {name}: acc {[round(100 * a, 2) for a in accuracy]} "
            f"epoch s {[round(s, 1) for s in seconds]}",
            flush=True,
        )
    minutes = (dt.datetime.now() - started).total_seconds() / 60
    plot_path = PLOTS / f"{args.section}.png"
    _plot(rows, plot_path)
    body = _report(rows, args, started, minutes, cores, base, plot_path)
    write_section(args.section, body)
    print(body)


def build_from_initial(spec: ArchSpec, state: dict) -> torch.nn.Module:
    model = build_model(spec)
    model.load_state_dict(state)
    return model


def _report(rows, args, started, minutes, cores, base, plot_path) -> str:  # noqa: ANN001
    serial = rows.get("serial (2 threads)")
    lines = [
        f"## {args.section} ({args.model}, Fashion-MNIST subset of {args.train_size:,} training "
        f"images, {args.epochs} epochs, K={args.stages})",
        "",
        command_line("layer_parallel_benchmark.py"),
        date_line(started, minutes, prefix="total "),
        machine_line(detected_device(), cores=cores),
        f"- Setup: SGD lr {base.lr} ({base.lr_schedule} schedule over the epochs) momentum "
        f"{base.momentum} wd {base.weight_decay}, batch "
        f"{base.batch_size}, same initial weights and seeds for every row; augmentation (random "
        "±2 px shifts + flips) in serial passes only; layer-parallel: gloo, "
        f"{base.threads_per_worker} thread(s) per worker, beta {base.beta0} x{base.beta_growth}"
        f"/parallel epoch up to {base.beta_max}, aux RMSprop lr {base.aux_lr}; hybrid 3+1 = 3 "
        "parallel epochs then 1 serial correction epoch (on rank 0 with all cores), 1+1 "
        "alternates them; N-bit boundary = N-bit codes over each sample's range, packed 8/N "
        "per byte below 8 (`boundary_bits=N`), downsample 2x2 = average pooling on the wire, "
        "the residual taken between pooled tensors and the auxiliary variables at full "
        'resolution. Test accuracy on the full 10k test set after each epoch. "Δ '
        'vs fp32 boundary" pairs a row with the same method and schedule at full-resolution '
        "fp32 boundaries, when that row is in the table.",
        "",
        "| configuration | stages | mean s/epoch | ratio vs serial | final test acc "
        "| Δ vs serial (pts) "
        "| acc at serial's wall time | boundary MB/parallel epoch | Δ vs fp32 boundary "
        "(pts) | boundary bytes vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        mean_s = sum(row["seconds"]) / len(row["seconds"])
        final = row["accuracy"][-1]
        # Without a serial row in the run, its columns say so ("–") instead of nan.
        ratio = delta = at_budget = "–"
        if serial:
            ratio = f"{mean_s / (sum(serial['seconds']) / len(serial['seconds'])):.2f}"
            delta = f"{100 * (final - serial['accuracy'][-1]):+.2f}"
            at_budget = f"{100 * _accuracy_at(row, sum(serial['seconds'])):.2f}"
        parallel_bytes = [
            b for b, k in zip(row["bytes"], row["kinds"], strict=True) if k == "parallel"
        ]
        mb = sum(parallel_bytes) / len(parallel_bytes) / 1e6 if parallel_bytes else 0.0
        pair = rows.get(_fp32_twin(name))
        vs_fp32 = vs_bytes = "–"
        if pair is not None and pair is not row:
            vs_fp32 = f"{100 * (final - pair['accuracy'][-1]):+.2f}"
            vs_bytes = f"{sum(pair['bytes']) / max(1, sum(row['bytes'])):.3f}x fewer"
        lines.append(
            f"| {name} | {row['stages']} | {mean_s:.1f} | {ratio} | {100 * final:.2f} "
            f"| {delta} | {at_budget} | {mb:.1f} | {vs_fp32} | {vs_bytes} |"
        )
    lines += ["", f"![accuracy vs wall time](simulations/plots/{plot_path.name})"]
    return "\n".join(lines)


def _fp32_twin(name: str) -> str:
    """The row name with the same method and schedule, with full-resolution fp32 boundaries."""
    return re.sub(r", (\d+-bit boundary|downsample \dx\d)$", "", name)


def _accuracy_at(row: dict, budget: float) -> float:
    """Test accuracy of the last checkpoint finished within ``budget`` training seconds."""
    elapsed, best = 0.0, float("nan")
    for seconds, accuracy in zip(row["seconds"], row["accuracy"], strict=True):
        elapsed += seconds
        if elapsed <= budget + 1e-6:
            best = accuracy
    return best


def _plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in rows.items():
        times = np.cumsum(row["seconds"])
        ax.plot(times, [100 * a for a in row["accuracy"]], marker=".", label=name)
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
