"""Fuzz FedEC's and FedHCE's ``aggregate_train`` with malformed replies among valid ones.

Each round hands a strategy 2-4 valid replies and ``--per-round`` malformed ones (each
a defect of one kind from ``malformed_replies.MAKERS``, or a second reply from a node
that already replied), and counts:

* **crashes**: an exception escapes ``aggregate_train``;
* **accepted**: the reply checks alone let the malformed reply through, or (a second
  reply from a node) the round accepted more replies than were valid;
* **non-finite**: the returned model holds a NaN or infinity;
* the **cost** of rejecting it: seconds and peak resident memory of checking the reply
  alone (peak measured with ``/proc/self/clear_refs``);

and, on clean rounds, what share of ``aggregate_train``'s time the reply checks take.

    python simulations/fuzz_replies.py --replies 1040 --seed 0 --per-round 2

Writes a section to BENCHMARKS.md (``--section``) and the raw rows to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from benchkit import ROOT
from benchkit.report import date_line, machine_line, write_section
from flwr.app import ArrayRecord, Message
from malformed_replies import (
    FEDHCE_ONLY,
    MAKERS,
    SPEC,
    parts_of,
    requests_for,
    strategies,
    valid_reply,
)

from fl_ec.models import build_model  # noqa: E402
from fl_ec.protocol import TRAIN_INFO_KEY  # noqa: E402
from fl_ec.strategies import FedEC  # noqa: E402
from fl_ec.strategies import replies as reply_checks  # noqa: E402
from fl_ec.strategies.fedec_utils import is_finite_state  # noqa: E402

DUPLICATE = "duplicate-node"


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(check) -> tuple[float, int]:
    """Seconds and peak resident bytes above the start of calling ``check()``."""
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to now
    before = _status("VmRSS")
    start = time.perf_counter()
    with contextlib.suppress(Exception):  # a rejection is what is measured here
        check()
    return time.perf_counter() - start, max(0, _status("VmHWM") - before)


def finite(arrays: ArrayRecord | None) -> bool:
    return arrays is None or is_finite_state(arrays.to_torch_state_dict())


def fuzz(replies: int, seed: int, per_round: int = 2) -> dict:
    """``replies`` malformed replies, ``per_round`` of them in each round among 2-4 valid."""
    from flwr.supercore.task_identity import TaskIdentity

    # Flower stamps run and node ids on every Message it creates, as inside a run.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    by_name = strategies(seed)
    for strategy in by_name.values():
        strategy.begin_run(10**9)
    model = build_model(SPEC)
    kinds = [*MAKERS, DUPLICATE]
    rows, clean = [], defaultdict(list)
    rounds = -(-replies // per_round)
    for index in range(rounds):
        name = ("FedEC", "FedHCE")[index % 2]
        strategy = by_name[name]
        kinds_here = [k for k in kinds if name == "FedHCE" or k not in FEDHCE_ONLY]
        server_round = index + 1
        num_good = int(rng.integers(2, 5))
        requests = requests_for(
            strategy, server_round, list(range(1, 1 + num_good + per_round)), model
        )
        good = [valid_reply(r, rng) for r in requests[:num_good]]
        bad, round_rows = [], []
        for request in requests[num_good:]:
            kind = kinds_here[int(rng.integers(len(kinds_here)))]
            row = {"strategy": name, "kind": kind, "seconds": 0.0, "peak-bytes": 0}
            if kind == DUPLICATE:  # a second reply from a node that already replied
                reply = valid_reply(requests[0], rng)
                row["accepted"] = None  # known only from the round
            else:
                reply = MAKERS[kind](parts_of(valid_reply(request, rng), request), rng).message()
                outcome: list[bool] = []
                row["seconds"], row["peak-bytes"] = measure(
                    lambda r=reply, o=outcome, s=strategy: o.append(bool(s._parse(r)))
                )
                row["accepted"] = bool(outcome)  # the checks alone let it through
            bad.append(reply)
            round_rows.append(row)
        try:
            arrays, _ = strategy.aggregate_train(server_round, [*good, *bad])
        except Exception as err:  # noqa: BLE001 - what the fuzzer counts
            outcome_row = {"crash": f"{type(err).__name__}: {err}"[:200], "finite": True}
            outcome_row.update({"round-accepted-bad": 0, "valid-rejected": False})
        else:
            # Every valid reply should be accepted: more than that are bad ones.
            valid = int(strategy.server_metrics[server_round]["valid-replies"])
            outcome_row = {"crash": "", "finite": finite(arrays)}
            outcome_row["round-accepted-bad"] = max(0, valid - len(good))
            outcome_row["valid-rejected"] = valid < len(good)
            if arrays is not None:
                model = build_model(SPEC)
                model.load_state_dict(arrays.to_torch_state_dict())
        for row in round_rows:
            row.update(outcome_row)
            if row["accepted"] is None:
                row["accepted"] = outcome_row["round-accepted-bad"] > 0
        rows += round_rows
        if index % 25 == 0:
            # A clean round: what the reply checks cost against the whole aggregation.
            requests = requests_for(strategy, server_round + rounds, [1, 2, 3, 4], model)
            good = [valid_reply(r, rng) for r in requests]
            start = time.perf_counter()
            checks = _time_checks(strategy, good)
            strategy.aggregate_train(server_round + rounds, good)
            total = time.perf_counter() - start - checks
            clean[name].append((checks, total))
        if index % 50 == 49:
            print(f"[fuzz] {len(rows)}/{replies} replies", flush=True)
    return {"rows": rows, "clean": {k: v for k, v in clean.items()}}


def _time_checks(strategy: FedEC, replies: list[Message]) -> float:
    """Seconds of the pre-allocation checks alone (metrics, spec, counts, headers)."""
    start = time.perf_counter()
    for reply in replies:
        content = reply.content
        reply_checks.reply_weight(content, strategy.weighted_by_key, strategy.reply_limits)
        info = content.config_records[TRAIN_INFO_KEY]
        claimed = reply_checks.read_spec(info["arch-spec"], strategy.reply_limits)
        expected = strategy._expect(
            claimed, str(info.get("variant", "")), reply.metadata.src_node_id
        )
        reply_checks.check_class_counts(
            info["class-counts"], expected.num_classes, 120.0, strategy.reply_limits
        )
        reply_checks.check_arrays(
            reply_checks.reply_arrays(content), expected.bounds, expected.exact
        )
    return time.perf_counter() - start


def summarise(result: dict) -> str:
    rows = result["rows"]
    by_kind: dict[str, Counter] = defaultdict(Counter)
    worst_seconds: dict[str, float] = defaultdict(float)
    worst_bytes: dict[str, int] = defaultdict(int)
    for row in rows:
        counter = by_kind[row["kind"]]
        counter["replies"] += 1
        counter["crashes"] += bool(row["crash"])
        counter["accepted"] += bool(row["accepted"])
        counter["non-finite"] += not row["finite"]
        counter["valid-rejected"] += bool(row["valid-rejected"])
        worst_seconds[row["kind"]] = max(worst_seconds[row["kind"]], row["seconds"])
        worst_bytes[row["kind"]] = max(worst_bytes[row["kind"]], row["peak-bytes"])
    lines = [
        "| defect | replies | crashes | accepted | non-finite output | valid ones rejected "
        "| worst s to reject | worst MB to reject |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total = Counter()
    for kind in sorted(by_kind):
        c = by_kind[kind]
        total.update(c)
        lines.append(
            f"| {kind} | {c['replies']} | {c['crashes']} | {c['accepted']} | {c['non-finite']} "
            f"| {c['valid-rejected']} | {worst_seconds[kind]:.3f} | {worst_bytes[kind] / 1e6:.1f} |"
        )
    lines.append(
        f"| **all** | **{total['replies']}** | **{total['crashes']}** | **{total['accepted']}** "
        f"| **{total['non-finite']}** | **{total['valid-rejected']}** "
        f"| {max(worst_seconds.values()):.3f} "
        f"| {max(worst_bytes.values()) / 1e6:.1f} |"
    )
    lines.append("")
    for name, pairs in result["clean"].items():
        checks = sum(c for c, _ in pairs)
        rest = sum(t for _, t in pairs)
        lines.append(
            f"- {name}, {len(pairs)} clean rounds: the pre-allocation checks take "
            f"{1e3 * checks / len(pairs):.1f} ms per round, {100 * checks / rest:.2f}% of "
            f"`aggregate_train` ({rest / len(pairs):.2f} s per round)."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replies", type=int, default=1040)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-round", type=int, default=2, help="malformed replies per round")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "fuzz-replies.json")
    parser.add_argument("--section", default="")
    args = parser.parse_args()
    started = dt.datetime.now()
    result = fuzz(args.replies, args.seed, args.per_round)
    minutes = (dt.datetime.now() - started).total_seconds() / 60
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    table = summarise(result)
    print(table)
    if args.section:
        body = "\n".join(
            [
                f"## {args.section} (malformed train replies, {args.per_round} per round "
                "among 2-4 valid ones, alternately to FedEC and FedHCE)",
                "",
                f"- Command: `python simulations/fuzz_replies.py --replies {args.replies} "
                f"--seed {args.seed} --per-round {args.per_round}`",
                date_line(started, minutes, prefix="total "),
                machine_line("CPU"),
                "",
                table,
            ]
        )
        write_section(args.section, body)


if __name__ == "__main__":
    main()
