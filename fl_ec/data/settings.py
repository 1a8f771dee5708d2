"""The run-config's data section: which dataset, and how it is split between server and clients.

Every process derives its data from these values and the run's seed alone
(:mod:`fl_ec.data.federated`), so a client's partition is the same in every process
and disjoint from the server's proxy and validation sets.
"""

from __future__ import annotations

from dataclasses import dataclass

from fl_ec.errors import check_fields, one_of

DATASETS = ("fashion-mnist", "cifar10", "synthetic")  # fl_ec.data.sources.load_dataset
PARTITIONERS = ("iid", "dirichlet", "pathological")  # fl_ec.data.partition.partition_labels


@dataclass(frozen=True)
class DataSection:
    """Run-config keys ``dataset`` ... ``validation-size`` (docs/configuration.md).

    ``proxy_size`` unlabeled and ``validation_size`` labelled samples are held out of
    the training set for the server; the clients share the rest (or ``train_subset``
    of it), split by ``partitioner``.
    """

    dataset: str = "fashion-mnist"
    data_dir: str = ""
    download: bool = False
    train_subset: int = 0
    partitioner: str = "dirichlet"
    alpha: float = 0.1
    classes_per_client: int = 2
    proxy_size: int = 5000
    validation_size: int = 1000

    def __post_init__(self) -> None:
        check_fields(
            self,
            [
                ("dataset", self.dataset in DATASETS, one_of(DATASETS)),
                ("partitioner", self.partitioner in PARTITIONERS, one_of(PARTITIONERS)),
                (
                    "alpha",
                    self.alpha > 0,
                    "must be > 0 (Dirichlet concentration; 0.1 is very non-IID, 100 is "
                    "nearly IID): set e.g. alpha=0.5",
                ),
                ("classes_per_client", self.classes_per_client > 0, "must be > 0"),
                ("proxy_size", self.proxy_size >= 0, "must be >= 0"),
                ("validation_size", self.validation_size >= 0, "must be >= 0"),
                ("train_subset", self.train_subset >= 0, "must be >= 0 (0: all)"),
            ],
        )
