"""Compare two runs' metrics.json value by value, leaving out what is measured in time.

    python simulations/compare_runs.py RUN_A/metrics.json RUN_B/metrics.json

How a change that must not change behaviour is checked: the same command before and
after it, then this. Every round's record and the summary are compared key by key
(nested tables too); seconds, throughputs, dates and the machine are left out, and a
per-node table is compared by its values, since node ids are drawn anew in every run.
Exits 1 when a value differs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# Keys holding one of these are measurements of time or of the machine, not of the run.
TIMING = ("seconds", "per-second", "wall", "started", "machine", "elapsed")


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """``value``'s leaves under dotted keys; a ``*-by-node`` table as its sorted values."""
    if isinstance(value, dict) and prefix.endswith("by-node"):
        out[prefix] = sorted(map(str, value.values()))
    elif isinstance(value, dict):
        for key, item in value.items():
            if not any(word in key for word in TIMING):
                flatten(f"{prefix}.{key}", item, out)
    else:
        out[prefix] = value


def run_values(path: Path) -> dict[str, Any]:
    """Every non-timing value of a run: each round's record and the summary."""
    metrics = json.loads(path.read_text())
    out: dict[str, Any] = {}
    for record in metrics["rounds"]:
        flatten(f"round{record['round']}", record, out)
    flatten("summary", metrics.get("summary", {}), out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    first, second = run_values(args.first), run_values(args.second)
    differ = sorted(k for k in set(first) | set(second) if first.get(k) != second.get(k))
    print(f"{len(set(first) | set(second))} values compared, {len(differ)} differ")
    for key in differ:
        print(f"  {key}: {first.get(key, '(none)')!r} -> {second.get(key, '(none)')!r}")
    raise SystemExit(1 if differ else 0)


if __name__ == "__main__":
    main()
