"""Server-side data as tensors, from whatever a Flower app holds.

A strategy's proxy and validation sets may arrive as a tensor, an ``(inputs, labels)``
pair, or a ``Dataset`` / ``DataLoader`` whose items or batches are tensors, ``(x, y)``
tuples, or dicts. Dict batches are what every ``flwr-datasets`` loader yields
(``{"img": ..., "label": ...}``); their keys are found among the common names, or
given with ``input_key`` / ``label_key``. Anything else fails with a message that says
what to pass. The sets are small (thousands of samples), so they are held in memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

INPUT_KEYS = ("img", "image", "pixel_values", "x", "inputs", "input")
LABEL_KEYS = ("label", "labels", "y", "target", "targets", "fine_label")

_ACCEPTED = (
    "a tensor, an (inputs, labels) pair of tensors, or a Dataset/DataLoader yielding x, "
    "(x, y) or {'img': x, 'label': y}"
)


def input_tensor(
    data: Any, *, input_key: str | None = None, name: str = "proxy_data"
) -> torch.Tensor:
    """The inputs of ``data`` as one CPU tensor; labels, if any, are dropped."""
    if isinstance(data, torch.Tensor):
        return data.detach().cpu()
    if isinstance(data, tuple) and data and isinstance(data[0], torch.Tensor):
        return data[0].detach().cpu()
    parts = [_split(batch, input_key, None, name)[0] for batch in _batches(data, name)]
    return _concat(parts, name)


def labelled_tensors(
    data: Any,
    *,
    input_key: str | None = None,
    label_key: str | None = None,
    name: str = "validation_data",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(inputs, int64 labels)`` of ``data`` as CPU tensors."""
    if isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        inputs, labels = data
    else:
        pairs = [_split(batch, input_key, label_key, name) for batch in _batches(data, name)]
        if any(labels is None for _, labels in pairs):
            raise ValueError(f"{name} has no labels: pass {_ACCEPTED}")
        inputs = _concat([x for x, _ in pairs], name)
        labels = _concat([y for _, y in pairs], name)  # type: ignore[misc]
    if len(inputs) != len(labels):
        raise ValueError(f"{name}: {len(inputs)} inputs but {len(labels)} labels")
    return inputs.detach().cpu(), labels.detach().cpu().long()


def _batches(data: Any, name: str) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, str | bytes):
        raise TypeError(f"{name} is a {type(data).__name__}: pass {_ACCEPTED}")
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        # A map-style dataset (torch, or a Hugging Face dataset with a transform).
        return DataLoader(data, batch_size=512)
    raise TypeError(f"{name} is a {type(data).__name__}: pass {_ACCEPTED}")


def _split(
    batch: Any, input_key: str | None, label_key: str | None, name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's (inputs, labels or None)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        x = batch[_key(batch, input_key, INPUT_KEYS, "input_key", name)]
        has_label = label_key is not None or any(k in batch for k in LABEL_KEYS)
        y = batch[_key(batch, label_key, LABEL_KEYS, "label_key", name)] if has_label else None
        return _tensor(x, name), None if y is None else _tensor(y, name)
    if isinstance(batch, Sequence) and not isinstance(batch, str) and batch:
        y = _tensor(batch[1], name) if len(batch) > 1 else None
        return _tensor(batch[0], name), y
    raise TypeError(f"{name} yields {type(batch).__name__} batches: pass {_ACCEPTED}")


def _key(batch: Mapping, given: str | None, common: tuple[str, ...], arg: str, name: str) -> str:
    if given is not None:
        if given not in batch:
            raise KeyError(f"{name} batches have no {given!r} (they have {sorted(batch)})")
        return given
    for key in common:
        if key in batch:
            return key
    raise KeyError(
        f"{name} batches have keys {sorted(batch)}, none of {list(common)}: pass the tensors "
        f"with fl_ec.data.input_tensor(data, {arg}=...) / labelled_tensors(...)"
    )


def _tensor(value: Any, name: str) -> torch.Tensor:
    if torch.is_tensor(value):
        return value
    raise TypeError(
        f"{name} holds {type(value).__name__} values, not tensors: give its loader a "
        "transform that makes tensors (e.g. torchvision's ToTensor)"
    )


def _concat(parts: list[torch.Tensor], name: str) -> torch.Tensor:
    if not parts:
        raise ValueError(f"{name} is empty")
    return torch.cat(parts).cpu()
