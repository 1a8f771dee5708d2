"""Server hold-out and client partitions, all seeded and reproducible in any process.

Every client process recomputes its own partition from the same seed (nothing about
data crosses the wire), so the functions here must be pure functions of their
arguments. The label partitioners themselves are flwr-datasets' -- applied to an
in-memory table of ``(label, index)`` rows, so no dataset hub is involved and the
partition comes back as row indices into our tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from fl_ec.errors import DataError


@dataclass(frozen=True)
class ServerHoldout:
    """Index sets into the training set: server proxy, server validation, client pool.

    The three are disjoint by construction. ``proxy`` is used unlabeled (for
    ensemble distillation), ``validation`` labelled (for early stopping), and clients
    only ever see indices from ``client_pool``.
    """

    proxy: np.ndarray
    validation: np.ndarray
    client_pool: np.ndarray


def split_server_holdout(
    num_train: int, proxy_size: int, validation_size: int, train_subset: int, seed: int
) -> ServerHoldout:
    """Carve the proxy and validation sets off a seeded permutation of the training set.

    ``train_subset > 0`` keeps only that many samples for the clients (a fixed subset,
    the same for every method), leaving the proxy and validation sets unchanged.
    """
    if proxy_size + validation_size >= num_train:
        raise DataError(
            f"proxy-size={proxy_size} + validation-size={validation_size} leave no "
            f"training data of the {num_train} samples: lower them"
        )
    order = np.random.default_rng(seed).permutation(num_train)
    proxy = np.sort(order[:proxy_size])
    validation = np.sort(order[proxy_size : proxy_size + validation_size])
    pool = order[proxy_size + validation_size :]
    if train_subset > 0:
        pool = pool[:train_subset]
    return ServerHoldout(proxy=proxy, validation=validation, client_pool=np.sort(pool))


def partition_labels(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 42,
) -> list[np.ndarray]:
    """Split positions ``0..len(labels)-1`` into ``num_partitions`` disjoint index arrays.

    ``partitioner`` is ``iid``, ``dirichlet`` (per-class proportions drawn from
    Dir(alpha)) or ``pathological`` (each client holds ``classes_per_client``
    classes). Together the partitions cover every position exactly once, except that
    the pathological partitioner leaves out classes no client was assigned.
    """
    labels = np.asarray(labels)
    if num_partitions <= 0:
        raise DataError(f"num-partitions={num_partitions} must be >= 1")
    if num_partitions > len(labels):
        raise DataError(
            f"num-partitions={num_partitions} exceeds the {len(labels)} client training "
            "samples: use fewer nodes (num-supernodes) or a larger train-subset"
        )
    return [
        np.asarray(p)
        for p in _partition_cached(
            tuple(labels.tolist()),
            num_partitions,
            partitioner,
            float(alpha),
            int(classes_per_client),
            int(seed),
        )
    ]


@lru_cache(maxsize=8)
def _partition_cached(
    labels: tuple[int, ...],
    num_partitions: int,
    partitioner: str,
    alpha: float,
    classes_per_client: int,
    seed: int,
) -> tuple[tuple[int, ...], ...]:
    # Imported lazily: flwr-datasets pulls in HF `datasets`, a second of import time
    # that pure-torch users of fl_ec should not pay.
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    table = Dataset.from_dict({"label": list(labels), "index": list(range(len(labels)))})
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        # Tiny partitions make local epochs meaningless; with few samples per client
        # relax the floor rather than fail to find a split. flwr-datasets redraws a split
        # with a partition under the floor 10 times, then gives up: with hundreds of
        # clients at a low alpha that happens, so the floor halves until a split is found
        # (a split found at the first floor is the one it always was).
        floor = min(10, len(labels) // (2 * num_partitions))
        while True:
            part = DirichletPartitioner(
                num_partitions=num_partitions,
                partition_by="label",
                alpha=alpha,
                min_partition_size=floor,
                self_balancing=False,
                shuffle=True,
                seed=seed,
            )
            part.dataset = table
            try:
                return _indices(part, num_partitions)
            except ValueError as err:
                if floor <= 1 or "max number of attempts" not in str(err):
                    raise DataError(f"{partitioner} partitioning failed: {err}") from None
                floor //= 2
    elif partitioner == "pathological":
        num_classes = len(set(labels))
        if classes_per_client > num_classes:
            raise DataError(
                f"classes-per-client={classes_per_client} exceeds the {num_classes} classes"
            )
        part = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    else:
        raise DataError(
            f"partitioner={partitioner!r} is unknown: choose iid, dirichlet or pathological"
        )
    part.dataset = table
    try:
        return _indices(part, num_partitions)
    except ValueError as err:
        raise DataError(f"{partitioner} partitioning failed: {err}") from None


def _indices(part: Any, num_partitions: int) -> tuple[tuple[int, ...], ...]:
    """Each partition's sorted row indices, as ``part`` splits its dataset."""
    return tuple(tuple(sorted(part.load_partition(pid)["index"])) for pid in range(num_partitions))
