"""Size strings: ``64KiB``, ``1MiB``, ``1 GiB``, ``4096``. Binary units only (K = KiB)."""
from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40,
          "p": 1 << 50, "pib": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Bytes for an int or a size string; ValueError says what is accepted."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 4096 or 64KiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if isinstance(value, str):
        if value.strip().startswith("-"):
            raise ValueError(f"size must not be negative, got {value!r}")
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(m.group(1)) * _UNITS[m.group(2).lower()]
    raise ValueError(f"expected a size such as 4096, 64KiB or 1GiB, got {value!r}")


def format_size(size_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size_bytes and size_bytes % scale == 0:
            return f"{size_bytes // scale}{unit}"
    return str(size_bytes)
