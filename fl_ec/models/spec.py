"""JSON architecture specs, and rebuilding models from a spec or from tensor shapes.

Models travel between server and clients as *plain arrays plus a JSON spec*, never as
pickled modules. The spec names the nominal architecture; the arrays may describe a
structurally pruned version of it (fewer channels). :func:`build_from_state_dict`
builds the nominal model and then resizes every Conv/BatchNorm/Linear layer to the
shapes in the arrays, so any channel-pruned variant is rebuilt without extra metadata.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fl_ec.errors import ModelSpecError
from fl_ec.models.cnn import SmallCNN
from fl_ec.models.resnet import CifarResNet

_RESNET = re.compile(r"^resnet(\d+)$")
DEFAULT_WIDTHS = {"cnn": (32, 64, 128), "resnet": (16, 32, 64)}


@dataclass(frozen=True)
class ArchSpec:
    """A JSON-serialisable description of a model.

    ``name`` is ``cnn`` or ``resnet<6n+2>`` (``resnet8``, ``resnet20``, ``resnet56``);
    ``widths`` are the three nominal channel widths; ``input_shape`` is ``(C, H, W)``.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    widths: tuple[int, int, int] = ()  # type: ignore[assignment]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(v) for v in self.input_shape))
        widths = tuple(int(v) for v in self.widths) or _default_widths(self.name)
        object.__setattr__(self, "widths", widths)
        validate_spec(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArchSpec:
        try:
            data = json.loads(text)
            return cls(
                name=str(data["name"]),
                input_shape=tuple(data["input_shape"]),
                num_classes=int(data["num_classes"]),
                widths=tuple(data.get("widths", ())),
                extra=dict(data.get("extra", {})),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError) as err:
            raise ModelSpecError(f"malformed architecture spec ({err}): {text[:120]!r}") from None


def is_known_model(name: str) -> bool:
    if name == "cnn":
        return True
    match = _RESNET.match(name)
    return bool(match) and int(match.group(1)) >= 8 and (int(match.group(1)) - 2) % 6 == 0


def family(name: str) -> str:
    """``cnn`` or ``resnet``: models of one family differ only in depth and widths."""
    return "cnn" if name == "cnn" else "resnet"


def resnet_depth(name: str) -> int:
    """A ResNet's depth from its name (``resnet20``: 20); 0 for other models."""
    match = _RESNET.match(name)
    return int(match.group(1)) if match else 0


def scaled_widths(name: str, width: float) -> tuple[int, int, int]:
    """The default widths of model ``name``, each times ``width`` (at least one channel)."""
    return tuple(max(1, round(w * width)) for w in _default_widths(name))  # type: ignore[return-value]


def _default_widths(name: str) -> tuple[int, int, int]:
    return DEFAULT_WIDTHS["cnn" if name == "cnn" else "resnet"]


def validate_spec(spec: ArchSpec) -> None:
    if not is_known_model(spec.name):
        raise ModelSpecError(
            f"model {spec.name!r} is unknown: use cnn or resnet<6n+2> (resnet8, resnet20, resnet56)"
        )
    if len(spec.input_shape) != 3 or min(spec.input_shape) <= 0:
        raise ModelSpecError(
            f"input_shape {spec.input_shape} must be (C, H, W) with positive sizes"
        )
    if len(spec.widths) != 3 or min(spec.widths) <= 0:
        raise ModelSpecError(f"widths {spec.widths} must be three positive channel counts")
    if spec.num_classes < 2:
        raise ModelSpecError(f"num_classes={spec.num_classes} must be >= 2")
    if spec.name == "cnn" and spec.input_shape[1] % 4:
        raise ModelSpecError(f"cnn needs an image size divisible by 4, got {spec.input_shape}")


def build_model(spec: ArchSpec) -> nn.Module:
    """The nominal (unpruned) model a spec describes, freshly initialised."""
    channels, size, _ = spec.input_shape
    if spec.name == "cnn":
        return SmallCNN(spec.widths, channels, size, spec.num_classes)
    depth = int(_RESNET.match(spec.name).group(1))  # type: ignore[union-attr]
    return CifarResNet(spec.widths, (depth - 2) // 6, channels, spec.num_classes)


def build_from_state_dict(
    spec: ArchSpec, state_dict: Mapping[str, torch.Tensor], *, share: bool = False
) -> nn.Module:
    """A model with the spec's topology and the *shapes* of ``state_dict``, loaded from it.

    Raises :class:`ModelSpecError` when the keys do not match the spec's topology or
    the shapes are inconsistent (e.g. a conv whose input channels do not match the
    previous layer's output), instead of returning a model that fails later.

    ``share``: the model's parameters and buffers *are* ``state_dict``'s tensors (no
    initialisation, no copy), so writing to either changes both. For models that are
    only read, such as the server's copies of client replies, it halves the memory.
    """
    with torch.device("meta") if share else contextlib.nullcontext():
        model = build_model(spec)
        expected = set(model.state_dict().keys())
        given = set(state_dict.keys())
        if expected != given:
            missing = sorted(expected - given)[:3]
            unexpected = sorted(given - expected)[:3]
            raise ModelSpecError(
                f"arrays do not match spec {spec.name}: missing {missing}, unexpected {unexpected}"
            )
        for name, module in list(model.named_modules()):
            replacement = _resized(module, name, state_dict)
            if replacement is not None:
                _set_submodule(model, name, replacement)
    try:
        model.load_state_dict(
            {k: torch.as_tensor(v) for k, v in state_dict.items()}, strict=True, assign=share
        )
        with torch.no_grad():
            model.eval()(torch.zeros(1, *spec.input_shape))
    except RuntimeError as err:
        raise ModelSpecError(f"arrays are inconsistent with spec {spec.name}: {err}") from None
    return model


def _resized(
    module: nn.Module, name: str, state_dict: Mapping[str, torch.Tensor]
) -> nn.Module | None:
    """A fresh layer with the shapes found in ``state_dict``, or ``None`` if unchanged."""
    prefix = f"{name}." if name else ""
    weight = state_dict.get(prefix + "weight")
    if weight is None:
        return None
    shape = tuple(weight.shape)
    if tuple(module.weight.shape) == shape:
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ModelSpecError(f"{name}: grouped convolutions cannot be resized from shapes")
        return nn.Conv2d(
            shape[1],
            shape[0],
            module.kernel_size,
            module.stride,
            module.padding,
            bias=module.bias is not None,
        )
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(shape[0], eps=module.eps, momentum=module.momentum)
    if isinstance(module, nn.Linear):
        return nn.Linear(shape[1], shape[0], bias=module.bias is not None)
    raise ModelSpecError(f"{name}: cannot resize a {type(module).__name__} from array shapes")


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def state_shapes(state: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """Keys and shapes in order: equal for two states of the same architecture."""
    return [(k, tuple(v.shape)) for k, v in state.items()]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
