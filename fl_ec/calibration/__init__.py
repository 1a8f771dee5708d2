"""Fixes of an aggregated model's last layers, from statistics the clients already hold.

* :mod:`~fl_ec.calibration.prior` -- the label-prior correction: shift the
  classifier's bias so its mean prediction on the proxy inputs matches the
  federation's label distribution (``calibration="prior"``), and the paired test that
  decides whether a fix is kept.
* Feature calibration (CCVR): retrain the last layers on virtual features drawn from
  the clients' class-conditional statistics. One object per kind of statistics, each
  with ``measure`` / ``to_arrays`` / ``parse`` / ``merge`` / ``calibrate``
  (:class:`~fl_ec.calibration.statistics.FeatureStatistics`):
  :class:`~fl_ec.calibration.gaussian.ClassifierGaussian` (``calibration="classifier"``),
  :class:`~fl_ec.calibration.low_rank.LowRankDense` (``"dense"``) and
  :class:`~fl_ec.calibration.low_rank.DenseMixture` (``"dense-mixture"``).
* :mod:`~fl_ec.calibration.settings` -- :class:`CalibrationSettings`, the run-config's
  ``calibration`` presets; :meth:`CalibrationSettings.statistics` picks the kind.

Nothing here knows about Flower: :mod:`fl_ec.strategies.fedec_calibration` applies the
fixes to the served model, and the ClientApp measures the statistics on query (the
query's keys: :mod:`fl_ec.protocol`).
"""

from fl_ec.calibration.gaussian import ClassFeatureStats, ClassifierGaussian, classifier_inputs
from fl_ec.calibration.low_rank import (
    MIN_CLUSTER_ROWS,
    DenseMixture,
    LowRankClassStats,
    LowRankDense,
    LowRankMixture,
    as_mixture,
    dense_head,
    kmeans_clusters,
    low_rank_factor,
)
from fl_ec.calibration.prior import (
    PriorCorrection,
    classifier_of,
    correct_prior,
    model_logits,
    paired_z,
    prior_offsets,
    target_prior,
)
from fl_ec.calibration.settings import (
    CALIBRATION_LAYERS,
    CALIBRATION_METHODS,
    CALIBRATION_NODES,
    CALIBRATION_PRESETS,
    CalibrationSettings,
    calibration_every,
)
from fl_ec.calibration.statistics import (
    FeatureStatistics,
    FitSettings,
    head_entry,
    layer_inputs,
    model_bytes,
)

# Statistics of any kind, as FeatureStatistics.parse returns them.
FeatureStats = ClassFeatureStats | LowRankClassStats | LowRankMixture

__all__ = [
    "CALIBRATION_LAYERS",
    "CALIBRATION_METHODS",
    "CALIBRATION_NODES",
    "CALIBRATION_PRESETS",
    "MIN_CLUSTER_ROWS",
    "CalibrationSettings",
    "ClassFeatureStats",
    "ClassifierGaussian",
    "DenseMixture",
    "FeatureStatistics",
    "FeatureStats",
    "FitSettings",
    "LowRankClassStats",
    "LowRankDense",
    "LowRankMixture",
    "PriorCorrection",
    "as_mixture",
    "calibration_every",
    "classifier_inputs",
    "classifier_of",
    "correct_prior",
    "dense_head",
    "head_entry",
    "kmeans_clusters",
    "layer_inputs",
    "low_rank_factor",
    "model_bytes",
    "model_logits",
    "paired_z",
    "prior_offsets",
    "target_prior",
]
