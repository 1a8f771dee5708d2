import pytest
import torch
import torch_pruning as tp

from fl_ec.errors import ModelSpecError
from fl_ec.models import ArchSpec, build_from_state_dict, build_model, count_parameters


@pytest.mark.parametrize("name", ["cnn", "resnet8", "resnet20"])
def test_spec_json_round_trip_rebuilds_identical_model(name):
    spec = ArchSpec(name=name, input_shape=(1, 28, 28), num_classes=10)
    again = ArchSpec.from_json(spec.to_json())
    assert again == spec
    torch.manual_seed(0)
    model = build_model(spec).eval()
    rebuilt = build_from_state_dict(again, model.state_dict()).eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), rebuilt(x))


def test_resnet_depths_and_sizes():
    r8 = build_model(ArchSpec("resnet8", (3, 32, 32), 10))
    r20 = build_model(ArchSpec("resnet20", (3, 32, 32), 10))
    assert len(r8.blocks) == 3 and len(r20.blocks) == 9
    assert count_parameters(r20) > 3 * count_parameters(r8)
    assert r20(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["cnn", "resnet8"])
def test_structurally_pruned_model_is_rebuilt_from_array_shapes(name):
    spec = ArchSpec(name=name, input_shape=(1, 28, 28), num_classes=10)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    example = torch.randn(1, 1, 28, 28)
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[model.classifier],
    )
    pruner.step()
    assert count_parameters(model) < count_parameters(build_model(spec)) * 0.6
    # What travels: plain tensors + the nominal spec.
    arrays = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = build_from_state_dict(ArchSpec.from_json(spec.to_json()), arrays).eval()
    x = torch.randn(5, 1, 28, 28)
    assert torch.allclose(model(x), rebuilt(x), atol=1e-6)


def test_arrays_with_wrong_keys_or_shapes_are_rejected():
    spec = ArchSpec("cnn", (1, 28, 28), 10)
    state = build_model(spec).state_dict()
    missing = {k: v for k, v in state.items() if k != "fc1.bias"}
    with pytest.raises(ModelSpecError, match="missing"):
        build_from_state_dict(spec, missing)
    inconsistent = dict(state)
    inconsistent["conv2.weight"] = torch.zeros(64, 7, 3, 3)  # 7 != conv1's 32 outputs
    with pytest.raises(ModelSpecError):
        build_from_state_dict(spec, inconsistent)


@pytest.mark.parametrize(
    "text",
    ["not json", '{"name": "cnn"}', '{"name": "vgg", "input_shape": [1,28,28], "num_classes": 10}'],
)
def test_malformed_specs_are_rejected(text):
    with pytest.raises(ModelSpecError):
        ArchSpec.from_json(text)


@pytest.mark.parametrize("name", ["cnn", "resnet8"])
def test_a_shared_build_holds_the_arrays_themselves(name):
    spec = ArchSpec(name=name, input_shape=(1, 28, 28), num_classes=10)
    torch.manual_seed(0)
    reference = build_model(spec).eval()
    arrays = {k: v.clone() for k, v in reference.state_dict().items()}
    shared = build_from_state_dict(spec, arrays, share=True).eval()
    held = shared.state_dict()
    assert all(held[k].data_ptr() == v.data_ptr() for k, v in arrays.items())
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(shared(x), reference(x))
    copied = build_from_state_dict(spec, arrays).state_dict()
    assert all(copied[k].data_ptr() != v.data_ptr() for k, v in arrays.items())


def test_a_shared_build_still_rejects_inconsistent_arrays():
    spec = ArchSpec("cnn", (1, 28, 28), 10)
    state = dict(build_model(spec).state_dict())
    state["conv2.weight"] = torch.zeros(64, 7, 3, 3)
    with pytest.raises(ModelSpecError):
        build_from_state_dict(spec, state, share=True)
