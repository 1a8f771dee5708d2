"""Run-config keys fl-ec no longer has: what to use instead, and which old value it kept.

A retired key fails a run with what to use instead (numbers behind each retirement are
in docs/experiments.md), since silently ignoring it would run something else than
asked. Runs recorded before a key retired still hold it: ``kept`` is the value whose
behaviour the code kept, so a recorded run with another value cannot be repeated (the
benchmark compares it before reusing a finished run). One registry serves both, so a
key retired here is known to both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


class _NotKept:
    """The ``kept`` of a key whose behaviour no single old value gives back."""

    def __repr__(self) -> str:
        return "NOT_KEPT"


# A sentinel rather than None: a recorded value could in principle be anything.
NOT_KEPT: Final = _NotKept()


@dataclass(frozen=True)
class RetiredKey:
    """A retired run-config key: what to use instead, and the old value the code kept.

    ``kept`` is :data:`NOT_KEPT` where another knob now records the key's behaviour
    (the calibration knobs map onto ``calibration`` presets; trim-ratio acted only
    through retired teacher rules, which ``teacher-rule`` records).
    """

    instead: str
    kept: object = NOT_KEPT


_REMOVED = "it was removed and its old default is now fixed; delete it from the run-config"
_DENSE = 'use calibration="dense" (one Gaussian per class) or "dense-mixture"'
_MIN_NODES = "min-available-nodes is the fewest nodes a round trains or evaluates"
_DISTILL = "fixed in fl_ec.distill.DistillSettings (library only); delete it"

RETIRED_KEYS: Final[dict[str, RetiredKey]] = {
    "prior-correction": RetiredKey('use calibration="prior"'),
    "feature-calibration": RetiredKey('use calibration="classifier" (or "dense", "dense-mixture")'),
    "calibration-layers": RetiredKey(_DENSE),
    "calibration-rank": RetiredKey(_DENSE),
    "calibration-components": RetiredKey(_DENSE),
    "calibration-samples": RetiredKey(
        "calibration draws a fixed 20000 virtual features; delete it", kept=20000
    ),
    "prior-correction-revert-z": RetiredKey(
        "the revert threshold is fixed at z=1.96; delete it", kept=1.96
    ),
    "eval-batch-size": RetiredKey("evaluation runs in fixed batches of 512; delete it", kept=512),
    # min-available-nodes replaced both, 2 by default.
    "min-train-nodes": RetiredKey(_MIN_NODES, kept=2),
    "min-evaluate-nodes": RetiredKey(_MIN_NODES, kept=2),
    "client-test-fraction": RetiredKey(
        "every client keeps 10% of its partition for evaluate; delete it", kept=0.1
    ),
    "lp-threads-per-worker": RetiredKey(
        "layer-parallel workers run one thread each; delete it", kept=1
    ),
    "tail-average-rounds": RetiredKey(_REMOVED, kept=1),
    "prior-aware-distillation": RetiredKey(_REMOVED, kept=False),
    "augment-copies": RetiredKey(_REMOVED, kept=0),
    "teacher-includes-average": RetiredKey(_REMOVED, kept=False),
    "teacher-includes-previous": RetiredKey(_REMOVED, kept=False),
    "student-init": RetiredKey(_REMOVED, kept="average"),
    "trim-ratio": RetiredKey(_REMOVED),
    "downlink-rounding": RetiredKey(_REMOVED, kept="nearest"),
    "variant-client-start": RetiredKey(_REMOVED, kept="tuned"),
    "prune-steps": RetiredKey(_REMOVED, kept=1),
    "prune-importance": RetiredKey(_REMOVED, kept="magnitude"),
    "default-variant": RetiredKey(_REMOVED, kept=""),
    "rebase-updates": RetiredKey(_REMOVED, kept=True),
    "lp-aux-resolution": RetiredKey(_REMOVED, kept="full"),
    "weight-decay": RetiredKey(_REMOVED, kept=0.0),
    "local-loss": RetiredKey(_REMOVED, kept="ce"),
    "distill-lr": RetiredKey(_DISTILL, kept=0.001),
    "distill-temperature": RetiredKey(_DISTILL, kept=1.0),
    "distill-eval-every": RetiredKey(_DISTILL, kept=50),
    "distill-patience": RetiredKey(_DISTILL, kept=100),
    # Quantization-aware local training of int8/int4 variants lost to fp32 training on
    # the unpacked weights (docs/experiments.md).
    "quantized-training": RetiredKey(
        "clients always train a quantized variant in fp32 on its unpacked weights "
        "(the quantization is the wire's and the served copy's); delete it",
        kept=False,
    ),
}


def retired_message(key: str) -> str:
    """The one-line error for a run-config that sets the retired ``key``."""
    return f"{key} no longer exists: {RETIRED_KEYS[key].instead}"


def kept_values() -> dict[str, object]:
    """Each retired key with a kept value -> that value (the keys a recorded run is checked on)."""
    return {
        key: retired.kept for key, retired in RETIRED_KEYS.items() if retired.kept is not NOT_KEPT
    }
