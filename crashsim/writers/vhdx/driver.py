"""The guest-side VHDX driver: open (with replay), read and write the virtual disk.

This module owns QEMU's open order and QEMU's allocating-write protocol
(vhdx-log-format.md §4 and §8). Every protocol step is a small method so that a defect
variant can subclass ``VhdxDriver`` and override exactly one step (for example skip the
flush after the data write), and the log steps live on ``LogWriter`` (``log.py``), which
``make_log_writer`` lets a subclass replace.

An allocating write of one block, as QEMU 7.2 does it::

    user_visible_write  first write of the session: DataWriteGuid := fresh (x2 headers)
    allocate_block      the file grows to ROUND_UP(len, 1 MiB) + block_size
    write_data          the guest bytes at their place in the new block
    log_bat_entry       LogWriter.log_write of the 8-byte BAT entry: flush; LogGuid :=
                        fresh (x2); entry sectors; flush; BAT sector write+flush;
                        LogGuid := 0 (x2)

Writes to blocks that are already allocated go straight to the data (no log, no flush).
GUIDs come from the ``random.Random`` given to the driver: the same seed gives the same
bytes.
"""
from __future__ import annotations

import functools
import random
import struct
from array import array
from dataclasses import dataclass
from itertools import chain
from typing import Iterator, MutableSequence

from ...blockdev import BlockDevice, IOGen
from .format import (FULLY_PRESENT, HEADER_SECTION_END, HEADER_SLOTS, METADATA_TABLE_BYTES,
                     MiB, NOT_PRESENT,
                     PARTIALLY_PRESENT, REGION_TABLE_BYTES, REGION_TABLE_OFFSETS,
                     SB_PRESENT, STATE_NAMES, UNDEFINED, UNMAPPED, UNMAPPED_V095, ZERO,
                     ZERO_GUID, Metadata, Regions, VhdxCorrupt, bat_index,
                     check_log_geometry, highest_bat_offset, is_bitmap_index, known_regions,
                     metadata_bytes_needed, nonzero_entries_of, pack_bat_entry, parse_bat,
                     parse_cache, parse_metadata_parts, parse_region_table, round_up,
                     unpack_bat_entry)
from .log import BlockIO, HeaderSession, LogWriter, as_io, check_signature
from .replay import FIXED_POLICY, ReplayPolicy, ReplayResult, replay, scan_log

BAT_SECTOR_BYTES = 512  # BAT entries are checked in pieces of this many bytes
READS_AS_ZERO = frozenset({NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, UNMAPPED_V095})


@functools.lru_cache(maxsize=64)
def zeros(length: int) -> bytes:
    """One shared zero buffer per length: unallocated blocks read as the same object,
    which the model then recognises by identity instead of comparing it again."""
    return bytes(length)


@dataclass(frozen=True)
class Extent:
    """The part of a guest request that falls in one payload block."""
    block: int
    block_offset: int
    length: int
    request_offset: int  # where this part starts inside the request


class VhdxDriver:
    """An open VHDX image: ``open`` first, then ``read``/``write``/``flush``."""

    log_writer_class = LogWriter

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random(0)
        self.io: BlockIO | None = None
        self.policy = FIXED_POLICY
        self.creator = ""
        self.headers: HeaderSession | None = None
        self.replay_result: ReplayResult | None = None
        self.regions: Regions | None = None
        self.metadata: Metadata | None = None
        self.bat: MutableSequence[int] = array("Q")  # entries: an array, made in C
        # The BAT's bytes as loaded from disk: the structure checks, which run right after
        # a load, read these, memoised by them; writes change self.bat only.
        self.bat_blob = b""
        self.metadata_bytes_read = 0
        self.log: LogWriter | None = None
        self.region_notes: list[str] = []

    # -- open (QEMU's order) --------------------------------------------------------------
    def open(self, dev: BlockDevice | BlockIO, *, policy: ReplayPolicy = FIXED_POLICY
             ) -> IOGen:
        """Signature, headers, log replay, region table, metadata, BAT, BAT sanity.
        Returns the ReplayResult."""
        self.io = as_io(dev)
        self.policy = policy
        self.creator = check_signature(self.io)
        self.headers = HeaderSession.load(self.io, self.rng)
        self.replay_result = yield from replay(self.io, policy=policy, headers=self.headers)
        self.regions = self.load_regions()
        self.metadata = self.load_metadata()
        self.bat = self.load_bat()
        self.check_bat()
        self.log = self.make_log_writer(self.replay_result.next_sequence)
        return self.replay_result

    def attach(self, dev: BlockDevice | BlockIO) -> "VhdxDriver":
        """Load the structures as they are on disk, without replaying the log (for
        read-only views of an image that has already been recovered)."""
        self.io = as_io(dev)
        self.creator = check_signature(self.io)
        self.headers = HeaderSession.load(self.io, self.rng)
        check_log_geometry(self.headers.current, HEADER_SLOTS[self.headers.slot])
        self.regions = self.load_regions()
        self.metadata = self.load_metadata()
        self.bat = self.load_bat()
        return self

    def make_log_writer(self, sequence: int) -> LogWriter:
        # QEMU resets the log write position to 0 on every open.
        return self.log_writer_class(self.io, self.headers, sequence=sequence, position=0)

    def load_regions(self) -> Regions:
        h = self.headers.current
        log_span = [(h.log_offset, h.log_offset + h.log_length)]
        errors = []
        tables = REGION_TABLE_OFFSETS[:1] if self.policy.qemu_quirks else REGION_TABLE_OFFSETS
        for off in tables:
            try:
                regions = _regions_of(self.io.read(off, REGION_TABLE_BYTES), off,
                                      tuple(log_span))
            except VhdxCorrupt as exc:
                errors.append(exc)
                self.region_notes.append(f"region table at {off:#x}: {exc}")
                continue
            self.check_regions_in_file(regions)
            return regions
        raise errors[0]

    def check_regions_in_file(self, regions: Regions) -> None:
        size = self.io.size_bytes
        for r, name in ((regions.bat, "BAT"), (regions.metadata, "metadata")):
            if r.file_offset + r.length > size:
                raise VhdxCorrupt(f"the {name} region [{r.file_offset:#x}, "
                                  f"{r.file_offset + r.length:#x}) lies beyond the end of "
                                  f"the file ({size} bytes): truncated", r.file_offset,
                                  "truncated")

    def load_metadata(self) -> Metadata:
        md = self.regions.metadata
        table = self.io.read(md.file_offset, min(md.length, METADATA_TABLE_BYTES))
        need = metadata_bytes_needed(table, md)
        rest = b""
        if need > len(table):
            rest = self.io.read(md.file_offset + len(table), need - len(table))
        self.metadata_bytes_read = len(table) + len(rest)
        return parse_metadata_parts(table, rest, md)

    def load_bat(self) -> MutableSequence[int]:
        count = self.metadata.bat_entries
        region = self.regions.bat
        if count * 8 > region.length:
            raise VhdxCorrupt(f"the BAT region ({region.length:#x} bytes) cannot hold "
                              f"{count} entries", region.file_offset, "bat-size")
        blob = self.bat_blob = bytes(self.io.read(region.file_offset, count * 8))
        return parse_bat(blob, count)

    def check_bat(self) -> None:
        """QEMU's vhdx_check_bat_entries: no present block may end past end-of-file."""
        size = self.io.size_bytes
        block = self.metadata.block_size
        if highest_bat_offset(self.bat_blob) + block <= size:
            return  # the entry with the highest offset ends in the file: so do all
        for i, value in nonzero_entries_of(self.bat_blob):
            state, off = unpack_bat_entry(value)
            if state == FULLY_PRESENT and off + block > size:
                raise VhdxCorrupt(f"BAT entry {i} end offset {off + block - 1} points after "
                                  f"end of file ({size}): image has probably been "
                                  f"truncated", self.bat_entry_offset(i), "bat-beyond-eof")

    # -- geometry -------------------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return self.metadata.virtual_size

    @property
    def block_size(self) -> int:
        return self.metadata.block_size

    def bat_entry_offset(self, index: int) -> int:
        return self.regions.bat.file_offset + 8 * index

    def bat_index_of(self, block: int) -> int:
        return bat_index(block, self.metadata.chunk_ratio)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError(f"guest range [{offset:#x}, {offset + length:#x}) is outside "
                             f"the {self.virtual_size}-byte virtual disk")
        pos = 0
        while pos < length:
            block, inner = divmod(offset + pos, self.block_size)
            n = min(self.block_size - inner, length - pos)
            yield Extent(block, inner, n, pos)
            pos += n

    def block_state(self, block: int) -> tuple[int, int]:
        """(state, file offset) of payload block ``block``."""
        return unpack_bat_entry(self.bat[self.bat_index_of(block)])

    # -- read -----------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        parts = [self.read_extent(ext) for ext in self.extents(offset, length)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_extent(self, ext: Extent) -> bytes:
        where = self.extent_source(ext)
        return zeros(ext.length) if where is None else self.io.read(where, ext.length)

    def extent_source(self, ext: Extent) -> int | None:
        """The file offset ``ext`` reads from; None if it reads as zeros."""
        state, file_off = self.block_state(ext.block)
        if state in READS_AS_ZERO:
            return None
        if state == FULLY_PRESENT:
            return file_off + ext.block_offset
        idx = self.bat_index_of(ext.block)
        raise VhdxCorrupt(f"BAT entry {idx} has state {STATE_NAMES[state]}: cannot read "
                          f"it", self.bat_entry_offset(idx), "bat-state")

    # -- write ----------------------------------------------------------------------------
    def write(self, offset: int, data: bytes) -> IOGen:
        """A guest write; blocks not yet allocated are allocated through the log."""
        extents = list(self.extents(offset, len(data)))
        if not data:
            return
        yield from self.user_visible_write()
        for ext in extents:
            piece = data[ext.request_offset:ext.request_offset + ext.length]
            state, file_off = self.block_state(ext.block)
            if state == FULLY_PRESENT:
                yield from self.write_data(file_off + ext.block_offset, piece)
            elif state in READS_AS_ZERO:
                yield from self.allocate_and_write(ext, piece)
            else:
                idx = self.bat_index_of(ext.block)
                raise VhdxCorrupt(f"BAT entry {idx} has state {STATE_NAMES[state]}: cannot "
                                  f"write it", self.bat_entry_offset(idx), "bat-state")

    def flush(self) -> IOGen:
        """A guest flush."""
        yield from self.io.flush()

    def user_visible_write(self) -> IOGen:
        yield from self.headers.user_visible_write(self.io)

    def allocate_and_write(self, ext: Extent, piece: bytes) -> IOGen:
        new_offset = self.allocate_block()
        yield from self.write_data(new_offset + ext.block_offset, piece)
        idx = self.bat_index_of(ext.block)
        entry = pack_bat_entry(FULLY_PRESENT, new_offset)
        old = self.bat[idx]
        self.bat[idx] = entry
        try:
            yield from self.log_bat_entry(idx, entry)
        except BaseException:
            self.bat[idx] = old  # QEMU's error_bat_restore
            raise

    def allocate_block(self) -> int:
        """QEMU's vhdx_allocate_block: the new block starts at ROUND_UP(len, 1 MiB)."""
        new_offset = round_up(self.io.size_bytes, MiB)
        self.io.resize(new_offset + self.block_size)
        return new_offset

    def write_data(self, file_offset: int, data: bytes) -> IOGen:
        if file_offset < HEADER_SECTION_END:
            raise VhdxCorrupt(f"payload write at {file_offset:#x} would land in the header "
                              f"section", file_offset, "bat-offset")
        yield from self.io.write(file_offset, data)

    def log_bat_entry(self, index: int, entry: int) -> IOGen:
        """vhdx_log_write_and_flush(bat_entry, 8, bat_entry_offset)."""
        yield from self.log.log_write(self.bat_entry_offset(index), struct.pack("<Q", entry))

    # -- validation -----------------------------------------------------------------------
    @staticmethod
    def validate(dev: BlockDevice, policy: ReplayPolicy = FIXED_POLICY) -> list[str]:
        return validate(dev, policy)


@parse_cache()
def _regions_of(blob: bytes, offset: int, log_span: tuple[tuple[int, int], ...]) -> Regions:
    return known_regions(parse_region_table(blob, offset), offset, list(log_span))


def validate(dev: BlockDevice, policy: ReplayPolicy = FIXED_POLICY) -> list[str]:
    """Structure problems of the image on ``dev`` by the format's rules (no writes)."""
    io = as_io(dev)
    try:
        headers = HeaderSession.load(io)
        check_log_geometry(headers.current, HEADER_SLOTS[headers.slot])
    except VhdxCorrupt as exc:
        return [str(exc)]
    problems = _log_problems(io, headers, policy)
    drv = VhdxDriver()
    drv.io, drv.headers, drv.policy = io, headers, policy
    try:
        drv.regions = drv.load_regions()
        drv.metadata = drv.load_metadata()
        drv.bat = drv.load_bat()
    except VhdxCorrupt as exc:
        return problems + [str(exc)]
    problems += drv.region_notes + _region_copy_problems(io)
    return problems + _bat_problems(drv)


def _log_problems(io: BlockIO, headers: HeaderSession, policy: ReplayPolicy) -> list[str]:
    h = headers.current
    if h.log_guid == ZERO_GUID or h.log_length == 0:
        return []
    try:
        scan = scan_log(io, h, policy)
    except VhdxCorrupt as exc:
        return [f"log cannot be scanned: {exc}"]
    if scan.active is None:
        return []  # a published GUID without entries is a liveness matter, not structure
    return [f"valid but unreplayed log left behind: {scan.active.describe()}"]


def _region_copy_problems(io: BlockIO) -> list[str]:
    first, second = (io.read(off, REGION_TABLE_BYTES) for off in REGION_TABLE_OFFSETS)
    out = []
    for off, blob in zip(REGION_TABLE_OFFSETS, (first, second)):
        try:
            parse_region_table(blob, off)
        except VhdxCorrupt as exc:
            out.append(f"region table copy: {exc}")
    if not out and first != second:
        out.append("the two region table copies differ")
    return out


def _bat_problems(drv: VhdxDriver) -> list[str]:
    h = drv.headers.current
    reserved = [(0, HEADER_SECTION_END), (h.log_offset, h.log_offset + h.log_length)]
    for r in (drv.regions.bat, drv.regions.metadata):
        reserved.append((r.file_offset, r.file_offset + r.length))
    return list(_bat_problems_of(drv.bat_blob, drv.io.size_bytes, drv.metadata.block_size,
                                 tuple(reserved), drv.metadata.chunk_ratio))


@functools.lru_cache(maxsize=64)
def _bat_problems_of(blob: bytes, size: int, block: int,
                     reserved: tuple[tuple[int, int], ...], ratio: int) -> tuple[str, ...]:
    """Memoised by the BAT's bytes, and found sound sector by sector when it is: each
    allocation makes a new BAT, and walking every allocated entry of each made a long
    workload pay for its length again and again."""
    if _bat_sound(blob, size, block, reserved, ratio):
        return ()
    return _bat_problems_exact(blob, size, block, reserved, ratio)


def _bat_sound(blob: bytes, size: int, block: int, reserved: tuple[tuple[int, int], ...],
               ratio: int) -> bool:
    """True when no entry has a problem. Each sector's entries are checked once per
    content (``_bat_sector``); what spans sectors (the end of file, two entries
    sharing a block) is then checked on their offsets."""
    offsets, end = [], 0
    for c in range(0, len(blob), BAT_SECTOR_BYTES):
        piece = blob[c:c + BAT_SECTOR_BYTES]
        if piece.count(0) == len(piece):
            continue  # all zero: NOT_PRESENT entries, sound in every slot
        sound, owned, top = _bat_sector(piece, c // 8, block, reserved, ratio)
        if not sound:
            return False
        offsets.append(owned)
        end = max(end, top)
    flat = list(chain.from_iterable(offsets))
    return end <= size and len(set(flat)) == len(flat)


@functools.lru_cache(maxsize=4096)
def _bat_sector(piece: bytes, first: int, block: int, reserved: tuple[tuple[int, int], ...],
                ratio: int) -> tuple[bool, tuple[int, ...], int]:
    """(no entry here has a problem besides the end of file, the offsets of its present
    blocks, the end of the last of them)."""
    owners: dict[int, int] = {}
    for k, value in nonzero_entries_of(piece):
        i = first + k
        state, off = unpack_bat_entry(value)
        if is_bitmap_index(i, ratio):
            if state not in (NOT_PRESENT, SB_PRESENT):
                return False, (), 0
            continue
        if _payload_entry_problems(i, state, off, block, 1 << 64, reserved, owners):
            return False, (), 0
    return True, tuple(owners), max((off + block for off in owners), default=0)


def _bat_problems_exact(blob: bytes, size: int, block: int,
                        reserved: tuple[tuple[int, int], ...], ratio: int
                        ) -> tuple[str, ...]:
    owners: dict[int, int] = {}
    out: list[str] = []
    for i, value in nonzero_entries_of(blob):
        state, off = unpack_bat_entry(value)
        if is_bitmap_index(i, ratio):
            if state not in (NOT_PRESENT, SB_PRESENT):
                out.append(f"BAT entry {i} (sector bitmap) has invalid state {state}")
            continue
        out += _payload_entry_problems(i, state, off, block, size, reserved, owners)
    return tuple(out)


def _payload_entry_problems(i: int, state: int, off: int, block: int, size: int,
                            reserved: tuple[tuple[int, int], ...], owners: dict[int, int]
                            ) -> list[str]:
    name = STATE_NAMES.get(state, str(state))
    if state not in (FULLY_PRESENT, PARTIALLY_PRESENT):
        if state not in READS_AS_ZERO:
            return [f"BAT entry {i} has invalid state {name}"]
        return [f"BAT entry {i} ({name}) has a non-zero file offset {off:#x}"] if off else []
    if off < HEADER_SECTION_END:
        return [f"BAT entry {i} points into the header section ({off:#x})"]
    if off + block > size:
        return [f"BAT entry {i} block [{off:#x}, {off + block:#x}) ends past end of file "
                f"({size:#x})"]
    if any(off < hi and lo < off + block for lo, hi in reserved):
        return [f"BAT entry {i} block at {off:#x} overlaps the log, BAT or metadata region"]
    if off in owners:
        return [f"BAT entries {owners[off]} and {i} share the block at {off:#x}"]
    owners[off] = i
    return []
