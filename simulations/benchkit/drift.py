"""The partial regime's client-drift tables: tail accuracy, teacher wins, sampling.

With 4 of 20 clients sampled per round the accuracy oscillates from round to round, so
these tables add the mean and sd of the last :data:`TAIL` rounds, how often the teacher
beat the parameter average on validation, and a check that every method of a seed
trained the same sampled partitions in every round. ``results`` is keyed as in
:mod:`benchkit.tables`.
"""

from __future__ import annotations

from benchkit.report import mean_sd, sample_sd
from benchkit.tables import fedavg_of, grouped

TAIL = 5  # the partial regime's targets use the mean of the last this many rounds


def tail_stats(metrics: dict, tail: int = TAIL) -> tuple[float, float, float]:
    """Final accuracy, and mean and sd of the last ``tail`` rounds' accuracy, in %."""
    accs = [100 * r["test-accuracy"] for r in metrics["rounds"] if r["round"] > 0][-tail:]
    return accs[-1], sum(accs) / len(accs), sample_sd(accs)


def teacher_wins(metrics: dict) -> tuple[int, int]:
    """Rounds where the teacher beat the parameter average on validation, of those measured."""
    measured = [
        r
        for r in metrics["rounds"]
        if "teacher-val-accuracy" in r and "student-start-val-accuracy" in r
    ]
    wins = sum(r["teacher-val-accuracy"] > r["student-start-val-accuracy"] for r in measured)
    return wins, len(measured)


def drift_table(results: dict[tuple, dict]) -> str:
    """Per method and alpha, over seeds: final, mean / sd of the last rounds, Δs paired."""
    groups = grouped(results, slice(0, 2))
    head = [
        "method",
        "alpha",
        "seeds",
        "final acc",
        f"mean of last {TAIL}",
        f"sd of last {TAIL}",
        f"Δ mean-of-last-{TAIL} vs FedAvg, per seed",
        "Δ mean ± sd",
        "teacher > average (rounds)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, alpha), keys in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        keys = sorted(keys, key=lambda k: k[2:])
        stats = [tail_stats(results[k]) for k in keys]
        deltas = []
        for k, (_, mean, _) in zip(keys, stats, strict=True):
            base = fedavg_of(results, k)
            if base is not None:
                deltas.append(mean - tail_stats(base)[1])
        wins = [teacher_wins(results[k]) for k in keys]
        won, measured = sum(w for w, _ in wins), sum(n for _, n in wins)
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    f"{alpha:g}",
                    ", ".join(str(k[2]) for k in keys if len(k) > 2) or "-",
                    " / ".join(f"{s[0]:.2f}" for s in stats),
                    " / ".join(f"{s[1]:.2f}" for s in stats),
                    " / ".join(f"{s[2]:.2f}" for s in stats),
                    ", ".join(f"{d:+.2f}" for d in deltas) or "-",
                    mean_sd(deltas, "{:+.2f}") if deltas else "-",
                    f"{won}/{measured} ({100 * won / measured:.0f}%)" if measured else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def sampled_partitions(metrics: dict) -> list[list[int] | None]:
    """The partitions each trained round sampled (None where the run did not record them)."""
    return [r.get("sampled-partitions") for r in metrics["rounds"] if r["round"] > 0]


def sampling_check(results: dict[tuple, dict]) -> str:
    """One line per (alpha, seed): do all methods' runs record the same sampled partitions?"""
    groups = grouped(results, slice(1, None))
    lines = []
    for rest, keys in sorted(groups.items()):
        samples = {k[0]: sampled_partitions(results[k]) for k in keys}
        first = next(iter(samples.values()))
        recorded = all(None not in s for s in samples.values())
        same = recorded and all(s == first for s in samples.values())
        verdict = (
            "the same partitions in every round"
            if same
            else "DIFFERENT partitions: "
            + "; ".join(f"{label}: {s}" for label, s in samples.items())
            if recorded
            else "not recorded by every run"
        )
        where = f"alpha={rest[0]:g}" + (f", seed {rest[1]}" if len(rest) > 1 else "")
        lines.append(f"- Sampling, {where}, {len(keys)} methods: {verdict}.")
    return "\n".join(lines)


def round_table(results: dict[tuple, dict]) -> str:
    """Per round of the first (alpha, seed): sampled partitions, their classes, val accs."""
    first = sorted({k[1:] for k in results})[0]
    keys = sorted(k for k in results if k[1:] == first)
    distilling = [k for k in keys if "teacher-val-accuracy" in results[k]["rounds"][-1]]
    reference = results[keys[0]]
    head = ["round", "sampled partitions", "classes held"] + [
        f"{k[0]}: teacher / avg / student val, test" for k in distilling
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_round = {k: {r["round"]: r for r in results[k]["rounds"]} for k in distilling}
    for r in reference["rounds"]:
        if r["round"] == 0:
            continue
        counts = r.get("sampled-class-counts") or []
        total = sum(counts) or 1
        held = [str(c) for c, n in enumerate(counts) if n >= 0.01 * total]
        cells = [
            str(r["round"]),
            " ".join(map(str, r.get("sampled-partitions", []))) or "-",
            " ".join(held) or "-",
        ]
        for k in distilling:
            row = by_round[k].get(r["round"], {})
            cells.append(
                " / ".join(
                    f"{100 * row[name]:.1f}" if name in row else "-"
                    for name in (
                        "teacher-val-accuracy",
                        "student-start-val-accuracy",
                        "student-val-accuracy",
                    )
                )
                + (f", {100 * row['test-accuracy']:.1f}" if "test-accuracy" in row else "")
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
