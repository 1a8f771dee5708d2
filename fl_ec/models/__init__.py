"""Models (small CNN, CIFAR ResNets) and their JSON architecture specs."""

from fl_ec.models.cnn import SmallCNN
from fl_ec.models.layout import channels_last, probe_channels_last
from fl_ec.models.resnet import CifarResNet
from fl_ec.models.spec import (
    ArchSpec,
    build_from_state_dict,
    build_model,
    count_parameters,
    is_known_model,
)

__all__ = [
    "ArchSpec",
    "CifarResNet",
    "SmallCNN",
    "build_from_state_dict",
    "build_model",
    "channels_last",
    "count_parameters",
    "is_known_model",
    "probe_channels_last",
]
