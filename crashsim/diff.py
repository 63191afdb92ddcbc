"""Expected-versus-actual views as a short text diff a storage engineer can read.

Views are the bytes of the model's ranges laid end to end; the diff maps positions back
to device (or guest) offsets, groups differences into runs, summarises each run by its
fill pattern, and shows hex for the first differing bytes.
"""
from __future__ import annotations

from .model import RangeModel
from .sizes import format_size

MAX_RUNS = 12
_CHUNK = 512


def view_diff(model: RangeModel, expected: bytes, actual: bytes | None,
              block_bytes: int | None = None) -> str:
    if actual is None:
        return "no view: recovery failed before the data could be read"
    if len(actual) != len(expected):
        return f"view length {len(actual)} differs from expected {len(expected)}"
    runs = _differing_runs(expected, actual)
    if not runs:
        return "views are identical"
    lines = []
    for start, end in runs[:MAX_RUNS]:
        lines.append(_run_line(model, expected, actual, start, end, block_bytes))
    if len(runs) > MAX_RUNS:
        lines.append(f"... and {len(runs) - MAX_RUNS} more differing runs")
    start = runs[0][0]
    lines.append(_hex_rows(model, expected, actual, start))
    return "\n".join(lines)


def _differing_runs(a: bytes, b: bytes) -> list[tuple[int, int]]:
    """[start, end) runs of differing 512-byte chunks, refined to the exact bytes."""
    runs: list[list[int]] = []
    for pos in range(0, len(a), _CHUNK):
        if a[pos:pos + _CHUNK] != b[pos:pos + _CHUNK]:
            end = min(pos + _CHUNK, len(a))
            if runs and runs[-1][1] == pos:
                runs[-1][1] = end
            else:
                runs.append([pos, end])
    out = []
    for start, end in runs:
        while a[start] == b[start]:
            start += 1
        while a[end - 1] == b[end - 1]:
            end -= 1
        out.append((start, end))
    return out


def _size(n: int) -> str:
    """64KiB, or "28 bytes": a bare 28 beside hex offsets could be read as sectors."""
    text = format_size(n)
    return f"{text} bytes" if text.isdigit() else text


def _fill(data: bytes) -> str:
    if data.count(data[:1]) == len(data):
        return f"0x{data[0]:02x} x {_size(len(data))}"
    values = sorted(set(data[:4096]))
    return "mixed bytes (" + " ".join(f"{v:02x}" for v in values[:6]) + \
        (" ..." if len(values) > 6 else "") + ")"


def _run_line(model: RangeModel, exp: bytes, act: bytes, start: int, end: int,
              block_bytes: int | None) -> str:
    off = model.locate(start)
    where = f"0x{off:x}..0x{off + end - start:x} ({_size(end - start)})"
    if block_bytes:
        where += f" in block {off // block_bytes} +0x{off % block_bytes:x}"
    return f"{where}: expected {_fill(exp[start:end])}; actual {_fill(act[start:end])}"


def _hex_rows(model: RangeModel, exp: bytes, act: bytes, start: int) -> str:
    row = start - start % 16
    off = model.locate(row)
    e, a = exp[row:row + 16], act[row:row + 16]
    return (f"  0x{off:08x} expected: {e.hex(' ')}\n"
            f"  0x{off:08x} actual:   {a.hex(' ')}")
