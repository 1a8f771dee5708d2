"""Layer-parallel training: stage split, objectives by hand, a real 2-process gloo run."""

import pytest
import torch
from torch import nn

from fl_ec.data.sources import make_synthetic
from fl_ec.layer_parallel import (
    BoundaryFilter,
    LPSettings,
    boundary_objective,
    split_resnet,
    stage_keys,
    stitch,
    train_layer_parallel,
    update_multipliers,
)
from fl_ec.layer_parallel.trainer import _BoundaryState, serial_epoch, usable_stages
from fl_ec.models import ArchSpec, build_model
from fl_ec.training import evaluate


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_split_then_stitch_equals_the_full_network(stages):
    torch.manual_seed(0)
    model = build_model(ArchSpec("resnet20", (1, 28, 28), 10)).eval()
    parts = split_resnet(model, stages)
    x = torch.randn(4, 1, 28, 28)
    assert len(parts) == stages
    assert torch.equal(stitch(parts)(x), model(x))
    keys = stage_keys(model, parts)
    assert sorted(k for owned in keys for k in owned) == sorted(model.state_dict())
    assert "stem.0.weight" in keys[0] and "classifier.weight" in keys[-1]


def test_penalty_and_al_objectives_match_hand_computed_values():
    aux = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    produced = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    # residual = [[1, 0], [-1, -2]]; mean of squares = (1 + 0 + 1 + 4) / 4 = 1.5
    assert boundary_objective(aux, produced, beta=2.0).item() == pytest.approx(0.5 * 2.0 * 1.5)
    lam = torch.tensor([[0.5, 1.0], [2.0, 0.0]])
    # <lambda, residual> / 4 = (0.5 + 0 - 2 + 0) / 4 = -0.375
    value = boundary_objective(aux, produced, beta=2.0, multipliers=lam)
    assert value.item() == pytest.approx(1.5 - 0.375)
    update_multipliers(lam, aux, produced, beta=2.0)
    assert torch.equal(lam, torch.tensor([[2.5, 1.0], [0.0, -4.0]]))


def test_beta_schedule_and_hybrid_schedule():
    settings = LPSettings(
        beta0=1.0, beta_growth=2.0, beta_max=5.0, parallel_epochs=2, serial_epochs=1
    )
    assert [settings.beta(e) for e in range(4)] == [1.0, 2.0, 4.0, 5.0]
    assert [settings.is_serial(e) for e in range(6)] == [False, False, True] * 2
    assert not any(LPSettings(serial_epochs=0).is_serial(e) for e in range(5))


def test_downsampling_filter_shrinks_the_boundary_4x():
    boundary = BoundaryFilter(2)
    x = torch.randn(3, 8, 14, 14)
    small = boundary.down(x)
    assert small.numel() * 4 == x.numel()


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_boundary_codes_lose_at_most_half_a_step_for_32_over_bits_fewer_bytes(bits):
    torch.manual_seed(0)
    scales = torch.tensor([0.1, 1, 3, 10, 100]).view(5, 1, 1, 1)
    x = torch.relu(torch.randn(5, 16, 7, 9)) * scales  # 1008 values: 126 groups of 8
    boundary = BoundaryFilter(1, bits=bits)
    sent = boundary.encode(x)
    received = [buffer.copy_(t) for buffer, t in zip(boundary.buffers_like(x), sent, strict=True)]
    decoded = boundary.decode(received, x.shape)
    half_step = (x.flatten(1).amax(1) - x.flatten(1).amin(1)) / (2 * (2**bits - 1))
    error = (decoded - x).abs().flatten(1).amax(1)
    assert torch.all(error <= half_step * 1.001 + 1e-6)
    assert torch.all(error > 0)  # it is lossy: the test would notice a silent fp32 path
    coded_bytes = sum(t.numel() * t.element_size() for t in sent)
    assert coded_bytes == x.numel() * bits // 8 + 8 * len(x)  # packed codes + 2 floats
    exact = BoundaryFilter(1).decode(BoundaryFilter(1).encode(x), x.shape)
    assert torch.equal(exact, x)


def test_al_multipliers_act_only_with_two_parallel_epochs_between_corrections():
    # 1+1: each sample's multiplier is updated once, then reset by the correction.
    assert not LPSettings(method="al", parallel_epochs=1, serial_epochs=1).multipliers_act
    assert LPSettings(method="al", parallel_epochs=2, serial_epochs=1).multipliers_act
    assert LPSettings(method="al", parallel_epochs=1, serial_epochs=0).multipliers_act
    assert not LPSettings(method="al", epochs=1, serial_epochs=0).multipliers_act
    assert not LPSettings(method="penalty", parallel_epochs=3).multipliers_act


def test_cosine_lr_schedule():
    cosine = LPSettings(lr=0.1, epochs=4, lr_schedule="cosine")
    assert [round(cosine.lr_at(e), 6) for e in range(4)] == [0.1, 0.085355, 0.05, 0.014645]
    assert LPSettings(lr=0.1, epochs=4).lr_at(3) == 0.1
    with pytest.raises(ValueError, match="lr_schedule"):
        LPSettings(lr_schedule="step")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("method", "admm", "LPSettings.method='admm' is unknown: choose one of penalty, al"),
        ("loss", "mse", "LPSettings.loss='mse' is unknown: choose one of ce, kl"),
        ("backend", "mpi", "LPSettings.backend='mpi' is unknown"),
        ("stages", 0, "LPSettings.stages=0 must be >= 1"),
        ("epochs", 0, "LPSettings.epochs=0 must be >= 1"),
        ("parallel_epochs", 0, "LPSettings.parallel_epochs=0 must be >= 1"),
        ("serial_epochs", -1, "LPSettings.serial_epochs=-1 must be >= 0"),
        ("downsample", 0, "LPSettings.downsample=0 must be >= 1"),
        ("boundary_bits", 5, "LPSettings.boundary_bits=5 is not offered: set 32"),
    ],
)
def test_settings_reject_a_bad_field_by_name(field, value, fragment):
    with pytest.raises(ValueError) as info:
        LPSettings(**{field: value})
    assert str(info.value).startswith(fragment)
    with pytest.raises(ValueError, match="BoundaryFilter.bits=16 is not offered"):
        BoundaryFilter(bits=16)


def test_fewer_devices_than_stages_falls_back_and_says_so(caplog):
    settings = LPSettings(stages=64, threads_per_worker=1, backend="gloo")
    stages, backend = usable_stages(64, settings, num_blocks=9)
    assert backend == "gloo" and stages < 64
    assert "fits" in caplog.text


@pytest.fixture(scope="module")
def tiny():
    train, test = make_synthetic(num_train=768, num_test=512, seed=0)
    spec = ArchSpec("resnet8", train.input_shape, 10)
    return spec, train, test


def test_full_resolution_aux_is_constrained_only_at_the_pooled_resolution(tiny):
    spec, train, _ = tiny
    torch.manual_seed(0)
    stages = split_resnet(build_model(spec), 2)
    x = train.normalize(train.images[:8])
    with torch.no_grad():
        real = stages[0].train()(x)  # what reinitialise stores: batch statistics
    boundary = BoundaryFilter(2)
    full = _BoundaryState(1, 2, stages, x, LPSettings(downsample=2), boundary, "cpu")
    # The next stage trains on the real, sharp activations; only the pooled view
    # crosses the wire and enters the residual.
    assert torch.allclose(full.aux, real, atol=1e-5)
    assert torch.allclose(full.on_wire(full.aux), boundary.down(real), atol=1e-5)
    # A zero-mean pattern inside every 2x2 cell changes the stage input but not what
    # the penalty sees: the high frequencies are left to the task loss.
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(
        real.shape[-2] // 2, real.shape[-1] // 2
    )
    assert torch.allclose(full.on_wire(full.aux + checker), full.on_wire(full.aux), atol=1e-5)


@pytest.mark.parametrize(("downsample", "bits"), [(2, 32), (1, 8), (1, 4)])
def test_two_process_gloo_run_lowers_loss_and_matches_serial_accuracy(tiny, downsample, bits):
    spec, train, test = tiny
    x, y = train.normalize(train.images), train.labels
    # Synthetic class patterns are not shift/flip invariant: no augmentation here.
    settings = LPSettings(
        stages=2,
        method="al",
        epochs=4,
        batch_size=64,
        downsample=downsample,
        boundary_bits=bits,
        augment=False,
    )
    torch.manual_seed(0)
    model = build_model(spec)
    before = evaluate(model, test).loss
    boundary_elements = split_resnet(model, 2)[0](x[:1]).numel() // downsample**2
    result = train_layer_parallel(model, spec, x, y, settings)
    assert result.stages == 2 and result.epoch_kinds == ["parallel", "serial"] * 2
    # Both directions, every sample: fp32 values, or packed codes + an 8-byte range.
    per_sample = boundary_elements * 4 if bits == 32 else boundary_elements * bits // 8 + 8
    assert result.boundary_bytes[0] == 2 * len(x) * per_sample
    assert result.boundary_bytes[1] == 0
    parallel_accuracy = evaluate(model, test).accuracy
    assert evaluate(model, test).loss < before
    # Serial training, same epochs, same data: accuracy agrees within 15 points on this
    # tiny problem (the benchmark measures the real gap on Fashion-MNIST).
    torch.manual_seed(0)
    serial = build_model(spec)
    optimizer = torch.optim.SGD(serial.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(4):
        serial_epoch(serial, optimizer, x, y, settings, epoch)
    serial_accuracy = evaluate(serial, test).accuracy
    assert parallel_accuracy > 0.5 and abs(parallel_accuracy - serial_accuracy) < 0.15


def test_kl_loss_distills_teacher_logits(tiny):
    spec, train, _ = tiny
    x = train.normalize(train.images)
    torch.manual_seed(1)
    teacher = build_model(spec).eval()
    with torch.no_grad():
        target = teacher(x)
    settings = LPSettings(stages=1, loss="kl", epochs=2, batch_size=64, serial_epochs=0, lr=0.02)
    torch.manual_seed(0)
    student = build_model(spec)
    result = train_layer_parallel(student, spec, x, target, settings)
    assert result.train_loss[-1] < result.train_loss[0]
    assert isinstance(student, nn.Module)


def test_fedec_distillation_switches_to_the_layer_parallel_trainer(tiny):
    from fl_ec.config import ExperimentConfig
    from fl_ec.data.federated import ServerData
    from fl_ec.factory import build_strategy

    spec, train, test = tiny
    config = ExperimentConfig.from_run_config(
        {
            "strategy": "fedec",
            "model": "resnet8",
            "distill-trainer": "layer-parallel",
            "distill-steps": 12,
            "distill-batch-size": 128,  # 12 x 128 proxy samples
        }
    )
    strategy = build_strategy(config, spec, ServerData(proxy=train, validation=test, test=test))
    assert strategy.student_trainer is not None
    proxy = train.normalize(train.images)
    torch.manual_seed(3)
    teacher = build_model(spec).eval()
    with torch.no_grad():
        target = teacher(proxy)
    torch.manual_seed(0)
    student = build_model(spec)
    gap = lambda: nn.functional.kl_div(  # noqa: E731
        student.eval()(proxy).log_softmax(-1),
        target.log_softmax(-1),
        log_target=True,
        reduction="batchmean",
    ).item()
    with torch.no_grad():
        before = gap()
    strategy.student_trainer(student, proxy, target)  # 2 stages, KL to the teacher
    with torch.no_grad():
        assert gap() < before
