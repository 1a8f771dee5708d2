import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fl_ec.data.batches import input_tensor, labelled_tensors
from fl_ec.data.server_holdout import hold_out
from fl_ec.models.layout import channels_last, probe_channels_last

X = torch.randn(10, 1, 8, 8)
Y = torch.arange(10) % 3


class DictImages(Dataset):
    """What a flwr-datasets partition with a ToTensor transform yields."""

    def __init__(self, image_key="img", label_key="label"):
        self.keys = (image_key, label_key)

    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        return {self.keys[0]: X[i], self.keys[1]: Y[i]}


@pytest.mark.parametrize(
    "data",
    [
        X,
        (X, Y),
        TensorDataset(X, Y),
        DataLoader(TensorDataset(X, Y), batch_size=3),
        DataLoader(TensorDataset(X), batch_size=4),
        DictImages(),
        DataLoader(DictImages("image", "labels"), batch_size=4),
    ],
)
def test_inputs_come_out_of_every_shape_a_flower_app_holds(data):
    assert torch.equal(input_tensor(data), X)


@pytest.mark.parametrize(
    "data",
    [(X, Y), TensorDataset(X, Y), DataLoader(DictImages(), batch_size=4), DictImages("x", "y")],
)
def test_labelled_data_keeps_inputs_and_labels_together(data):
    inputs, labels = labelled_tensors(data)
    assert torch.equal(inputs, X) and torch.equal(labels, Y) and labels.dtype == torch.int64


def test_other_keys_are_named_by_the_caller_or_reported():
    odd = DictImages("pixels", "class_id")
    with pytest.raises(KeyError, match=r"keys \['class_id', 'pixels'\].*input_key="):
        input_tensor(odd)
    inputs, labels = labelled_tensors(odd, input_key="pixels", label_key="class_id")
    assert torch.equal(inputs, X) and torch.equal(labels, Y)


def test_what_cannot_be_read_says_what_to_pass():
    with pytest.raises(TypeError, match=r"proxy_data is a str: pass a tensor"):
        input_tensor("images/")
    with pytest.raises(TypeError, match="not tensors.*ToTensor"):
        input_tensor([{"img": "a PIL image"}])
    with pytest.raises(ValueError, match="validation_data has no labels"):
        labelled_tensors(DataLoader(TensorDataset(X)))


def test_hold_out_gives_three_disjoint_seeded_parts():
    data = TensorDataset(torch.arange(100))
    parts = hold_out(data, proxy=20, validation=10, seed=3)
    sets = [set(part.indices) for part in (parts.proxy, parts.validation, parts.rest)]
    assert [len(s) for s in sets] == [20, 10, 70]
    assert set().union(*sets) == set(range(100))
    assert hold_out(data, proxy=20, validation=10, seed=3).proxy.indices == parts.proxy.indices
    assert hold_out(data, proxy=20, validation=10, seed=4).proxy.indices != parts.proxy.indices
    with pytest.raises(ValueError, match="leave samples for the rest"):
        hold_out(data, proxy=90, validation=10)


class ViewNet(nn.Module):
    """PyTorch's tutorial CNN: ``.view`` of a conv output fails channels-last."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(-1, 4 * 6 * 6))


class FlattenNet(ViewNet):
    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_a_model_that_breaks_channels_last_keeps_pytorchs_layout():
    model = ViewNet()
    with pytest.raises(RuntimeError):  # what the teacher pass hit before the probe existed
        model.to(memory_format=torch.channels_last)(X)
    model.to(memory_format=torch.contiguous_format)
    assert probe_channels_last(model, X) is False
    with channels_last(model):
        assert model.conv.weight.is_contiguous()
        model(X)  # runs as under FedAvg


def test_a_model_that_passes_the_probe_runs_channels_last():
    model = FlattenNet()
    with channels_last(model):  # unknown class: left alone until probed
        assert model.conv.weight.is_contiguous()
    assert probe_channels_last(model, X) is True
    with channels_last(model):
        assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.conv.weight.is_contiguous()
