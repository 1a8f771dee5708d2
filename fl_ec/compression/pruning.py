"""Structured pruning with torch-pruning, recorded as index maps so it can be replayed.

torch-pruning decides *which* channels go (its dependency graph keeps residual and
flatten couplings consistent; the group L2 norm of the weights ranks the channel groups).
We record, for every state_dict entry, which original indices survive along each
dimension. That record is what makes the rest of fl-ec work without pickles:

* a variant is re-derived each round by *slicing* the new global model with the same
  maps (stable architecture, no re-ranking), identical to re-running the pruner with
  the same decisions;
* a pruned client's update can be folded back into full-model coordinates
  (HeteroFL-style) through the same maps;
* the pruned model travels as plain arrays; :func:`fl_ec.models.spec.build_from_state_dict`
  rebuilds it from the array shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

# kept[key][dim] = original indices kept along that dim, or None when the dim is whole.
IndexMaps = dict[str, list[list[int] | None]]


@dataclass
class PrunedStructure:
    """Which original indices of each state_dict entry a pruned variant keeps."""

    kept: IndexMaps

    def slice(self, full_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pruned variant's state cut out of a full-size ``full_state``."""
        out = {}
        for key, value in full_state.items():
            for dim, index in enumerate(self.kept.get(key, [])):
                if index is not None:
                    value = value.index_select(dim, torch.as_tensor(index, dtype=torch.long))
            out[key] = value.clone()
        return out

    def to_json_dict(self) -> dict[str, list[list[int] | None]]:
        return {k: v for k, v in self.kept.items() if any(i is not None for i in v)}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, list[list[int] | None]]) -> PrunedStructure:
        return cls(
            {
                str(k): [None if i is None else [int(j) for j in i] for i in v]
                for k, v in data.items()
            }
        )


def prune_structured(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ratio: float,
    keep: tuple[str, ...] = ("classifier",),
) -> PrunedStructure:
    """Prune ``model`` in place by channel ``ratio``, in one step; returns the index maps.

    Channel groups are ranked by the group L2 norm of their weights. Modules named in
    ``keep`` are never pruned on their outputs, so the logits keep their shape. The
    result is checked with a forward pass.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio {ratio} must be within [0, 1)")
    model.eval()
    with torch.no_grad():
        reference_shape = model(example_inputs).shape
    names = {module: name for name, module in model.named_modules()}
    shapes = {key: tuple(v.shape) for key, v in model.state_dict().items()}
    kept: IndexMaps = {key: [None] * len(shape) for key, shape in shapes.items()}
    if ratio == 0.0:
        return PrunedStructure(kept)
    ignored = [m for n, m in model.named_modules() if n in keep]
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
    )
    for group in pruner.step(interactive=True):
        for item in group:
            module = item.dep.target.module
            if module not in names:  # ReLU / flatten / add nodes carry no state
                continue
            handler = item.dep.handler.__name__
            _record(kept, shapes, names[module], module, handler, item.idxs)
        group.prune()
    with torch.no_grad():
        out = model(example_inputs)
    if out.shape != reference_shape or not torch.isfinite(out).all():
        raise RuntimeError(f"pruned model is broken: output {tuple(out.shape)}")
    return PrunedStructure(kept)


def _record(
    kept: IndexMaps,
    shapes: Mapping[str, tuple[int, ...]],
    name: str,
    module: nn.Module,
    handler: str,
    removed: list[int],
) -> None:
    """Apply one torch-pruning removal to the index maps of ``module``'s entries."""
    if handler == "prune_out_channels":
        dims = {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}
    elif handler == "prune_in_channels":
        # BatchNorm has no input side; for Conv/Linear inputs are weight dim 1.
        dims = {} if isinstance(module, nn.modules.batchnorm._BatchNorm) else {"weight": 1}
    else:
        raise RuntimeError(f"unexpected torch-pruning handler {handler} on {name}")
    gone = set(int(i) for i in removed)
    for suffix, dim in dims.items():
        key = f"{name}.{suffix}" if name else suffix
        if key not in kept:
            continue
        current = kept[key][dim]
        if current is None:
            current = list(range(shapes[key][dim]))
        kept[key][dim] = [orig for pos, orig in enumerate(current) if pos not in gone]


def fold_into_full(
    previous_full: Mapping[str, torch.Tensor],
    updates: list[tuple[Mapping[str, torch.Tensor], PrunedStructure | None, float]],
) -> dict[str, torch.Tensor]:
    """HeteroFL-style average in full-model coordinates.

    ``updates`` are ``(state, structure, weight)``; ``structure=None`` means a
    full-size state. Every coordinate is the weighted mean over the updates that
    contain it; coordinates no update contains keep ``previous_full``'s value.
    """
    folded = {}
    for key, base in previous_full.items():
        if not base.is_floating_point():
            folded[key] = base.clone()
            continue
        total = torch.zeros_like(base, dtype=torch.float64)
        weight = torch.zeros_like(base, dtype=torch.float64)
        for state, structure, w in updates:
            value = state[key].to(torch.float64)
            maps = structure.kept.get(key) if structure is not None else None
            if not maps or all(i is None for i in maps):
                total += w * value
                weight += w
                continue
            grids = torch.meshgrid(
                *[
                    torch.arange(size) if index is None else torch.as_tensor(index)
                    for index, size in zip(maps, base.shape, strict=True)
                ],
                indexing="ij",
            )
            total.index_put_(grids, w * value, accumulate=True)
            weight.index_put_(grids, torch.full_like(value, w), accumulate=True)
        mean = total / weight.clamp_min(1e-12)
        folded[key] = torch.where(weight > 0, mean, base.to(torch.float64)).to(base.dtype)
    return folded
