"""Local training and evaluation in plain PyTorch (the client trainer).

Nothing here knows about Flower: the ClientApp calls these functions, and so can
tests, benchmarks and the server.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from fl_ec.data.tensor_data import TensorData
from fl_ec.errors import FlEcError
from fl_ec.models.layout import channels_last
from fl_ec.protocol import (
    CPU_THREADS_KEY,
    DEVICE_KIND_KEY,
    DEVICE_TIER_KEY,
    MEMORY_MB_KEY,
    SPEED_KEY,
)
from fl_ec.scoring import hits

# Batch size of evaluation passes (no gradients: it bounds memory, not the result).
EVAL_BATCH_SIZE = 512


class TrainingDivergedError(FlEcError):
    """The loss became NaN/inf: the reply is dropped, the round goes on."""


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU falls back to CPU."""
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def set_cpu_threads(threads: int) -> None:
    """Pin torch's intra-op threads. ``0`` keeps torch's default (all cores)."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class TrainResult:
    train_loss: float
    num_examples: int
    seconds: float
    stages: int = 1  # >1 when the layer-parallel trainer split the model


def train_supervised(
    model: nn.Module,
    data: TensorData,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    max_grad_norm: float = 0.0,
) -> TrainResult:
    """SGD with momentum on cross-entropy; returns the mean loss of the last epoch.

    ``max_grad_norm > 0`` clips the global gradient norm. On strongly non-IID
    partitions (one or two classes) the first steps from a fresh model can produce
    gradient spikes 1000x the median; without clipping, lr 0.05 with momentum 0.9 can
    then diverge to NaN (seen on Fashion-MNIST, alpha=0.1). Training stops at the first
    non-finite loss with :class:`TrainingDivergedError` rather than returning NaN weights.
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty partition")
    start = time.perf_counter()
    model.to(device).train()
    with channels_last(model):
        optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        generator = torch.Generator().manual_seed(seed)
        loss_sum, seen = 0.0, 0
        for _ in range(epochs):
            loss_sum, seen = 0.0, 0
            for x, y in data.batches(batch_size, shuffle=True, generator=generator, device=device):
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise TrainingDivergedError(
                        f"local training diverged (loss={loss_value}) after {seen} samples: "
                        "lower lr or set max-grad-norm (e.g. 10)"
                    )
                loss.backward()
                if max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                loss_sum += loss_value * len(y)
                seen += len(y)
    return TrainResult(loss_sum / seen, epochs * len(data), time.perf_counter() - start)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: TensorData,
    batch_size: int = EVAL_BATCH_SIZE,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Mean cross-entropy and top-1 accuracy over ``data`` (eval mode, no gradients)."""
    if len(data) == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    with channels_last(model):
        for x, y in data.batches(batch_size, device=device):
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int(hits(logits, y).sum())
    return EvalResult(loss_sum / len(data), correct / len(data), len(data))


def device_capability(
    device: torch.device, tier: str = "", memory_mb: float = 0.0, speed: float = 0.0
) -> dict[str, float | str]:
    """What a client reports about itself: kind, tier, memory (MB), cores, a speed figure.

    The keys are the ``capability`` record's (:mod:`fl_ec.protocol`).

    ``tier`` / ``memory_mb`` / ``speed`` override what is detected, so a simulated
    node can play an edge device. Without a tier, CUDA nodes are ``gpu`` and others
    ``cpu``.
    """
    if device.type == "cuda":
        detected_mb = torch.cuda.get_device_properties(device).total_memory / 2**20
    else:
        try:
            detected_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        except (ValueError, OSError, AttributeError):
            detected_mb = 0.0
    return {
        DEVICE_KIND_KEY: device.type,
        DEVICE_TIER_KEY: tier or ("gpu" if device.type == "cuda" else "cpu"),
        MEMORY_MB_KEY: float(memory_mb or detected_mb),
        CPU_THREADS_KEY: float(torch.get_num_threads()),
        SPEED_KEY: float(speed),
    }
