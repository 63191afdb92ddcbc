"""Reference models of a workload: the ground truth the oracle compares against.

A model is built from the workload's operations only, never by running the writer, so a
writer that is wrong even without a crash cannot define its own truth. After k
transactions the model holds the first k operations applied to a zeroed space.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterable, Literal

OpKind = Literal["guest_write", "log_write"]


@dataclass(frozen=True, slots=True)
class Op:
    """One transaction of the workload: fill [offset, offset+length) with ``pattern``."""

    kind: OpKind
    offset: int
    length: int
    pattern: int

    def data(self) -> bytes:
        return bytes([self.pattern]) * self.length


def random_ops(kind: OpKind, count: int, seed: int, space_bytes: int,
               max_length: int = 256 * 1024, align: int = 512) -> list[Op]:
    """Seeded random ops, sector aligned, each with a pattern distinct from its neighbour."""
    rng = random.Random(seed)
    ops: list[Op] = []
    for i in range(count):
        length = rng.randrange(1, max_length // align + 1) * align
        offset = rng.randrange(0, (space_bytes - length) // align + 1) * align
        pattern = 1 + (rng.randrange(254) + i) % 255
        ops.append(Op(kind, offset, length, pattern))
    return ops


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, coalesced (offset, length) ranges."""
    out: list[list[int]] = []
    for off, length in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + length - out[-1][0])
        else:
            out.append([off, length])
    return [(o, n) for o, n in out]


class RangeModel:
    """The content of the workload's ranges after k operations (k = 0 .. len(ops)).

    Only a digest per k is kept, so a long workload over large ranges stays small in
    memory; a full view is rebuilt on demand for a diff.
    """

    def __init__(self, ops: list[Op]):
        self.ops = ops
        self.ranges = merge_ranges((op.offset, op.length) for op in ops)
        self._starts: list[tuple[int, int, int]] = []  # (offset, length, position in view)
        pos = 0
        for off, length in self.ranges:
            self._starts.append((off, length, pos))
            pos += length
        self.view_bytes = pos
        self._digests: dict[bytes, int] = {}
        self._by_k: list[bytes] = []
        buf = bytearray(pos)
        self._record(buf)
        for op in ops:
            self._apply(buf, op)
            self._record(buf)

    def _record(self, buf: bytearray) -> None:
        d = digest(buf)
        self._by_k.append(d)
        self._digests.setdefault(d, len(self._by_k) - 1)

    def _apply(self, buf: bytearray, op: Op) -> None:
        for off, length, vpos in self._starts:
            lo, hi = max(off, op.offset), min(off + length, op.offset + op.length)
            if lo < hi:
                buf[vpos + lo - off: vpos + hi - off] = bytes([op.pattern]) * (hi - lo)

    def view_after(self, k: int) -> bytes:
        buf = bytearray(self.view_bytes)
        for op in self.ops[:k]:
            self._apply(buf, op)
        return bytes(buf)

    def matching(self, view: bytes) -> list[int]:
        """Every k whose model view equals ``view``."""
        d = digest(view)
        return [k for k, dk in enumerate(self._by_k) if dk == d]

    def locate(self, view_offset: int) -> int:
        """The device/guest offset that a position in the view stands for."""
        for off, length, vpos in self._starts:
            if view_offset < vpos + length:
                return off + view_offset - vpos
        raise IndexError(view_offset)


def digest(data: bytes | bytearray) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()
