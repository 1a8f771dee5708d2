"""What a strategy keeps at the end of a run besides the global model.

EC-DNN's inference-time model is the ensemble of the last round's client models,
averaging their logits: :func:`save_ensemble` writes each member with its spec and
records the ensemble's test accuracy in the run's summary. FedHCE's product is its
compressed variants and their HCE ensemble: :func:`save_variants_of`.
"""

from __future__ import annotations

from logging import INFO

import torch
from flwr.common.logger import log

from fl_ec.data.tensor_data import TensorData
from fl_ec.ensemble import teacher_logits
from fl_ec.hce import evaluate_variants, save_variants
from fl_ec.results import RunRecorder
from fl_ec.scoring import accuracy
from fl_ec.strategies.fedec_utils import ClientModel, members_of
from fl_ec.strategies.variant_bank import VariantBank


def save_ensemble(
    recorder: RunRecorder,
    test: TensorData,
    client_models: list[ClientModel],
    device: torch.device | str,
) -> None:
    """EC-DNN's ensemble of ``client_models``: each member to ``ensemble/member-<i>``,
    its test accuracy and size to the summary. Nothing without a completed round."""
    if not client_models:
        return
    members = members_of(client_models)
    outputs = teacher_logits(members, test.normalize(test.images), "mean-logits", device=device)
    test_accuracy = accuracy(outputs.logits, test.labels)
    recorder.extra_summary["ensemble-test-accuracy"] = test_accuracy
    recorder.extra_summary["ensemble-members"] = len(members)
    for index, member in enumerate(client_models):
        recorder.write_model(member.state, name=f"ensemble/member-{index}", spec=member.spec)
    log(
        INFO,
        "[fl-ec] EC-DNN global ensemble of %d client models: test acc %.2f%%",
        len(members),
        100 * test_accuracy,
    )


def save_variants_of(
    recorder: RunRecorder, test: TensorData, bank: VariantBank, members: list[str]
) -> None:
    """FedHCE's final variants to ``variants/`` (:mod:`fl_ec.hce`) and their test results.

    The run's summary gets each variant's test accuracy and wire bytes and the HCE
    ensemble's (``members``' mean logits), and, when the variants were calibrated,
    their accuracies before that calibration (``*-uncalibrated``). Latency and the
    int8 export are left to ``fl-ec-hce-eval <run dir>``.
    """
    if not bank.models:
        return
    wire_bytes = {name: payload.nbytes for name, payload in bank.payloads.items()}
    index = save_variants(recorder, bank.models, bank.variants, wire_bytes, members)
    test_x = test.normalize(test.images)
    reports = evaluate_variants(bank.models, index, test_x, test.labels, members, latency=False)
    summary = recorder.extra_summary
    summary["variant-test-accuracy"] = {r.name: r.accuracy for r in reports[:-1]}
    summary["variant-wire-bytes"] = {r.name: r.wire_bytes for r in reports[:-1]}
    summary["hce-test-accuracy"] = reports[-1].accuracy
    summary["hce-wire-bytes"] = reports[-1].wire_bytes
    if bank.uncalibrated:  # what the variants' own calibration gained
        before = evaluate_variants(
            {**bank.models, **bank.uncalibrated}, index, test_x, test.labels, members,
            latency=False,
        )
        summary["variant-test-accuracy-uncalibrated"] = {r.name: r.accuracy for r in before[:-1]}
        summary["hce-test-accuracy-uncalibrated"] = before[-1].accuracy
    log(
        INFO,
        "[fl-ec] HCE ensemble %s: test acc %.2f%%, %d bytes on the wire",
        members,
        100 * reports[-1].accuracy,
        reports[-1].wire_bytes,
    )
