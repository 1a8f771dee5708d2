"""An in-memory image dataset kept as uint8, normalised per batch.

Federated simulations load the same dataset in every client process. Keeping images
as uint8 (a quarter of float32) and slicing batches with index tensors -- instead of a
per-sample ``DataLoader`` -- keeps memory low and makes a CPU epoch several times
faster on small models. ``TensorData`` is still a ``torch.utils.data.Dataset``, so it
plugs into a ``DataLoader`` where that is wanted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class TensorData(Dataset):
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64, plus normalisation.

    ``mean``/``std`` are per-channel statistics in [0, 1] units, applied when a batch
    is materialised, so every consumer sees identically normalised inputs.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have shape (N,) matching images")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normalize(self.images[index : index + 1])[0], self.labels[index]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float32 batch, scaled to [0, 1] then standardised per channel."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (images_uint8.float().div_(255.0) - mean) / std

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> TensorData:
        """A new ``TensorData`` holding the given rows (a copy, so parents can be freed)."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TensorData(
            images=self.images[index].clone(),
            labels=self.labels[index].clone(),
            mean=self.mean,
            std=self.std,
            num_classes=self.num_classes,
        )

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised ``(x, y)`` batches; the last batch may be smaller."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            x = self.normalize(self.images[index])
            y = self.labels[index]
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
