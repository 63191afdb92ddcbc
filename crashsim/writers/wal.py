"""A small redo write-ahead log: crashsim's second writer, of a different design from VHDX.

It proves the plugin API is not VHDX-shaped, and it is the example in the README.

On-disk layout (all little-endian, 512-byte records)::

    sector 0             superblock: b"CSWALSB1", u64 checkpoint_lsn, u64 log_pos,
                         u32 crc32c (log_pos: where the record after the checkpoint goes)
    [log_offset, +log)   append-only records, each starting on a 512-byte boundary:
                         redo:   b"REDO", u32 crc, u64 lsn, u64 target, u32 length, payload
                                 (the CRC covers the header only, as in jbd2 without
                                 journal checksums: the flush before the commit record
                                 is what makes the payload trustworthy)
                         commit: b"CMIT", u32 crc, u64 lsn (the lsn of the redo it commits)
    [data_offset, +size) the home locations: the "database" the log protects

A transaction: append redo, flush, append commit, flush, acknowledge, write home, flush,
advance the checkpoint (superblock write + flush). Recovery reads the superblock, scans
records from its log_pos for lsn = checkpoint+1, +2, ... and redoes each one whose
commit record is present and valid, stopping at the first gap. When the log is full,
the superblock is pointed back at the log's first sector (write + flush) and appending
starts over; records left behind carry lsns at or below the checkpoint.

Each defect switch is one realistic way to get this protocol wrong.
"""
from __future__ import annotations

import struct
from typing import Any, ClassVar

import crc32c

from ..blockdev import BlockDevice, IOGen
from ..image import SparseImage
from ..model import Op
from .base import ProbeFailed, Recovery, RecoveryError, TxReporter

SECTOR = 512
SB_MAGIC = b"CSWALSB1"
REDO, CMIT = b"REDO", b"CMIT"
_SB = struct.Struct("<8sQQI")
_REDO = struct.Struct("<4sIQQI")
_CMIT = struct.Struct("<4sIQ")


def _crc(blob: bytes) -> int:
    return crc32c.crc32c(blob)


def _pad(blob: bytes) -> bytes:
    return blob + bytes(-len(blob) % SECTOR)


class WalWriter:
    kind: ClassVar[str] = "wal"
    # Judging reads the image only through the device and is deterministic, so the
    # oracle may reuse a verdict for states that differ only where it never read.
    reads_through_device: ClassVar[bool] = True
    op_kinds: ClassVar[frozenset[str]] = frozenset({"log_write"})
    defects_available: ClassVar[dict[str, str]] = {
        "commit-before-data-flush": "the commit record is written without a flush "
                                    "after the redo record",
        "fua-commit-as-barrier": "the commit record is written with FUA instead of a "
                                 "flush, as if FUA ordered the earlier redo write",
        "ack-before-commit-flush": "the transaction is acknowledged before its commit "
                                   "record is flushed",
        "checkpoint-before-home-flush": "the checkpoint advances before the home writes "
                                        "are flushed",
        "home-before-commit": "the home location is written before the commit record "
                              "is durable",
        "replay-ignores-commit": "recovery redoes every redo record, committed or not",
    }

    def __init__(self, *, ops: list[Op], image: dict[str, Any], defects: list[str],
                 seed: int) -> None:
        self.ops = ops
        self.defects = frozenset(defects)
        self.data_bytes = image.get("virtual_size", 64 << 20)
        self.log_bytes = image.get("log_size", 1 << 20)
        self.log_offset = SECTOR
        self.data_offset = self.log_offset + self.log_bytes

    # -- format -------------------------------------------------------------------------
    def format_image(self) -> SparseImage:
        img = SparseImage(self.data_offset + self.data_bytes)
        img.write(0, self._superblock(0, 0))
        return img

    def _superblock(self, checkpoint_lsn: int, log_pos: int) -> bytes:
        head = _SB.pack(SB_MAGIC, checkpoint_lsn, log_pos, 0)
        return _pad(_SB.pack(SB_MAGIC, checkpoint_lsn, log_pos, _crc(head)))

    def _read_checkpoint(self, dev: BlockDevice) -> tuple[int, int]:
        magic, lsn, pos, crc = _SB.unpack(dev.read(0, _SB.size))
        if magic != SB_MAGIC or crc != _crc(_SB.pack(magic, lsn, pos, 0)):
            raise RecoveryError("superblock is not valid (bad magic or CRC)", 0)
        if pos % SECTOR or pos >= self.log_bytes:
            raise RecoveryError(f"superblock log position {pos:#x} is out of range", 0)
        return lsn, pos

    # -- the workload -------------------------------------------------------------------
    def run(self, dev: BlockDevice, tx: TxReporter) -> IOGen:
        session = _Session(self, *self._read_checkpoint(dev))
        for i, op in enumerate(self.ops):
            tx.start(i)
            yield from session.commit(dev, op.offset, op.data(), lambda i=i: tx.ack(i))

    # -- recovery -----------------------------------------------------------------------
    def recover(self, dev: BlockDevice) -> IOGen:
        rec = Recovery()
        checkpoint, start = self._read_checkpoint(dev)
        rec.decisions.append(f"superblock: checkpoint lsn {checkpoint}, log at {start:#x}")
        redo = list(self._scan(dev, checkpoint, start, rec))
        if not redo:
            rec.branches.append("clean")
            return rec
        for lsn, target, payload, _ in redo:
            yield from dev.write(self.data_offset + target, payload)
        yield from dev.flush()
        yield from dev.write(0, self._superblock(redo[-1][0], redo[-1][3]))
        yield from dev.flush()
        rec.branches.append("redo")
        rec.decisions.append(f"redid {len(redo)} record(s); checkpoint now {redo[-1][0]}")
        return rec

    def _scan(self, dev: BlockDevice, checkpoint: int, pos: int, rec: Recovery):
        want = checkpoint + 1
        while pos + SECTOR <= self.log_bytes:
            found = self._redo_at(dev, pos, want, rec)
            if found is None:
                return
            target, payload, size = found
            if not self._committed(dev, pos + size, want, rec):
                return
            pos += size + SECTOR
            yield want, target, payload, pos
            want += 1

    def _redo_at(self, dev: BlockDevice, pos: int, lsn: int, rec: Recovery):
        head = dev.read(self.log_offset + pos, _REDO.size)
        magic, crc, got_lsn, target, length = _REDO.unpack(head)
        if magic != REDO or got_lsn != lsn:
            rec.decisions.append(f"log+{pos:#x}: no redo record for lsn {lsn}: end of log")
            rec.branches.append("end-of-log")
            return None
        if length > self.log_bytes or target + length > self.data_bytes:
            rec.decisions.append(f"log+{pos:#x}: lsn {lsn} length/target out of range")
            rec.branches.append("record-out-of-range")
            return None
        if crc != _crc(_REDO.pack(magic, 0, got_lsn, target, length)):
            rec.decisions.append(f"log+{pos:#x}: lsn {lsn} redo header CRC mismatch")
            rec.branches.append("record-crc-mismatch")
            return None
        payload = dev.read(self.log_offset + pos + _REDO.size, length)
        return target, payload, len(_pad(head + payload))

    def _committed(self, dev: BlockDevice, pos: int, lsn: int, rec: Recovery) -> bool:
        if "replay-ignores-commit" in self.defects:
            return True
        magic, crc, got_lsn = _CMIT.unpack(dev.read(self.log_offset + pos, _CMIT.size))
        if magic == CMIT and got_lsn == lsn and crc == _crc(_CMIT.pack(magic, 0, lsn)):
            rec.decisions.append(f"log+{pos:#x}: lsn {lsn} committed: redo")
            return True
        rec.decisions.append(f"log+{pos:#x}: lsn {lsn} has no valid commit record: "
                             f"not redone")
        rec.branches.append("uncommitted-tail")
        return False

    # -- the user's view ----------------------------------------------------------------
    def view(self, dev: BlockDevice, ranges: list[tuple[int, int]]) -> bytes:
        return b"".join(dev.read(self.data_offset + off, n) for off, n in ranges)

    def check_structure(self, dev: BlockDevice) -> list[str]:
        try:
            checkpoint, pos = self._read_checkpoint(dev)
        except RecoveryError as exc:
            return [str(exc)]
        if list(self._scan(dev, checkpoint, pos, Recovery())):
            return ["committed records remain unapplied after recovery"]
        return []

    def probe(self, dev: BlockDevice) -> IOGen:
        try:
            session = _Session(self, *self._read_checkpoint(dev))
        except RecoveryError as exc:
            raise ProbeFailed(str(exc)) from None
        data = b"\x5a" * SECTOR
        yield from session.commit(dev, 0, data, lambda: None)
        if dev.read(self.data_offset, SECTOR) != data:
            raise ProbeFailed("probe transaction did not reach its home location")


class _Session:
    """The writer's in-memory state between transactions: next lsn and log position."""

    def __init__(self, wal: WalWriter, checkpoint: int, log_pos: int):
        self.wal = wal
        self.lsn = checkpoint
        self.pos = log_pos

    def commit(self, dev: BlockDevice, target: int, payload: bytes, ack) -> IOGen:
        w, d = self.wal, self.wal.defects
        self.lsn += 1
        redo_head = _REDO.pack(REDO, 0, self.lsn, target, len(payload))
        redo = _pad(_REDO.pack(REDO, _crc(redo_head), self.lsn, target,
                               len(payload)) + payload)
        if len(redo) + SECTOR > w.log_bytes:  # not even an empty log would hold it
            raise ValueError(f"a {len(payload)}-byte record does not fit the "
                             f"{w.log_bytes}-byte log")
        if self.pos + len(redo) + SECTOR > w.log_bytes:
            yield from self._restart_log(dev)
        cmit = _pad(_CMIT.pack(CMIT, _crc(_CMIT.pack(CMIT, 0, self.lsn)), self.lsn))
        yield from dev.write(w.log_offset + self.pos, redo)
        if "home-before-commit" in d:
            yield from dev.write(w.data_offset + target, payload)
        if not d & {"commit-before-data-flush", "fua-commit-as-barrier"}:
            yield from dev.flush()
        fua = "fua-commit-as-barrier" in d
        yield from dev.write(w.log_offset + self.pos + len(redo), cmit, fua=fua)
        if "ack-before-commit-flush" in d:
            ack()
        if not fua:
            yield from dev.flush()
        if "ack-before-commit-flush" not in d:
            ack()
        self.pos += len(redo) + SECTOR
        if "home-before-commit" not in d:
            yield from dev.write(w.data_offset + target, payload)
        if "checkpoint-before-home-flush" not in d:
            yield from dev.flush()
        yield from dev.write(0, w._superblock(self.lsn, self.pos))
        yield from dev.flush()

    def _restart_log(self, dev: BlockDevice) -> IOGen:
        # Every committed record is already home and checkpointed, so the log may
        # start over; stale records keep lsns at or below the checkpoint.
        if self.pos == 0:
            raise ValueError(f"a {self.wal.log_bytes}-byte log cannot hold one record")
        self.pos = 0
        yield from dev.write(0, self.wal._superblock(self.lsn - 1, 0))
        yield from dev.flush()
