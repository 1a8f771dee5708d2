"""BENCHMARKS.md sections and the lines every section opens with."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys

import torch

from benchkit import BENCHMARKS_MD


def write_section(section: str, body: str) -> None:
    """Replace ``section`` of BENCHMARKS.md (between its begin / end markers) by ``body``.

    A section not there yet is appended, so a new benchmark needs no manual edit first.
    """
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def command_line(script: str) -> str:
    """``- Command: `python simulations/<script> ...` ``: this process's own arguments.

    Quoted as a shell would need them, so the line can be pasted to repeat the run.
    """
    command = f"python simulations/{script} " + shlex.join(sys.argv[1:])
    return f"- Command: `{command.strip()}`"


def date_line(
    started: dt.datetime, minutes: float | None = None, *, prefix: str = "", suffix: str = ""
) -> str:
    """``- Date: 2025-01-31 14:05; total 3.2 min for all runs``, without the time if None.

    ``prefix`` / ``suffix`` frame the minutes, so each section keeps its own wording.
    """
    line = f"- Date: {started:%Y-%m-%d %H:%M}"
    if minutes is not None:
        line += f"; {prefix}{minutes:.1f} min{suffix}"
    return line


def detected_device(*, named: bool = True) -> str:
    """``GPU <name>`` (``GPU`` without ``named``) when CUDA is available, else ``CPU only``."""
    if not torch.cuda.is_available():
        return "CPU only"
    return f"GPU {torch.cuda.get_device_name(0)}" if named else "GPU"


def machine_line(device: str = "", *, cores: bool | int = True) -> str:
    """The machine line of a section: platform, cores, torch version and device.

    ``cores``: True for this machine's count, a number to report that one, False to
    leave them out (scripts whose timings do not depend on them). ``device``: what ran
    the numbers (e.g. :func:`detected_device`, ``"CPU"``); left out when empty.
    """
    parts = [platform.platform()]
    if cores is True:
        parts.append(f"{os.cpu_count()} cores")
    elif cores is not False:
        parts.append(f"{cores} cores")
    parts.append(f"torch {torch.__version__}")
    if device:
        parts.append(device)
    return "- Machine: " + ", ".join(parts)


def sample_sd(values: list[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def mean_sd(values: list[float], fmt: str) -> str:
    """``fmt`` of the mean, ``± sd`` (two decimals) added when there are two values or more."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {sample_sd(values):.2f}"
