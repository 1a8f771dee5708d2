"""Datasets, server hold-out and client partitions."""

from fl_ec.data.batches import input_tensor, labelled_tensors
from fl_ec.data.federated import (
    ClientData,
    ServerData,
    client_partition_indices,
    load_client_data,
    load_server_data,
)
from fl_ec.data.hold_out import HeldOut, hold_out
from fl_ec.data.partition import ServerHoldout, partition_labels, split_server_holdout
from fl_ec.data.sources import (
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    locate_fashion_mnist,
    make_synthetic,
    read_idx,
)
from fl_ec.data.tensor_data import TensorData

__all__ = [
    "HeldOut",
    "hold_out",
    "input_tensor",
    "labelled_tensors",
    "ClientData",
    "ServerData",
    "ServerHoldout",
    "TensorData",
    "client_partition_indices",
    "load_cifar10",
    "load_client_data",
    "load_dataset",
    "load_fashion_mnist",
    "load_server_data",
    "locate_fashion_mnist",
    "make_synthetic",
    "partition_labels",
    "read_idx",
    "split_server_holdout",
]
