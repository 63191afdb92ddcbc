"""Variants of the VHDX writer: the defect switches of ``vhdx`` and the other protocol kinds.

This module owns every deliberate departure from the fixed protocol:

* the wiring of the ``vhdx`` writer's defect switches (named and described in
  ``writer.py``, ``VhdxWriter.defects_available``). Each one is a realistic mistake,
  wired either by a ``LogWriter``/``VhdxDriver`` step override (``DefectLogWriter``,
  ``defect_driver_class``) or by flipping a ``ReplayPolicy`` field (``defect_policy``).
* ``VhdxQemuWriter`` (kind ``vhdx-qemu``): today's QEMU protocol recovered with QEMU's
  replay (quirks, LogGuid left set without entries), which gets stuck (format note §8).
* ``Vhdx2013Writer`` (kind ``vhdx-2013``): the log write of the 2013 patch review
  (shared/seed/vhdx-log-write-patch-review-2013.txt), its defects included.
"""
from __future__ import annotations

import dataclasses
import struct
from typing import ClassVar

from ...blockdev import IOGen
from .driver import Extent, VhdxDriver
from .format import (FULLY_PRESENT, LOG_SECTOR, ZERO_GUID, SectorUpdate, build_log_entry,
                     pack_bat_entry, round_up)
from .log import BlockIO, LogBusy, LogWriter, new_guid, parse_entry_blob
from .replay import QEMU_POLICY, ReplayPolicy
from .writer import VhdxWriter

DEFECTS = VhdxWriter.defects_available

# defects that are a flip of a replay policy field
_POLICY_FLIPS = {"replay-skips-checksum": {"verify_checksum": False}}


def defect_policy(base: ReplayPolicy, defects: frozenset[str]) -> ReplayPolicy:
    changes: dict[str, bool] = {}
    for name in sorted(defects & set(_POLICY_FLIPS)):
        changes.update(_POLICY_FLIPS[name])
    return dataclasses.replace(base, **changes) if changes else base


def zero_filled_updates(offset: int, data: bytes) -> list[SectorUpdate]:
    """The mistaken merge: bytes of a partial sector outside the write become zeros."""
    start = offset - offset % LOG_SECTOR
    end = round_up(offset + len(data), LOG_SECTOR)
    buf = bytearray(end - start)
    buf[offset - start:offset - start + len(data)] = data
    return [SectorUpdate(start + pos, bytes(buf[pos:pos + LOG_SECTOR]))
            for pos in range(0, len(buf), LOG_SECTOR)]


class DefectLogWriter(LogWriter):
    """``LogWriter`` with the log-side defects of ``defects`` switched on."""

    defects: ClassVar[frozenset[str]] = frozenset()
    _late = False  # guid-after-apply: True while the late LogGuid publish runs

    def updates_for(self, offset: int, data: bytes) -> list[SectorUpdate]:
        if "bad-partial-merge" in self.defects:
            return zero_filled_updates(offset, data)
        return super().updates_for(offset, data)

    def before_log(self, updates: list[SectorUpdate]) -> IOGen:
        if "apply-before-log" in self.defects:
            for u in updates:  # the update in place first, as if the log were a formality
                yield from self.io.write(u.file_offset, u.data or bytes(u.zero_length))

    def publish_log_guid(self) -> IOGen:
        if "guid-after-apply" in self.defects and not self._late:
            return
        yield from super().publish_log_guid()

    def write_entry_sectors(self, blob: bytes) -> IOGen:
        if "fua-as-barrier" not in self.defects:
            yield from super().write_entry_sectors(blob)
            return
        pos = self.write_pos
        last = len(blob) - LOG_SECTOR
        for i in range(0, len(blob), LOG_SECTOR):
            self.io.dirty = True
            yield from self.io.dev.write(self.log_offset + pos, blob[i:i + LOG_SECTOR],
                                         fua=i == last)
            pos = (pos + LOG_SECTOR) % self.log_length
        self.io.dirty = False  # the FUA is taken as the barrier: no flush follows

    def flush_log(self) -> IOGen:
        if self.defects & {"no-flush-after-log", "fua-as-barrier"}:
            return
        yield from super().flush_log()

    def checkpoint(self) -> IOGen:
        if not self.pending:
            return
        if "no-apply" in self.defects:
            yield from self.io.flush()
            yield from self.clear_log_guid()
            self._done()
            return
        if self.defects & {"clear-guid-before-apply-flush", "guid-after-apply"}:
            yield from self._unsynced_checkpoint()
            return
        yield from super().checkpoint()

    def _unsynced_checkpoint(self) -> IOGen:
        for _, entry in self.pending:
            for file_offset, what in entry.writes():
                blob = what if isinstance(what, bytes) else bytes(what)
                yield from self.io.write(file_offset, blob)
        yield from self.extend_file()
        if "guid-after-apply" in self.defects:
            self._late = True
            yield from self.publish_log_guid()
            self._late = False
            yield from self.io.flush()
        yield from self.clear_log_guid()
        yield from self.io.flush()
        self._done()

    def _done(self) -> None:
        self.pending.clear()
        self.read_pos = self.write_pos


class DefectDriver(VhdxDriver):
    """``VhdxDriver`` with the driver-side defects of ``defects`` switched on."""

    defects: ClassVar[frozenset[str]] = frozenset()

    def allocate_and_write(self, ext: Extent, piece: bytes) -> IOGen:
        if "bat-before-data" not in self.defects:
            yield from super().allocate_and_write(ext, piece)
            return
        new_offset = self.allocate_block()
        idx = self.bat_index_of(ext.block)
        entry = pack_bat_entry(FULLY_PRESENT, new_offset)
        self.bat[idx] = entry
        yield from self.log.log_write(self.bat_entry_offset(idx), struct.pack("<Q", entry))
        yield from self.write_data(new_offset + ext.block_offset, piece)


def defect_driver_class(defects: frozenset[str]) -> type[VhdxDriver]:
    """A driver class whose steps carry ``defects`` (the plain driver when empty)."""
    if not defects:
        return VhdxDriver
    log_cls = type("DefectLogWriter", (DefectLogWriter,), {"defects": defects})
    return type("DefectDriver", (DefectDriver,),
                {"defects": defects, "log_writer_class": log_cls})


class VhdxQemuWriter(VhdxWriter):
    """Today's QEMU protocol and QEMU's recovery: a LogGuid left set without entries
    stays set, so the next logged write is refused (-ENOTSUP) and the image is stuck."""

    kind: ClassVar[str] = "vhdx-qemu"
    recovery_policy: ClassVar[ReplayPolicy] = QEMU_POLICY


# -- vhdx-2013: the log write of the 2013 patch review, defects included ------------------
class EntryLost(ValueError):
    """The 2013 log write returned an error after writing part or all of its entry."""


def merge_2013(io: BlockIO, offset: int, data: bytes) -> list[SectorUpdate]:
    """The patch's sector split, bugs kept: every sector is a data sector, and the
    trailing partial sector reads the file from the sector's *start* into the bytes after
    the new data (``bdrv_pread(file_offset, merged + trailing, 4096 - trailing)``), so
    the rest of that sector shifts by ``trailing`` bytes."""
    sector_offset = offset % LOG_SECTOR
    file_offset = offset - sector_offset
    length = len(data)
    leading = min(LOG_SECTOR - sector_offset, length) if sector_offset else 0
    aligned = length - leading
    sectors, trailing = divmod(aligned, LOG_SECTOR)
    count = sectors + (1 if leading else 0) + (1 if trailing else 0)
    out, pos = [], 0
    for i in range(count):
        if i == 0 and leading:
            merged = bytearray(io.read(file_offset, LOG_SECTOR))
            merged[sector_offset:sector_offset + leading] = data[:leading]
            n = leading
        elif i == count - 1 and trailing:
            merged = bytearray(data[pos:pos + trailing])
            merged += io.read(file_offset, LOG_SECTOR - trailing)
            n = trailing
        else:
            merged, n = bytearray(data[pos:pos + LOG_SECTOR]), LOG_SECTOR
        out.append(SectorUpdate(file_offset, bytes(merged)))
        pos += n
        file_offset += LOG_SECTOR
    return out


class Log2013Writer(LogWriter):
    """``vhdx_log_write_and_flush`` as posted for review on 2013-07-24.

    Kept from the seed: no flush before the entry; a set LogGuid sets -ENOTSUP but falls
    through (the next ``bdrv_pread`` of a partial sector overwrites ``ret``); Tail is the
    session's ``log.tail`` (the end of the previous entry, 0 after open); Flushed- and
    LastFileOffset are the file length; each log sector is ``bdrv_pwrite_sync`` (write +
    flush); a full log stops the write part-way and the error is returned only after
    the partial entry is on disk; ``vhdx_log_write_sectors``' own error is ignored.
    Taken from QEMU of that time where the seed stops: ``vhdx_log_flush`` applies each
    sector with ``bdrv_pwrite_sync``, flushes, then clears LogGuid (``LogWriter.
    checkpoint``); positions start at 0 on open.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tail = 0

    def log_write(self, offset: int, data: bytes) -> IOGen:
        if len(data) > self.log_length:
            raise EntryLost(f"log write of {len(data)} bytes exceeds the log (-EINVAL)")
        ret_enotsup = False
        if self.headers.log_guid == ZERO_GUID:
            yield from self.headers.update_both(self.io, log_guid=new_guid(self.headers.rng))
        else:
            ret_enotsup = True  # -ENOTSUP, but no goto: the write goes on
        updates = merge_2013(self.io, offset, data)
        if offset % LOG_SECTOR or len(data) % LOG_SECTOR:
            ret_enotsup = False  # the partial sector's bdrv_pread overwrote ret
        blob = build_log_entry(sequence_number=self.sequence, tail=self.tail,
                               log_guid=self.headers.log_guid,
                               flushed_file_offset=self.io.size_bytes,
                               last_file_offset=self.io.size_bytes, updates=updates)
        yield from self.headers.user_visible_write(self.io)
        written = yield from self._write_sectors(blob)
        if ret_enotsup:
            raise LogBusy("LogGuid was set: the entry was written, then -ENOTSUP",
                          0, "log-busy")
        if written != len(blob) // LOG_SECTOR:
            raise EntryLost(f"log full after {written} of {len(blob) // LOG_SECTOR} "
                            f"sectors (-EINVAL, the partial entry stays in the log)")
        self.pending.append((self.write_pos, parse_entry_blob(blob)))
        self.sequence += 1
        self.tail = self.write_pos
        yield from self.checkpoint()

    def _write_sectors(self, blob: bytes) -> IOGen:
        """vhdx_log_write_sectors: write+flush per sector, stop when the log is full."""
        written, write = 0, self.write_pos
        for i in range(0, len(blob), LOG_SECTOR):
            offset = self.log_offset + write
            nxt = (write + LOG_SECTOR) % self.log_length
            if nxt == self.read_pos:
                break  # full
            yield from self.io.write_sync(offset, blob[i:i + LOG_SECTOR])
            write = self.write_pos = nxt
            written += 1
        return written


class Vhdx2013Driver(VhdxDriver):
    log_writer_class = Log2013Writer


class Vhdx2013Writer(VhdxWriter):
    """The 2013 patch's log write under QEMU's recovery of the time (quirks; a LogGuid
    left set without entries stays set)."""

    kind: ClassVar[str] = "vhdx-2013"
    recovery_policy: ClassVar[ReplayPolicy] = QEMU_POLICY
    driver_class: ClassVar[type[VhdxDriver]] = Vhdx2013Driver
