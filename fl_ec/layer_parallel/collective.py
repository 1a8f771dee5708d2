"""The layer-parallel workers' collectives and small shared state helpers.

Each wraps one ``torch.distributed`` call so that a single worker (``world == 1``)
runs without a process group, and moves tensors where the backend needs them (NCCL
reduces CUDA tensors only).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def _broadcast_stages(state, keys, world) -> None:  # noqa: ANN001
    if world == 1:
        return
    for owner, owned in enumerate(keys):
        for key in owned:
            dist.broadcast(state[key], src=owner)


def _bn_buffers(stages):  # noqa: ANN001, ANN202
    return [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for s in stages
        for m in s.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _restore_bn(stages, saved) -> None:  # noqa: ANN001
    for m, mean, var, count in saved:
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)


def _save(model: nn.Module, keys: list[str], path: Path) -> None:
    state = model.state_dict()
    torch.save({k: state[k].detach().cpu().clone() for k in keys}, path)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _sum_over_ranks(value: int, world: int) -> int:
    if world == 1:
        return int(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return int(tensor.item())


def _from_last(value: float, rank: int, world: int) -> float:
    """The last stage's loss (parallel epochs) or rank 0's (serial), on every rank."""
    if world == 1:
        return value
    finite = value if value == value else 0.0
    tensor = torch.tensor([finite], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)  # exactly one rank holds a finite loss
    return float(tensor.item())


def _collective_device() -> torch.device:
    """NCCL only reduces CUDA tensors; gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Threads:
    """Temporarily set torch's intra-op thread count."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.count)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)
