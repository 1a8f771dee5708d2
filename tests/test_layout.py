import torch

from fl_ec.compression import enable_weight_fake_quant, fake_quantize
from fl_ec.data.sources import make_synthetic
from fl_ec.models import ArchSpec, build_model, channels_last
from fl_ec.training import evaluate, train_supervised


def _conv_weight(model: torch.nn.Module) -> torch.Tensor:
    return next(
        m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1
    )


def _is_nhwc(weight: torch.Tensor) -> bool:
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_channels_last_same_outputs_and_restores_plain_layout_on_exit():
    torch.manual_seed(0)
    model = build_model(ArchSpec("cnn", (1, 28, 28), 10)).eval()
    x = torch.randn(8, 1, 28, 28)
    expected = model(x)
    params_before = list(model.parameters())
    with channels_last(model):
        assert _is_nhwc(_conv_weight(model))
        inside = model(x)
    torch.testing.assert_close(inside, expected, rtol=1e-5, atol=1e-5)
    # Arrays leave the process from the state dict: all of it contiguous again.
    assert all(t.is_contiguous() for t in model.state_dict().values())
    # Same Parameter objects: an optimizer built outside still updates the model.
    assert all(a is b for a, b in zip(params_before, model.parameters(), strict=True))


def test_channels_last_is_reentrant():
    model = build_model(ArchSpec("cnn", (1, 28, 28), 10))
    with channels_last(model):
        with channels_last(model):
            pass
        assert _is_nhwc(_conv_weight(model)), "an inner exit undid the outer conversion"
    assert _conv_weight(model).is_contiguous()


def test_fake_quant_keeps_the_channels_last_layout():
    model = build_model(ArchSpec("cnn", (1, 28, 28), 10))
    enable_weight_fake_quant(model, 4)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    with channels_last(model):
        assert _is_nhwc(fake_quantize(conv.weight, 4))


def test_training_under_channels_last_matches_plain_layout():
    data, _ = make_synthetic(num_train=64, num_test=8, seed=0)
    spec = ArchSpec("cnn", data.input_shape, 10)
    torch.manual_seed(1)
    trained = build_model(spec)
    reference = build_model(spec)
    reference.load_state_dict(trained.state_dict())
    train_supervised(trained, data, epochs=1, batch_size=16, lr=0.05, seed=3)
    # The same SGD steps by hand in the default layout.
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(3)
    reference.train()
    for x, y in data.batches(16, shuffle=True, generator=generator):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_evaluating_under_inference_mode_leaves_the_model_trainable():
    train, test = make_synthetic(num_train=64, num_test=32, seed=0)
    model = build_model(ArchSpec("cnn", train.input_shape, 10))
    evaluate(model, test)  # inference mode + channels-last conversion inside
    assert not any(p.is_inference() for p in model.parameters())
    train_supervised(model, train, epochs=1, batch_size=16, lr=0.05)
