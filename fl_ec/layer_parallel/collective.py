"""The layer-parallel workers' collectives and small shared state helpers.

Each wraps one ``torch.distributed`` call so that a single worker (``world == 1``)
runs without a process group, and moves tensors where the backend needs them (NCCL
reduces CUDA tensors only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def broadcast_stages(
    state: Mapping[str, torch.Tensor], keys: Sequence[Sequence[str]], world: int
) -> None:
    """Give every rank each stage's tensors (``keys[k]``: those rank ``k`` owns), in place."""
    if world == 1:
        return
    for owner, owned in enumerate(keys):
        for key in owned:
            dist.broadcast(state[key], src=owner)


BatchNormState = list[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]]


def bn_buffers(stages: Iterable[nn.Module]) -> BatchNormState:
    """A copy of every BatchNorm's running statistics in ``stages``."""
    return [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for s in stages
        for m in s.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def restore_bn(saved: BatchNormState) -> None:
    """Put back the running statistics :func:`bn_buffers` copied."""
    for m, mean, var, count in saved:
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)


def save_stage_state(model: nn.Module, keys: list[str], path: Path) -> None:
    """Write the tensors ``keys`` of ``model`` (one stage's) to ``path``."""
    state = model.state_dict()
    torch.save({k: state[k].detach().cpu().clone() for k in keys}, path)


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for alone)."""
    if world > 1:
        dist.barrier()


def sum_over_ranks(value: int, world: int) -> int:
    """``value`` summed over the ranks, on every rank."""
    if world == 1:
        return int(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return int(tensor.item())


def from_last(value: float, rank: int, world: int) -> float:
    """The last stage's loss (parallel epochs) or rank 0's (serial), on every rank."""
    if world == 1:
        return value
    finite = value if value == value else 0.0
    tensor = torch.tensor([finite], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)  # exactly one rank holds a finite loss
    return float(tensor.item())


def collective_device() -> torch.device:
    """NCCL only reduces CUDA tensors; gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TorchThreads:
    """Temporarily set torch's intra-op thread count."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.count)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)
