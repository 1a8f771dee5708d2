"""The HCE ensemble for inference: save, load and evaluate FedHCE's final variants.

A run of ``strategy=fedhce`` writes ``results/<run>/variants/``: one ``<name>.pt``
(tensors only) + ``<name>.json`` (architecture spec) per variant and an
``index.json`` with each variant's recipe, wire bytes and HCE membership.
:func:`load_variants` reloads them (``torch.load(weights_only=True)``), and
:func:`evaluate_variants` reports for every variant and for the HCE ensemble (mean
logits of the members) the test accuracy, parameters, bytes on the wire, and CPU
latency at batch 1 and 64, in fp32 (fake-quant) and as an exported int8 model. The
command ``fl-ec-hce-eval`` (:mod:`fl_ec.hce_eval`) does both for a run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fl_ec.compression import Variant, enable_weight_fake_quant
from fl_ec.compression.export import export_int8, latency_ms
from fl_ec.compression.quantization import baked_copy
from fl_ec.ensemble import teacher_logits
from fl_ec.models.spec import count_parameters
from fl_ec.results import RunRecorder, load_saved_model
from fl_ec.scoring import accuracy

INDEX = "variants/index.json"


@dataclass
class VariantReport:
    name: str
    accuracy: float
    parameters: int
    wire_bytes: int
    fp32_bytes: int
    latency_b1_ms: float = float("nan")
    latency_b64_ms: float = float("nan")
    int8_accuracy: float = float("nan")
    int8_latency_b1_ms: float = float("nan")
    int8_latency_b64_ms: float = float("nan")


def save_variants(
    recorder: RunRecorder,
    models: dict[str, nn.Module],
    variants: dict[str, Variant],
    wire_bytes: dict[str, int],
    hce_members: list[str],
) -> list[dict[str, Any]]:
    """Write every variant (tensors + spec) and the index the evaluator reads; return it."""
    index = []
    for name, model in models.items():
        recorder.write_model(model.state_dict(), name=f"variants/{_file(name)}")
        variant = variants[name]
        index.append(
            {
                "name": name,
                "file": _file(name),
                "bits": variant.bits,
                "prune-ratio": variant.prune_ratio,
                "wire-bytes": wire_bytes[name],
                "hce": name in hce_members,
            }
        )
    (recorder.run_dir / INDEX).write_text(json.dumps(index, indent=2))
    return index


def load_variants(run_dir: Path) -> tuple[dict[str, nn.Module], list[dict[str, Any]]]:
    """Rebuild the saved variants (fake-quant on for quantized ones) and the index."""
    index_path = Path(run_dir) / INDEX
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found: was this a strategy=fedhce run?")
    index = json.loads(index_path.read_text())
    models = {}
    for entry in index:
        model = load_saved_model(Path(run_dir), f"variants/{entry['file']}")
        models[entry["name"]] = enable_weight_fake_quant(model, int(entry["bits"])).eval()
    return models, index


def evaluate_variants(
    models: dict[str, nn.Module],
    index: list[dict[str, Any]],
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    members: list[str] | None = None,
    calibration: torch.Tensor | None = None,
    latency: bool = True,
) -> list[VariantReport]:
    """One report per variant plus a final ``HCE{...}`` row for the ensemble of members."""
    entries = {e["name"]: e for e in index}
    members = members or [e["name"] for e in index if e["hce"]]
    unknown = [m for m in members if m not in models]
    if unknown:
        raise ValueError(f"unknown HCE members {unknown}: saved variants are {list(models)}")
    reports, logits = [], {}
    for name, model in models.items():
        report, logits[name] = report_model(
            name, model, test_x, test_y, int(entries[name]["wire-bytes"]), calibration, latency
        )
        reports.append(report)
    by_name = {r.name: r for r in reports}
    ensemble_logits = torch.stack([logits[m] for m in members]).mean(0)
    total = lambda field: sum(getattr(by_name[m], field) for m in members)  # noqa: E731
    reports.append(
        VariantReport(
            "HCE{" + ", ".join(members) + "}",
            accuracy(ensemble_logits, test_y),
            total("parameters"),
            total("wire_bytes"),
            total("fp32_bytes"),
            # Members run one after another on one CPU: latencies add up.
            total("latency_b1_ms"),
            total("latency_b64_ms"),
            float("nan"),
            total("int8_latency_b1_ms"),
            total("int8_latency_b64_ms"),
        )
    )
    return reports


def report_model(
    name: str,
    model: nn.Module,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    wire_bytes: int,
    calibration: torch.Tensor | None = None,
    latency: bool = True,
) -> tuple[VariantReport, torch.Tensor]:
    """Accuracy, size and (optionally) fp32 / int8-export CPU latency of one model."""
    logits = teacher_logits([model], test_x, "mean-logits").logits
    params = count_parameters(model)
    report = VariantReport(name, accuracy(logits, test_y), params, wire_bytes, 4 * params)
    if latency:
        input_shape = tuple(test_x.shape[1:])
        deployed = baked_copy(model)  # quantized weights baked in: no fake-quant per call
        report.latency_b1_ms = latency_ms(deployed, input_shape, 1)
        report.latency_b64_ms = latency_ms(deployed, input_shape, 64)
        exported = export_int8(model, calibration if calibration is not None else test_x[:512])
        with torch.inference_mode():
            int8_logits = torch.cat([exported(x) for x in test_x.split(512)])
        report.int8_accuracy = accuracy(int8_logits, test_y)
        report.int8_latency_b1_ms = latency_ms(exported, input_shape, 1)
        report.int8_latency_b64_ms = latency_ms(exported, input_shape, 64)
    return report, logits


def markdown_table(reports: list[VariantReport]) -> str:
    lines = [
        "| variant | test acc | params | wire bytes | fp32 ms b1 | fp32 ms b64 "
        "| int8 export acc | int8 ms b1 | int8 ms b64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r.name} | {100 * r.accuracy:.2f} | {r.parameters:,} | {r.wire_bytes:,} "
            f"| {r.latency_b1_ms:.3f} | {r.latency_b64_ms:.2f} | {100 * r.int8_accuracy:.2f} "
            f"| {r.int8_latency_b1_ms:.3f} | {r.int8_latency_b64_ms:.2f} |"
        )
    return "\n".join(lines)


def _file(name: str) -> str:
    return name.replace("+", "_")
