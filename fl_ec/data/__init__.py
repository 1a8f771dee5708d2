"""Datasets, server hold-out and client partitions.

The names below are imported from their modules on first use (PEP 562), not when the
package is: Flower's simulation loads the ServerApp and the ClientApp on two threads at
once, and a package that imports its own submodules while another thread imports one
of them by its full name can deadlock Python's import locks -- which Python resolves by
handing one thread a half-initialised module ("cannot import name ...").
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "HeldOut": "server_holdout",
    "hold_out": "server_holdout",
    "input_tensor": "batches",
    "labelled_tensors": "batches",
    "load_local_data": "local_folder",
    "ServerHoldout": "partition",
    "partition_labels": "partition",
    "split_server_holdout": "partition",
    "DatasetFormat": "sources",
    "dataset_format": "sources",
    "load_cifar10": "sources",
    "load_dataset": "sources",
    "load_fashion_mnist": "sources",
    "locate_fashion_mnist": "sources",
    "make_synthetic": "sources",
    "read_idx": "sources",
    "TensorData": "tensor_data",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'fl_ec.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fl_ec.data.{module}"), name)
