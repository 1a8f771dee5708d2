"""Split a CIFAR ResNet into K stages at block boundaries, and stitch them back.

Stage 0 is the stem plus the first blocks, the last stage ends with the pooling head
and the classifier; blocks are divided so every stage has (as nearly as possible) the
same number of residual blocks, which in these ResNets means the same FLOPs (each
width doubling comes with a 4x smaller feature map). The stages *share* the model's
modules, so training a stage trains the model, and ``stitch(split_resnet(m, K))``
computes exactly ``m``.
"""

from __future__ import annotations

import torch
from torch import nn

from fl_ec.models.resnet import CifarResNet


class _Head(nn.Module):
    def __init__(self, pool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(x), 1))


def split_points(num_blocks: int, stages: int) -> list[int]:
    """Block indices where stages 1..K-1 begin (balanced block counts)."""
    if not 1 <= stages <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks into {stages} stages")
    return [round(num_blocks * k / stages) for k in range(1, stages)]


def split_resnet(model: CifarResNet, stages: int) -> list[nn.Module]:
    """The K stages of ``model`` (sharing its modules)."""
    if not isinstance(model, CifarResNet):
        raise TypeError("layer-parallel training splits fl-ec's CifarResNet (model=resnet<6n+2>)")
    blocks = list(model.blocks)
    bounds = [0, *split_points(len(blocks), stages), len(blocks)]
    parts: list[nn.Module] = []
    for k in range(stages):
        modules: list[nn.Module] = [model.stem] if k == 0 else []
        modules += blocks[bounds[k] : bounds[k + 1]]
        if k == stages - 1:
            modules.append(_Head(model.pool, model.classifier))
        parts.append(nn.Sequential(*modules))
    return parts


def stitch(stages: list[nn.Module]) -> nn.Module:
    """The stages run one after the other: the full network again."""
    return nn.Sequential(*stages)


def stage_keys(model: nn.Module, stages: list[nn.Module]) -> list[list[str]]:
    """For each stage, the keys of ``model.state_dict()`` whose tensors it owns."""
    owner = {}
    for k, stage in enumerate(stages):
        for tensor in list(stage.parameters()) + list(stage.buffers()):
            owner[tensor.data_ptr()] = k
    keys: list[list[str]] = [[] for _ in stages]
    for key, tensor in model.state_dict(keep_vars=True).items():
        keys[owner[tensor.data_ptr()]].append(key)
    return keys
