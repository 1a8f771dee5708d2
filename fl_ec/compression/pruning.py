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

For a model fl-ec has no spec of (a user's ``nn.Module`` class), the decision is also kept
per layer -- which original output and input channels of each pruned layer survive -- as
JSON (:meth:`PrunedStructure.decision_json`). :func:`replay_pruning` cuts a freshly built
model to that decision with torch-pruning's per-layer functions, so any side that can
build the model can build its pruned variant. :func:`probe_prunable_layers` finds the
layers whose pruning a model's forward cannot take (a ``.view`` to a fixed size, the
output layer) so that pruning leaves them whole.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch_pruning as tp
from torch import nn

# kept[key][dim] = original indices kept along that dim, or None when the dim is whole.
IndexMaps = dict[str, list[list[int] | None]]
# layers[module name][side] = original indices kept on that side ("out" or "in").
LayerCuts = dict[str, dict[str, list[int]]]

_SIDES = {"out": "prune_out_channels", "in": "prune_in_channels"}


@dataclass
class PrunedStructure:
    """Which original indices of each state_dict entry a pruned variant keeps.

    ``layers`` is the same decision per layer (module name -> kept output / input
    channels), the form :func:`replay_pruning` applies to a fresh model.
    """

    kept: IndexMaps
    layers: LayerCuts = field(default_factory=dict)

    def slice(self, full_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pruned variant's state cut out of a full-size ``full_state``."""
        out = {}
        for key, value in full_state.items():
            for dim, index in enumerate(self.kept.get(key, [])):
                if index is not None:
                    value = value.index_select(dim, torch.as_tensor(index, dtype=torch.long))
            out[key] = value.clone()
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """The index maps and the per-layer decision, as JSON-able values (checkpoints)."""
        kept = {k: v for k, v in self.kept.items() if any(i is not None for i in v)}
        return {"kept": kept, "layers": self.layers}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> PrunedStructure:
        """What :meth:`to_json_dict` wrote; ``ValueError`` if it is malformed."""
        try:
            kept = {
                str(k): [None if i is None else [int(j) for j in i] for i in v]
                for k, v in data["kept"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"malformed index maps: {err}") from None
        return cls(kept, _parse_decision(data.get("layers", {})))

    def decision_json(self) -> str:
        """The per-layer decision as compact JSON, what :func:`replay_pruning` reads."""
        return json.dumps(self.layers, sort_keys=True, separators=(",", ":"))

    def shapes(self, full_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """The pruned variant's state shapes, given the full model's."""
        out = {}
        for key, shape in full_shapes.items():
            maps = self.kept.get(key, [None] * len(shape))
            out[key] = tuple(
                size if index is None else len(index)
                for size, index in zip(shape, maps, strict=True)
            )
        return out


def prune_structured(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ratio: float,
    keep: tuple[str, ...] = ("classifier",),
) -> PrunedStructure:
    """Prune ``model`` in place by channel ``ratio``, in one step; returns the index maps.

    Channel groups are ranked by the group L2 norm of their weights. Modules named in
    ``keep`` are never pruned on their outputs, so the logits keep their shape. The
    result is checked with a forward pass (``RuntimeError`` if it fails or changes the
    output's shape).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio {ratio} must be within [0, 1)")
    model.eval()
    with torch.no_grad():
        reference_shape = model(example_inputs).shape
    names = {module: name for name, module in model.named_modules()}
    shapes = {key: tuple(v.shape) for key, v in model.state_dict().items()}
    kept: IndexMaps = {key: [None] * len(shape) for key, shape in shapes.items()}
    layers: LayerCuts = {}
    if ratio == 0.0:
        return PrunedStructure(kept, layers)
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
            _record(kept, layers, shapes, names[module], module, handler, item.idxs)
        group.prune()
    try:
        with torch.no_grad():
            out = model(example_inputs)
    except Exception as err:  # the model's own forward: any error means it cannot run pruned
        raise RuntimeError(f"pruned model does not run: {_first_line(err)}") from None
    if out.shape != reference_shape or not torch.isfinite(out).all():
        raise RuntimeError(f"pruned model is broken: output {tuple(out.shape)}")
    return PrunedStructure(kept, layers)


def replay_pruning(model: nn.Module, decision: str | Mapping[str, Any]) -> PrunedStructure:
    """Prune a freshly built ``model`` in place to a recorded decision; its index maps.

    ``decision`` is :meth:`PrunedStructure.decision_json` (or its parsed dict): for each
    pruned layer, the original output (``out``) and input (``in``) channels it keeps.
    Each layer is cut with torch-pruning's function for its type, so the module's
    attributes (``out_channels``, ``in_features``, ...) follow its weights and the
    model is the one the decision was taken on, at the pruned width. Raises
    ``ValueError`` when the decision does not fit the model.
    """
    layers = _parse_decision(decision)
    modules = dict(model.named_modules())
    shapes = {key: tuple(v.shape) for key, v in model.state_dict().items()}
    kept: IndexMaps = {key: [None] * len(shape) for key, shape in shapes.items()}
    recorded: LayerCuts = {}
    cuts = []
    # All removals are computed on the unpruned widths first: cutting a layer's outputs
    # changes what its pruner reports, and the decision is in original indices.
    for name, sides in layers.items():
        module = modules.get(name)
        pruner = (
            None if module is None else tp.pruner.function.PrunerBox.get(tp.ops.module2type(module))
        )
        if module is None or pruner is None:
            what = (
                "the model has no such layer"
                if module is None
                else f"torch-pruning cannot cut a {type(module).__name__}"
            )
            raise ValueError(f"pruning decision names layer {name!r}: {what}")
        for side, keep in sides.items():
            size = (pruner.get_out_channels if side == "out" else pruner.get_in_channels)(module)
            if size is None or not keep or keep[-1] >= size:
                raise ValueError(
                    f"pruning decision keeps {len(keep)} {side} channels up to index "
                    f"{keep[-1] if keep else None} of layer {name!r}, which has {size}"
                )
            removed = sorted(set(range(size)) - set(keep))
            _record(kept, recorded, shapes, name, module, _SIDES[side], removed)
            cuts.append((module, getattr(pruner, _SIDES[side]), removed))
    for module, cut, removed in cuts:
        if removed:
            cut(module, removed)
    structure = PrunedStructure(kept, recorded)
    got = {key: tuple(v.shape) for key, v in model.state_dict().items()}
    if got != structure.shapes(shapes):
        wrong = next(k for k, v in structure.shapes(shapes).items() if got.get(k) != v)
        raise ValueError(f"replaying the pruning decision gives {wrong!r} the wrong shape")
    return structure


class LayerProbe(NamedTuple):
    """Which layers' outputs a model can and cannot have pruned (module names)."""

    prunable: list[str]
    blocked: list[str]


def probe_prunable_layers(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ratio: float,
    keep: Sequence[str] = (),
) -> LayerProbe:
    """Try pruning each channel group of ``model`` alone; report which ones it can take.

    For every torch-pruning group (a Conv/Linear layer's outputs and everything coupled
    to them), a copy of ``model`` loses ``ratio`` of that group's channels (at least
    one) and runs ``example_inputs``. The group is *blocked* when the forward fails or
    its output changes shape: a forward that reshapes a conv output to a hard-coded
    size fails once that conv is narrower, and pruning the output layer changes the
    logits. ``model`` itself is not changed; layers named in ``keep`` are not tried.
    Pass ``blocked`` as :func:`prune_structured`'s ``keep`` to prune only the rest.
    """
    model.eval()
    with torch.no_grad():
        reference = model(example_inputs)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs)
    names = {module: name for name, module in model.named_modules()}
    shapes = {key: tuple(v.shape) for key, v in model.state_dict().items()}
    ignored = [m for n, m in model.named_modules() if n in keep]
    prunable, blocked = [], []
    for group in graph.get_all_groups(ignored_layers=ignored):
        root, handler = group[0].dep.target.module, group[0].dep.handler
        width = graph.get_pruner_of_module(root).get_out_channels(root)
        count = min(width - 1, max(1, int(width * ratio)))
        if count < 1:  # one channel: nothing to prune
            blocked.append(names[root])
            continue
        trial = graph.get_pruning_group(root, handler, list(range(width - count, width)))
        kept: IndexMaps = {key: [None] * len(shape) for key, shape in shapes.items()}
        layers: LayerCuts = {}
        candidate = copy.deepcopy(model)
        try:
            for item in trial:
                module = item.dep.target.module
                if module in names:
                    handler_name = item.dep.handler.__name__
                    _record(kept, layers, shapes, names[module], module, handler_name, item.idxs)
            replay_pruning(candidate, layers)
            with torch.no_grad():
                out = candidate(example_inputs)
            works = out.shape == reference.shape and bool(torch.isfinite(out).all())
        except Exception:  # a layer the maps cannot record, or the user's forward failing
            works = False
        (prunable if works else blocked).append(names[root])
    return LayerProbe(prunable, blocked)


def _parse_decision(decision: str | Mapping[str, Any]) -> LayerCuts:
    """A decision (JSON text or dict) as ``LayerCuts``; ``ValueError`` if malformed."""
    try:
        data = json.loads(decision) if isinstance(decision, str) else decision
        layers = {
            str(name): {str(side): [int(i) for i in keep] for side, keep in sides.items()}
            for name, sides in data.items()
        }
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"malformed pruning decision: {err}") from None
    for name, sides in layers.items():
        for side, keep in sides.items():
            increasing = all(a < b for a, b in zip(keep, keep[1:], strict=False))
            if side not in _SIDES or not increasing or (keep and keep[0] < 0):
                raise ValueError(f"malformed pruning decision for layer {name!r} ({side!r})")
    return layers


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _record(
    kept: IndexMaps,
    layers: LayerCuts,
    shapes: Mapping[str, tuple[int, ...]],
    name: str,
    module: nn.Module,
    handler: str,
    removed: list[int],
) -> None:
    """Apply one torch-pruning removal to the index maps of ``module``'s entries.

    ``layers`` gets the same removal per layer: the original indices ``module`` keeps
    on that side.
    """
    if handler == "prune_out_channels":
        dims = {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}
    elif handler == "prune_in_channels":
        # BatchNorm has no input side; for Conv/Linear inputs are weight dim 1.
        dims = {} if isinstance(module, nn.modules.batchnorm._BatchNorm) else {"weight": 1}
    else:
        raise RuntimeError(f"unexpected torch-pruning handler {handler} on {name}")
    gone = set(int(i) for i in removed)
    side = "out" if handler == "prune_out_channels" else "in"
    for suffix, dim in dims.items():
        key = f"{name}.{suffix}" if name else suffix
        if key not in kept:
            continue
        current = kept[key][dim]
        if current is None:
            current = list(range(shapes[key][dim]))
        remaining = [orig for pos, orig in enumerate(current) if pos not in gone]
        kept[key][dim] = remaining
        layers.setdefault(name, {})[side] = list(remaining)


def _full_grid(maps: list, shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """Index grids placing a pruned tensor (kept indices ``maps`` per dim) in ``shape``."""
    return torch.meshgrid(
        *[
            torch.arange(size) if index is None else torch.as_tensor(index)
            for index, size in zip(maps, shape, strict=True)
        ],
        indexing="ij",
    )


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
            grids = _full_grid(maps, base.shape)
            total.index_put_(grids, w * value, accumulate=True)
            weight.index_put_(grids, torch.full_like(value, w), accumulate=True)
        mean = total / weight.clamp_min(1e-12)
        folded[key] = torch.where(weight > 0, mean, base.to(torch.float64)).to(base.dtype)
    return folded


def expand_to_full(
    previous_full: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    structure: PrunedStructure | None,
) -> dict[str, torch.Tensor]:
    """``state`` in full-model coordinates, NaN where the pruned model has no coordinate.

    What a robust rule folds (:meth:`fl_ec.robust.StartRule.fold`): each coordinate
    combines only the clients that hold it. NaN can mark absence because every accepted
    reply was checked finite. Integer buffers keep ``previous_full``'s.
    """
    full = {}
    for key, base in previous_full.items():
        if not base.is_floating_point():
            full[key] = base.clone()
            continue
        value = state[key].to(base.dtype)
        maps = structure.kept.get(key) if structure is not None else None
        if not maps or all(i is None for i in maps):
            full[key] = value.clone()
            continue
        expanded = torch.full_like(base, float("nan"))
        expanded[_full_grid(maps, base.shape)] = value
        full[key] = expanded
    return full
