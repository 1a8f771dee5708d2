"""int8 inference export for CPU, and a latency probe.

torch 2.15 moved the pt2e quantization flow (X86InductorQuantizer) out of core into
``torchao``, which is not a dependency here; the in-tree path that still produces
real int8 kernels on CPU is FX graph-mode post-training quantization with the
``x86`` engine (fbgemm/oneDNN quantized conv and linear). Weights are per-channel
int8, activations per-tensor uint8 with ranges observed on calibration batches.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from fl_ec.compression.quantization import baked_copy


def export_int8(
    model: nn.Module, calibration_inputs: torch.Tensor, batch_size: int = 256
) -> nn.Module:
    """A CPU int8 copy of ``model`` (post-training static quantization, FX, x86)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    # A quantized variant's own (e.g. 4-bit) weights are baked in; int8 represents them.
    float_model = baked_copy(model).cpu().eval()
    torch.backends.quantized.engine = "x86"
    example = calibration_inputs[:1]
    with warnings.catch_warnings():  # FX quantization is marked deprecated in torch 2.15
        warnings.simplefilter("ignore")
        prepared = prepare_fx(float_model, get_default_qconfig_mapping("x86"), (example,))
        with torch.inference_mode():
            for batch in calibration_inputs.split(batch_size):
                prepared(batch)
        return convert_fx(prepared)


@torch.inference_mode()
def latency_ms(
    model: nn.Module, input_shape: tuple[int, ...], batch: int, repeats: int = 30
) -> float:
    """Median CPU wall time of one forward pass at ``batch``, in milliseconds."""
    model = model.cpu().eval()
    x = torch.randn(batch, *input_shape)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    times.sort()
    return 1000 * times[len(times) // 2]
