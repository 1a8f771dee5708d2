"""TailAverage: the uniform mean of the last K states (pure logic)."""

from __future__ import annotations

import pytest
import torch

from fl_ec.tail_average import TailAverage


def _state(value: float, steps: int = 0) -> dict[str, torch.Tensor]:
    return {
        "w": torch.full((2, 3), value),
        "bn.num_batches_tracked": torch.tensor(steps),
    }


def test_mean_covers_only_the_last_window_states():
    tail = TailAverage(3)
    means = [tail.push(_state(v, steps=int(v)))["w"][0, 0].item() for v in (1.0, 2.0, 3.0, 10.0)]
    # Windows: [1], [1, 2], [1, 2, 3], then 1 falls out: [2, 3, 10].
    assert means == pytest.approx([1.0, 1.5, 2.0, 5.0])
    assert len(tail) == 3


def test_integer_buffers_keep_the_newest_value_and_dtypes_survive():
    tail = TailAverage(2)
    tail.push(_state(1.0, steps=4))
    mean = tail.push(_state(2.0, steps=9))
    assert mean["bn.num_batches_tracked"].item() == 9
    assert mean["bn.num_batches_tracked"].dtype == torch.int64
    assert mean["w"].dtype == torch.float32


def test_pushed_states_are_copied_not_aliased():
    tail = TailAverage(2)
    state = _state(1.0)
    tail.push(state)
    state["w"].fill_(100.0)  # the caller reuses its tensor (e.g. trains it in place)
    assert tail.push(_state(3.0))["w"][0, 0].item() == pytest.approx(2.0)


def test_a_state_of_another_shape_restarts_the_window():
    tail = TailAverage(3)
    tail.push(_state(1.0))
    mean = tail.push({"w": torch.full((4,), 5.0), "bn.num_batches_tracked": torch.tensor(0)})
    assert len(tail) == 1 and mean["w"].shape == (4,) and mean["w"][0].item() == 5.0


def test_window_of_one_is_the_identity_and_zero_is_rejected():
    assert torch.equal(TailAverage(1).push(_state(7.0))["w"], _state(7.0)["w"])
    with pytest.raises(ValueError, match="window=0"):
        TailAverage(0)
