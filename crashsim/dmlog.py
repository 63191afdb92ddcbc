"""dm-log-writes / QEMU blklogwrites logs: reading, writing, recording, and Traces.

This module owns the on-disk log format that Linux's dm-log-writes target and QEMU's
``blklogwrites`` block filter both write, and its conversion into a crashsim ``Trace``.

Format (all integers little-endian; facts from Linux ``drivers/md/dm-log-writes.c``,
QEMU ``block/blklogwrites.c`` and fstests ``src/log-writes/log-writes.c``):

- Sector 0 holds the super block {u64 magic 0x6a736677736872, u64 version 1,
  u64 nr_entries, u32 sectorsize}, zero padded to one sector.
- Then ``nr_entries`` entries, each a header sector {u64 sector, u64 nr_sectors,
  u64 flags, u64 data_len} followed by ``nr_sectors`` sectors of data. ``sector`` and
  ``nr_sectors`` count in the log's ``sectorsize``. DISCARD entries carry no data (their
  ``nr_sectors`` is the discarded range).
- Flags: FLUSH=1, FUA=2, DISCARD=4, MARK=8, METADATA=16 (Linux only: a REQ_META hint).
- MARK entries: Linux writes the text inline in the header sector, right after the
  32-byte header, with ``data_len`` = its length and ``nr_sectors`` = 0 (``log_mark`` and
  ``write_metadata``). QEMU never writes MARKs, but its own parser (and fstests') skips a
  header sector plus ``nr_sectors`` sectors for every non-DISCARD entry. This reader
  follows that rule for every entry, and reads a MARK's text from the header sector and
  then on into its data sectors, so both the Linux layout and a longer text spilled into
  ``nr_sectors`` sectors (what ``write_log`` does with text that does not fit) are read.
- QEMU updates ``nr_entries`` only when it logs a FLUSH (7.2; newer releases also every
  4096 entries); Linux on FUA, MARK and teardown. Bytes after the counted entries are
  reported as ``DmLog.trailing_bytes``, never parsed.

Which order the log is in (and why the serial step model is right for it):

- Linux logs a plain write only once a later flush covers it. At a flush's completion it
  appends every write that had completed before the flush was submitted, then the flush
  entry itself; a FUA write is appended at its completion. So the log order of the writes
  between two flush entries is not their submission order, and nothing orders them among
  themselves. ``to_trace`` turns each write into a submit+complete pair in log order and
  each flush into a flush pair. Crash points inside one such epoch give prefixes of it as
  pending sets; the crash point just before the flush completes has the whole epoch
  pending, and the crash-state enumeration takes every subset and tear of the pending
  writes. The union over the epoch is therefore exactly "all writes between two flushes
  unordered and pending together", with everything before the previous flush durable.
  What no log can give back: a write still in flight across a flush is logged after that
  flush, and a write logged after a FUA write in the same epoch may have completed before
  it; crashsim keeps the log's order there, which can only omit states, never invent one.
- A FLUSH-flagged entry with data is a REQ_PREFLUSH write: the cache flush happens before
  the write, and the entry is logged after the writes the flush covers. It becomes a
  flush pair followed by the write pair (FUA if also flagged, as journal commits are).
- QEMU logs each request after its own I/O on the file completed: completion order. It
  never sets FUA (the block layer emulates FUA with a flush, which is logged), and the
  file growth done by ``bdrv_truncate`` is not logged at all, so the replay target is the
  base image already extended to the final size (a resize recorded at step 0), which the
  caller must know (``final_size_bytes``, or ``DmLog.image_size_bytes`` from
  ``record_qemu``): the log alone cannot tell it.
- DISCARD becomes a write of zeros. On the replay targets here a discarded range reads
  as zeros (QEMU's file-posix punches a hole; fstests' replay-log falls back to writing
  zeros), and a discard that did not reach media leaves the old data, which is what an
  unflushed pending write that may or may not survive (or may tear) already models.
"""
from __future__ import annotations

import itertools
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

from .external import private_tempdir, run_checked
from .image import SparseImage
from .trace import Trace, Write

MAGIC = 0x6A736677736872
VERSION = 1
FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
KNOWN_FLAGS = FLUSH | FUA | DISCARD | MARK | METADATA
MAX_DISCARD_BYTES = 256 << 20

_SUPER = struct.Struct("<QQQI")
_ENTRY = struct.Struct("<QQQQ")
_FIX_RERECORD = ("re-record the log (create it empty before qemu-io starts) or copy it "
                 "again once the recording process has exited")
_FIX_NOT_A_LOG = ("check that the path names a dm-log-writes/blklogwrites log and not "
                  "the image")

Semantics = Literal["linux", "qemu"]


class DmLogError(Exception):
    """A truncated or corrupt log, or an entry the conversion cannot place."""

    def __init__(self, path: str | os.PathLike, entry_index: int | None, offset: int,
                 reason: str, fix: str = _FIX_RERECORD):
        self.path = os.fspath(path)
        self.entry_index = entry_index
        self.offset = offset
        self.reason = reason
        self.fix = fix
        where = "super block" if entry_index is None else f"entry {entry_index}"
        super().__init__(f"{self.path}: {where} at offset {offset:#x}: {reason}; {fix}")


@dataclass(frozen=True)
class LogEntry:
    sector: int  # in the log's sectorsize
    nr_sectors: int
    flags: int
    data: bytes = b""  # the written bytes; empty for flushes, discards and marks
    mark: str | None = None
    log_offset: int | None = None  # byte offset of the header in the log file, if read

    @property
    def is_flush(self) -> bool:
        return bool(self.flags & FLUSH)

    @property
    def is_fua(self) -> bool:
        return bool(self.flags & FUA)

    @property
    def is_discard(self) -> bool:
        return bool(self.flags & DISCARD)

    @property
    def is_mark(self) -> bool:
        return bool(self.flags & MARK)

    @property
    def is_write(self) -> bool:
        return bool(self.data) and not self.is_mark


@dataclass
class DmLog:
    path: str
    sectorsize: int
    entries: list[LogEntry] = field(default_factory=list)
    trailing_bytes: int = 0  # log bytes after the counted entries (never parsed)
    image_size_bytes: int | None = None  # recorded image's size after the run, if known

    @property
    def nr_entries(self) -> int:
        return len(self.entries)

    def byte_range(self, entry: LogEntry) -> tuple[int, int]:
        start = entry.sector * self.sectorsize
        return start, start + entry.nr_sectors * self.sectorsize


# -- building entries -------------------------------------------------------------------
def write_entry(sector: int, data: bytes, *, sectorsize: int = 512, fua: bool = False,
                flush: bool = False, metadata: bool = False) -> LogEntry:
    if not data or len(data) % sectorsize:
        raise ValueError(f"write data must be a non-empty multiple of {sectorsize} bytes, "
                         f"got {len(data)}")
    flags = (FUA if fua else 0) | (FLUSH if flush else 0) | (METADATA if metadata else 0)
    return LogEntry(sector, len(data) // sectorsize, flags, bytes(data))


def flush_entry() -> LogEntry:
    return LogEntry(0, 0, FLUSH)


def discard_entry(sector: int, nr_sectors: int) -> LogEntry:
    return LogEntry(sector, nr_sectors, DISCARD)


def mark_entry(text: str) -> LogEntry:
    return LogEntry(0, 0, MARK, mark=text)


# -- reading ----------------------------------------------------------------------------
def read_log(path: str | os.PathLike) -> DmLog:
    """Parse a whole log; ``DmLogError`` names the entry and offset of any damage."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        sectorsize, nr_entries = _read_super(f, path, size)
        log = DmLog(path, sectorsize)
        offset = sectorsize
        for index in range(nr_entries):
            entry, offset = _read_entry(f, path, index, offset, sectorsize, size)
            log.entries.append(entry)
    log.trailing_bytes = max(0, size - offset)
    return log


def _read_super(f, path: str, size: int) -> tuple[int, int]:
    if size == 0:
        raise DmLogError(path, None, 0, "the log is empty (QEMU writes the super block "
                         "only when it logs its first flush)")
    raw = f.read(_SUPER.size)
    if len(raw) < _SUPER.size:
        raise DmLogError(path, None, len(raw), f"super block truncated: the file is "
                         f"{size} bytes, the super block needs {_SUPER.size}")
    magic, version, nr_entries, sectorsize = _SUPER.unpack(raw)
    if magic != MAGIC:
        raise DmLogError(path, None, 0, f"bad magic {magic:#x}, expected {MAGIC:#x}",
                         _FIX_NOT_A_LOG)
    if version != VERSION:
        raise DmLogError(path, None, 8, f"unsupported version {version}, expected "
                         f"{VERSION}", _FIX_NOT_A_LOG)
    if sectorsize < 64 or sectorsize >= 1 << 24 or sectorsize & (sectorsize - 1):
        # QEMU accepts any power of two below 16 MiB; an entry header needs 32 bytes
        raise DmLogError(path, None, 24, f"sector size {sectorsize} is not a power of two "
                         "from 64 bytes to 8 MiB", _FIX_NOT_A_LOG)
    return sectorsize, nr_entries


def _read_entry(f, path: str, index: int, offset: int, sectorsize: int,
                size: int) -> tuple[LogEntry, int]:
    f.seek(offset)
    head = f.read(sectorsize)
    if len(head) < sectorsize:
        raise DmLogError(path, index, offset, f"entry header truncated: the file ends at "
                         f"{size:#x}, inside the header sector")
    sector, nr_sectors, flags, data_len = _ENTRY.unpack_from(head)
    _check_header(path, index, offset, head, flags, nr_sectors)
    n_data = 0 if flags & DISCARD else nr_sectors * sectorsize
    data_end = offset + sectorsize + n_data
    if data_end > size:
        raise DmLogError(path, index, offset, f"entry data truncated: {nr_sectors} "
                         f"sectors need the file to reach {data_end:#x}, it ends at "
                         f"{size:#x}")
    data = f.read(n_data)
    if flags & MARK:
        text = _mark_text(path, index, offset, head[_ENTRY.size:] + data, data_len)
        return LogEntry(sector, nr_sectors, flags, b"", text, offset), data_end
    return LogEntry(sector, nr_sectors, flags, data, None, offset), data_end


def _check_header(path: str, index: int, offset: int, head: bytes, flags: int,
                  nr_sectors: int) -> None:
    if flags & ~KNOWN_FLAGS:
        raise DmLogError(path, index, offset, f"unknown flag bits "
                         f"{flags & ~KNOWN_FLAGS:#x} in flags {flags:#x}", _FIX_NOT_A_LOG)
    if flags == 0 and nr_sectors == 0:
        # fstests' replay-log calls this "malformed" too: zeros where an entry should be
        raise DmLogError(path, index, offset, "all-zero entry header (no flags, no "
                         "sectors): the log was cut short or overwritten")
    if not flags & MARK and head.count(0, _ENTRY.size) != len(head) - _ENTRY.size:
        raise DmLogError(path, index, offset, "non-zero bytes in the padding after the "
                         "entry header", _FIX_NOT_A_LOG)


def _mark_text(path: str, index: int, offset: int, room: bytes, data_len: int) -> str:
    if data_len > len(room):
        raise DmLogError(path, index, offset, f"MARK text of {data_len} bytes does not "
                         f"fit in the {len(room)} bytes the entry has")
    return room[:data_len].split(b"\0", 1)[0].decode("utf-8", errors="replace")


# -- writing ----------------------------------------------------------------------------
def write_log(path: str | os.PathLike, entries: Iterable[LogEntry],
              sectorsize: int = 512) -> None:
    """Write a log in the common format (MARK text inline, as Linux writes it)."""
    entries = list(entries)
    with open(path, "wb") as f:
        f.write(_pad(_SUPER.pack(MAGIC, VERSION, len(entries), sectorsize), sectorsize))
        for entry in entries:
            f.write(_encode_entry(entry, sectorsize))


def _encode_entry(entry: LogEntry, sectorsize: int) -> bytes:
    if entry.is_mark:
        text = (entry.mark or "").encode()
        room = sectorsize - _ENTRY.size
        # Text longer than Linux's inline room spills into data sectors, which every
        # parser of the format skips by nr_sectors.
        extra = max(0, -(-(len(text) - room) // sectorsize))
        head = _ENTRY.pack(entry.sector, extra, entry.flags, len(text))
        return _pad(head + text, sectorsize * (1 + extra))
    n_data = 0 if entry.is_discard else entry.nr_sectors * sectorsize
    if len(entry.data) != n_data:
        raise ValueError(f"entry at sector {entry.sector} has {len(entry.data)} data bytes;"
                         f" its {entry.nr_sectors} sectors need {n_data}")
    head = _ENTRY.pack(entry.sector, entry.nr_sectors, entry.flags, 0)
    return _pad(head, sectorsize) + entry.data


def _pad(data: bytes, size: int) -> bytes:
    return data + bytes(size - len(data))


# -- conversion to a Trace -----------------------------------------------------------------
def to_trace(log: DmLog, base: SparseImage, semantics: Semantics = "linux",
             final_size_bytes: int | None = None, atomic_write_bytes: int = 512) -> Trace:
    """The log as a serial crashsim Trace over ``base`` (see the module docstring)."""
    if semantics not in ("linux", "qemu"):
        raise ValueError(f"semantics must be 'linux' or 'qemu', got {semantics!r}")
    size = _device_size(log, base, semantics, final_size_bytes)
    start = base.fork()
    trace = Trace(base=start, atomic_write_bytes=atomic_write_bytes)
    if size != base.size_bytes:
        start.resize(size)
        trace.resizes.append((0, size))
    io_ids = itertools.count()
    for index, entry in enumerate(log.entries):
        _add_entry(trace, log, index, entry, size, io_ids, semantics)
    return trace


def _device_size(log: DmLog, base: SparseImage, semantics: Semantics,
                 final_size_bytes: int | None) -> int:
    if final_size_bytes is not None:
        return final_size_bytes
    if semantics == "qemu":
        if log.image_size_bytes is not None:
            return log.image_size_bytes
        # The end of the last logged write is only a lower bound: QEMU truncates the file
        # to whole blocks it then writes in part, so a guessed length gives crash states
        # no real file held (recovery refuses them as truncated).
        raise ValueError(f"{log.path}: a blklogwrites log does not record the image "
                         f"file's growth; pass final_size_bytes: the image file's size "
                         f"after the recording")
    return base.size_bytes


def _add_entry(trace: Trace, log: DmLog, index: int, entry: LogEntry, size: int,
               io_ids, semantics: Semantics) -> None:
    if entry.is_mark:
        trace.marks.append((len(trace.steps), entry.mark or ""))
        return
    if entry.is_flush:  # a preflush precedes the entry's own data
        io_id = next(io_ids)
        trace.add_step("flush_submit", io_id)
        trace.add_step("flush_complete", io_id)
    data = _entry_payload(log, index, entry, size)
    if data:
        io_id = next(io_ids)
        offset = entry.sector * log.sectorsize
        fua = entry.is_fua and not entry.is_discard
        trace.writes[io_id] = Write(io_id, offset, data, fua)
        trace.add_step("write_submit", io_id)
        trace.add_step("write_complete", io_id)


def _entry_payload(log: DmLog, index: int, entry: LogEntry, size: int) -> bytes:
    start, end = log.byte_range(entry)
    if entry.is_discard:
        # Sectors past the device do not exist; a whole-device discard stays bounded.
        return _discard_zeros(log, index, entry, max(0, min(end, size) - start))
    if entry.data and end > size:
        raise DmLogError(log.path, index, entry.log_offset or 0,
                         f"write to {start:#x}..{end:#x} ends past the device size "
                         f"{size:#x}", "set final_size to the image's size after the "
                         "recording (e.g. stat -c %s)")
    return entry.data


def replay(log: DmLog, image: SparseImage, upto: int | None = None) -> SparseImage:
    """Apply entries [0, upto) to ``image`` in log order, as fstests' replay-log does."""
    for index, entry in enumerate(log.entries[:upto]):
        start, end = log.byte_range(entry)
        if entry.is_discard:
            n = max(0, min(end, image.size_bytes) - start)
            image.write(start, _discard_zeros(log, index, entry, n))
        elif entry.is_write:
            image.write(start, entry.data)
    return image


def _discard_zeros(log: DmLog, index: int, entry: LogEntry, length: int) -> bytes:
    """A discard becomes a write of zeros, held in memory: refuse one too large to hold
    (a damaged sector count, or a device far larger than a test image)."""
    if length > MAX_DISCARD_BYTES:
        raise DmLogError(log.path, index, entry.log_offset or 0,
                         f"discard of {length:#x} bytes is more than crashsim turns into "
                         f"zeros ({MAX_DISCARD_BYTES:#x})", "record on a smaller device, "
                         "or without discards (e.g. mkfs -E nodiscard)")
    return bytes(length)


# -- recording with QEMU ------------------------------------------------------------------
def image_opts(image_path: str | os.PathLike, log_path: str | os.PathLike,
               fmt: str = "vhdx") -> str:
    """``--image-opts`` for a format driver over blklogwrites (commas in paths doubled)."""
    image = os.fspath(image_path).replace(",", ",,")
    log = os.fspath(log_path).replace(",", ",,")
    return (f"driver={fmt},file.driver=blklogwrites,file.file.filename={image},"
            f"file.log.filename={log}")


def record_qemu(image_path: str | os.PathLike, log_path: str | os.PathLike,
                commands: Sequence[str], qemu_io: str = "qemu-io", timeout_s: float = 60,
                fmt: str = "vhdx") -> DmLog:
    """Run ``qemu-io -c CMD ...`` on the image through blklogwrites; return the log.

    ``CommandFailed`` if qemu-io fails or times out, ``ToolMissing`` if it is absent.
    """
    image_path, log_path = Path(image_path).resolve(), Path(log_path).resolve()
    if image_path == log_path:
        raise ValueError(f"{log_path}: the log path is the image itself; give another file")
    if not image_path.is_file():
        raise FileNotFoundError(f"{image_path}: image to record does not exist; create it "
                                "first (qemu-img create -f vhdx ...)")
    log_path.write_bytes(b"")  # blklogwrites opens the log, it never creates it
    argv = [qemu_io, "--image-opts", image_opts(image_path, log_path, fmt)]
    for command in commands:
        argv += ["-c", command]
    with private_tempdir("crashsim-qemu-io-") as cwd:
        run_checked(argv, timeout_s=timeout_s, cwd=cwd)
    log = read_log(log_path)
    log.image_size_bytes = image_path.stat().st_size
    return log
