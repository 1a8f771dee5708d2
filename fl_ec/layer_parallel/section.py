"""The run-config's layer-parallel section: the ``lp-*`` knobs of :class:`LPSettings`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fl_ec.layer_parallel.objectives import LPSettings


@dataclass(frozen=True)
class LayerParallelSection:
    """Run-config keys ``lp-stages`` ... ``lp-serial-epochs`` (docs/layer-parallel.md).

    They configure the layer-parallel trainer wherever it runs (``trainer`` for the
    clients, ``distill-trainer`` for the server), and are checked whatever the
    trainers, by :class:`LPSettings` itself: a bad value fails every run.
    """

    # LPSettings' field -> this section's, which names the run-config key.
    OWNER_FIELDS: ClassVar[dict[str, str]] = {
        "stages": "lp_stages",
        "method": "lp_method",
        "downsample": "lp_downsample",
        "boundary_bits": "lp_boundary_bits",
        "parallel_epochs": "lp_parallel_epochs",
        "serial_epochs": "lp_serial_epochs",
    }

    lp_stages: int = 2
    lp_method: str = "penalty"
    lp_downsample: int = 1
    lp_boundary_bits: int = 32
    lp_parallel_epochs: int = 1
    lp_serial_epochs: int = 1

    def __post_init__(self) -> None:
        self.settings()

    def settings(self, **fields: Any) -> LPSettings:
        """:class:`LPSettings` of these knobs, with ``fields`` (LPSettings fields) on top."""
        own = {owner: getattr(self, mine) for owner, mine in self.OWNER_FIELDS.items()}
        return LPSettings(**{**own, **fields})
