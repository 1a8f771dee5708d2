"""The steps of one FedEC round, each a function of what it needs.

A round, after the replies are checked: the proxy subset (:func:`proxy_for_round`), the
student's start (:mod:`~fl_ec.strategies.student_start`), the ensemble teacher
(:func:`run_teacher`), the distillation (:func:`distill_student`) and, when configured,
the prior correction. :class:`RoundOutcome` carries what they produce to the rest of
the round: the served model's feature calibration and, in FedHCE, the variants. None
of this needs a ``Grid``, so each step is tested by calling it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO

import torch
from flwr.common.logger import log
from torch import nn

from fl_ec.distill import DistillResult, DistillSettings, distill
from fl_ec.ensemble import WEIGHTED_RULES, TeacherOutputs, teacher_logits
from fl_ec.run.reporting import RoundMetrics
from fl_ec.scoring import accuracy, model_accuracy, model_hits
from fl_ec.strategies.degraded import (
    ADD_CLASS_COUNTS,
    DegradedFeatures,
    all_class_counts,
    nodes_without_counts,
)
from fl_ec.strategies.fedec_utils import ClientModel

# The seeds of a round are spaced this far apart per unit of the run's seed, so two runs
# with neighbouring seeds never draw a round's proxy subset or batches alike.
_SEED_STRIDE = 10_007
# Replaces a student trainer without early stopping (e.g. layer-parallel): trains the
# student in place on (proxy, teacher logits).
StudentTrainer = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]
Validation = tuple[torch.Tensor, torch.Tensor]


def round_seed(seed: int, server_round: int, offset: int = 0) -> int:
    """The seed of one random draw of round ``server_round``: every per-round seed.

    ``offset`` tells apart the draws of one round (FedHCE's variants: 1 for their
    distillation, ``7_919 * (i + 1)`` for the calibration of variant ``i``).
    """
    return seed * _SEED_STRIDE + server_round + offset


@dataclass(frozen=True)
class Teacher:
    """The round's ensemble teacher: its proxy inputs and their combined logits."""

    proxy: torch.Tensor
    logits: torch.Tensor


@dataclass
class RoundOutcome:
    """What a round's aggregation produced, for the steps after it.

    ``student``: the model to serve (distilled, prior-corrected; feature calibration,
    when the round has one, changes it later in place). ``client_start``: under
    ``client_start="average"``, the state the next round's clients train from.
    ``teacher``: None when nothing trained on it. ``metrics``: the round's server-side
    measurements, which every later step adds to.
    """

    server_round: int
    accepted: list[ClientModel]
    student: nn.Module
    client_start: dict[str, torch.Tensor] | None
    teacher: Teacher | None
    metrics: RoundMetrics = field(default_factory=dict)


def proxy_for_round(proxy: torch.Tensor, per_round: int, seed: int) -> torch.Tensor:
    """A seeded random subset of ``per_round`` proxy rows (all of them for 0 or more)."""
    if 0 < per_round < len(proxy):
        chosen = torch.randperm(len(proxy), generator=torch.Generator().manual_seed(seed))
        return proxy[chosen[:per_round]]
    return proxy


def teacher_rule_for(
    rule: str, accepted: list[ClientModel], degraded: DegradedFeatures, server_round: int
) -> str:
    """``rule``, or ``mean-logits`` when it weighs by class counts and a reply has none.

    Replies from clients that report no class counts (e.g. a stock quickstart
    ClientApp) get the plain mean, which needs none; said once per run.
    """
    if rule not in WEIGHTED_RULES or all_class_counts(accepted) is not None:
        return rule
    degraded.warn(
        "teacher-rule",
        "round %d: replies from node(s) %s carry no class counts: teacher rule %r "
        "runs as %r in rounds with such replies; %s",
        server_round,
        nodes_without_counts(accepted),
        rule,
        "mean-logits",
        ADD_CLASS_COUNTS,
    )
    return "mean-logits"


@dataclass(frozen=True)
class TeacherSettings:
    """How the teacher combines the client models (see :func:`fl_ec.ensemble.teacher_logits`)."""

    rule: str
    trim: float
    batch_size: int
    device: torch.device | str


def run_teacher(
    accepted: list[ClientModel],
    proxy: torch.Tensor,
    validation: Validation | None,
    settings: TeacherSettings,
    needed: bool,
) -> tuple[Teacher | None, dict[str, float]]:
    """The ensemble teacher on ``proxy`` (when ``needed``) and its validation accuracy.

    Without anything to train on it (``needed`` false: e.g. ``distill-steps=0``) the
    proxy pass over every client model would only cost time and is skipped; the
    validation pass still reports the teacher's accuracy.
    """
    class_counts = all_class_counts(accepted)

    def combine(inputs: torch.Tensor) -> TeacherOutputs:
        return teacher_logits(
            [m.model for m in accepted],
            inputs,
            rule=settings.rule,
            batch_size=settings.batch_size,
            device=settings.device,
            class_counts=class_counts,
            trim=settings.trim,
        )
    metrics: dict[str, float] = {"teacher-seconds": 0.0}
    teacher = None
    if needed:
        outputs = combine(proxy)
        metrics["teacher-seconds"] = outputs.seconds
        metrics["teacher-samples-per-second"] = outputs.samples_per_second
        teacher = Teacher(proxy, outputs.logits)
    if validation is not None:
        metrics["teacher-val-accuracy"] = accuracy(combine(validation[0]).logits, validation[1])
    return teacher, metrics


def distill_student(
    student: nn.Module,
    proxy: torch.Tensor,
    teacher: Teacher | None,
    validation: Validation | None,
    settings: DistillSettings,
    device: torch.device | str,
    seed: int,
    trainer: StudentTrainer | None = None,
    score: Callable[[nn.Module], float] | None = None,
) -> DistillResult:
    """Compress ``teacher`` into ``student`` in place: Adam KD, or ``trainer``.

    Without a teacher no step is taken; BatchNorm statistics are still re-estimated on
    the proxy set and the start scored. An external ``trainer`` has no early stopping
    of its own: the better of start and result on validation (``score``) is kept.
    """
    if teacher is None:
        return distill(student, proxy, None, validation, settings, device)
    if trainer is None:
        return distill(student, proxy, teacher.logits, validation, settings, device, seed)
    score = score or (lambda _: float("nan"))
    started = time.perf_counter()
    before = copy.deepcopy(student.state_dict())
    start = score(student)
    trainer(student, proxy, teacher.logits)
    end = score(student)
    if end < start:
        student.load_state_dict(before)
    return DistillResult(
        start, max(start, end), 1, int(end >= start), time.perf_counter() - started
    )


def distill_metrics(result: DistillResult, validated: bool) -> dict[str, float]:
    """The round's distillation metrics (validation accuracies only with validation data)."""
    metrics = {
        "distill-steps": float(result.steps),
        "distill-best-step": float(result.best_step),
        "distill-seconds": result.seconds,
    }
    if validated:
        metrics["student-start-val-accuracy"] = result.start_accuracy
        metrics["student-val-accuracy"] = result.best_accuracy
    return metrics


def log_round(server_round: int, rule: str, result: DistillResult, metrics: RoundMetrics) -> None:
    """One line on the round's teacher and distillation."""
    log(
        INFO,
        "round %d: teacher %.2fs (%s), distill %d steps %.2fs; val acc teacher %.4f, "
        "average %.4f -> student %.4f",
        server_round,
        metrics["teacher-seconds"],
        rule,
        result.steps,
        result.seconds,
        metrics.get("teacher-val-accuracy", float("nan")),
        result.start_accuracy,
        result.best_accuracy,
    )


class ValidationScorer:
    """Scores models on the server's labelled validation split (none: nothing to score)."""

    def __init__(
        self, validation: Validation | None, batch_size: int, device: torch.device | str
    ) -> None:
        self.validation = validation
        self.batch_size = batch_size
        self.device = device

    def hits(self, model: nn.Module) -> torch.Tensor | None:
        """Per-sample correctness on validation (None without validation data)."""
        if self.validation is None:
            return None
        inputs, labels = self.validation
        return model_hits(model, inputs, labels, self.batch_size, self.device)

    def accuracy(self, model: nn.Module) -> float:
        """Validation accuracy (NaN without validation data)."""
        if self.validation is None:
            return float("nan")
        return model_accuracy(model, self.validation[0], self.validation[1], device=self.device)
