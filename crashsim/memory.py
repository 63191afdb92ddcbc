"""The memory cap (``explore.max_memory_mib``): how big this process is, and whether it
may judge another crash point.

The cap bounds the resident memory of each exploring process: the parent in a serial
run, each worker otherwise. Between crash points a process over the cap first drops its
judge cache (the part that grows with the run); if it is still over, it judges nothing
more of its chunk, and those crash points are recorded as skipped for the memory cap,
never as covered.
"""
from __future__ import annotations

import gc
import os
import resource
import sys

MIB = 1 << 20


_STATM: tuple[int, int] | None = None  # (pid, fd): /proc/self names the opener


def rss_bytes() -> int:
    """Resident set size of this process now (the peak where /proc is missing)."""
    global _STATM
    try:
        if _STATM is None or _STATM[0] != os.getpid():  # a forked worker opens its own
            _STATM = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY))
        # Kept open: the cap is checked at every crash point, and opening the file
        # each time cost more than reading it.
        return int(os.pread(_STATM[1], 128, 0).split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes vs KiB


class MemoryCap:
    """Once over the cap, stays over: the rest of the chunk is skipped."""

    def __init__(self, max_mib: int, judge: object | None = None):
        self.limit_bytes = max_mib * MIB
        self.judge = judge
        self.hit = False

    def exceeded(self) -> bool:
        if self.hit:
            return True
        if rss_bytes() <= self.limit_bytes:
            return False
        forget = getattr(self.judge, "forget", None)
        if forget is not None:
            forget()
        gc.collect()
        self.hit = rss_bytes() > self.limit_bytes
        return self.hit
