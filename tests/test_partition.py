import numpy as np
import pytest

from fl_ec.config import ExperimentConfig
from fl_ec.data.federated import client_partition_indices
from fl_ec.data.partition import partition_labels, split_server_holdout
from fl_ec.errors import DataError

LABELS = np.random.default_rng(0).integers(0, 10, size=6000)


def _mean_max_class_share(parts, labels):
    shares = []
    for part in parts:
        counts = np.bincount(labels[part], minlength=10)
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_complete(partitioner):
    parts = partition_labels(LABELS, 10, partitioner, alpha=0.5, seed=1)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())), "a sample is in two partitions"
    assert sorted(joined.tolist()) == list(range(len(LABELS))), "a sample is in no partition"


def test_pathological_gives_each_client_k_classes():
    parts = partition_labels(LABELS, 10, "pathological", classes_per_client=2, seed=1)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist()))
    for part in parts:
        assert len(set(LABELS[part].tolist())) <= 2


def test_smaller_alpha_means_more_label_skew():
    skewed = partition_labels(LABELS, 10, "dirichlet", alpha=0.1, seed=1)
    mild = partition_labels(LABELS, 10, "dirichlet", alpha=100.0, seed=1)
    iid = partition_labels(LABELS, 10, "iid", seed=1)
    s_skewed, s_mild, s_iid = (_mean_max_class_share(p, LABELS) for p in (skewed, mild, iid))
    assert s_skewed > s_mild + 0.2
    assert abs(s_mild - s_iid) < 0.05


def test_partitions_are_seeded():
    first = partition_labels(LABELS, 5, "dirichlet", alpha=0.3, seed=7)
    again = partition_labels(LABELS, 5, "dirichlet", alpha=0.3, seed=7)
    other = partition_labels(LABELS, 5, "dirichlet", alpha=0.3, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_more_partitions_than_samples_is_a_clear_error():
    with pytest.raises(DataError, match="num-partitions=50 exceeds the 20"):
        partition_labels(LABELS[:20], 50, "iid")


def test_proxy_and_validation_are_disjoint_from_every_client():
    config = ExperimentConfig.from_run_config(
        {"proxy-size": 500, "validation-size": 300, "train-subset": 3000}
    )
    holdout = split_server_holdout(len(LABELS), 500, 300, 3000, config.seed)
    parts = client_partition_indices(config.data, config.seed, 8, LABELS)
    clients = set(np.concatenate(parts).tolist())
    proxy, validation = set(holdout.proxy.tolist()), set(holdout.validation.tolist())
    assert len(proxy) == 500 and len(validation) == 300
    assert not proxy & validation
    assert not clients & proxy and not clients & validation
    assert len(clients) == 3000, "train-subset must bound the client pool"


def test_holdout_larger_than_dataset_is_rejected():
    with pytest.raises(DataError, match="leave no training data"):
        split_server_holdout(100, 80, 30, 0, seed=0)


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")  # each redraw says so
def test_hundreds_of_skewed_partitions_relax_the_size_floor_instead_of_failing():
    # 200 clients at alpha 0.1: flwr-datasets' 10 redraws rarely find a split in which
    # every client holds 10 samples; the floor halves until one is found.
    labels = np.repeat(np.arange(10), 2700)
    parts = partition_labels(labels, 200, "dirichlet", alpha=0.1, seed=42)
    assert len(parts) == 200 and all(len(p) >= 1 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
