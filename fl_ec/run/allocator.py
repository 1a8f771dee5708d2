"""Fixed heap thresholds for glibc's ``malloc``, so a round's peak memory is what it holds.

Why: glibc adapts two thresholds as a process runs. A freed block served by ``mmap``
raises the size above which blocks are mmapped (up to 32 MiB), and the size of free
memory at the top of the heap kept rather than returned with it. A FedEC round
allocates and frees many blocks of 1-50 MB (each reply's arrays, the teacher's
activations over K models, the distillation's), and under those moving thresholds the
peak of the same round moved by up to 2x with the order of those events
(BENCHMARKS.md, ``teacher-scaling``). With both thresholds fixed (blocks
up to 64 MiB from the heap, where freed space is reused without new page faults; up to
128 MiB of free space kept at its top) the peak follows what the round holds.

Only glibc has ``mallopt``; elsewhere (macOS, Windows, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import sys
from logging import DEBUG

from flwr.common.logger import log

# mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 << 20
TRIM_THRESHOLD_BYTES = 128 << 20

_fixed: bool | None = None


def fix_heap_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; whether it could.

    Process-wide and done once: later calls return the first call's answer.
    """
    global _fixed
    if _fixed is None:
        _fixed = _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and _mallopt(
            _M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES
        )
        log(DEBUG, "glibc heap thresholds fixed: %s", _fixed)
    return _fixed


def _mallopt(parameter: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(parameter, value))
