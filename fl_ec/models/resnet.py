"""CIFAR-style ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages.

Shortcuts that change shape use a 1x1 convolution + BatchNorm ("option B") rather
than the zero-padding/slicing shortcut ("option A"): torch-pruning's dependency graph
cannot follow the slicing, and structured pruning of these models is a later feature.
"""

from __future__ import annotations

import torch
from torch import nn

from fl_ec.models.layout import register_channels_last


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@register_channels_last
class CifarResNet(nn.Module):
    """Stem conv, three stages of ``blocks_per_stage`` basic blocks, global pool, classifier."""

    def __init__(
        self,
        widths: tuple[int, int, int],
        blocks_per_stage: int,
        in_channels: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        # One flat Sequential of blocks: splitting the network at block boundaries
        # (layer-parallel training) is then a slice.
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_planes, num_classes)

    def dense_head(self) -> nn.Module:
        """The pooled features to the logits: the classifier is the only dense layer."""
        return nn.Sequential(self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))
