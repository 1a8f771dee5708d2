import torch

from fl_ec.data.sources import make_synthetic
from fl_ec.ensemble import log_class_prior
from fl_ec.models import ArchSpec, build_model
from fl_ec.training import (
    device_capability,
    evaluate,
    logit_adjusted_loss,
    select_device,
    train_supervised,
)


def test_local_training_learns_synthetic_classes():
    train, test = make_synthetic(num_train=1200, num_test=400, seed=3)
    torch.manual_seed(0)
    model = build_model(ArchSpec("cnn", train.input_shape, 10))
    before = evaluate(model, test)
    result = train_supervised(model, train, epochs=2, batch_size=32, lr=0.05, seed=1)
    after = evaluate(model, test)
    assert result.num_examples == 2 * len(train)
    assert after.loss < before.loss * 0.5
    assert after.accuracy > 0.8 > before.accuracy


def test_training_is_reproducible_for_a_seed():
    train, _ = make_synthetic(num_train=300, num_test=10, seed=3)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(ArchSpec("resnet8", train.input_shape, 10))
        train_supervised(model, train, epochs=1, batch_size=64, lr=0.05, seed=11)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_capability_reports_device_and_overrides():
    device = select_device("cpu")
    detected = device_capability(device)
    assert detected["device-kind"] == "cpu" and detected["device-tier"] == "cpu"
    assert detected["memory-mb"] > 0
    edge = device_capability(device, tier="edge", memory_mb=256, speed=0.1)
    assert (edge["device-tier"], edge["memory-mb"], edge["speed"]) == ("edge", 256.0, 0.1)


def test_cuda_request_falls_back_to_cpu_without_a_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("cuda").type == expected
    assert select_device("cpu").type == "cpu"


def _update_norm(max_grad_norm):
    train, _ = make_synthetic(num_train=64, num_test=1, seed=3)
    torch.manual_seed(0)
    model = build_model(ArchSpec("cnn", train.input_shape, 10))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_supervised(
        model, train, epochs=1, batch_size=64, lr=1.0, momentum=0.0, max_grad_norm=max_grad_norm
    )
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return float((after - before).norm())


def test_gradient_clipping_bounds_the_step():
    # One full-batch SGD step with lr=1: the update *is* the (clipped) gradient.
    assert _update_norm(0.0) > 0.05
    assert _update_norm(0.01) <= 0.01 + 1e-6


def test_divergence_is_reported_as_a_one_line_error():
    import pytest

    from fl_ec.training import TrainingDivergedError

    train, _ = make_synthetic(num_train=256, num_test=1, seed=3)
    torch.manual_seed(0)
    model = build_model(ArchSpec("cnn", train.input_shape, 10))
    with pytest.raises(TrainingDivergedError, match="lower lr or set max-grad-norm"):
        train_supervised(model, train, epochs=3, batch_size=32, lr=1e6, momentum=0.9)


def test_logit_adjusted_loss_is_cross_entropy_of_prior_shifted_logits():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 0, 0, 1, 1])
    prior = log_class_prior([30, 10, 0, 0])
    # Laplace smoothing: an unseen class gets (0 + 1) / (40 + 4), not log(0).
    assert torch.allclose(prior.exp(), torch.tensor([31, 11, 1, 1]) / 44.0)
    manual = torch.nn.functional.cross_entropy(logits + prior, labels)
    assert torch.isclose(logit_adjusted_loss(logits, labels, prior), manual)
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.isclose(logit_adjusted_loss(logits, labels), plain)


def _absent_class_drift(log_prior):
    """How far one client's training moves the logits of classes it never saw."""
    train, test = make_synthetic(num_train=1200, num_test=400, seed=3)
    skewed = train.subset(torch.nonzero(train.labels < 2).flatten())  # classes 0 and 1 only
    torch.manual_seed(0)
    model = build_model(ArchSpec("cnn", train.input_shape, 10))
    x = test.normalize(test.images)
    with torch.inference_mode():
        before = model.eval()(x)
    prior = log_prior(skewed.class_counts()) if log_prior else None
    train_supervised(model, skewed, epochs=1, batch_size=32, lr=0.05, seed=1, log_prior=prior)
    with torch.inference_mode():
        after = model.eval()(x)
    present_gap = (after[:, :2] - before[:, :2]).mean()
    return float(present_gap - (after[:, 2:] - before[:, 2:]).mean())


def test_logit_adjusted_training_suppresses_unseen_classes_far_less():
    # Plain CE on a two-class partition pushes the eight unseen classes' logits down
    # relative to the seen ones; the logit-adjusted loss leaves them near the start,
    # so the client stays usable (in an average and in an ensemble) on other classes.
    plain = _absent_class_drift(None)
    adjusted = _absent_class_drift(log_class_prior)
    assert plain > 1.0
    assert adjusted < 0.5 * plain
