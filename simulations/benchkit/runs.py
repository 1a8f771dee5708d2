"""One ``flwr run`` per method and setting, and the reuse of runs already finished."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchkit import ROOT
from fl_ec.config import ExperimentConfig
from fl_ec.launch import FlowerCli, format_overrides, parse_overrides
from fl_ec.retired_keys import kept_values

# Full Fashion-MNIST minus the server's 5k proxy + 1k validation hold-out (54k client
# samples), 1 local epoch, batch 32, SGD lr 0.05 momentum 0.9, clipping 10, seed 42.
STANDARD_SETTINGS = {
    "dataset": "fashion-mnist",
    "model": "cnn",
    "partitioner": "dirichlet",
    "local-epochs": 1,
    "batch-size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "max-grad-norm": 10.0,
    "proxy-size": 5000,
    "validation-size": 1000,
    "train-subset": 0,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "seed": 42,
}


@dataclass(frozen=True)
class Regime:
    """A benchmark regime: local epochs, default rounds and the federation's shape."""

    local_epochs: int
    rounds: int  # the default of --rounds
    supernodes: int
    fraction_train: float
    round_divisor: int = 1  # runs --rounds // this many rounds

    def num_rounds(self, rounds: int | None) -> int:
        return max(1, (self.rounds if rounds is None else rounds) // self.round_divisor)


REGIMES = {
    "standard": Regime(local_epochs=1, rounds=20, supernodes=10, fraction_train=1.0),
    # The standard client compute: 5x the local epochs, a fifth of the rounds.
    "comm-limited": Regime(
        local_epochs=5, rounds=20, supernodes=10, fraction_train=1.0, round_divisor=5
    ),
    # 4 of 20 clients x 5 epochs is one pass over the 54k client samples per round, as in
    # the other regimes; 15 rounds keep a distilling method within ~15 min on 2 cores.
    "partial": Regime(local_epochs=5, rounds=15, supernodes=20, fraction_train=0.2),
}


def parse_method(text: str) -> tuple[str, str, dict]:
    """``fedec:teacher-rule="label-aware",proxy-per-round=2000`` -> (label, strategy, overrides)."""
    strategy, _, rest = text.partition(":")
    overrides = parse_overrides(_commas_outside_quotes_to_spaces(rest)) if rest else {}
    return text, strategy, overrides


def strategy_of(label: str) -> str:
    """The strategy of a method label: ``fedec`` of ``fedec:teacher-rule="gated"``."""
    return label.partition(":")[0]


def _commas_outside_quotes_to_spaces(text: str) -> str:
    """Overrides are comma-separated, but a quoted value may hold commas."""
    out, quote = [], ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == ",":
            char = " "
        out.append(char)
    return "".join(out)


def run_one(
    label: str,
    strategy: str,
    method_overrides: dict,
    alpha: float,
    rounds: int,
    local_epochs: int,
    supernodes: int,
    results_dir: Path,
    extra: str,
    reuse: bool = False,
    seed: int | None = None,
) -> dict:
    """One ``flwr run`` of ``label``; its metrics (plus the run's wall seconds).

    ``reuse``: a finished run with the same name in ``results_dir`` (every round
    recorded) is read instead of run again, e.g. after a run was cut off.
    ``seed``: replaces the shared seed (partitions, initial model, client batch
    order, proxy subsets) and names the run after it.
    """
    name = run_name(label, alpha, local_epochs, seed)
    settings = {
        **STANDARD_SETTINGS,
        "strategy": strategy,
        "alpha": alpha,
        "num-server-rounds": rounds,
        "local-epochs": local_epochs,
        "run-name": name,
        "results-dir": str(results_dir),
        **parse_overrides(extra),
        # A method's own overrides are more specific than the settings shared by all.
        **method_overrides,
        **({"seed": seed} if seed is not None else {}),
    }
    metrics_path = results_dir / name / "metrics.json"
    if reuse and metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        if _same_config(metrics.get("config", {}), _as_config(settings)) and (
            len(metrics.get("rounds", [])) == rounds + 1
        ):
            print(f"[bench] {label} alpha={alpha}: reusing {metrics_path}", flush=True)
            metrics["elapsed-seconds"] = None  # not recorded in metrics.json
            return metrics
    with tempfile.TemporaryDirectory(prefix="flec-bench-") as home:
        cli = FlowerCli(home=Path(home), isolated=True)
        try:
            run_id = cli.submit(ROOT, format_overrides(settings), supernodes)
            print(f"[bench] {label} alpha={alpha} epochs={local_epochs}: run {run_id}", flush=True)
            outcome = cli.wait(run_id, timeout=3 * 3600, poll=5)
        finally:
            cli.stop_local_superlink()
    if not outcome.completed:
        raise SystemExit(f"[bench] {label} alpha={alpha} ended {outcome.status}: {outcome.details}")
    metrics = json.loads(metrics_path.read_text())
    metrics["elapsed-seconds"] = outcome.info.get("elapsed")
    return metrics


def run_name(label: str, alpha: float, local_epochs: int, seed: int | None = None) -> str:
    """The run folder's name: the method label, alpha, local epochs and the seed, if set."""
    return (
        "bench-"
        + "".join(c if c.isalnum() or c in ".-" else "_" for c in label)
        + f"-a{alpha:g}-e{local_epochs}"
        + (f"-s{seed}" if seed is not None else "")
    )


# Where a run was written is not part of the experiment: a run moved or copied into
# another results folder (e.g. to combine seeds run on several days) is still reusable.
_OUTPUT_KEYS = frozenset({"results-dir", "run-name"})
# Knobs that runs may have recorded but the code no longer has, each with the value
# whose behaviour the code kept: a run recorded with another value cannot be repeated.
# The registry is fl-ec's own list of retired keys, so a key retired there is compared
# here too; the calibration knobs have no kept value (they map onto presets, below).
_RETIRED_KNOBS = kept_values()
# (calibration-layers, calibration-rank, calibration-components) of a run recorded with
# feature-calibration=true, before one ``calibration`` preset replaced those knobs.
_DENSE_PRESETS = {("dense", 64, 1): "dense", ("dense", 32, 8): "dense-mixture"}


def recorded_calibration(recorded: dict) -> str | None:
    """The ``calibration`` preset of a recorded config, also of one recorded before it.

    Older runs recorded prior-correction, feature-calibration, calibration-layers,
    calibration-rank and calibration-components instead. None: a combination that no
    preset reproduces (e.g. a dense calibration of rank 16).
    """
    if "calibration" in recorded:
        return recorded["calibration"]
    if not recorded.get("feature-calibration"):
        return "prior" if recorded.get("prior-correction") else "none"
    layers = recorded.get("calibration-layers", "classifier")
    if layers == "classifier":
        return "classifier"
    shape = (
        layers,
        recorded.get("calibration-rank", 64),
        recorded.get("calibration-components", 1),
    )
    return _DENSE_PRESETS.get(shape)


def _same_config(recorded: dict, expected: dict) -> bool:
    """A recorded run matches ``expected``; a knob added since it ran counts as it behaved."""
    as_run = {**ExperimentConfig().to_dict(), **recorded}
    as_run["calibration"] = recorded_calibration(recorded)
    if as_run["calibration"] is None:
        return False
    if recorded.get("prior-correction") and "prior-correction-revert-z" not in recorded:
        as_run["prior-correction-revert-z"] = 0.0  # it reverted on any validation drop
    if "distill-batch-size" not in recorded:
        as_run["distill-batch-size"] = 128  # fixed at 128 while it was no run-config key
    ignored = set(_OUTPUT_KEYS)
    if as_run["calibration"] in ("none", "prior"):
        ignored.add("calibration-samples")  # virtual features of a feature calibration
    if "layer-parallel" not in (as_run.get("trainer"), as_run.get("distill-trainer")):
        # The layer-parallel knobs act only through those trainers (lp-method's default
        # changed once; runs without the trainer are unaffected).
        ignored |= {key for key in as_run if key.startswith("lp-")}
    if as_run.get("strategy") != "fedhce":
        ignored.add("quantized-training")  # it acted only on FedHCE's variants
        if not as_run.get("train-tiers"):
            # A node's tier picks FedHCE's variant or trains under `train-tiers`; other
            # runs are the same whatever the tiers (the fleet's full-model references
            # repeat the partial regime's runs bit for bit).
            ignored.add("simulated-tiers")
    if as_run.get("strategy") == "fedavg":
        # Server-side distillation knobs: FedAvg never distils, so a run recorded
        # before their defaults changed is the same run.
        ignored |= {"distill-steps", "distill-batch-size", "variant-distill-steps"}
    if any(
        as_run.get(key, kept) != kept
        for key, kept in _RETIRED_KNOBS.items()
        if key not in ignored and key not in expected
    ):
        return False
    return all(as_run.get(key) == value for key, value in expected.items() if key not in ignored)


def _as_config(settings: dict) -> dict:
    """``settings`` as a run's recorded config (the typed, validated values)."""
    return ExperimentConfig.from_run_config(settings).to_dict()
