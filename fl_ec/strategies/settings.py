"""FedEC's own choices, each checked once, here.

:class:`FedECSettings` holds what FedEC decides that no algorithm module owns: which
teacher rule, how many clients the teacher may trim, what the clients train from, how
much of the proxy set a round uses and how many valid replies a round needs. The
distillation, calibration and start rule have settings of their own
(:class:`~fl_ec.distill.DistillSettings`, :class:`~fl_ec.calibration.CalibrationSettings`,
:mod:`fl_ec.robust`). ``FedEC(...)`` builds this object from its arguments and the
run-config's FedEC section builds the same object, so a bad value fails with the same
rule either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from fl_ec.ensemble import RULES
from fl_ec.errors import accepts, check_fields, one_of
from fl_ec.robust import check_trim

CLIENT_STARTS = ("student", "average")  # what the next round's clients train from


@dataclass(frozen=True)
class FedECSettings:
    """FedEC's round choices (see :class:`~fl_ec.strategies.FedEC` for each)."""

    teacher_rule: str = "gated"
    teacher_trim: float = 0
    client_start: str = "average"
    proxy_per_round: int = 0
    proxy_batch_size: int = 512
    min_valid_replies: int = 1

    def __post_init__(self) -> None:
        check_fields(
            self,
            [
                ("teacher_rule", self.teacher_rule in RULES, one_of(RULES)),
                ("client_start", self.client_start in CLIENT_STARTS, one_of(CLIENT_STARTS)),
                ("proxy_per_round", self.proxy_per_round >= 0, "must be >= 0 (0: all)"),
                ("proxy_batch_size", self.proxy_batch_size > 0, "must be > 0"),
                ("min_valid_replies", self.min_valid_replies >= 1, "must be >= 1"),
                (
                    "teacher_trim",
                    accepts(check_trim, self.teacher_trim),
                    "is neither a number of clients (1, 2, ...) nor a fraction of them "
                    "(0 < trim < 1); 0 trims none",
                ),
            ],
        )

    @property
    def trains_average(self) -> bool:
        """Whether the clients train the parameter average (``client_start="average"``)."""
        return self.client_start == "average"

