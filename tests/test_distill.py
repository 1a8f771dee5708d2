"""Distillation on tiny synthetic data, without Flower."""

import pytest
import torch

from fl_ec.data.sources import make_synthetic
from fl_ec.distill import (
    DistillSettings,
    augmented_views,
    distill,
    kd_loss,
    recalibrate_batchnorm,
)
from fl_ec.models import ArchSpec, build_model
from fl_ec.scoring import model_accuracy
from fl_ec.training import train_supervised


def _agreement(a, b, x):
    with torch.no_grad():
        return float((a.eval()(x).argmax(1) == b.eval()(x).argmax(1)).float().mean())


def test_distillation_makes_the_student_agree_with_the_teacher():
    train, val = make_synthetic(num_train=1500, num_test=300, seed=5)
    torch.manual_seed(0)
    teacher = build_model(ArchSpec("cnn", train.input_shape, 10))
    train_supervised(teacher, train, epochs=2, batch_size=32, lr=0.05)
    torch.manual_seed(1)
    student = build_model(ArchSpec("cnn", train.input_shape, 10))
    proxy = train.normalize(train.images)
    with torch.no_grad():
        targets = teacher.eval()(proxy)
    before = _agreement(student, teacher, proxy)
    val_xy = (val.normalize(val.images), val.labels)
    result = distill(
        student,
        proxy,
        targets,
        val_xy,
        DistillSettings(steps=150, batch_size=64, lr=3e-3, eval_every=25, patience=200),
    )
    after = _agreement(student, teacher, proxy)
    assert after > before + 0.5
    assert result.best_accuracy >= result.start_accuracy
    assert result.best_accuracy == model_accuracy(student, *val_xy)


def test_early_stopping_keeps_a_start_that_distillation_cannot_improve():
    train, val = make_synthetic(num_train=600, num_test=200, seed=5)
    torch.manual_seed(0)
    good = build_model(ArchSpec("cnn", train.input_shape, 10))
    train_supervised(good, train, epochs=2, batch_size=32, lr=0.05)
    start = {k: v.clone() for k, v in good.state_dict().items()}
    proxy = train.normalize(train.images)
    noise = torch.randn(len(proxy), 10) * 5  # a useless teacher
    result = distill(
        good,
        proxy,
        noise,
        (val.normalize(val.images), val.labels),
        DistillSettings(steps=200, batch_size=64, lr=1e-2, eval_every=20, patience=60),
    )
    assert result.steps < 200, "patience should stop a run that never improves"
    assert result.best_step == 0
    assert all(torch.equal(start[k], v) for k, v in good.state_dict().items())


def test_kd_loss_is_zero_for_identical_logits_and_scaled_by_t_squared():
    logits = torch.randn(8, 10)
    assert float(kd_loss(logits, logits, 4.0)) < 1e-6
    other = torch.randn(8, 10)
    loss_t1 = kd_loss(other * 2, logits * 2, 2.0) / 4.0
    assert torch.allclose(loss_t1, kd_loss(other, logits, 1.0), atol=1e-6)


def test_batchnorm_recalibration_matches_the_data():
    model = build_model(ArchSpec("resnet8", (1, 28, 28), 10))
    inputs = torch.randn(64, 1, 28, 28) * 3 + 2
    recalibrate_batchnorm(model, inputs, batch_size=16)
    first_bn = model.stem[1]
    conv = model.stem[0]
    with torch.no_grad():
        features = conv(inputs)
    assert torch.allclose(first_bn.running_mean, features.mean((0, 2, 3)), atol=1e-4)
    assert first_bn.momentum == 0.1, "momentum must be restored"


def test_augmented_views_are_seeded_shifts_of_the_inputs():
    x = torch.randn(6, 1, 28, 28)
    a, b = augmented_views(x, 2, seed=3), augmented_views(x, 2, seed=3)
    assert a.shape == (12, 1, 28, 28) and torch.equal(a, b)
    assert not torch.equal(a[:6], x)
    assert torch.equal(augmented_views(x, 1, seed=0, max_shift=0, flip=False), x)


def test_zero_steps_need_no_teacher_but_still_recalibrate_and_score():
    import pytest

    model = build_model(ArchSpec("resnet8", (1, 28, 28), 10))
    inputs = torch.randn(64, 1, 28, 28) * 3 + 2
    validation = (inputs[:16], torch.zeros(16, dtype=torch.long))
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    result = distill(model, inputs, None, validation, DistillSettings(steps=0))
    with torch.no_grad():
        features = model.stem[0](inputs)
    assert torch.allclose(model.stem[1].running_mean, features.mean((0, 2, 3)), atol=1e-4)
    assert result.steps == 0 and result.start_accuracy == model_accuracy(model, *validation)
    assert all(torch.equal(p, weights[k]) for k, p in model.named_parameters())  # no step
    with pytest.raises(ValueError, match="only distill\\(steps=0\\)"):
        distill(model, inputs, None, validation, DistillSettings(steps=1))


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("steps", -1, "DistillSettings.steps=-1 must be >= 0"),
        ("batch_size", 0, "DistillSettings.batch_size=0 must be >= 1"),
        ("lr", 0.0, "DistillSettings.lr=0.0 must be > 0"),
        ("temperature", -2.0, "DistillSettings.temperature=-2.0 must be > 0"),
        ("eval_every", 0, "DistillSettings.eval_every=0 must be >= 1"),
        ("patience", -1, "DistillSettings.patience=-1 must be >= 0"),
    ],
)
def test_settings_reject_a_bad_field_by_name(field, value, fragment):
    with pytest.raises(ValueError) as info:
        DistillSettings(**{field: value})
    assert str(info.value).startswith(fragment) and "\n" not in str(info.value)
    assert DistillSettings(steps=0).steps == 0  # 0 takes no step, a valid choice
