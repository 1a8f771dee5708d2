"""Layer-parallel training of ResNets (Sun et al. 2021): penalty / augmented-Lagrangian
stage sub-problems solved by parallel workers, serial correction passes, downsampling
filters on the stage boundaries. Usable without Flower."""

from fl_ec.layer_parallel.objectives import (
    BoundaryFilter,
    LPSettings,
    boundary_objective,
    update_multipliers,
)
from fl_ec.layer_parallel.stages import split_resnet, stage_keys, stitch
from fl_ec.layer_parallel.trainer import LPResult, train_layer_parallel

__all__ = [
    "BoundaryFilter",
    "LPResult",
    "LPSettings",
    "boundary_objective",
    "split_resnet",
    "stage_keys",
    "stitch",
    "train_layer_parallel",
    "update_multipliers",
]
