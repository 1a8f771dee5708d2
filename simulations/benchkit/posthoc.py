"""Post-hoc label-prior correction of finished runs' final models (no re-training).

FedEC's ``calibration="prior"`` shifts the served model's classifier bias every round. A
run without it -- FedAvg above all -- can get the same shift once, after the fact, from
the model it saved. Applying it here tells a reader how much of a corrected FedEC's
lead is the correction itself rather than the ensemble: the baseline a fair comparison
needs, at the cost of a forward pass instead of another run.

The correction is the one FedEC applies (:func:`fl_ec.calibration.correct_prior`), on
the run's own proxy set (all of it, where FedEC uses each round's subset), towards the
pooled label distribution of the clients' data, reverted only where FedEC would revert
it (the uncorrected model significantly better on validation: McNemar's paired z above
:data:`fl_ec.strategies.fedec_calibration.REVERT_Z`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl_ec.calibration import correct_prior, paired_z, target_prior
from fl_ec.config import ExperimentConfig
from fl_ec.data.federated import ServerData, load_server_data
from fl_ec.data.partition import split_server_holdout
from fl_ec.data.sources import load_dataset
from fl_ec.data.tensor_data import TensorData
from fl_ec.results import load_saved_model
from fl_ec.scoring import model_accuracy, model_hits
from fl_ec.strategies.fedec_calibration import REVERT_Z

RunData = tuple[ExperimentConfig, ServerData, TensorData, np.ndarray]


def run_data(metrics: dict) -> RunData:
    """A finished run's config, server data, full train set and the clients' row pool."""
    config = ExperimentConfig.from_run_config(metrics["config"], allow_retired=True)
    data = config.data
    server = load_server_data(data, config.seed)
    train, _ = load_dataset(data.dataset, data.data_dir, data.download)
    pool = split_server_holdout(
        len(train), data.proxy_size, data.validation_size, data.train_subset, config.seed
    ).client_pool
    return config, server, train, pool


def posthoc_prior_correction(
    run_dir: Path, metrics: dict, data: RunData | None = None
) -> tuple[float, float] | None:
    """(final test accuracy, after the correction); None if the run saved no model.

    ``data``: the run's :func:`run_data`, when the caller has loaded it already.
    """
    if not (run_dir / "final_model.pt").exists():
        return None
    _, server, train, pool = data if data is not None else run_data(metrics)
    counts = np.bincount(train.labels.numpy()[pool], minlength=server.test.num_classes)
    model = load_saved_model(run_dir)
    val_x = server.validation.normalize(server.validation.images)
    test_x = server.test.normalize(server.test.images)
    before_val = model_hits(model, val_x, server.validation.labels)
    before_test = model_accuracy(model, test_x, server.test.labels)
    correct_prior(
        model, server.proxy.normalize(server.proxy.images), target_prior([counts.tolist()])
    )
    after_val = model_hits(model, val_x, server.validation.labels)
    if paired_z(before_val, after_val) > REVERT_Z:
        return before_test, before_test  # FedEC would have reverted it
    return before_test, model_accuracy(model, test_x, server.test.labels)
