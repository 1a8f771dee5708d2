"""A small CNN for 28x28 (or 32x32) images: two conv blocks and two linear layers."""

from __future__ import annotations

import torch
from torch import nn

from fl_ec.models.layout import register_channels_last


@register_channels_last
class SmallCNN(nn.Module):
    """conv(w0) -> pool -> conv(w1) -> pool -> fc(w2) -> classifier.

    ``widths = (w0, w1, w2)``. The last layer is called ``classifier`` in every fl-ec
    model so that compression code can find (and keep) it by name.
    """

    def __init__(
        self, widths: tuple[int, int, int], in_channels: int, image_size: int, num_classes: int
    ) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.conv1 = nn.Conv2d(in_channels, w0, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(w0, w1, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU(inplace=True)
        spatial = image_size // 4
        self.fc1 = nn.Linear(w1 * spatial * spatial, w2)
        self.classifier = nn.Linear(w2, num_classes)

    def dense_head(self) -> nn.Module:
        """fc1 -> ReLU -> classifier: the flattened conv features to the logits.

        It shares this model's layers, so training it trains them
        (:mod:`fl_ec.calibration.low_rank`).
        """
        return nn.Sequential(self.fc1, nn.ReLU(), self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(torch.flatten(x, 1)))
        return self.classifier(x)
