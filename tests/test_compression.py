"""The compression toolkit without Flower: pruning maps, fake-quant, wire packing, export."""

import numpy as np
import pytest
import torch

from fl_ec.compression import (
    Variant,
    enable_weight_fake_quant,
    fake_quantize,
    fold_into_full,
    pack_state_dict,
    packed_nbytes,
    parse_variants,
    prune_structured,
    quantize_per_channel,
    unpack_state_dict,
    weight_bits,
)
from fl_ec.compression.export import export_int8
from fl_ec.compression.quantization import quantized_weight_keys
from fl_ec.compression.variants import VariantFactory
from fl_ec.models import ArchSpec, build_from_state_dict, build_model, count_parameters


def _model(name: str = "cnn"):
    spec = ArchSpec(name=name, input_shape=(1, 28, 28), num_classes=10)
    torch.manual_seed(0)
    return spec, build_model(spec).eval()


@pytest.mark.parametrize("name", ["cnn", "resnet8"])
def test_prune_send_as_arrays_rebuild_gives_identical_outputs(name):
    spec, model = _model(name)
    full_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 28, 28)
    structure = prune_structured(model, x[:2], 0.5)
    model.eval()
    assert count_parameters(model) < 0.5 * sum(v.numel() for v in full_state.values())
    assert model.classifier.out_features == 10  # the classifier keeps its outputs
    # Arrays only (what travels): numpy copies of the state, rebuilt from shapes.
    arrays = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    rebuilt = build_from_state_dict(spec, {k: torch.from_numpy(a) for k, a in arrays.items()})
    assert torch.equal(rebuilt.eval()(x), model(x))
    # Replaying the recorded cut on the original weights reproduces the pruned model.
    replayed = build_from_state_dict(spec, structure.slice(full_state)).eval()
    assert torch.equal(replayed(x), model(x))


def test_fold_into_full_averages_each_coordinate_over_who_has_it():
    _, model = _model()
    previous = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    structure = prune_structured(model, torch.randn(1, 1, 28, 28), 0.5)
    full_update = {k: torch.full_like(v, 2.0) for k, v in previous.items()}
    pruned_update = {k: torch.full_like(v, 4.0) for k, v in model.state_dict().items()}
    folded = fold_into_full(previous, [(full_update, None, 1.0), (pruned_update, structure, 1.0)])
    kept_out = structure.kept["conv1.weight"][0]
    assert torch.allclose(folded["conv1.weight"][kept_out], torch.tensor(3.0))
    dropped = [i for i in range(32) if i not in kept_out]
    assert torch.allclose(folded["conv1.weight"][dropped], torch.tensor(2.0))
    # Only the pruned client: coordinates it lacks keep the previous value.
    only_pruned = fold_into_full(previous, [(pruned_update, structure, 1.0)])
    assert torch.allclose(only_pruned["conv1.weight"][dropped], torch.tensor(0.0))
    assert torch.allclose(only_pruned["conv1.weight"][kept_out], torch.tensor(4.0))


def test_expanded_states_fold_like_fold_into_full_under_the_weighted_mean():
    from fl_ec.compression import expand_to_full
    from fl_ec.robust import CoordinateMedian, WeightedMean

    _, model = _model()
    previous = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    structure = prune_structured(model, torch.randn(1, 1, 28, 28), 0.5)
    full_update = {
        k: torch.randn_like(v) if v.is_floating_point() else v for k, v in previous.items()
    }
    pruned_update = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    updates = [(full_update, None, 3.0), (pruned_update, structure, 1.0)]
    expanded = [expand_to_full(previous, state, s) for state, s, _ in updates]
    kept_out = structure.kept["conv1.weight"][0]
    dropped = [i for i in range(32) if i not in kept_out]
    assert expanded[1]["conv1.weight"][dropped].isnan().all()
    assert torch.equal(expanded[1]["conv1.weight"][kept_out], pruned_update["conv1.weight"])
    folded = WeightedMean().fold(expanded, [3.0, 1.0], previous)
    reference = fold_into_full(previous, updates)
    for key, value in reference.items():
        assert torch.allclose(folded[key], value, atol=1e-6), key
    # The median of one full and one pruned client: their midpoint where both hold a
    # coordinate, the full client's value where only it does.
    median = CoordinateMedian().fold(expanded, [3.0, 1.0], previous)["conv1.weight"]
    assert torch.equal(median[dropped], full_update["conv1.weight"][dropped])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fake_quantized_weights_take_at_most_2_to_the_bits_values_per_channel(bits):
    weight = torch.randn(6, 3, 3, 3, requires_grad=True)
    quantized = fake_quantize(weight, bits)
    for channel in quantized.detach():
        assert channel.unique().numel() <= 2**bits
    if bits == 2:  # ternary
        assert quantized.detach()[0].unique().numel() <= 3
    quantized.sum().backward()  # straight-through: identity gradient
    assert torch.equal(weight.grad, torch.ones_like(weight))
    # Re-quantizing is a no-op, so weights survive server -> client -> server.
    assert torch.allclose(fake_quantize(quantized.detach(), bits), quantized.detach())


def test_fake_quant_keeps_state_dict_keys_and_changes_outputs():
    _, model = _model()
    keys = list(model.state_dict())
    x = torch.randn(4, 1, 28, 28)
    reference = model(x)
    enable_weight_fake_quant(model, 2)
    assert list(model.state_dict()) == keys and weight_bits(model) == 2
    assert not torch.allclose(model(x), reference)
    enable_weight_fake_quant(model, 0)
    assert weight_bits(model) == 0 and torch.allclose(model(x), reference)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_unpack_error_within_one_quantization_step(bits):
    _, model = _model()
    state = model.state_dict()
    keys = quantized_weight_keys(model)
    arrays, manifest = pack_state_dict(state, bits, keys)
    restored = unpack_state_dict(arrays, manifest)
    assert list(restored) == list(state)
    for key in keys:
        _, scale = quantize_per_channel(state[key], bits)
        step = scale.reshape((-1,) + (1,) * (state[key].dim() - 1))
        assert ((restored[key] - state[key]).abs() <= step / 2 + 1e-6).all()
    for key in set(state) - set(keys):
        assert torch.equal(restored[key], state[key])
    fp32 = packed_nbytes({k: v.numpy() for k, v in state.items()})
    # int8 ~ 1/4, int4 ~ 1/8, int2 ~ 1/16 of the weights' fp32 bytes (+ scales, biases).
    assert packed_nbytes(arrays) < fp32 * (bits / 32 + 0.02)


def test_unpack_rejects_malformed_entries():
    _, model = _model()
    arrays, manifest = pack_state_dict(model.state_dict(), 4, ["conv1.weight"])
    arrays["conv1.weight"] = arrays["conv1.weight"][:-3]
    with pytest.raises(ValueError, match="conv1.weight"):
        unpack_state_dict(arrays, manifest)


def test_variant_names_parse_and_bad_ones_fail_with_the_reason():
    variants = parse_variants("full, prune-0.5+int8, int4,prune-0.25")
    assert variants[1] == Variant("prune-0.5+int8", 0.5, 8)
    assert (variants[2].bits, variants[3].prune_ratio) == (4, 0.25)
    for bad in ("int3", "prune-1.5", "half", "full,full"):
        with pytest.raises(ValueError):
            parse_variants(bad)


def test_variant_factory_keeps_the_architecture_across_rounds():
    spec, model = _model()
    factory = VariantFactory(lambda s: build_from_state_dict(spec, s), torch.randn(1, 1, 28, 28))
    variant = Variant.parse("prune-0.5+int4")
    first = factory.derive(variant, model.state_dict())
    torch.manual_seed(1)
    later_full = build_model(spec).state_dict()  # very different weights next round
    second = factory.derive(variant, later_full)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(first) == shapes(second) and weight_bits(second) == 4
    structure = factory.structure(variant).kept["conv2.weight"]
    assert torch.equal(
        second.state_dict()["conv2.weight"],
        later_full["conv2.weight"][structure[0]][:, structure[1]],
    )


def test_int8_export_agrees_with_fp32_model():
    spec, model = _model()
    calibration = torch.randn(256, 1, 28, 28)
    exported = export_int8(model, calibration)
    x = torch.randn(64, 1, 28, 28)
    agree = (exported(x).argmax(1) == model(x).argmax(1)).float().mean()
    assert agree > 0.9
    assert any(".quantized." in type(m).__module__ for m in exported.modules())
    assert not np.isnan(exported(x).detach().numpy()).any()
