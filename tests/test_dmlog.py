"""dm-log-writes / blklogwrites logs: format round trip, damage reports, Trace conversion,
and a real QEMU recording checked against vhdx-log-format.md §8."""
from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from crashsim.dmlog import (FLUSH, FUA, MARK, METADATA, DmLog, DmLogError,
                            LogEntry, discard_entry, flush_entry, mark_entry, read_log,
                            record_qemu, replay, to_trace, write_entry, write_log)
from crashsim.external import CommandFailed, ToolMissing
from crashsim.image import SparseImage

KiB, MiB = 1 << 10, 1 << 20
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le


def _linux_entries() -> list[LogEntry]:
    return [
        write_entry(0, b"\x11" * 512),
        write_entry(8, b"\x22" * 1024, metadata=True),
        flush_entry(),
        mark_entry("commit-1"),
        write_entry(16, b"\x33" * 512, fua=True),
        discard_entry(8, 2),
        write_entry(24, b"\x44" * 512, flush=True, fua=True),  # a journal commit block
        mark_entry("dm-log-writes-end"),
    ]


@pytest.fixture
def linux_log(tmp_path) -> Path:
    path = tmp_path / "linux.log"
    write_log(path, _linux_entries())
    return path


# -- format round trip --------------------------------------------------------------------
def test_linux_log_reads_back(linux_log):
    log = read_log(linux_log)
    assert (log.sectorsize, log.nr_entries, log.trailing_bytes) == (512, 8, 0)
    got = [(e.sector, e.nr_sectors, e.flags, e.data, e.mark) for e in log.entries]
    want = [(e.sector, e.nr_sectors, e.flags, e.data, e.mark) for e in _linux_entries()]
    assert got == want
    assert [e.log_offset for e in log.entries] == \
        [0x200, 0x600, 0xC00, 0xE00, 0x1000, 0x1400, 0x1600, 0x1A00]
    assert log.entries[1].flags == METADATA and log.entries[6].flags == FLUSH | FUA


def test_mark_text_is_inline_in_the_header_sector_as_linux_writes_it(linux_log):
    raw = linux_log.read_bytes()
    sector, nr_sectors, flags, data_len = struct.unpack_from("<QQQQ", raw, 0xE00)
    assert (sector, nr_sectors, flags, data_len) == (0, 0, MARK, len("commit-1"))
    assert raw[0xE00 + 32:0xE00 + 32 + data_len] == b"commit-1"


def test_long_mark_spills_into_data_sectors_and_reads_back(tmp_path):
    text = "m" * 700  # more than the 480 bytes a 512-byte header sector leaves
    write_log(tmp_path / "m.log", [mark_entry(text), write_entry(1, b"\x55" * 512)])
    log = read_log(tmp_path / "m.log")
    assert log.entries[0].mark == text and log.entries[0].nr_sectors == 1
    assert log.entries[1].data == b"\x55" * 512 and log.entries[1].log_offset == 0x600


def test_four_kib_sector_log(tmp_path):
    write_log(tmp_path / "4k.log", [write_entry(3, b"\x66" * 4096, sectorsize=4096),
                                    flush_entry()], sectorsize=4096)
    log = read_log(tmp_path / "4k.log")
    assert log.sectorsize == 4096 and log.byte_range(log.entries[0]) == (3 * 4096, 4 * 4096)
    trace = to_trace(log, SparseImage(64 * KiB))
    assert trace.writes[0].offset == 3 * 4096


# -- damage -------------------------------------------------------------------------------
def _damaged(tmp_path, linux_log, cut: int | None = None, patch=None) -> Path:
    raw = bytearray(linux_log.read_bytes())
    if patch:
        offset, data = patch
        raw[offset:offset + len(data)] = data
    path = tmp_path / "bad.log"
    path.write_bytes(bytes(raw[:cut] if cut is not None else raw))
    return path


def _error(path) -> DmLogError:
    with pytest.raises(DmLogError) as err:
        read_log(path)
    assert "\n" not in str(err.value)
    return err.value


def test_cut_inside_entry_data_names_entry_and_offset(tmp_path, linux_log):
    err = _error(_damaged(tmp_path, linux_log, cut=0xA00))  # entry 1's data is 0x800..0xC00
    assert (err.entry_index, err.offset) == (1, 0x600)
    assert str(err).startswith(f"{tmp_path / 'bad.log'}: entry 1 at offset 0x600: "
                               "entry data truncated")
    assert "; re-record the log" in str(err)


def test_cut_inside_entry_header(tmp_path, linux_log):
    err = _error(_damaged(tmp_path, linux_log, cut=0xC00 + 100))
    assert (err.entry_index, err.offset) == (2, 0xC00)
    assert "entry header truncated" in err.reason


def test_cut_inside_super_block(tmp_path, linux_log):
    err = _error(_damaged(tmp_path, linux_log, cut=20))
    assert err.entry_index is None
    assert f"{tmp_path / 'bad.log'}: super block at offset 0x14: super block truncated" \
        in str(err)


def test_empty_log(tmp_path):
    (tmp_path / "e.log").write_bytes(b"")
    assert "the log is empty" in _error(tmp_path / "e.log").reason


def test_bad_magic(tmp_path, linux_log):
    err = _error(_damaged(tmp_path, linux_log, patch=(0, b"VHDXFILE")))
    assert (err.entry_index, err.offset) == (None, 0)
    assert "bad magic 0x454c494658444856, expected 0x6a736677736872" in str(err)
    assert "not the image" in str(err)


def test_unknown_flags(tmp_path, linux_log):
    err = _error(_damaged(tmp_path, linux_log, patch=(0xC00 + 16, struct.pack("<Q", 0x101))))
    assert (err.entry_index, err.offset) == (2, 0xC00)
    assert "unknown flag bits 0x100" in err.reason


def test_all_zero_entry(tmp_path, linux_log):
    err = _error(_damaged(tmp_path, linux_log, patch=(0xC00, bytes(32))))
    assert (err.entry_index, err.offset) == (2, 0xC00)
    assert "all-zero entry header" in err.reason


# -- conversion ---------------------------------------------------------------------------
def test_linux_log_to_trace(linux_log):
    base = SparseImage(64 * KiB)
    trace = to_trace(read_log(linux_log), base, "linux")
    kinds = [(s.kind, s.io_id) for s in trace.steps]
    assert kinds == [
        ("write_submit", 0), ("write_complete", 0),
        ("write_submit", 1), ("write_complete", 1),
        ("flush_submit", 2), ("flush_complete", 2),
        ("write_submit", 3), ("write_complete", 3),       # FUA write
        ("write_submit", 4), ("write_complete", 4),       # discard as zeros
        ("flush_submit", 5), ("flush_complete", 5),       # the preflush comes first ...
        ("write_submit", 6), ("write_complete", 6),       # ... then the FUA data
    ]
    assert {i: (w.offset, len(w.data), w.fua) for i, w in trace.writes.items()} == {
        0: (0, 512, False), 1: (4096, 1024, False), 3: (8192, 512, True),
        4: (4096, 1024, False), 6: (12288, 512, True)}
    assert trace.writes[4].data == bytes(1024)
    assert trace.marks == [(6, "commit-1"), (14, "dm-log-writes-end")]
    assert trace.resizes == [] and trace.size_at(14) == 64 * KiB
    assert trace.tx_marks == []  # MARK text is the user's, not a transaction


def test_qemu_semantics_resize_first(tmp_path):
    write_log(tmp_path / "q.log", [write_entry(20, b"\x77" * 512), flush_entry()])
    log = read_log(tmp_path / "q.log")
    base = SparseImage(8 * KiB)
    trace = to_trace(log, base, "qemu", final_size_bytes=16 * KiB, atomic_write_bytes=4096)
    assert trace.resizes == [(0, 16 * KiB)] and trace.base.size_bytes == 16 * KiB
    assert base.size_bytes == 8 * KiB  # the caller's base is left alone
    assert trace.size_at(0) == 16 * KiB and trace.atomic_write_bytes == 4096
    assert [s.kind for s in trace.steps] == ["write_submit", "write_complete",
                                             "flush_submit", "flush_complete"]
    # the log never records the file's growth, so crashsim does not guess it
    with pytest.raises(ValueError, match="pass final_size_bytes: the image file's size"):
        to_trace(log, base, "qemu")


def test_write_past_the_device_is_reported(tmp_path):
    write_log(tmp_path / "q.log", [flush_entry(), write_entry(20, b"\x77" * 512)])
    with pytest.raises(DmLogError) as err:
        to_trace(read_log(tmp_path / "q.log"), SparseImage(8 * KiB), "linux")
    assert (err.value.entry_index, err.value.offset) == (1, 0x400)
    assert "set final_size to the image's size after the recording" in str(err.value)


def test_unknown_semantics(linux_log):
    with pytest.raises(ValueError, match="'linux' or 'qemu'"):
        to_trace(read_log(linux_log), SparseImage(64 * KiB), "windows")  # type: ignore


# -- a real recording ---------------------------------------------------------------------
def _bat_offset(image: Path) -> int:
    raw = image.read_bytes()[192 * KiB:256 * KiB]
    assert raw[:4] == b"regi"
    count = struct.unpack_from("<I", raw, 8)[0]
    for i in range(count):
        guid, offset = raw[16 + 32 * i:32 + 32 * i], struct.unpack_from("<Q", raw, 32 + 32 * i)
        if guid == BAT_GUID:
            return offset[0]
    raise AssertionError("no BAT region")


def _raw_digest(image: Path, tmp_path: Path) -> str:
    out = tmp_path / (image.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def recording(require_qemu, tmp_path):
    image, base = tmp_path / "d.vhdx", tmp_path / "base.vhdx"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o",
                    "block_size=1M,log_size=1M", str(image), "64M"], check=True)
    shutil.copyfile(image, base)
    log = record_qemu(image, tmp_path / "w.log",
                      ["write -P 0xab 0 64k", "write -P 0xcd 1M 64k"])
    return image, base, log


# One allocating write, as vhdx-log-format.md §8 tabulates it (entries 0..18).
HEADER, FLUSH_E, DATA, LOG, BAT = "header", "flush", "data", "log", "bat"
FIRST_WRITE = [HEADER, FLUSH_E, HEADER, FLUSH_E, DATA, FLUSH_E, HEADER, FLUSH_E, HEADER,
               FLUSH_E, LOG, LOG, FLUSH_E, BAT, FLUSH_E, HEADER, FLUSH_E, HEADER, FLUSH_E]
# The second one skips the DataWriteGuid update: the header was already changed once.
SECOND_WRITE = FIRST_WRITE[4:]


def _classify(log: DmLog, entry: LogEntry, bat: int, base_size: int) -> str:
    start, end = log.byte_range(entry)
    if entry.is_flush:
        assert not entry.data and entry.flags == FLUSH
        return FLUSH_E
    assert entry.flags == 0  # blklogwrites never logs FUA
    if start in (64 * KiB, 128 * KiB) and end - start == 512:
        return HEADER
    if 1 * MiB <= start and end <= 2 * MiB and end - start == 4 * KiB:
        return LOG
    if bat <= start < bat + MiB and end - start == 4 * KiB:
        return BAT
    assert start >= base_size and end - start == 64 * KiB
    return DATA


def test_recorded_allocating_writes_match_the_format_note(recording):
    image, base, log = recording
    bat, base_size = _bat_offset(base), base.stat().st_size
    assert log.nr_entries == len(FIRST_WRITE) + len(SECOND_WRITE) == 34
    assert log.trailing_bytes == 0 and log.image_size_bytes == image.stat().st_size
    kinds = [_classify(log, e, bat, base_size) for e in log.entries]
    assert kinds == FIRST_WRITE + SECOND_WRITE
    e = log.entries
    assert e[0].sector * 512 == 64 * KiB and e[2].sector * 512 == 128 * KiB
    assert e[4].data == b"\xab" * 64 * KiB and e[19].data == b"\xcd" * 64 * KiB
    assert e[10].data[:4] == b"loge" and e[11].data[:4] == b"data"  # the log entry
    assert log.byte_range(e[10])[0] == 1 * MiB
    assert log.byte_range(e[25])[0] == 1 * MiB + 8 * KiB  # the next entry of the session
    assert e[13].sector == e[28].sector  # both BAT entries live in the first BAT sector


def test_replaying_the_recorded_log_rebuilds_the_image(recording, tmp_path):
    image, base, log = recording
    trace = to_trace(log, SparseImage.from_file(base), "qemu")
    assert trace.resizes == [(0, image.stat().st_size)]
    assert sum(s.kind == "flush_complete" for s in trace.steps) == 9 + 7
    rebuilt = trace.base.fork()
    for step in trace.steps:
        if step.kind == "write_complete":
            w = trace.writes[step.io_id]
            rebuilt.write(w.offset, w.data)
    out = tmp_path / "rebuilt.vhdx"
    rebuilt.to_file(out)
    assert out.read_bytes() == image.read_bytes()
    assert _raw_digest(out, tmp_path) == _raw_digest(image, tmp_path)
    # the direct replay helper agrees
    direct = replay(log, SparseImage.from_file(base))
    direct.resize(image.stat().st_size)
    assert direct.content_key() == rebuilt.content_key()


def test_record_refuses_missing_image_and_same_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        record_qemu(tmp_path / "none.vhdx", tmp_path / "w.log", ["write 0 512"])
    (tmp_path / "d.vhdx").write_bytes(b"x")
    with pytest.raises(ValueError, match="the log path is the image itself"):
        record_qemu(tmp_path / "d.vhdx", tmp_path / "d.vhdx", ["write 0 512"])
    assert (tmp_path / "d.vhdx").read_bytes() == b"x"


def test_record_reports_a_failing_qemu_io(require_qemu, tmp_path):
    image = tmp_path / "d.vhdx"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", str(image), "8M"], check=True)
    with pytest.raises(CommandFailed, match="qemu-io exited with status 1: write failed"):
        record_qemu(image, tmp_path / "w.log", ["write -P 0xab 100M 64k"])
    with pytest.raises(ToolMissing, match="apt-get install -y qemu-utils"):
        record_qemu(image, tmp_path / "w.log", ["write 0 512"], qemu_io="qemu-io-missing")
