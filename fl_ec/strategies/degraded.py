"""Features that need client support, and how FedEC says once per run that one is off.

The ``gated`` and ``label-aware`` teachers and the ``prior`` correction need class
counts in the train replies; feature calibration needs clients that answer its
statistics query. A stock ClientApp sends neither: the feature degrades and one
warning per run says which and what the ClientApp must add.
"""

from __future__ import annotations

from logging import DEBUG, WARNING
from typing import Any

from flwr.common.logger import log

from fl_ec.protocol import CLASS_COUNTS_KEY, STATS_RECORD_KEY, TRAIN_INFO_KEY
from fl_ec.strategies.fedec_utils import ClientModel

# What a ClientApp adds to its train reply for the teacher rules and the prior correction
# that need class counts.
ADD_CLASS_COUNTS = (
    f"a ClientApp adds them to its train reply as a ConfigRecord {TRAIN_INFO_KEY!r} "
    f"holding {CLASS_COUNTS_KEY!r}, its training examples per class (or replies with "
    "fl_ec.clients.reply_variant(msg, model, metrics, class_counts=...))"
)
# What a ClientApp adds to answer feature calibration's statistics query.
ADD_FEATURE_STATS = (
    "a ClientApp answers it with a query handler (@app.query()) that replies with the "
    f"{STATS_RECORD_KEY!r} ArrayRecord of fl_ec.calibration.FeatureStatistics.to_arrays, "
    "as fl-ec's ClientApp (fl_ec.clients.client_app.query_handler) does"
)


class DegradedFeatures:
    """The degraded features already reported in this run."""

    def __init__(self) -> None:
        self.reported: set[str] = set()

    def new_run(self) -> None:
        """A new run reports each degraded feature again, once."""
        self.reported.clear()

    def warn(self, key: str, message: str, *args: Any) -> None:
        """Log ``message`` as a warning the first time ``key`` degrades in the run.

        Later rounds log it at DEBUG: a stock ClientApp stays one all run long.
        """
        if key in self.reported:
            log(DEBUG, message, *args)
            return
        self.reported.add(key)
        log(WARNING, message + " (reported once per run)", *args)


def nodes_without_counts(models: list[ClientModel]) -> list[int]:
    return sorted(m.node_id for m in models if m.class_counts is None)


def all_class_counts(models: list[ClientModel]) -> list[list[float]] | None:
    """Every model's class counts, or None if one has none."""
    if any(m.class_counts is None for m in models):
        return None
    return [list(m.class_counts) for m in models]  # type: ignore[arg-type]
