"""Seeded client sampling: the same partitions per round whatever the strategy or node ids.

Also a whole run through the ServerApp's wrappers (SeededSampling, TimedAggregation).
"""

from __future__ import annotations

import random

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg

from fl_ec.distill import DistillSettings
from fl_ec.models.spec import ArchSpec, build_model
from fl_ec.protocol import (
    CAPABILITY_KEY,
    CLASS_COUNTS_KEY,
    DESCRIBE_KEY,
    NODE_INFO_KEY,
    PARTITION_ID_KEY,
)
from fl_ec.results import RunRecorder
from fl_ec.run.metering import TimedAggregation
from fl_ec.run.sampling import SeededSampler, SeededSampling, parse_node_info
from fl_ec.server_app import record_sample
from fl_ec.strategies.fedec import FedEC

SPEC = ArchSpec("cnn", (1, 28, 28), 10)


class DescribingGrid:
    """Nodes with random ids answering describe queries as fl-ec's ClientApp does.

    ``silent`` nodes answer with an error (a stock ClientApp without the handler);
    ``capability`` (partition -> record fields) adds a ``capability`` record.
    """

    def __init__(
        self,
        partitions: int,
        id_seed: int,
        silent: frozenset[int] = frozenset(),
        capability: dict[int, dict] | None = None,
    ):
        ids = random.Random(id_seed).sample(range(1, 10**9), partitions)
        self.partition_of = dict(zip(ids, range(partitions), strict=True))
        self.silent = silent
        self.capability = capability or {}
        self.queries = 0

    def get_node_ids(self):
        return list(self.partition_of)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            assert message.content["config"][DESCRIBE_KEY] is True
            self.queries += 1
            partition = self.partition_of[message.metadata.dst_node_id]
            if partition in self.silent:
                replies.append(Message(Error(code=0, reason="no query handler"), reply_to=message))
                continue
            info = ConfigRecord({PARTITION_ID_KEY: partition, CLASS_COUNTS_KEY: [partition, 1]})
            content = RecordDict({NODE_INFO_KEY: info})
            if partition in self.capability:
                content[CAPABILITY_KEY] = ConfigRecord(self.capability[partition])
            replies.append(Message(content, reply_to=message))
        return replies


def sampled_partitions(strategy, grid, rounds=4, seed=7):
    strategy = SeededSampling(strategy, SeededSampler(seed))
    arrays = ArrayRecord(build_model(SPEC).state_dict())
    out = []
    for server_round in range(1, rounds + 1):
        random.random()  # anything else in the ServerApp may advance the global state
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        out.append(sorted(grid.partition_of[m.metadata.dst_node_id] for m in messages))
    return out


def test_strategies_with_one_seed_train_the_same_partitions_every_round(task_identity):
    fedavg = sampled_partitions(FedAvg(fraction_train=0.2), DescribingGrid(20, id_seed=1))
    random.seed(123)  # a different global state, different node ids, another strategy
    grid = DescribingGrid(20, id_seed=2)
    fedec = sampled_partitions(
        FedEC(proxy_data=torch.zeros(4, 1, 28, 28), arch_spec=SPEC, fraction_train=0.2), grid
    )
    assert fedavg == fedec
    assert all(len(sample) == 4 for sample in fedavg)
    assert len({tuple(s) for s in fedavg}) == 4  # rounds differ
    assert grid.queries == 20  # each node is described once, not every round
    other_seed = sampled_partitions(FedAvg(fraction_train=0.2), DescribingGrid(20, 1), seed=8)
    assert other_seed != fedavg


def test_sampling_restores_the_global_random_state(task_identity):
    strategy = SeededSampling(FedAvg(fraction_train=0.5), SeededSampler(0))
    random.seed(5)
    expected = [random.random() for _ in range(3)]
    random.seed(5)
    strategy.configure_train(
        1, ArrayRecord(build_model(SPEC).state_dict()), ConfigRecord(), DescribingGrid(6, 0)
    )
    assert [random.random() for _ in range(3)] == expected


def test_nodes_that_do_not_describe_themselves_come_last_by_node_id(task_identity):
    grid = DescribingGrid(5, id_seed=3, silent=frozenset({0, 3}))
    order = SeededSampler(0).ordered_nodes(grid)
    partitions = [grid.partition_of[n] for n in order]
    assert partitions[:3] == [1, 2, 4]
    silent_ids = sorted(n for n, p in grid.partition_of.items() if p in (0, 3))
    assert order[3:] == silent_ids


def test_describe_replies_are_validated(task_identity):
    query = Message(RecordDict({"config": ConfigRecord({DESCRIBE_KEY: True})}), 5, "query")

    def reply(**fields):
        return Message(RecordDict({NODE_INFO_KEY: ConfigRecord(fields)}), reply_to=query)

    info = parse_node_info(reply(**{PARTITION_ID_KEY: 3, CLASS_COUNTS_KEY: [2, 0, 5]}))
    assert info.partition_id == 3 and info.class_counts == (2.0, 0.0, 5.0)
    for bad in (
        {PARTITION_ID_KEY: -1},
        {PARTITION_ID_KEY: 1.5},
        {PARTITION_ID_KEY: True},
        {PARTITION_ID_KEY: 1, CLASS_COUNTS_KEY: [1.0, float("inf")]},
        {PARTITION_ID_KEY: 1, CLASS_COUNTS_KEY: [-1]},
        {CLASS_COUNTS_KEY: [1]},
    ):
        try:
            parse_node_info(reply(**bad))
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_described_capabilities_reach_the_listeners_before_the_first_sample(
    task_identity, caplog
):
    tiers = {0: {"device-tier": "gpu"}, 1: {"device-tier": "edge"}, 2: {"device-tier": 5.0}}
    grid = DescribingGrid(4, id_seed=5, capability=tiers)  # partition 3 reports none
    heard = {}

    def listener(node, record):
        tier = record.get("device-tier")
        if not isinstance(tier, str):
            raise ValueError("no tier")
        heard[grid.partition_of[node]] = tier

    seen_by_strategy = []

    class Recording(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            seen_by_strategy.append(dict(heard))
            return super().configure_train(server_round, arrays, config, grid)

    sampler = SeededSampler(0, capability_listeners=[listener])
    strategy = SeededSampling(Recording(fraction_train=0.5, min_available_nodes=2), sampler)
    strategy.configure_train(1, ArrayRecord(build_model(SPEC).state_dict()), ConfigRecord(), grid)
    assert seen_by_strategy == [{0: "gpu", 1: "edge"}]
    assert "capability rejected: no tier" in caplog.text  # logged, the round goes on
    assert len(sampler.info) == 4


def test_aggregation_sees_the_replies_in_node_order_not_arrival_order(task_identity):
    grid = DescribingGrid(6, id_seed=4)
    seen = []

    class Recording(FedAvg):
        def aggregate_train(self, server_round, replies):
            seen.append([grid.partition_of[r.metadata.src_node_id] for r in replies])
            return None, None

    strategy = SeededSampling(Recording(), SeededSampler(0))
    messages = strategy.configure_train(
        1, ArrayRecord(build_model(SPEC).state_dict()), ConfigRecord(), grid
    )
    replies = [Message(RecordDict(), reply_to=m) for m in messages]
    strategy.aggregate_train(1, list(reversed(replies)))
    strategy.aggregate_train(1, replies[1:] + replies[:1])
    assert seen[0] == seen[1] == sorted(seen[0]) and len(seen[0]) == 6


class FederationGrid(DescribingGrid):
    """A DescribingGrid whose nodes also train (returning the model they got) and evaluate.

    ``trained`` keeps each training round's node ids in the order they were sent.
    """

    def __init__(self, partitions: int, id_seed: int):
        super().__init__(partitions, id_seed)
        self.trained: list[list[int]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else None
        if kind == MessageType.QUERY:
            return super().send_and_receive(messages, timeout=timeout)
        if kind == MessageType.TRAIN:
            self.trained.append([m.metadata.dst_node_id for m in messages])
        replies = []
        for message in reversed(messages):  # arrival order is not sending order
            content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 0.5})})
            if kind == MessageType.TRAIN:
                content["arrays"] = message.content["arrays"]
            replies.append(Message(content, reply_to=message))
        return replies


def test_a_run_through_the_wrappers_trains_the_seeded_sample(task_identity, tmp_path):
    grid = FederationGrid(6, id_seed=5)
    fedec = FedEC(
        proxy_data=torch.zeros(4, 1, 28, 28),
        arch_spec=SPEC,
        distill=DistillSettings(steps=0),
        fraction_train=0.5,
    )
    recorder = RunRecorder(tmp_path / "run", {}, SPEC, num_rounds=2)
    strategy = TimedAggregation(
        SeededSampling(fedec, SeededSampler(7), record_sample(recorder)), recorder
    )

    def close_round(server_round, arrays):  # as the ServerApp's central evaluation does
        recorder.close_round(server_round, {})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(build_model(SPEC).state_dict()),
        num_rounds=2,
        evaluate_fn=close_round,
    )
    assert fedec.num_rounds == 2  # FedEC's own start() is not run: begin_run told it
    assert sorted(fedec.server_metrics) == [1, 2]
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    trained = [sorted(grid.partition_of[n] for n in nodes) for nodes in grid.trained]
    assert trained == sampled_partitions(FedAvg(fraction_train=0.5), grid, rounds=2)
    assert [record.round for record in recorder.rounds] == [0, 1, 2]
    for record, partitions in zip(recorder.rounds[1:], trained, strict=True):
        assert record.metrics["sampled-partitions"] == partitions
        assert record.metrics["client-loss"] == 0.5
        assert record.aggregate_seconds > 0


def test_wrappers_pass_the_run_length_on_to_the_inner_strategy(task_identity, tmp_path):
    fedec = FedEC(proxy_data=torch.zeros(4, 1, 28, 28), arch_spec=SPEC)
    recorder = RunRecorder(tmp_path / "run", {}, SPEC, num_rounds=1)
    TimedAggregation(SeededSampling(fedec, SeededSampler(0)), recorder).begin_run(12, 30.0)
    assert fedec.num_rounds == 12
    SeededSampling(FedAvg(), SeededSampler(0)).begin_run(3)  # FedAvg takes none: no-op
