"""What FedEC does to the served model after aggregating: the run-config's ``calibration``.

:class:`CalibrationSettings` names the fix (none, the label-prior correction, or feature
calibration), when and from whom statistics are gathered, and how the layers are
fine-tuned; :meth:`CalibrationSettings.statistics` picks the kind of feature statistics
(:class:`~fl_ec.calibration.statistics.FeatureStatistics`) that does the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fl_ec.calibration.gaussian import ClassifierGaussian
from fl_ec.calibration.low_rank import DenseMixture, LowRankDense
from fl_ec.calibration.statistics import FeatureStatistics
from fl_ec.errors import SettingError, accepts, check_fields, one_of

# What FedEC does to the served model after aggregating: nothing, the label-prior
# correction (fl_ec.calibration.prior), or retraining layers on virtual features.
CALIBRATION_METHODS = ("none", "prior", "features")
# Which layers feature calibration retrains.
CALIBRATION_LAYERS = ("classifier", "dense")
# Which nodes feature calibration queries: the round's sampled clients, or every node.
CALIBRATION_NODES = ("sampled", "all")
# Which rounds are calibrated (calibration_every).
_ROUNDS_REASON = "is unknown: choose one of all, last, every-N (N >= 1)"
# The run-config's ``calibration`` values, as CalibrationSettings fields. ``dense`` is
# the best single Gaussian per class (rank 64); ``dense-mixture``, 8 components of rank
# 32 per class, measured best overall (docs/calibration.md).
CALIBRATION_PRESETS: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "prior": {"method": "prior"},
    "classifier": {"method": "features", "layers": "classifier"},
    "dense": {"method": "features", "layers": "dense", "rank": 64, "components": 1},
    "dense-mixture": {"method": "features", "layers": "dense", "rank": 32, "components": 8},
}


@dataclass(frozen=True)
class CalibrationSettings:
    """What FedEC does to the served model after aggregating, and how.

    ``method``: ``none``; ``prior``, the label-prior correction of the classifier's
    bias (:mod:`fl_ec.calibration.prior`); or ``features``, fine-tuning layers on
    virtual features drawn from the clients' statistics (the fields below).

    ``layers``: ``classifier`` (CCVR, full covariances of the classifier's inputs;
    :class:`~fl_ec.calibration.gaussian.ClassifierGaussian`) or ``dense`` (every dense
    layer, from rank-``rank`` statistics of the first dense layer's inputs;
    :mod:`fl_ec.calibration.low_rank`). ``components`` > 1 (``dense`` only): each
    client splits each class it holds into that many k-means clusters and sends one
    rank-``rank`` Gaussian per cluster; the server samples their mixture.
    ``rounds``: which rounds are calibrated (:func:`calibration_every`). ``nodes``: who
    is asked for statistics, the round's ``sampled`` clients or ``all`` connected
    nodes. Under partial participation a round's few clients hold a few classes, and a
    head calibrated on their statistics forgets the others; a query is one forward
    pass, far cheaper than the training round that sampled them. ``samples``,
    ``epochs``, ``lr`` and ``batch_size``: the virtual features drawn and how the
    layers are fine-tuned on them.

    The run-config names combinations by :meth:`preset`. Construction checks every
    field; a bad one raises :class:`~fl_ec.errors.SettingError` (a ``ValueError``)
    naming it.
    """

    method: str = "features"
    layers: str = "classifier"
    rank: int = 64
    components: int = 1
    rounds: str = "all"
    nodes: str = "sampled"
    samples: int = 20_000
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 128

    def __post_init__(self) -> None:
        check_fields(
            self,
            [
                ("method", self.method in CALIBRATION_METHODS, one_of(CALIBRATION_METHODS)),
                ("nodes", self.nodes in CALIBRATION_NODES, one_of(CALIBRATION_NODES)),
                ("layers", self.layers in CALIBRATION_LAYERS, one_of(CALIBRATION_LAYERS)),
                ("rank", self.rank >= 1, "must be >= 1"),
                ("components", self.components >= 1, "must be >= 1"),
                (
                    "components",
                    self.components == 1 or self.layers == "dense",
                    'need the dense calibration: set layers="dense" or components=1',
                ),
                ("samples", self.samples >= 1, "must be >= 1"),
                ("rounds", accepts(calibration_every, self.rounds), _ROUNDS_REASON),
            ],
        )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CalibrationSettings:
        """The settings of the run-config's ``calibration=name``, with ``overrides``.

        E.g. ``CalibrationSettings.preset("dense-mixture", rounds="last", nodes="all")``.
        An unknown ``name`` raises :class:`~fl_ec.errors.SettingError` for the field
        ``preset``.
        """
        if name not in CALIBRATION_PRESETS:
            raise SettingError(cls.__name__, "preset", name, one_of(CALIBRATION_PRESETS))
        return cls(**{**CALIBRATION_PRESETS[name], **overrides})

    def statistics(self) -> FeatureStatistics[Any]:
        """The kind of feature statistics that ``layers``, ``rank`` and ``components`` name.

        ``classifier``: :class:`~fl_ec.calibration.gaussian.ClassifierGaussian`;
        ``dense``: :class:`~fl_ec.calibration.low_rank.LowRankDense`, or with
        ``components`` > 1 :class:`~fl_ec.calibration.low_rank.DenseMixture`.
        """
        if self.layers == "classifier":
            return ClassifierGaussian()
        if self.components == 1:
            return LowRankDense(self.rank)
        return DenseMixture(self.rank, self.components)


def calibration_every(rounds: str) -> int:
    """Calibrate every this many rounds, plus the last (0: the last only).

    ``rounds`` is a ``calibration-rounds`` value: ``all`` (1), ``last`` (0) or
    ``every-N`` (N >= 1), which buys a calibrated model at rounds N, 2N, ... for a
    query each, without paying one every round.
    """
    if rounds == "all":
        return 1
    if rounds == "last":
        return 0
    count = rounds.removeprefix("every-")
    if count != rounds and count.isdigit() and int(count) >= 1:
        return int(count)
    raise ValueError(f"calibration-rounds={rounds!r} {_ROUNDS_REASON}")
