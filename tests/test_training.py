import torch

from fl_ec.data.sources import make_synthetic
from fl_ec.ensemble import log_class_prior
from fl_ec.models import ArchSpec, build_model
from fl_ec.training import (
    device_capability,
    evaluate,
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


def test_class_prior_is_laplace_smoothed():
    # An unseen class gets (0 + 1) / (40 + 4), not log(0): the gated teacher subtracts it.
    prior = log_class_prior([30, 10, 0, 0])
    assert torch.allclose(prior.exp(), torch.tensor([31, 11, 1, 1]) / 44.0)
