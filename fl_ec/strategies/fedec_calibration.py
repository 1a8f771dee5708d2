"""FedEC's served-model fixes after distillation, each guarded by the same validation test.

Two fixes act on the served model's last layers only:

* the label-prior correction (:mod:`fl_ec.calibration.prior`), which shifts the
  classifier's bias;
* CCVR, which retrains the classifier -- or every dense layer -- on virtual features
  drawn from the clients' pooled statistics (one
  :class:`~fl_ec.calibration.FeatureStatistics` object per kind of statistics).

Both are applied, and then kept unless the unfixed model is *significantly* more
accurate on the server's validation split. Significance is McNemar's paired z (over the
samples the two disagree on) above :data:`REVERT_Z` (1.96): a raw accuracy difference
on a 1k validation split rejects a fix on noise (``docs/calibration.md``). Without
validation data there is no evidence against a fix, so it is kept.

Kept out of :class:`~fl_ec.strategies.fedec.FedEC` so the strategy stays the glue
that gathers the inputs (class counts, client statistics) and records the outcome.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from logging import INFO

import torch
from flwr.common.logger import log
from torch import nn

from fl_ec.calibration import (
    CalibrationSettings,
    FeatureStatistics,
    FeatureStats,
    correct_prior,
    paired_z,
    target_prior,
)
from fl_ec.scoring import hit_rate
from fl_ec.strategies.degraded import (
    ADD_CLASS_COUNTS,
    DegradedFeatures,
    all_class_counts,
    nodes_without_counts,
)
from fl_ec.strategies.fedec_utils import ClientModel

# A fix is reverted when the unfixed model is more accurate on validation with a
# McNemar paired z above this (two-sided 5%).
REVERT_Z = 1.96
# Per-sample correctness of a model on the validation split; None without one.
HitsFn = Callable[[nn.Module], torch.Tensor | None]


def serve_prior_corrected(
    student: nn.Module,
    start: nn.Module | None,
    proxy: torch.Tensor,
    prior: torch.Tensor,
    hits: HitsFn,
    batch_size: int,
    device: torch.device | str,
    server_round: int,
) -> dict[str, float]:
    """Prior-correct ``student`` in place, keeping the best candidate; returns metrics.

    Three candidates compete on validation: the corrected student, the corrected
    ``start`` of distillation (the parameter average, or the previous global model)
    and the student as distilled. Early stopping chose the student *before* any
    correction, and a corrected average can beat a corrected student, so both are
    corrected and scored. ``student`` ends holding the winner. Without validation data
    (``hits`` returns None) ``start`` is ignored and the corrected student is served.
    """
    uncorrected = copy.deepcopy(student.state_dict())
    uncorrected_hits = hits(student)
    correction = correct_prior(student, proxy, prior, batch_size, device)
    candidate_hits = {"student": hits(student)}
    corrected = {"student": copy.deepcopy(student.state_dict())}
    if start is not None and uncorrected_hits is not None:
        correct_prior(start, proxy, prior, batch_size, device)
        candidate_hits["start"] = hits(start)
        corrected["start"] = start.state_dict()
    scores = {name: _mean_or_nan(mask) for name, mask in candidate_hits.items()}
    before = _mean_or_nan(uncorrected_hits)
    best = max(scores, key=lambda name: scores[name])  # ties: the student
    z_uncorrected = (
        paired_z(uncorrected_hits, candidate_hits[best]) if uncorrected_hits is not None else 0.0
    )
    kept = not z_uncorrected > REVERT_Z
    student.load_state_dict(corrected[best] if kept else uncorrected)
    log(
        INFO,
        "round %d: prior correction %s (max |offset| %.2f); val acc %.4f -> %s; "
        "uncorrected better by z=%.2f (revert above %.2f)",
        server_round,
        f"kept, serving the corrected {best}" if kept else "reverted",
        float(correction.offsets.abs().max()),
        before,
        ", ".join(f"{name} {score:.4f}" for name, score in scores.items()),
        z_uncorrected,
        REVERT_Z,
    )
    return {
        "prior-correction-applied": float(kept),
        "prior-correction-served-start": float(kept and best == "start"),
        "prior-correction-max-offset": float(correction.offsets.abs().max()),
        "prior-correction-val-before": before,
        "prior-correction-val-after": scores[best] if kept else before,
        "prior-correction-val-z": z_uncorrected,
    }


def serve_feature_calibrated(
    served: nn.Module,
    statistics: FeatureStatistics,
    stats: FeatureStats,
    settings: CalibrationSettings,
    seed: int,
    hits: HitsFn,
    server_round: int,
    name: str = "served model",
) -> dict[str, float]:
    """Calibrate ``served`` in place from ``stats`` unless it hurts; metrics.

    ``statistics`` is the kind ``stats`` are of: it says which layers change (the
    classifier, or the dense head) and how. ``settings`` says how they are fine-tuned.
    ``name`` says which model in the log (FedHCE calibrates each variant too).
    """
    layers = statistics.layers(served)
    before_state = copy.deepcopy(layers.state_dict())  # the only layers it changes
    before_hits = hits(served)
    metrics = {"calibration-seconds": statistics.calibrate(served, stats, settings, seed=seed)}
    if before_hits is not None:
        after_hits = hits(served)
        metrics["calibration-val-gain"] = hit_rate(after_hits) - hit_rate(before_hits)
        if paired_z(before_hits, after_hits) > REVERT_Z:
            layers.load_state_dict(before_state)
            log(INFO, "round %d: calibration hurt the %s; reverted", server_round, name)
            metrics["feature-calibration-applied"] = 0.0
            return metrics
    metrics["feature-calibration-applied"] = 1.0
    return metrics


def prior_correction(
    student: nn.Module,
    build_start: Callable[[], nn.Module] | None,
    proxy: torch.Tensor,
    accepted: list[ClientModel],
    hits: HitsFn,
    batch_size: int,
    device: torch.device | str,
    server_round: int,
    degraded: DegradedFeatures,
) -> dict[str, float]:
    """FedEC's ``prior`` calibration step: :func:`serve_prior_corrected` towards the
    label prior pooled from the replies' class counts, the start of distillation
    (``build_start()``, scored on validation only) competing with the student.
    Skipped, said once per run, when a reply carries no class counts."""
    counts = all_class_counts(accepted)
    if counts is None:
        degraded.warn(
            "prior-correction",
            "round %d: replies from node(s) %s carry no class counts: calibration "
            "'prior' is skipped in rounds with such replies; %s",
            server_round,
            nodes_without_counts(accepted),
            ADD_CLASS_COUNTS,
        )
        return {"prior-correction-applied": 0.0}
    start = build_start() if build_start is not None else None
    return serve_prior_corrected(
        student, start, proxy, target_prior(counts), hits, batch_size, device, server_round
    )


def _mean_or_nan(mask: torch.Tensor | None) -> float:
    return float("nan") if mask is None else hit_rate(mask)
