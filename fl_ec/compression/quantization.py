"""Per-channel symmetric weight quantization: fake-quant for training, integers for the wire.

A weight tensor is quantized per output channel (dim 0) with a symmetric scale
``max|w| / qmax``, ``qmax = 2^(bits-1) - 1``: 127 levels each side at 8 bits, 7 at 4
bits, and 1 at 2 bits -- the ternary {-s, 0, +s}. Symmetric per-channel scales keep
zero exact (pruned-away and ReLU-sparse weights stay zero) and make re-quantizing a
quantized tensor a no-op, so a variant's weights survive the server->client->server
trip unchanged.

Training uses *fake* quantization with a straight-through estimator: the forward pass
sees the quantized weight, the backward pass treats rounding as identity, so the fp32
shadow weights keep learning. Conv2d / Linear modules are switched to subclasses that
do this in ``forward``; their parameters and state_dict keys are untouched, so a
quantized variant still averages, distills and serialises like the plain model.
"""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED_BITS = (2, 4, 8)


def _qmax(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"weight bits {bits}: choose one of {SUPPORTED_BITS}")
    return 2 ** (bits - 1) - 1


def quantize_per_channel(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q`` int8 in ``[-qmax, qmax]`` and ``weight ~ q * scale``.

    ``scale`` has one entry per output channel (dim 0); ``q`` is rounded to nearest.
    """
    qmax = _qmax(bits)
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    scale = (flat.abs().amax(1) / qmax).clamp_min(1e-12)
    q = torch.round(flat / scale.unsqueeze(1)).clamp(-qmax, qmax).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (q.dim() - 1)
    return q.float() * scale.reshape(shape)


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize in the forward pass, identity gradient (straight-through)."""
    qmax = _qmax(bits)
    # Reduce over every dim but the output channel without reshaping, so the result
    # keeps the weight's memory layout (a reshape would copy a channels-last weight
    # back to NCHW and lose the fast convolution path, see fl_ec.models.layout).
    magnitude = weight.detach().abs()
    if weight.dim() > 1:  # amax over an empty dim tuple would reduce everything
        magnitude = magnitude.amax(tuple(range(1, weight.dim())), keepdim=True)
    scale = (magnitude / qmax).clamp_min(1e-12)
    quantized = torch.round(weight / scale).clamp(-qmax, qmax) * scale
    return weight + (quantized - weight).detach()


class QuantConv2d(nn.Conv2d):
    """Conv2d whose forward uses its weight fake-quantized to ``weight_bits``."""

    weight_bits: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, fake_quantize(self.weight, self.weight_bits), self.bias)


class QuantLinear(nn.Linear):
    """Linear whose forward uses its weight fake-quantized to ``weight_bits``."""

    weight_bits: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, fake_quantize(self.weight, self.weight_bits), self.bias)


_QUANT_CLASS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def enable_weight_fake_quant(model: nn.Module, bits: int) -> nn.Module:
    """Make every Conv2d / Linear of ``model`` fake-quantize its weight (in place).

    The module's class is switched to a subclass with the same parameters, so no
    weight is copied and the state_dict is unchanged. ``bits=0`` turns it off.
    """
    if bits:
        _qmax(bits)
    for module in model.modules():
        base = next((b for b in _QUANT_CLASS if type(module) in (b, _QUANT_CLASS[b])), None)
        if base is None:
            continue
        if bits:
            module.__class__ = _QUANT_CLASS[base]
            module.weight_bits = bits
        else:
            module.__class__ = base
    return model


def baked_copy(model: nn.Module) -> nn.Module:
    """A plain-module copy whose weights *are* the quantized values (for deployment).

    Fake-quant recomputes the quantization every forward pass; an exported or
    latency-measured model should not pay for that.
    """
    import copy

    baked = copy.deepcopy(model)
    bits = weight_bits(baked)
    if bits:
        with torch.no_grad():
            for module in baked.modules():
                if isinstance(module, nn.Conv2d | nn.Linear):
                    module.weight.copy_(fake_quantize(module.weight, bits))
        enable_weight_fake_quant(baked, 0)
    return baked


def weight_bits(model: nn.Module) -> int:
    """The fake-quant bit width of ``model`` (0 when it is not quantized)."""
    for module in model.modules():
        if isinstance(module, QuantConv2d | QuantLinear):
            return module.weight_bits
    return 0


def quantized_weight_keys(model: nn.Module) -> list[str]:
    """state_dict keys of the weights that quantization applies to."""
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    ]
