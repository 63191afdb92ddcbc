"""The VHDX metadata log writer, header updates, and in-place application of log entries.

This module owns the *write* side of the log protocol (vhdx-log-format.md §3 "Updating the
headers", §6.5 and §8): QEMU's ``vhdx_update_headers`` and ``vhdx_log_write_and_flush``,
generalised to any byte range of the file. Replay (``replay.py``) reuses ``apply_entry``
and ``HeaderSession`` so that a logged update is applied by the same code whether the
writer applies it or a later open replays it.

``log_write(dev, offset, data)`` is one atomic update of the file's bytes:

1. flush (whatever the caller wrote before is stable before the log refers to it);
2. if the header's LogGuid is zero, publish a fresh LogGuid (double header update);
3. write the entry, one 4 KiB log sector per write, wrapping at the end of the log;
4. flush (the entry is durable: from here on a crash replays it);
5. apply every pending entry in place, each 4 KiB sector write followed by a flush;
6. flush, then clear LogGuid (double header update).

Every step is a method of ``LogWriter`` so a defect variant can override one step.
"""
from __future__ import annotations

import random
import uuid
from typing import Callable

from ...blockdev import BlockDevice, IOGen, read_summary
from .format import (FILE_SIGNATURE, HEADER_BLOCK, HEADER_SLOTS, LOG_SECTOR, MAX_FILE_BYTES,
                     ZERO_GUID, Header, LogEntry, MiB, SectorUpdate, VhdxCorrupt,
                     build_log_entry, choose_header, entry_sector_count, header_block,
                     parse_descriptors, parse_file_identifier, parse_log_entry_header,
                     MAX_REPLAY_ZERO_BYTES, round_up)

SECTOR_BYTES = 512


class LogBusy(VhdxCorrupt):
    """A log write was refused: the header's LogGuid is set but this session has no
    pending entries (QEMU's -ENOTSUP after a crash left the GUID published)."""


def new_guid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


class BlockIO:
    """The device as QEMU's block layer presents it to the VHDX driver.

    A flush with nothing written or resized since the last flush is skipped, as
    ``bdrv_co_flush`` skips it (write_gen == flushed_gen). Writes smaller than a device
    sector are read-merged into whole 512-byte sectors, as the block layer does.
    """

    def __init__(self, dev: BlockDevice):
        self.dev = dev
        self.dirty = False

    @property
    def size_bytes(self) -> int:
        return self.dev.size_bytes

    def read(self, offset: int, length: int) -> bytes:
        return self.dev.read(offset, length)

    def read_summary(self, offset: int, length: int, summarise, key):
        return read_summary(self.dev, offset, length, summarise, key)

    def write(self, offset: int, data: bytes) -> IOGen:
        start = offset - offset % SECTOR_BYTES
        end = round_up(offset + len(data), SECTOR_BYTES)
        if (start, end) != (offset, offset + len(data)):
            old = bytearray(self.dev.read(start, end - start))
            old[offset - start:offset - start + len(data)] = data
            offset, data = start, bytes(old)
        self.dirty = True
        yield from self.dev.write(offset, data)

    def write_sync(self, offset: int, data: bytes) -> IOGen:
        """QEMU's bdrv_pwrite_sync: write, then flush."""
        yield from self.write(offset, data)
        yield from self.flush()

    def flush(self) -> IOGen:
        if self.dirty:
            self.dirty = False
            yield from self.dev.flush()

    def resize(self, size_bytes: int) -> None:
        self.dirty = True
        self.dev.resize(size_bytes)


def as_io(dev: BlockDevice | BlockIO) -> BlockIO:
    return dev if isinstance(dev, BlockIO) else BlockIO(dev)


def check_signature(dev: BlockDevice | BlockIO) -> str:
    """The creator string; VhdxCorrupt if the file is not VHDX or too short for one."""
    size = dev.size_bytes
    first_end = HEADER_SLOTS[0] + HEADER_BLOCK
    # Reads past the end return zeros: a short file must be called short, or an empty
    # one reads as a bad signature of zeros.
    if size == 0:
        raise VhdxCorrupt(f"file is empty (0 bytes), too short to be a VHDX, whose first "
                          f"header ends at {first_end:#x}", 0, "truncated")
    if size < HEADER_SLOTS[1] + HEADER_BLOCK:
        signature = dev.read(0, min(size, len(FILE_SIGNATURE)))
        if signature != FILE_SIGNATURE:
            if size < first_end:
                raise VhdxCorrupt(f"file is {size} bytes, too short to be a VHDX, whose "
                                  f"first header ends at {first_end:#x}; not a VHDX file "
                                  f"either: signature {signature!r}, expected "
                                  f"{FILE_SIGNATURE!r}", 0, "truncated")
            parse_file_identifier(dev.read(0, 8))
        raise VhdxCorrupt(f"file is truncated: {size} bytes, too short to hold "
                          f"the VHDX headers", size, "truncated")
    return parse_file_identifier(dev.read(0, 1024))


class HeaderSession:
    """The current header and how this session updates it (§3).

    An update writes the non-current slot with SequenceNumber + 1 and FileWriteGuid = the
    session GUID, over the slot's old 4 KiB (CRC over all of it), as one 512-byte
    write + flush; that slot then becomes current. QEMU starts from the stale in-memory
    copy of the slot it overwrites; crashsim starts from the current header, so a torn or
    garbage slot never leaks its fields into the new header (``base_for_update``).
    """

    def __init__(self, slot: int, current: Header, rng: random.Random,
                 notes: list[str] | None = None):
        self.slot = slot
        self.current = current
        self.rng = rng
        self.session_guid = new_guid(rng)
        self.notes = notes or []
        self.data_guid_changed = False

    @classmethod
    def load(cls, dev: BlockDevice | BlockIO, rng: random.Random | None = None
             ) -> "HeaderSession":
        check_signature(dev)
        slot, header, notes = choose_header(dev.read(HEADER_SLOTS[0], HEADER_BLOCK),
                                            dev.read(HEADER_SLOTS[1], HEADER_BLOCK))
        return cls(slot, header, rng or random.Random(0), notes)

    @property
    def log_guid(self) -> uuid.UUID:
        return self.current.log_guid

    def base_for_update(self) -> Header:
        return self.current

    def update(self, io: BlockIO, *, new_data_guid: bool = False,
               log_guid: uuid.UUID | None = None) -> IOGen:
        """One header update (QEMU's vhdx_update_header)."""
        target = 1 - self.slot
        if self.current.sequence_number >= (1 << 64) - 1:  # no newer header can exist
            raise VhdxCorrupt("the current header's sequence number is 2^64-1: no newer "
                              "header can be written", HEADER_SLOTS[self.slot] + 8,
                              "header-sequence-max")
        h = self.base_for_update().evolve(
            sequence_number=self.current.sequence_number + 1,
            file_write_guid=self.session_guid)
        if new_data_guid:
            h = h.evolve(data_write_guid=new_guid(self.rng))
        if log_guid is not None:
            h = h.evolve(log_guid=log_guid)
        offset = HEADER_SLOTS[target]
        block = header_block(h, io.read(offset, HEADER_BLOCK))
        yield from io.write_sync(offset, block[:SECTOR_BYTES])
        self.slot, self.current = target, h

    def update_both(self, io: BlockIO, *, new_data_guid: bool = False,
                    log_guid: uuid.UUID | None = None) -> IOGen:
        """QEMU's vhdx_update_headers: the update twice, so both slots agree."""
        yield from self.update(io, new_data_guid=new_data_guid, log_guid=log_guid)
        yield from self.update(io, new_data_guid=new_data_guid, log_guid=log_guid)

    def user_visible_write(self, io: BlockIO) -> IOGen:
        """Before the first change to user-visible data: a fresh DataWriteGuid."""
        if not self.data_guid_changed:
            self.data_guid_changed = True
            yield from self.update_both(io, new_data_guid=True)


def apply_entry(io: BlockIO, entry: LogEntry) -> IOGen:
    """Write every descriptor of ``entry`` in place, each 4 KiB sector with write+flush
    (QEMU's vhdx_log_flush_desc: zeros are real zeros, one sector at a time)."""
    zero = bytes(LOG_SECTOR)
    for file_offset, what in entry.writes():
        if isinstance(what, bytes):
            yield from io.write_sync(file_offset, what)
            continue
        for off in range(file_offset, file_offset + what, LOG_SECTOR):
            yield from io.write_sync(off, zero)


def sector_updates(io: BlockIO, offset: int, data: bytes) -> list[SectorUpdate]:
    """The 4 KiB sectors covering [offset, offset+len), partial ends read-merged from the
    file; all-zero sectors become "zero" runs (consecutive ones merged)."""
    if offset < 0 or not data:
        raise ValueError(f"log_write needs a non-negative offset and data (got offset "
                         f"{offset}, {len(data)} bytes)")
    start = offset - offset % LOG_SECTOR
    end = round_up(offset + len(data), LOG_SECTOR)
    if end > MAX_FILE_BYTES:
        raise ValueError(f"log_write range ends at {end:#x}, beyond the largest VHDX file")
    buf = bytearray(len(data) + (offset - start) + (end - offset - len(data)))
    if offset != start:
        buf[:LOG_SECTOR] = io.read(start, LOG_SECTOR)
    if (offset + len(data)) % LOG_SECTOR:
        buf[-LOG_SECTOR:] = io.read(end - LOG_SECTOR, LOG_SECTOR)
    buf[offset - start:offset - start + len(data)] = data
    out: list[SectorUpdate] = []
    for pos in range(0, len(buf), LOG_SECTOR):
        sector = bytes(buf[pos:pos + LOG_SECTOR])
        if sector.count(0) == LOG_SECTOR:
            last = out[-1] if out else None
            if last and last.data is None and last.file_offset + last.zero_length == start + pos:
                out[-1] = SectorUpdate(last.file_offset, None, last.zero_length + LOG_SECTOR)
            else:
                out.append(SectorUpdate(start + pos, None, LOG_SECTOR))
        else:
            out.append(SectorUpdate(start + pos, sector))
    return out


class LogWriter:
    """One session's writer of the circular log (§6.5), with QEMU's one-free-sector rule.

    ``position`` is where the next entry goes (QEMU resets it to 0 on every open) and
    ``sequence`` its sequence number (1, or the replayed head's + 1). Entries written but
    not yet applied are *pending*; ``checkpoint`` applies them and clears the LogGuid.
    When a new entry does not fit beside the pending ones, the log is checkpointed first
    and reused, so a write never fails half-written.
    """

    def __init__(self, io: BlockIO, headers: HeaderSession, *, sequence: int = 1,
                 position: int = 0):
        self.io = io
        self.headers = headers
        self.log_offset = headers.current.log_offset
        self.log_length = headers.current.log_length
        self.sequence = max(sequence, 1)
        self.write_pos = position % self.log_length if self.log_length else 0
        self.read_pos = self.write_pos
        self.pending: list[tuple[int, LogEntry]] = []
        # A hook for tests and defect variants: called with the step name before each step.
        self.on_step: Callable[[str], None] = lambda step: None

    # -- capacity -----------------------------------------------------------------------
    @property
    def capacity_sectors(self) -> int:
        """Sectors one entry may use in an empty log: all but one (QEMU's rule)."""
        return self.log_length // LOG_SECTOR - 1

    def free_sectors(self) -> int:
        used = (self.write_pos - self.read_pos) % self.log_length
        return (self.log_length - used) // LOG_SECTOR - 1

    # -- the whole protocol ---------------------------------------------------------------
    def log_write(self, offset: int, data: bytes) -> IOGen:
        """Atomically replace file bytes [offset, offset+len(data)) through the log."""
        updates = self.updates_for(offset, data)
        yield from self.before_log(updates)
        self.check_fits(updates)
        yield from self.flush_data()
        yield from self.headers.user_visible_write(self.io)
        yield from self.append(updates)
        yield from self.flush_log()
        yield from self.checkpoint()

    # Variants replace these two steps: how updates are merged, and what (if anything)
    # is written before the log entry.
    def updates_for(self, offset: int, data: bytes) -> list[SectorUpdate]:
        return sector_updates(self.io, offset, data)

    def before_log(self, updates: list[SectorUpdate]) -> IOGen:
        return
        yield

    def check_fits(self, updates: list[SectorUpdate]) -> None:
        if self.log_length == 0:
            raise LogBusy("the image has no log (LogLength 0): logged updates are "
                          "impossible", HEADER_SLOTS[self.headers.slot] + 68, "no-log")
        if self.sequence >= 1 << 64:  # the replayed head had sequence number 2^64-1
            raise LogBusy("log sequence numbers are exhausted: no entry can follow one "
                          "with sequence number 2^64-1", self.log_offset, "sequence-max")
        need = entry_sector_count(updates)
        if need > self.capacity_sectors:
            raise ValueError(f"a log entry of {need} sectors cannot fit in a "
                             f"{self.log_length // MiB} MiB log (at most "
                             f"{self.capacity_sectors}); use a larger log_size")
        zeros = sum(u.zero_length for u in updates if u.data is None)
        if zeros > MAX_REPLAY_ZERO_BYTES:
            raise ValueError(f"a log entry may zero at most {MAX_REPLAY_ZERO_BYTES // MiB} "
                             f"MiB (this one zeroes {zeros} bytes); split the write")

    # -- steps ----------------------------------------------------------------------------
    def flush_data(self) -> IOGen:
        self.on_step("flush-data")
        yield from self.io.flush()

    def append(self, updates: list[SectorUpdate]) -> IOGen:
        """Write one entry carrying ``updates`` (it becomes pending)."""
        need = entry_sector_count(updates)
        if need > self.free_sectors():
            yield from self.checkpoint()
        yield from self.publish_log_guid()
        blob = self.build_entry(updates)
        self.on_step("write-entry")
        yield from self.write_entry_sectors(blob)
        self.pending.append((self.write_pos, parse_entry_blob(blob)))
        self.write_pos = (self.write_pos + len(blob)) % self.log_length
        self.sequence += 1

    def publish_log_guid(self) -> IOGen:
        if self.headers.log_guid != ZERO_GUID:
            if self.pending:
                return  # later entries of the same sequence reuse the GUID
            raise LogBusy("LogGuid is set but no log entries are pending: the log must be "
                          "replayed or reset before writing (QEMU: -ENOTSUP)",
                          HEADER_SLOTS[self.headers.slot] + 48, "log-busy")
        self.on_step("publish-guid")
        yield from self.headers.update_both(self.io, log_guid=new_guid(self.headers.rng))

    def build_entry(self, updates: list[SectorUpdate]) -> bytes:
        tail = self.pending[0][0] if self.pending else self.write_pos
        size = self.io.size_bytes
        end = max((u.file_offset + (u.zero_length if u.data is None else LOG_SECTOR)
                   for u in updates), default=0)
        return build_log_entry(sequence_number=self.sequence, tail=tail,
                               log_guid=self.headers.log_guid, flushed_file_offset=size,
                               last_file_offset=max(size, end), updates=updates)

    def write_entry_sectors(self, blob: bytes) -> IOGen:
        """One write per 4 KiB log sector, no barrier between them (as QEMU)."""
        pos = self.write_pos
        for i in range(0, len(blob), LOG_SECTOR):
            yield from self.io.write(self.log_offset + pos, blob[i:i + LOG_SECTOR])
            pos = (pos + LOG_SECTOR) % self.log_length

    def flush_log(self) -> IOGen:
        self.on_step("flush-log")
        yield from self.io.flush()

    def checkpoint(self) -> IOGen:
        """Apply every pending entry in place, flush, and clear the LogGuid."""
        if not self.pending:
            return
        yield from self.flush_log()
        self.on_step("apply")
        for _, entry in self.pending:
            yield from apply_entry(self.io, entry)
        yield from self.extend_file()
        self.on_step("flush-applied")
        yield from self.io.flush()
        yield from self.clear_log_guid()
        self.pending.clear()
        self.read_pos = self.write_pos

    def extend_file(self) -> IOGen:
        lfo = max(e.header.last_file_offset for _, e in self.pending)
        if self.io.size_bytes < lfo:
            self.io.resize(round_up(lfo, MiB))
        return
        yield

    def clear_log_guid(self) -> IOGen:
        self.on_step("clear-guid")
        yield from self.headers.update_both(self.io, log_guid=ZERO_GUID)


def parse_entry_blob(blob: bytes) -> LogEntry:
    """The parsed form of an entry this writer built, for the in-place apply."""
    header = parse_log_entry_header(blob, 0)
    descs = parse_descriptors(blob, header, 0)
    start = header.descriptor_sectors * LOG_SECTOR
    datas = [blob[pos:pos + LOG_SECTOR] for pos in range(start, len(blob), LOG_SECTOR)]
    return LogEntry(header, descs, datas)


def log_write(dev: BlockDevice, offset: int, data: bytes, *,
              rng: random.Random | None = None, writer: LogWriter | None = None) -> IOGen:
    """One logged update of the file's bytes (a one-shot session).

    Without ``writer`` a session is opened: headers are read and a dirty log is replayed
    first (fixed policy), as an open would. Pass ``writer`` to continue a session
    (sequence numbers and log position carry on). Returns the LogWriter, to pass to the
    next call.
    """
    if writer is None:
        from .replay import FIXED_POLICY, replay  # replay builds on this module
        io = BlockIO(dev)
        headers = HeaderSession.load(io, rng)
        result = yield from replay(io, policy=FIXED_POLICY, headers=headers)
        writer = LogWriter(io, headers, sequence=result.next_sequence)
    yield from writer.log_write(offset, data)
    return writer
