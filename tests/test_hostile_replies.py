"""Malformed and hostile replies: rejected before allocation, never ending a round.

Property-based: hypothesis draws a defect from the fuzz catalogue
(``simulations/malformed_replies.py``) and a seed, and hands FedEC or FedHCE one such
reply among valid ones. Plus the checks one by one, and the client's unpacking of
what the server sends.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from malformed_replies import (
    FEDHCE_ONLY,
    MAKERS,
    SPEC,
    parts_of,
    raw_array,
    requests_for,
    valid_reply,
)
from malformed_replies import strategies as fuzz_strategies

from fl_ec.clients.variants import received_state
from fl_ec.compression import pack_state_dict, unpack_state_dict
from fl_ec.errors import ModelSpecError
from fl_ec.models import ArchSpec, build_model
from fl_ec.strategies.replies import (
    RejectedReplyError,
    ReplyLimits,
    check_arrays,
    check_class_counts,
    read_spec,
    shapes_of_spec,
    spec_bounds,
)

LIMITS = ReplyLimits()


@pytest.fixture(scope="module")
def identity():
    """What Flower's Message needs outside a run."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture(scope="module")
def strategies(identity):
    return fuzz_strategies(seed=5)


def _requests(strategy, server_round, nodes):
    return requests_for(strategy, server_round, nodes, build_model(SPEC))


def _valid_reply(request, tier="edge", examples=120):
    return valid_reply(request, np.random.default_rng(request.metadata.dst_node_id), examples, tier)


ROUND = iter(range(1, 10**6))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(["FedEC", "FedHCE"]),
    kind=st.sampled_from(sorted(MAKERS)),
    seed=st.integers(0, 2**16),
)
def test_no_malformed_reply_crashes_slips_through_or_spoils_the_model(strategies, name, kind, seed):
    if name == "FedEC" and kind in FEDHCE_ONLY:
        kind = "non-finite"  # FedEC reads neither capabilities nor variants
    strategy = strategies[name]
    server_round = next(ROUND)
    requests = _requests(strategy, server_round, [1, 2, 3])
    bad_request = requests[-1]
    parts = parts_of(_valid_reply(bad_request), bad_request)
    bad = MAKERS[kind](parts, np.random.default_rng(seed)).message()
    arrays, _ = strategy.aggregate_train(
        server_round, [_valid_reply(r) for r in requests[:-1]] + [bad]
    )
    stats = strategy.server_metrics[server_round]
    assert stats["valid-replies"] == 2 and stats["rejected-replies"] == 1, kind
    assert 3 not in [m.node_id for m in strategy.last_client_models]
    assert arrays is not None
    assert all(bool(torch.isfinite(v).all()) for v in arrays.to_torch_state_dict().values())


def test_a_second_reply_from_a_node_is_rejected(strategies, caplog):
    strategy = strategies["FedEC"]
    requests = _requests(strategy, 900_001, [1, 2])
    replies = [_valid_reply(r) for r in requests] + [_valid_reply(requests[0])]
    caplog.set_level(logging.WARNING, logger="flwr")
    strategy.aggregate_train(900_001, replies)
    assert strategy.server_metrics[900_001]["valid-replies"] == 2
    assert "node 1: a second reply from this node" in caplog.text


def test_capabilities_come_only_from_accepted_replies(strategies):
    strategy = strategies["FedHCE"]
    requests = _requests(strategy, 900_002, [1, 2, 7])
    bad = _valid_reply(requests[-1], tier="gpu")
    bad.content["metrics"]["train-loss"] = float("nan")
    strategy.capabilities.pop(7, None)
    strategy.aggregate_train(900_002, [_valid_reply(r) for r in requests[:-1]] + [bad])
    assert 7 not in strategy.capabilities


@pytest.mark.parametrize("robust", [False, True])
def test_fedhce_folds_pruned_and_full_replies_with_the_robust_start_rule(identity, robust):
    from fl_ec.robust import CoordinateMedian

    options = {"start_rule": CoordinateMedian()} if robust else {}
    strategy = fuzz_strategies(seed=5, **options)["FedHCE"]
    nodes = [1, 2, 3, 4, 5, 6, 7]  # tiers by node % 3: full, pruned and int8 variants

    def honest(request):  # each node reports the tier of its node id
        return valid_reply(request, np.random.default_rng(request.metadata.dst_node_id))

    strategy.aggregate_train(1, [honest(r) for r in _requests(strategy, 1, nodes)])
    requests = _requests(strategy, 2, nodes)
    variants = {r.metadata.dst_node_id: str(r.content["config"]["variant"]) for r in requests}
    assert len(set(variants.values())) == 3
    replies = [honest(r) for r in requests]
    attacker = next(i for i in nodes if variants[i] == "full")
    scaled = replies[nodes.index(attacker)].content["arrays"]
    honest_largest = max(float(np.abs(a.numpy()).max()) for a in scaled.values())
    for key in list(scaled.keys()):
        value = scaled[key].numpy()
        if value.dtype.kind == "f":
            scaled[key] = Array(value * 100)
    arrays, _ = strategy.aggregate_train(2, replies)
    largest = max(v.abs().max().item() for v in arrays.to_torch_state_dict().values())
    # A full-size client scaling its model x100 drags the plain fold's every coordinate
    # it holds (by 100 / 7 of its values); the median of the holders ignores it.
    assert (largest < 2 * honest_largest) if robust else (largest > 5 * honest_largest)


def test_a_round_with_every_reply_rejected_keeps_the_model(strategies, caplog):
    strategy = strategies["FedEC"]
    requests = _requests(strategy, 900_003, [1, 2])
    replies = [_valid_reply(r, examples=10) for r in requests]
    for reply in replies:
        reply.content["metrics"]["num-examples"] = 1e30
    caplog.set_level(logging.WARNING, logger="flwr")
    assert strategy.aggregate_train(900_003, replies) == (None, None)
    assert "0 of 2 replies accepted" in caplog.text and "the global model stays" in caplog.text


# -- the checks one by one -----------------------------------------------------------
def test_a_header_that_asks_for_millions_of_values_is_rejected_without_allocating():
    bounds = shapes_of_spec(SPEC)
    record = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, (s, _) in bounds.items()})
    body = b"\0" * 3500
    header = {"descr": "<f4", "fortran_order": False, "shape": (9000, 9000)}
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    record["fc1.weight"] = raw_array((9000, 9000), "float32", buffer.getvalue() + body)
    start = time.perf_counter()
    with pytest.raises(RejectedReplyError, match="does not fit"):
        check_arrays(record, bounds, exact=False)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (SPEC.to_json().replace('"num_classes": 10', '"num_classes": 1e400'), "malformed"),
        (json.dumps({**json.loads(SPEC.to_json()), "num_classes": 10**15}), "classes differ"),
        (json.dumps({**json.loads(SPEC.to_json()), "widths": [64, 64, 256]}), "larger"),
        (ArchSpec("resnet8", (1, 28, 28), 10).to_json(), "family"),
        (ArchSpec("cnn", (1, 32, 32), 10).to_json(), "differ"),
        ("{" * 10_000, "at most"),
    ],
)
def test_specs_larger_than_the_global_model_are_rejected(text, reason):
    with pytest.raises(RejectedReplyError, match=reason):
        spec_bounds(read_spec(text, LIMITS), SPEC)


def test_a_narrower_spec_of_the_same_family_is_bounded_by_its_own_shapes():
    narrow = ArchSpec("cnn", (1, 28, 28), 10, widths=(8, 16, 32))
    assert spec_bounds(narrow, SPEC)["conv1.weight"][0] == (8, 1, 3, 3)


@pytest.mark.parametrize(
    ("counts", "examples", "reason"),
    [
        (100, 100.0, "a list"),
        ([10] * 9, 100.0, "9 class-counts"),
        ([float("inf")] + [10] * 9, 100.0, "finite"),
        ([1e308] + [10] * 9, 100.0, "finite"),
        ([-1] + [10] * 9, 100.0, "non-negative"),
        ([100] + [10] * 9, 100.0, "sum to 190"),
    ],
)
def test_class_counts_must_be_a_distribution_of_the_examples(counts, examples, reason):
    with pytest.raises(RejectedReplyError, match=reason):
        check_class_counts(counts, 10, examples, LIMITS)
    assert check_class_counts([10] * 10, 10, 100.0, LIMITS) == [10.0] * 10


# -- the client's side: what the server sends ---------------------------------------------
def _packed():
    state = build_model(SPEC).state_dict()
    return pack_state_dict(state, 4, ["conv1.weight", "fc1.weight"])


@settings(max_examples=80, deadline=None)
@given(
    entry=st.one_of(
        st.none(),
        st.integers(),
        st.text(max_size=5),
        st.fixed_dictionaries(
            {
                "bits": st.one_of(st.integers(-2, 9), st.floats(), st.text(max_size=2)),
                "shape": st.one_of(
                    st.lists(st.integers(-3, 2**40), max_size=5), st.integers(), st.none()
                ),
            }
        ),
    )
)
def test_a_malformed_manifest_entry_is_one_value_error(entry):
    arrays, manifest = _packed()
    manifest["fc1.weight"] = entry
    try:
        state = unpack_state_dict(arrays, manifest)
    except ValueError:
        return
    # Only a well-formed entry that matches the packed bytes may unpack.
    assert tuple(state["fc1.weight"].shape) == (128, 3136)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda a, m: a.update({"fc1.weight": a["fc1.weight"][:10]}),
        lambda a, m: a.pop("fc1.weight::scale"),
        lambda a, m: a.update({"fc1.weight::scale": np.zeros((2, 2), np.float32)}),
        lambda a, m: m.update({"conv1.weight": {"bits": 4, "shape": []}}),
        lambda a, m: m.clear() or m.update({"x": 1}),
    ],
)
def test_a_malformed_packed_payload_is_one_clear_error_on_the_client(spoil):
    arrays, manifest = _packed()
    spoil(arrays, manifest)
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    with pytest.raises(ModelSpecError, match="malformed quantized payload"):
        received_state(record, {"wire-manifest": json.dumps(manifest)})


def test_a_message_without_its_records_is_one_clear_error_on_the_client():
    from fl_ec.clients.client_app import received_model

    arrays = ArrayRecord(build_model(SPEC).state_dict())
    with pytest.raises(ModelSpecError, match="lacks"):
        received_model(RecordDict({"arrays": arrays}))
    with pytest.raises(ModelSpecError, match="no 'arch-spec'"):
        received_model(RecordDict({"arrays": arrays, "config": ConfigRecord({})}))
