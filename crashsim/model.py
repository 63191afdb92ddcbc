"""Reference models of a workload: the ground truth the oracle compares against.

A model is built from the workload's operations only, never by running the writer, so a
writer that is wrong even without a crash cannot define its own truth. After k
transactions the model holds the first k operations applied to a zeroed space.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import operator
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Literal

import crc32c

from .parts import CHUNK_ITEMS, Parts

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

    Per k only a CRC-32C (and, for views too large to cache, a BLAKE2b digest) is kept,
    so a long workload over large ranges stays small in memory. Matching a view is on the hot path of every crash
    state: the hardware CRC picks the candidate k, and an exact comparison with the
    expected view (kept in a bounded cache) confirms it, so no collision can pass.
    """

    VIEW_CACHE_BYTES = 64 << 20
    RANGE_INDEX_BYTES = 64 << 20  # contents kept as index keys; digests beyond that

    def __init__(self, ops: list[Op]):
        self.ops = ops
        self.ranges = merge_ranges((op.offset, op.length) for op in ops)
        self._starts: list[tuple[int, int, int]] = []  # (offset, length, position in view)
        pos = 0
        for off, length in self.ranges:
            self._starts.append((off, length, pos))
            pos += length
        self.view_bytes = pos
        self._by_digest = self.view_bytes > self.VIEW_CACHE_BYTES // 4
        self._by_k: list[bytes] = []
        self._crc_by_k: list[int] = []
        self._summed = False
        self._views: OrderedDict[int, bytes] = OrderedDict()
        self._last_match: tuple[int, ...] | None = None
        self._index = self._range_index()
        self._seen: list[dict[int, tuple[bytes, int]]] = [{} for _ in self.ranges]
        self._prev_parts: tuple[Parts, list[int]] | None = None
        self._all_k = (1 << (len(ops) + 1)) - 1

    def _range_index(self) -> list[dict[bytes, int]]:
        """Per range, each content it holds after some k, with the set of those k as a
        bit mask. Keys are the contents themselves while they fit in RANGE_INDEX_BYTES,
        else their BLAKE2b digests (as for views too large to cache): a workload of a
        thousand 64 KiB writes would otherwise fall back to summing its whole 64 MiB
        view for every crash state. Built one range at a time, from the ops that touch
        it, so it costs the ops' bytes, not ops × ranges."""
        starts = [off for off, _ in self.ranges]
        touching: list[list[int]] = [[] for _ in self.ranges]
        for k, op in enumerate(self.ops, 1):  # an op lies inside one merged range
            touching[bisect.bisect_right(starts, op.offset) - 1].append(k)
        bound = sum(n * (len(ks) + 1) for (_, n), ks in zip(self.ranges, touching))
        self._content_key = digest if bound > self.RANGE_INDEX_BYTES else None
        return [self._versions(off, n, ks) for (off, n), ks in zip(self.ranges, touching)]

    def _versions(self, off: int, n: int, touching: list[int]) -> dict[bytes, int]:
        key = self._content_key or bytes
        masks: dict[bytes, int] = {}
        buf, since = bytearray(n), 0
        for k in touching + [len(self.ops) + 1]:
            content = key(buf)  # held for every k in [since, k)
            masks[content] = masks.get(content, 0) | ((1 << k) - (1 << since))
            if k <= len(self.ops):
                op = self.ops[k - 1]
                buf[op.offset - off:op.offset - off + op.length] = op.data()
            since = k
        return masks

    def _sum_views(self) -> None:
        """A CRC (and for large views a digest) of every k's whole view, for matching a
        joined view. Worked out on first need only: it reads every k's view, so a long
        workload's model took time quadratic in its length to build (9 s at 320
        ranges of 64 KiB), and a writer that views range by range never needs it."""
        if self._summed:
            return
        self._summed = True
        buf = bytearray(self.view_bytes)
        self._record(buf)
        for op in self.ops:
            self._apply(buf, op)
            self._record(buf)

    def _record(self, buf: bytearray) -> None:
        # BLAKE2b confirms a CRC match only for views too large to keep for an exact
        # comparison; hashing every k's view otherwise costs more than all matching.
        if self._by_digest:
            self._by_k.append(digest(buf))
        self._crc_by_k.append(crc32c.crc32c(buf))

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

    def matching(self, view: bytes | list[bytes] | Parts) -> list[int]:
        """Every k whose model view equals ``view``: the bytes of all ranges joined, or
        a list (or ``Parts``) holding the bytes of each range."""
        if isinstance(view, (list, Parts)):
            if len(view) == len(self.ranges):
                return self._matching_parts(view)
            view = b"".join(view)
        if len(view) != self.view_bytes:
            return []
        guess = self._last_match
        if guess is not None and self.view_bytes <= self.VIEW_CACHE_BYTES // 4 and \
                self._cached_view(guess[0]) == view:
            return list(guess)  # consecutive states mostly show the same k
        found = self._matching(view)
        if found:
            self._last_match = tuple(found)
        return found

    def _matching_parts(self, parts: Parts | list[bytes]) -> list[int]:
        """Intersect, range by range, the k that hold each part. Views of successive
        states share most chunks of parts as the very same objects, so only the
        chunks that are not the previous view's are looked up again: a view costs
        in proportion to what changed and to the number of chunks, not of ranges."""
        prev = self._prev_parts
        if not isinstance(parts, Parts):
            parts = Parts.of(parts, like=prev[0] if prev is not None else None)
        chunks = parts.chunks
        if prev is not None and len(prev[0].chunks) == len(chunks):
            masks = [m if c is old else self._chunk_mask(j, c)
                     for j, (c, old, m) in enumerate(zip(chunks, prev[0].chunks, prev[1]))]
        else:
            masks = [self._chunk_mask(j, c) for j, c in enumerate(chunks)]
        self._prev_parts = (parts, masks)
        mask = functools.reduce(operator.and_, masks, self._all_k)
        found = []
        while mask:  # the set bits only: a view matches one k or a few
            low = mask & -mask
            found.append(low.bit_length() - 1)
            mask ^= low
        return found

    def _chunk_mask(self, j: int, chunk: tuple[bytes, ...]) -> int:
        first = j * CHUNK_ITEMS
        mask = self._all_k
        for t, part in enumerate(chunk):
            mask &= self._mask_of(first + t, part)
        return mask

    def _mask_of(self, i: int, part: bytes) -> int:
        """The k whose range ``i`` holds ``part``, as a bit mask. A part seen before as
        the very same object (a cached page) is found by identity, without comparing
        its bytes; any other is looked up by content, which compares them exactly."""
        seen = self._seen[i]
        hit = seen.get(id(part))
        if hit is not None and hit[0] is part:
            return hit[1]
        key = self._content_key
        m = self._index[i].get(part if key is None else key(part), 0)
        if len(seen) >= 16:
            seen.clear()
        seen[id(part)] = (part, m)  # the reference keeps the id from reuse
        return m

    def _matching(self, view: bytes) -> list[int]:
        self._sum_views()
        crc = crc32c.crc32c(view)
        candidates = [k for k, ck in enumerate(self._crc_by_k) if ck == crc]
        if not candidates:
            return []
        if self._by_digest:
            d = digest(view)
            return [k for k in candidates if self._by_k[k] == d]
        return [k for k in candidates if self._cached_view(k) == view]

    def _cached_view(self, k: int) -> bytes:
        view = self._views.get(k)
        if view is None:
            view = self._views[k] = self.view_after(k)
            while len(self._views) * self.view_bytes > self.VIEW_CACHE_BYTES:
                self._views.popitem(last=False)
        else:
            self._views.move_to_end(k)
        return view

    def locate(self, view_offset: int) -> int:
        """The device/guest offset that a position in the view stands for."""
        for off, length, vpos in self._starts:
            if view_offset < vpos + length:
                return off + view_offset - vpos
        raise IndexError(view_offset)


def digest(data: bytes | bytearray) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()
