"""What the benchmark scripts in ``simulations/`` share.

A script runs as ``python simulations/<script>.py``, which puts ``simulations/`` first
on the import path, so ``from benchkit.report import write_section`` works from every
script; the tests get the same path from pytest's ``pythonpath`` option.

- :mod:`benchkit.report`: BENCHMARKS.md sections, their command / date / machine lines,
  mean ± sd cells;
- :mod:`benchkit.runs`: the standard settings and regimes, one ``flwr run`` per method,
  and the reuse of finished runs;
- :mod:`benchkit.tables`: the per-run and across-seed tables of the standard benchmark;
- :mod:`benchkit.drift`: the partial regime's client-drift tables;
- :mod:`benchkit.posthoc`: the post-hoc prior correction of a finished run's model;
- :mod:`benchkit.plots`: accuracy per round, teacher vs parameter average;
- :mod:`benchkit.throughput`: the teacher pass against one model's inference.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
PLOTS = ROOT / "simulations" / "plots"
