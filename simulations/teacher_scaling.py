"""The teacher pass as the number of client models K grows: seconds and peak memory.

    python simulations/teacher_scaling.py --ks 10 40 80 160 --proxy 5000

Two fresh processes per K. In the first, K small-CNN state dicts arrive as
``ArrayRecord`` payloads (the wire format), are rebuilt into models, and FedEC's teacher
(``fl_ec.ensemble.teacher_logits``, mean logits) runs them over ``--proxy`` proxy images:
recorded are the models' parameter bytes, the peak resident memory (``ru_maxrss``) after
the models are built and after the teacher pass, the pass's seconds, and its throughput
against one CNN's batched inference in the same layout (channels-last, batch 512). In
the second, FedEC's whole ``aggregate_train`` takes K such replies (the checks, the
models, the teacher, 50 distillation steps): the peak memory with the replies received
and after the round (FedEC fixes glibc's heap thresholds when it is built:
``fl_ec.run.allocator``). The section ``teacher-scaling`` of BENCHMARKS.md is rewritten.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time

import torch

from fl_ec.results import peak_rss_mb

SECTION = "teacher-scaling"


def measure(num_models: int, proxy_size: int, threads: int) -> dict:
    """One K, in this process: the numbers of one row."""
    from flwr.app import ArrayRecord

    from fl_ec.ensemble import teacher_logits
    from fl_ec.models import ArchSpec, build_model, channels_last
    from fl_ec.models.spec import build_from_state_dict

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = ArchSpec("cnn", (1, 28, 28), 10)
    proxy = torch.randn(proxy_size, 1, 28, 28)
    start_mb = peak_rss_mb()
    # The replies as the server receives them: serialised arrays, rebuilt into models.
    replies = [ArrayRecord(build_model(spec).state_dict()) for _ in range(num_models)]
    models = [build_from_state_dict(spec, r.to_torch_state_dict()) for r in replies]
    del replies
    param_mb = sum(p.numel() * 4 for p in models[0].parameters()) * num_models / 1e6
    built_mb = peak_rss_mb()

    reference = build_model(spec).eval()
    with channels_last(reference), torch.inference_mode():
        for batch in proxy.split(512):  # warm-up
            reference(batch)
        started = time.perf_counter()
        for batch in proxy.split(512):
            reference(batch)
        single = proxy_size / (time.perf_counter() - started)
    teacher = teacher_logits(models, proxy, batch_size=512)
    return {
        "k": num_models,
        "param-mb": param_mb,
        "start-mb": start_mb,
        "built-mb": built_mb,
        "peak-mb": peak_rss_mb(),
        "seconds": teacher.seconds,
        "ratio": teacher.samples_per_second / single,
    }


def fedec_round(num_models: int, proxy_size: int, threads: int) -> dict:
    """Peak RSS (MB) after FedEC's ``aggregate_train`` on K replies, as a ServerApp
    receives them (checks, models, teacher, 50 distillation steps), in this process."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fl_ec.distill import DistillSettings
    from fl_ec.models import ArchSpec, build_model
    from fl_ec.protocol import TRAIN_INFO_KEY
    from fl_ec.strategies.fedec import FedEC

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    proxy = torch.randn(proxy_size, 1, 28, 28)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    spec = ArchSpec("cnn", (1, 28, 28), 10)
    strategy = FedEC(
        proxy_data=proxy,
        arch_spec=spec,
        distill=DistillSettings(steps=50, batch_size=128, eval_every=50),
        min_train_nodes=2,
    )
    strategy.global_arrays = ArrayRecord(build_model(spec).state_dict())
    replies = []
    for node in range(1, num_models + 1):
        request = Message(
            RecordDict({"config": ConfigRecord({"server-round": 1})}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord(build_model(spec).state_dict()),
                "metrics": MetricRecord({"num-examples": 100, "train-loss": 0.5}),
                TRAIN_INFO_KEY: ConfigRecord(
                    {"arch-spec": spec.to_json(), "class-counts": [10] * 10}
                ),
            }
        )
        replies.append(Message(content, reply_to=request))
    received_mb = peak_rss_mb()
    started = time.perf_counter()
    strategy.aggregate_train(1, replies)
    return {
        "fedec-received-mb": received_mb,
        "fedec-peak-mb": peak_rss_mb(),
        "fedec-seconds": time.perf_counter() - started,
    }


def report(rows: list[dict], args: argparse.Namespace, started: dt.datetime) -> str:
    from benchkit.report import command_line, date_line, machine_line

    base = next((r for r in rows if r["k"] == 40), rows[0])
    lines = [
        f"## Teacher pass against K client models ({args.proxy} proxy images)",
        "",
        command_line("teacher_scaling.py"),
        date_line(started),
        machine_line(),
        "",
        "| K | models' parameters (MB) | peak RSS after building (MB) | peak RSS after the "
        f"teacher (MB) | vs K={base['k']} | seconds | s per model | vs one CNN's batched "
        "inference | FedEC round: RSS with the replies received (MB) | after aggregate_train "
        f"(MB) | vs K={base['k']} | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['param-mb']:.0f} | {r['built-mb']:.0f} | {r['peak-mb']:.0f} | "
            f"{r['peak-mb'] / base['peak-mb']:.2f}x | {r['seconds']:.1f} | "
            f"{r['seconds'] / r['k']:.3f} | {r['ratio']:.2f} | {r['fedec-received-mb']:.0f} | "
            f"{r['fedec-peak-mb']:.0f} | {r['fedec-peak-mb'] / base['fedec-peak-mb']:.2f}x | "
            f"{r['fedec-seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 40, 80, 160])
    parser.add_argument("--proxy", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fedec", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    args = parser.parse_args()
    if args.child is not None:
        run = fedec_round if args.fedec else measure
        print(json.dumps(run(args.child, args.proxy, args.threads)))
        return
    started = dt.datetime.now()
    rows = []
    for k in args.ks:
        row = {}
        for mode in ([], ["--fedec"]):  # each in a fresh process: peaks do not mix
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(k), "--proxy", str(args.proxy),
                 "--threads", str(args.threads), *mode],
                capture_output=True, text=True, check=True, env=dict(os.environ),
            )
            row.update(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append(row)
        print(rows[-1], flush=True)
    body = report(rows, args, started)
    print(body)
    if not args.no_write:
        from benchkit.report import write_section

        write_section(SECTION, body)


if __name__ == "__main__":
    main()
