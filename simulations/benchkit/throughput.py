"""How fast the teacher pass is against one model's plain batched inference."""

from __future__ import annotations

import time

import torch


def teacher_throughput(num_models: int = 10, proxy_size: int = 5000) -> str:
    """Teacher pass (num_models CNNs) vs one CNN's batched inference, samples/s.

    The reference is measured twice: in the layout the teacher uses (channels-last,
    so the ratio isolates ensembling overhead) and in PyTorch's default layout (what a
    plain ``model(x)`` loop gets, so the layout's own gain shows).
    """
    from fl_ec.ensemble import teacher_logits
    from fl_ec.models import ArchSpec, build_model, channels_last

    torch.manual_seed(0)
    spec = ArchSpec("cnn", (1, 28, 28), 10)
    models = [build_model(spec).eval() for _ in range(num_models)]
    x = torch.randn(proxy_size, 1, 28, 28)
    teacher_logits(models[:1], x[:512])  # warm-up

    def single_rate() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in x.split(512):
                models[0](batch)
        return proxy_size / (time.perf_counter() - start)

    plain = single_rate()
    with channels_last(models[0]):
        single_rate()  # warm-up of the channels-last kernels
        same_layout = single_rate()
    teacher = teacher_logits(models, x, batch_size=512)
    rate = teacher.samples_per_second
    return (
        f"Teacher pass: {num_models} CNNs x {proxy_size} proxy samples in "
        f"{teacher.seconds:.2f} s = {rate:,.0f} model-samples/s. One CNN's batched "
        f"inference (batch 512): {same_layout:,.0f} samples/s channels-last (ratio "
        f"{rate / same_layout:.2f}; 1.0 = no overhead for ensembling), {plain:,.0f} "
        f"samples/s in PyTorch's default layout (ratio {rate / plain:.2f})."
    )
