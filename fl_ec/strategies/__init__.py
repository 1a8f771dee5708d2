"""Flower strategies (thin glue over fl_ec's algorithms), their settings and helpers.

``FedEC`` and ``FedHCE`` subclass Flower's ``FedAvg`` and take every ``FedAvg``
argument; their own settings are the objects exported next to them. The run
machinery they run in -- ``SeededSampling`` and ``TimedAggregation`` wrap any strategy
(``StrategyWrapper``), ``MeteredGrid`` meters any grid -- lives in :mod:`fl_ec.run`
and is re-exported here.
"""

from fl_ec.calibration import CalibrationSettings
from fl_ec.compression import Variant
from fl_ec.distill import DistillSettings
from fl_ec.run.metering import MeteredGrid, TimedAggregation, payload_bytes
from fl_ec.run.sampling import SeededSampler, SeededSampling
from fl_ec.run.wrapper import StrategyWrapper
from fl_ec.strategies.fedec import FedEC
from fl_ec.strategies.fedhce import FedHCE
from fl_ec.strategies.fedhce_utils import TierPolicy
from fl_ec.strategies.replies import ReplyLimits

__all__ = [
    "CalibrationSettings",
    "DistillSettings",
    "FedEC",
    "FedHCE",
    "MeteredGrid",
    "ReplyLimits",
    "SeededSampler",
    "SeededSampling",
    "StrategyWrapper",
    "TierPolicy",
    "TimedAggregation",
    "Variant",
    "payload_bytes",
]
