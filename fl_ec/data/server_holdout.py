"""Carve a strategy's proxy and validation sets off a dataset the clients do not train on.

FedEC distils on unlabeled proxy inputs and picks its teacher and student on labelled
validation data. Neither may be the data the final accuracy is reported on: a server
that distils or selects on test images reports an optimistic number (the "easy fix" of
handing the strategy the app's test loader does exactly that, silently). Hold the
server's sets out of a split the clients never train on, and report on what remains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import Subset

from fl_ec.data.partition import split_server_holdout


@dataclass(frozen=True)
class HeldOut:
    """Three disjoint parts of one dataset: for the strategy, and ``rest`` for reporting."""

    proxy: Subset
    validation: Subset
    rest: Subset


def hold_out(dataset: Any, *, proxy: int, validation: int = 0, seed: int = 42) -> HeldOut:
    """Split ``dataset`` (any map-style dataset: torch, or Hugging Face) by a seeded draw.

    ``proxy`` and ``validation`` samples go to the strategy (pass them as ``proxy_data``
    and ``validation_data``); ``rest`` is what the app evaluates on, or, held out of the
    training split, what the clients partition.
    """
    if proxy <= 0 or validation < 0 or proxy + validation >= len(dataset):
        raise ValueError(
            f"hold_out(proxy={proxy}, validation={validation}) of {len(dataset)} samples: "
            "proxy must be > 0 and leave samples for the rest"
        )
    split = split_server_holdout(len(dataset), proxy, validation, 0, seed)
    return HeldOut(
        proxy=Subset(dataset, split.proxy.tolist()),
        validation=Subset(dataset, split.validation.tolist()),
        rest=Subset(dataset, split.client_pool.tolist()),
    )
