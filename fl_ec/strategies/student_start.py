"""Where distillation starts, and what the clients train next: one object per rule.

FedDF starts the student from the parameter average of the round's replies.
:class:`AverageStart` is FedEC's: the replies that share the global architecture,
combined by a :class:`~fl_ec.robust.StartRule` (FedAvg's weighted mean by default).
FedHCE's start folds its compressed variants back into full-model coordinates
(:class:`~fl_ec.strategies.variant_bank.FoldedStart`). Either returns the student and,
for ``client_start="average"``, the state the next round's clients train from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fl_ec.models.spec import ArchSpec, state_shapes
from fl_ec.robust import StartRule
from fl_ec.strategies.fedec_utils import ClientModel, group_by_spec
from fl_ec.strategies.global_model import GlobalModel

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StartOutcome:
    """The student before distillation, and the clients' next state (None: the student)."""

    student: nn.Module
    client_start: State | None


class StudentStart(Protocol):
    """Builds the round's student start from the accepted replies.

    ``previous`` is the last global model, ``sent`` the state the clients trained
    from (the last round's parameter average under ``client_start="average"``).
    """

    def __call__(
        self, accepted: list[ClientModel], previous: nn.Module, sent: State
    ) -> StartOutcome: ...


def same_architecture(
    accepted: list[ClientModel], spec: ArchSpec | None, previous: nn.Module
) -> list[ClientModel]:
    """The first group of replies whose spec and array shapes are the global model's."""
    shapes = state_shapes(previous.state_dict())
    for group in group_by_spec(accepted).values():
        if group[0].spec == spec and state_shapes(group[0].state) == shapes:
            return group
    return []


def snapshot(model: nn.Module) -> State:
    """A copy of ``model``'s state that later in-place training leaves alone.

    Contiguous, as the arrays a client receives are, whatever the model's memory format.
    """
    return {
        k: v.detach().clone(memory_format=torch.contiguous_format)
        for k, v in model.state_dict().items()
    }


class AverageStart:
    """FedDF's start: the same-architecture replies combined by ``rule``.

    Replies of a smaller architecture join the teacher only. Without a
    same-architecture reply the student starts from the previous global model and the
    clients get the student.
    """

    def __init__(self, model: GlobalModel, rule: StartRule) -> None:
        self.model = model
        self.rule = rule

    def __call__(
        self, accepted: list[ClientModel], previous: nn.Module, sent: State
    ) -> StartOutcome:
        same_arch = same_architecture(accepted, self.model.spec, previous)
        if not same_arch:
            return StartOutcome(previous, None)
        # The updates are measured from what the clients trained from.
        state = self.rule.combine(
            [m.state for m in same_arch], [m.num_examples for m in same_arch], sent
        )
        student = self.model.from_state(state)
        return StartOutcome(student, snapshot(student))
