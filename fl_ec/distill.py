"""Compression by distillation: train a student to match cached teacher logits.

FedDF-style: KL(teacher || student) at temperature T, scaled by T^2 so gradient size
does not depend on T; Adam with cosine decay; every ``eval_every`` steps the student is
scored on the server's labelled validation split, the best checkpoint is kept, and
training stops after ``patience`` steps without improvement. The starting point is
scored first, so distillation can never return something worse (on validation) than
the model it started from -- typically the FedAvg average.

BatchNorm: the student starts from averaged client parameters *and averaged running
statistics*, which describe no real data distribution when clients are non-IID. Before
scoring the start, and throughout distillation, BN statistics are re-estimated on the
proxy set (which is drawn from the global distribution): first a full pass with a
cumulative average (``momentum=None``), then the usual running update in train mode.
Models without BatchNorm are unaffected.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the universal alias

from fl_ec.errors import check_fields
from fl_ec.models.layout import channels_last
from fl_ec.scoring import model_accuracy


@dataclass(frozen=True)
class DistillSettings:
    """Settings of one distillation; the run-config sets ``steps`` (``distill-steps``) and
    ``batch_size`` (``distill-batch-size``) of the student's.

    Proxy batch size, Adam lr (cosine decay to 0 over ``steps``), KD temperature,
    steps between validation checks (the best checkpoint is kept) and the steps
    without a better validation accuracy after which it stops. A value out of range
    raises :class:`~fl_ec.errors.SettingError` (a ``ValueError``) naming the field.
    """

    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 1.0
    eval_every: int = 50
    patience: int = 100
    recalibrate_bn: bool = True

    def __post_init__(self) -> None:
        check_fields(
            self,
            (
                ("steps", self.steps >= 0, "must be >= 0 (0: no distillation step)"),
                ("batch_size", self.batch_size >= 1, "must be >= 1"),
                ("lr", self.lr > 0, "must be > 0"),
                ("temperature", self.temperature > 0, "must be > 0"),
                ("eval_every", self.eval_every >= 1, "must be >= 1"),
                ("patience", self.patience >= 0, "must be >= 0"),
            ),
        )


@dataclass
class DistillResult:
    start_accuracy: float
    best_accuracy: float
    steps: int
    best_step: int
    seconds: float


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits.float() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    inputs: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> None:
    """Replace BN running statistics by a cumulative average over ``inputs``."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    model.to(device).train()
    with channels_last(model):
        for batch in inputs.split(batch_size):
            model(batch.to(device))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum


def augmented_views(
    inputs: torch.Tensor, copies: int, seed: int, max_shift: int = 2, flip: bool = True
) -> torch.Tensor:
    """``copies`` augmented versions of ``inputs`` (N, C, H, W): random shifts (+ flips).

    Shifts pad with the border value (torch.roll would wrap objects around); the
    same seed gives the same views, so a round's teacher labels stay aligned.
    """
    generator = torch.Generator().manual_seed(seed)
    n, _, h, w = inputs.shape
    views = []
    for _ in range(copies):
        padded = F.pad(inputs, (max_shift,) * 4, mode="replicate")
        dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
        batch = torch.arange(n).view(n, 1, 1, 1)
        chan = torch.arange(inputs.shape[1]).view(1, -1, 1, 1)
        view = padded[batch, chan, rows, cols]
        if flip:
            flips = torch.rand(n, generator=generator) < 0.5
            view[flips] = view[flips].flip(-1)
        views.append(view)
    return torch.cat(views) if views else inputs[:0]


def distill(
    student: nn.Module,
    proxy_inputs: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    validation: tuple[torch.Tensor, torch.Tensor] | None,
    settings: DistillSettings,
    device: torch.device | str = "cpu",
    seed: int = 0,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> DistillResult:
    """Distil ``teacher_logits`` (aligned with ``proxy_inputs`` rows) into ``student``.

    ``student`` is modified in place and ends holding the best checkpoint on
    ``validation`` (inputs, labels); without validation it runs every step and keeps
    the last one (accuracies are then NaN). ``loss_fn(student, x, teacher_batch)``
    replaces the KD loss (e.g. the diversity-aware loss of several variants).

    With ``settings.steps == 0`` no step is taken, so ``teacher_logits`` may be None:
    BatchNorm is still re-estimated on the proxy set and the start is scored.
    """
    if teacher_logits is None:
        if settings.steps > 0:
            raise ValueError("teacher_logits is None: only distill(steps=0) can do without")
    elif proxy_inputs.shape[0] != teacher_logits.shape[0]:
        raise ValueError("proxy_inputs and teacher_logits must have the same number of rows")
    start_time = time.perf_counter()
    student.to(device)
    with channels_last(student):
        return _distill(
            student,
            proxy_inputs,
            teacher_logits,
            validation,
            settings,
            device,
            seed,
            loss_fn,
            start_time,
        )


def _distill(
    student: nn.Module,
    proxy_inputs: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    validation: tuple[torch.Tensor, torch.Tensor] | None,
    settings: DistillSettings,
    device: torch.device | str,
    seed: int,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None,
    start_time: float,
) -> DistillResult:
    if settings.recalibrate_bn:  # a no-op for models without BatchNorm
        recalibrate_batchnorm(student, proxy_inputs, device=device)

    def score() -> float:
        if validation is None:
            return float("nan")
        return model_accuracy(student, validation[0], validation[1], device=device)

    best_accuracy = start_accuracy = score()
    best_state = copy.deepcopy(student.state_dict())
    best_step = 0
    if settings.steps <= 0:
        return DistillResult(start_accuracy, best_accuracy, 0, 0, time.perf_counter() - start_time)
    optimizer = torch.optim.Adam(student.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
    generator = torch.Generator().manual_seed(seed)
    n = proxy_inputs.shape[0]
    order, cursor, step = torch.randperm(n, generator=generator), 0, 0
    while step < settings.steps:
        if cursor + settings.batch_size > n:  # reshuffle each pass over the proxy set
            order, cursor = torch.randperm(n, generator=generator), 0
        index = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        student.train()
        x = proxy_inputs[index].to(device, non_blocking=True)
        target = teacher_logits[index].to(device, non_blocking=True)
        if loss_fn is None:
            loss = kd_loss(student(x), target, settings.temperature)
        else:
            loss = loss_fn(student, x, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        if validation is not None and (step % settings.eval_every == 0 or step == settings.steps):
            current = score()
            if current > best_accuracy:
                best_accuracy, best_step = current, step
                best_state = copy.deepcopy(student.state_dict())
            elif step - best_step >= settings.patience:
                break
    if validation is None:
        best_step = step
    else:
        student.load_state_dict(best_state)
    return DistillResult(
        start_accuracy, best_accuracy, step, best_step, time.perf_counter() - start_time
    )
