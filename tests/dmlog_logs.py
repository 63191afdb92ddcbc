"""A small Linux dm-log-writes log shared by the trace-scenario tests (not a test module).

It records a 64 KiB raw device: op0 plain, op1 FUA, a MARK, op2 plain, a FLUSH, op3
plain. Crash points (after p steps): 4 = op1 (FUA) complete, 8 = the flush complete,
10 = the end.
"""
from __future__ import annotations

from pathlib import Path

from crashsim.dmlog import flush_entry, mark_entry, write_entry, write_log

LINUX_OPS = [(0, 0xA1), (4096, 0xB2), (8192, 0xC3), (12288, 0xD4)]  # (offset, pattern)


def linux_log(path: Path) -> Path:
    (a, pa), (b, pb), (c, pc), (d, pd) = LINUX_OPS
    write_log(path, [write_entry(a // 512, bytes([pa]) * 512),
                     write_entry(b // 512, bytes([pb]) * 512, fua=True),
                     mark_entry("after-fua"),
                     write_entry(c // 512, bytes([pc]) * 512),
                     flush_entry(),
                     write_entry(d // 512, bytes([pd]) * 512)])
    return path
