"""``fl-ec-hce-eval``: accuracy, size and CPU latency of a FedHCE run's saved variants.

    fl-ec-hce-eval results/<run> [--members prune-0.5+int8,int4] [--no-latency]

reloads the variants a ``strategy=fedhce`` run saved (:func:`fl_ec.hce.load_variants`),
evaluates every variant and the HCE ensemble of ``--members`` (default: the run's) on
the run's test set (:func:`fl_ec.hce.evaluate_variants`), prints a markdown table and
writes it as ``hce_eval.json`` into the run folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from fl_ec.config import ExperimentConfig
from fl_ec.data.sources import load_dataset
from fl_ec.hce import evaluate_variants, load_variants, markdown_table


def run_test_set(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized test images and labels of the dataset a finished run used."""
    run_config = json.loads((run_dir / "metrics.json").read_text())["config"]
    data = ExperimentConfig.from_run_config(run_config, allow_retired=True).data
    _, test = load_dataset(data.dataset, data.data_dir, data.download)
    return test.normalize(test.images), test.labels


def main(argv: list[str] | None = None) -> int:
    """Evaluate a run folder's variants; 0, or 2 with one line on what is missing."""
    parser = argparse.ArgumentParser(
        prog="fl-ec-hce-eval",
        description="Accuracy, size and CPU latency of a FedHCE run's variants and HCE ensemble.",
    )
    parser.add_argument("run_dir", type=Path, help="results/<run> of a strategy=fedhce run")
    parser.add_argument("--members", default="", help="comma-separated HCE members")
    parser.add_argument("--no-latency", action="store_true", help="accuracy and bytes only")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for latency")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    try:
        models, index = load_variants(args.run_dir)
        test_x, test_y = run_test_set(args.run_dir)
        members = [m.strip() for m in args.members.split(",") if m.strip()] or None
        reports = evaluate_variants(
            models, index, test_x, test_y, members, latency=not args.no_latency
        )
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"fl-ec-hce-eval: {err}", file=sys.stderr)
        return 2
    print(markdown_table(reports))
    out = args.run_dir / "hce_eval.json"
    out.write_text(json.dumps([asdict(r) for r in reports], indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
