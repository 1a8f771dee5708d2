"""The federated view of a dataset: what the server holds and what each client holds.

Both sides derive everything from the same data section
(:class:`~fl_ec.data.settings.DataSection`: dataset, sizes, partitioner) and the run's
seed, so a client's partition is identical in every process and always disjoint from
the server's proxy and validation sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fl_ec.data.partition import ServerHoldout, partition_labels, split_server_holdout
from fl_ec.data.settings import DataSection
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


def server_holdout(data: DataSection, seed: int, num_train: int) -> ServerHoldout:
    """The proxy, validation and client-pool indices of a training set of ``num_train``."""
    return split_server_holdout(
        num_train, data.proxy_size, data.validation_size, data.train_subset, seed
    )


def client_partition_indices(
    data: DataSection, seed: int, num_partitions: int, labels: np.ndarray
) -> list[np.ndarray]:
    """Indices into the *full* training set for every partition (disjoint from the holdout)."""
    pool = server_holdout(data, seed, len(labels)).client_pool
    parts = partition_labels(
        labels[pool], num_partitions, data.partitioner, data.alpha, data.classes_per_client, seed
    )
    return [pool[p] for p in parts]


def load_server_data(data: DataSection, seed: int) -> ServerData:
    """The server's proxy and validation sets (held out of the training set) and the test set."""
    train, test = load_dataset(data.dataset, data.data_dir, data.download)
    holdout = server_holdout(data, seed, len(train))
    return ServerData(
        proxy=train.subset(holdout.proxy),
        validation=train.subset(holdout.validation),
        test=test,
    )


def load_client_data(
    data: DataSection, seed: int, partition_id: int, num_partitions: int
) -> ClientData:
    """Partition ``partition_id`` of ``num_partitions``, split into local train and test rows."""
    train, _ = load_dataset(data.dataset, data.data_dir, data.download)
    indices = client_partition_indices(data, seed, num_partitions, train.labels.numpy())
    # Per-partition seed: the local train/test split differs between clients but is
    # reproducible for each.
    order = np.random.default_rng([seed, partition_id]).permutation(indices[partition_id])
    num_test = int(round(len(order) * CLIENT_TEST_FRACTION))
    return ClientData(train=train.subset(order[num_test:]), test=train.subset(order[:num_test]))
