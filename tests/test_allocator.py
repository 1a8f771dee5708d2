import ctypes.util
import sys

import pytest

from fl_ec.run import allocator


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or "libc" not in str(ctypes.util.find_library("c")),
    reason="glibc only",
)
def test_heap_thresholds_are_fixed_once_per_process(monkeypatch):
    monkeypatch.setattr(allocator, "_fixed", None)
    calls = []
    real = allocator._mallopt
    monkeypatch.setattr(allocator, "_mallopt", lambda p, v: calls.append((p, v)) or real(p, v))
    assert allocator.fix_heap_thresholds() is True
    assert allocator.fix_heap_thresholds() is True
    assert calls == [
        (allocator._M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD_BYTES),
        (allocator._M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD_BYTES),
    ]


def test_without_glibc_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(allocator, "_fixed", None)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.fix_heap_thresholds() is False
