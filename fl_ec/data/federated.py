"""The federated view of a dataset: what the server holds and what each client holds.

Both sides derive everything from the same :class:`~fl_ec.config.ExperimentConfig`
(dataset, seed, sizes, partitioner), so a client's partition is identical in every
process and always disjoint from the server's proxy and validation sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fl_ec.config import ExperimentConfig
from fl_ec.data.partition import partition_labels, split_server_holdout
from fl_ec.data.sources import load_dataset
from fl_ec.data.tensor_data import TensorData

# Share of each client's partition it keeps for its local ``evaluate``.
CLIENT_TEST_FRACTION = 0.1


@dataclass
class ServerData:
    """The server's data: an unlabeled proxy set, a labelled validation set, the test set."""

    proxy: TensorData
    validation: TensorData
    test: TensorData


@dataclass
class ClientData:
    """One client's partition, split into local train and local test rows."""

    train: TensorData
    test: TensorData


def client_partition_indices(
    config: ExperimentConfig, num_partitions: int, labels: np.ndarray
) -> list[np.ndarray]:
    """Indices into the *full* training set for every partition (disjoint from the holdout)."""
    holdout = split_server_holdout(
        len(labels), config.proxy_size, config.validation_size, config.train_subset, config.seed
    )
    pool = holdout.client_pool
    parts = partition_labels(
        labels[pool],
        num_partitions,
        config.partitioner,
        config.alpha,
        config.classes_per_client,
        config.seed,
    )
    return [pool[p] for p in parts]


def load_server_data(config: ExperimentConfig) -> ServerData:
    train, test = load_dataset(config.dataset, config.data_dir, config.download)
    holdout = split_server_holdout(
        len(train), config.proxy_size, config.validation_size, config.train_subset, config.seed
    )
    return ServerData(
        proxy=train.subset(holdout.proxy),
        validation=train.subset(holdout.validation),
        test=test,
    )


def load_client_data(
    config: ExperimentConfig, partition_id: int, num_partitions: int
) -> ClientData:
    train, _ = load_dataset(config.dataset, config.data_dir, config.download)
    indices = client_partition_indices(config, num_partitions, train.labels.numpy())[partition_id]
    # Per-partition seed: the local train/test split differs between clients but is
    # reproducible for each.
    order = np.random.default_rng([config.seed, partition_id]).permutation(indices)
    num_test = int(round(len(order) * CLIENT_TEST_FRACTION))
    return ClientData(train=train.subset(order[num_test:]), test=train.subset(order[:num_test]))
