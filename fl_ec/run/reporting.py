"""What an fl-ec strategy reports to the ServerApp beyond Flower's result.

Flower's ``Strategy.start`` returns the final arrays and the aggregated client
metrics. FedEC and FedHCE measure more on the server each round (teacher and
student validation accuracy, distillation steps, replies they rejected), and at the
end of a run they have more models to keep (EC-DNN's ensemble of the last round's
client models; FedHCE's compressed variants and their HCE ensemble). They implement
:class:`RunReporter`. The ServerApp checks a strategy against it once
(``isinstance``); any other strategy, e.g. Flower's own ``FedAvg``, reports nothing
beyond its result.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from fl_ec.data.tensor_data import TensorData
from fl_ec.results import RunRecorder

# A strategy's server-side measurement of a round: a number, or a small table (per node,
# per variant) of numbers or names.
MetricValue = float | dict[str, Any]
RoundMetrics = dict[str, MetricValue]


@runtime_checkable
class RunReporter(Protocol):
    """A strategy with server-side round metrics and end-of-run artifacts.

    ``server_metrics``: per round number, the server's own measurements of that round
    (numbers, or small per-node / per-variant tables as dicts). The ServerApp merges
    them into the round's record in ``metrics.json``; ``rejected-replies`` counts the
    training replies the strategy rejected, ``error-replies`` those of them that were
    error replies (already counted as rejected when they arrived).
    """

    server_metrics: dict[int, RoundMetrics]

    def save_artifacts(self, recorder: RunRecorder, test: TensorData) -> None:
        """Write what the run produced besides the global model; called once after ``start``.

        Models go into ``recorder``'s run folder (``recorder.write_model``), their
        test-set results into ``recorder.extra_summary``; ``test`` is the server's test
        split. Nothing to write (e.g. no round completed) is not an error.
        """
        ...
