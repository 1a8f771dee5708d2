"""What every kind of class-conditional feature statistics does, and the code they share.

Feature calibration (CCVR, Luo et al. 2021) retrains some of a model's last layers on
virtual features drawn from the federation's class-conditional statistics of those
layers' inputs. The kinds differ in which layers they retrain and in how they describe
a class's features (:mod:`fl_ec.calibration.gaussian`, :mod:`fl_ec.calibration.low_rank`);
each is one :class:`FeatureStatistics` object with the same steps:

* ``measure`` -- a client, one forward pass over its own data;
* ``to_arrays`` / ``parse`` -- the wire form, and its check on the server;
* ``merge`` -- the server pools the clients' statistics;
* ``calibrate`` -- the server draws labelled virtual features (``sample``) and
  fine-tunes the layers on them.

:meth:`fl_ec.calibration.CalibrationSettings.statistics` picks the kind.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from fl_ec.calibration.prior import classifier_of
from fl_ec.models.layout import channels_last

StatsT = TypeVar("StatsT")


class FitSettings(Protocol):
    """How many virtual features :meth:`FeatureStatistics.calibrate` draws and how it fits
    the layers on them (:class:`~fl_ec.calibration.CalibrationSettings` has these fields).

    A protocol rather than the settings class: the settings pick the kind of statistics,
    so this module cannot import them.
    """

    @property
    def samples(self) -> int: ...

    @property
    def epochs(self) -> int: ...

    @property
    def lr(self) -> float: ...

    @property
    def batch_size(self) -> int: ...


class FeatureStatistics(ABC, Generic[StatsT]):
    """One kind of feature statistics: what a client measures, and what it calibrates.

    ``StatsT`` is the kind's statistics (a frozen dataclass of float64 tensors with a
    ``dim`` property: the width of the features they describe).
    """

    # What the calibrated layers are called in error messages.
    layers_name: ClassVar[str]

    @abstractmethod
    def layers(self, model: nn.Module) -> nn.Module:
        """The layers this calibration retrains: their first ``nn.Linear``'s inputs -> logits.

        ``ValueError`` (naming the fix) when ``model`` has no such layers.
        """

    @abstractmethod
    def measure(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        batch_size: int = 512,
        device: torch.device | str = "cpu",
    ) -> StatsT:
        """The statistics of the calibrated layers' inputs over a labelled dataset."""

    @abstractmethod
    def to_arrays(self, stats: StatsT, budget_bytes: int | None = None) -> dict[str, np.ndarray]:
        """The wire form: one row per class seen (per component).

        ``budget_bytes`` (None: no limit) caps the arrays' bytes where the kind can trade
        detail for size; a client passes :func:`model_bytes` of the model it measured, so
        its statistics never cost more upload than a copy of that model.
        """

    @abstractmethod
    def parse(self, arrays: Mapping[str, np.ndarray], num_classes: int, dim: int) -> StatsT:
        """Check and rebuild a client's wire statistics; ``ValueError`` says what is wrong.

        Every check runs before anything is built from the arrays.
        """

    @abstractmethod
    def merge(self, parts: Sequence[StatsT]) -> StatsT:
        """Pool the clients' statistics as the calibration needs them."""

    @abstractmethod
    def sample(
        self, stats: StatsT, num_samples: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 features, labels): about ``num_samples`` labelled virtual features.

        Classes (components) are drawn in proportion to their counts.
        """

    def dims(self, model: nn.Module) -> tuple[int, int]:
        """(number of classes, feature dimension) that statistics for ``model`` must have."""
        entry = head_entry(self.layers(model))
        return classifier_of(model).out_features, entry.in_features

    def labelled_inputs(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int = 512,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float64 inputs of the calibrated layers, long labels) over a labelled dataset."""
        entry = head_entry(self.layers(model))
        features = layer_inputs(model, entry, inputs, batch_size, device).double()
        labels = torch.as_tensor(labels).long()
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} inputs but {len(labels)} labels")
        return features, labels

    def calibrate(
        self, model: nn.Module, stats: StatsT, settings: FitSettings, seed: int = 0
    ) -> float:
        """Fine-tune ``model``'s calibrated layers (in place) on virtual features; seconds.

        ``settings`` gives the number of draws and the optimiser's epochs, learning rate
        and batch size. One generator seeded with ``seed`` draws the features, then
        shuffles the batches.
        """
        start = time.perf_counter()
        layers = self.layers(model)
        entry = head_entry(layers)
        dim = stats.dim  # type: ignore[attr-defined]
        if entry.in_features != dim:
            raise ValueError(
                f"statistics have {dim} features, the {self.layers_name} takes {entry.in_features}"
            )
        generator = torch.Generator().manual_seed(seed)
        features, labels = self.sample(stats, settings.samples, generator)
        fit_on_virtual_features(layers, features, labels, settings, generator)
        return time.perf_counter() - start


def model_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s floating-point state in float32: what one copy of it costs on
    the wire, and so the budget of a client's statistics of it."""
    return sum(4 * t.numel() for t in model.state_dict().values() if t.is_floating_point())


def head_entry(layers: nn.Module) -> nn.Linear:
    """The first ``nn.Linear`` of ``layers`` (itself for a layer): where inputs are measured."""
    for module in layers.modules():
        if isinstance(module, nn.Linear):
            return module
    raise ValueError("the dense head has no nn.Linear layer")


def layer_inputs(
    model: nn.Module,
    layer: nn.Module,
    inputs: torch.Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """What ``layer`` (a module of ``model``) receives for ``inputs``, flattened, on CPU."""
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(
        lambda _module, args: captured.append(args[0].detach().flatten(1).float().cpu())
    )
    was_training = model.training
    model.to(device).eval()
    try:
        with channels_last(model), torch.inference_mode():  # channels-last: ~4x on CPU
            for batch in inputs.split(batch_size):
                model(batch.to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured)


def check_class_arrays(
    arrays: Mapping[str, np.ndarray],
    per_class_shapes: Mapping[str, tuple[int, ...]],
    num_classes: int,
    rows_per_class: int = 1,
) -> tuple[torch.Tensor, np.ndarray, dict[str, np.ndarray]]:
    """The checks every per-class wire format shares; (class index, counts, float64 arrays).

    ``arrays`` holds ``classes`` and ``counts`` (one row per class sent, or per mixture
    component: then a class may have up to ``rows_per_class`` rows) and the float
    arrays named in ``per_class_shapes``, each of shape ``(rows,) + shape``.
    """
    missing = [key for key in ("classes", "counts", *per_class_shapes) if key not in arrays]
    if missing:
        raise ValueError(f"feature statistics lack {missing}")
    classes = np.asarray(arrays["classes"])
    k = len(classes)
    expected = {"classes": (k,), "counts": (k,)}
    expected.update({key: (k, *shape) for key, shape in per_class_shapes.items()})
    for key, shape in expected.items():
        got = np.asarray(arrays[key]).shape
        if got != shape:
            raise ValueError(f"feature statistics {key!r} have shape {got}, expected {shape}")
    if k == 0:
        raise ValueError("feature statistics cover no class")
    if not np.issubdtype(classes.dtype, np.integer):
        raise ValueError("feature statistics classes must be integers")
    for key in ("counts", *per_class_shapes):
        check_real_dtype(key, np.asarray(arrays[key]))
    if classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(f"feature statistics name a class outside [0, {num_classes})")
    most = int(np.bincount(classes).max())
    if most > rows_per_class:
        raise ValueError(
            "feature statistics classes must be distinct"
            if rows_per_class == 1
            else f"feature statistics send {most} components of one class, "
            f"at most {rows_per_class} were asked for"
        )
    counts = np.asarray(arrays["counts"])
    if not (np.isfinite(counts).all() and (counts > 0).all()):
        raise ValueError("feature statistics counts must be positive")
    floats = {key: np.asarray(arrays[key], dtype=np.float64) for key in per_class_shapes}
    if not all(np.isfinite(value).all() for value in floats.values()):
        raise ValueError("feature statistics contain non-finite values")
    return torch.as_tensor(classes, dtype=torch.long), counts, floats


def check_real_dtype(key: str, value: np.ndarray) -> None:
    """``ValueError`` unless the statistics array ``key`` holds integers or floats."""
    if not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
        raise ValueError(
            f"feature statistics {key!r} have dtype {value.dtype}, expected real numbers"
        )


def scatter_classes(index: torch.Tensor, rows: np.ndarray, num_classes: int) -> torch.Tensor:
    """float64 ``(num_classes, ...)``: ``rows`` at the classes sent, zeros elsewhere."""
    full = torch.zeros(num_classes, *rows.shape[1:], dtype=torch.float64)
    full[index] = torch.as_tensor(rows, dtype=torch.float64)
    return full


def fit_on_virtual_features(
    layers: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    settings: FitSettings,
    generator: torch.Generator,
) -> None:
    """Fine-tune ``layers`` (features -> logits) in place: cross-entropy, Adam."""
    device = next(layers.parameters()).device
    features, labels = features.to(device), labels.to(device)
    optimizer = torch.optim.Adam(layers.parameters(), lr=settings.lr)
    with torch.enable_grad():
        for _ in range(settings.epochs):
            order = torch.randperm(len(labels), generator=generator).to(device)
            for batch in order.split(settings.batch_size):
                loss = nn.functional.cross_entropy(layers(features[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
