"""crashsim's VHDX against QEMU 7.2 (qemu-img, qemu-io), the real samples, and the CLI.

Large images stay sparse: raw conversions are compared extent by extent (SEEK_DATA),
never read whole.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crashsim import vhdx_cli
from crashsim.blockdev import FileDevice, run_sync
from crashsim.model import Op
from crashsim.writers.vhdx import format as f
from crashsim.writers.vhdx.create import create_image
from crashsim.writers.vhdx.driver import VhdxDriver

MiB = f.MiB
GiB = 1 << 30
REPO = Path(__file__).resolve().parents[1]


class Stop(Exception):
    """A modelled crash at a chosen protocol step."""


# -- helpers ------------------------------------------------------------------------------
def _qemu(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "crashsim.vhdx_cli", "vhdx", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def _cli_in_process(*args: str) -> int:
    return vhdx_cli.main(["vhdx", *args])


def _extents(path: Path) -> list[tuple[int, int]]:
    size = path.stat().st_size
    out, pos = [], 0
    with open(path, "rb") as fh:
        fd = fh.fileno()
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    return out


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(length)
    return data + bytes(length - len(data))


def _expected(ops: list[Op], offset: int, length: int) -> bytes:
    buf = bytearray(length)
    for op in ops:
        lo, hi = max(offset, op.offset), min(offset + length, op.offset + op.length)
        if lo < hi:
            buf[lo - offset:hi - offset] = bytes([op.pattern]) * (hi - lo)
    return bytes(buf)


def assert_raw_matches_ops(raw: Path, size: int, ops: list[Op]) -> None:
    """``raw`` equals the flat model of ``ops`` over a zeroed disk of ``size`` bytes."""
    assert raw.stat().st_size == size
    for op in ops:
        assert _read(raw, op.offset, op.length) == _expected(ops, op.offset, op.length), \
            f"op at {op.offset:#x}"
    for start, end in _extents(raw):
        for pos in range(start, end, 8 * MiB):
            n = min(8 * MiB, end - pos)
            assert _read(raw, pos, n) == _expected(ops, pos, n), f"extent at {pos:#x}"


def assert_same_raw(a: Path, b: Path) -> None:
    assert a.stat().st_size == b.stat().st_size
    for start, end in sorted(set(_extents(a)) | set(_extents(b))):
        for pos in range(start, end, 8 * MiB):
            n = min(8 * MiB, end - pos)
            assert _read(a, pos, n) == _read(b, pos, n), f"differ in [{pos:#x}, +{n:#x})"


def _check_clean(path: Path) -> None:
    res = _qemu("qemu-img", "check", str(path), check=False)
    assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout + res.stderr


def _convert(path: Path, out: Path) -> Path:
    _qemu("qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(path), str(out))
    return out


def _crashsim_read(path: Path, out: Path) -> Path:
    assert _cli_in_process("read", str(path), "-o", str(out)) == 0
    return out


def _write_ops(path: Path, ops: list[Op], seed: int = 2) -> VhdxDriver:
    with FileDevice(path) as dev:
        drv = VhdxDriver(random.Random(seed))
        run_sync(drv.open(dev))
        for op in ops:
            run_sync(drv.write(op.offset, op.data()))
        run_sync(drv.flush())
    return drv


def _varied_ops() -> list[Op]:
    picked = [(0, 65536), (65536, 4096), (MiB - 4096, 8192), (511 * MiB, 65536),
              (512 * MiB, 4096), (512 * MiB - 512, 1024), (513 * MiB + 1536, 3072),
              (GiB - 4096, 4096), (200 * MiB + 512, 2 * MiB), (3 * MiB + 4096, 512)]
    rng = random.Random(11)
    for _ in range(14):
        length = rng.randrange(1, 129) * 512
        picked.append((rng.randrange(0, (GiB - length) // 512) * 512, length))
    return [Op("guest_write", off, n, 1 + i * 7 % 254) for i, (off, n) in enumerate(picked)]


# -- 1. crashsim writes, QEMU reads -------------------------------------------------------
def test_crashsim_written_image_passes_qemu_check_and_converts(require_qemu, tmp_path):
    img = tmp_path / "a.vhdx"
    create_image(GiB, rng=random.Random(1)).to_file(img)
    _check_clean(img)
    info = json.loads(_qemu("qemu-img", "info", "--output=json", str(img)).stdout)
    assert info["virtual-size"] == GiB and info["format"] == "vhdx"
    ops = _varied_ops()
    assert len(ops) >= 20
    drv = _write_ops(img, ops)
    assert drv.bat_index_of(512) == 512 and f.unpack_bat_entry(drv.bat[512])[0] == 6
    _check_clean(img)
    assert_raw_matches_ops(_convert(img, tmp_path / "a.raw"), GiB, ops)


def test_bat_entries_past_the_first_chunk(require_qemu, tmp_path):
    """With 1 MiB blocks, BAT entry 4096 is a sector bitmap: block 4096 is entry 4097 and
    block 4607 opens BAT sector 9 (entry 4608)."""
    img = tmp_path / "b.vhdx"
    size = 5 * GiB
    create_image(size, rng=random.Random(1)).to_file(img)
    ops = [Op("guest_write", 4095 * MiB + MiB // 2, MiB, 0x61),
           Op("guest_write", 4607 * MiB, 4096, 0x62),
           Op("guest_write", size - 512, 512, 0x63)]
    drv = _write_ops(img, ops)
    assert [drv.bat_index_of(b) for b in (4095, 4096, 4607)] == [4095, 4097, 4608]
    _check_clean(img)
    assert_raw_matches_ops(_convert(img, tmp_path / "b.raw"), size, ops)


# -- 2. QEMU writes, crashsim reads ----------------------------------------------------------
def test_qemu_io_written_image_reads_the_same_through_crashsim(require_qemu, tmp_path):
    img = tmp_path / "q.vhdx"
    _qemu("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M,log_size=1M",
          str(img), "1G")
    _qemu("qemu-io", "-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 512M 4k",
          "-c", "write -P 0xef 1048064 1024", "-c", "write -P 0x12 700M 3M", str(img))
    assert_same_raw(_crashsim_read(img, tmp_path / "c.raw"), _convert(img, tmp_path / "q.raw"))
    # and crashsim's own driver can continue writing QEMU's image
    ops = [Op("guest_write", 5 * MiB, 8192, 0x77)]
    assert _cli_in_process("write", str(img), str(5 * MiB), "8192", "--pattern", "0x77") == 0
    _check_clean(img)
    raw = _convert(img, tmp_path / "q2.raw")
    assert _read(raw, 5 * MiB, 8192) == ops[0].data()
    assert _read(raw, 0, 4) == b"\xab" * 4


def test_read_to_stdout_streams_the_virtual_disk(require_qemu, tmp_path):
    img = tmp_path / "s.vhdx"
    assert _cli_in_process("create", str(img), "--size", "8MiB", "--seed", "3") == 0
    assert _cli_in_process("write", str(img), "1MiB", "3KiB", "--pattern", "0x5a") == 0
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "crashsim.vhdx_cli", "vhdx", "read",
                          str(img)], capture_output=True, env=env, check=True).stdout
    qemu = _convert(img, tmp_path / "s.raw").read_bytes()
    assert out == qemu and out[MiB:MiB + 3072] == b"\x5a" * 3072


# -- 3. the real samples --------------------------------------------------------------------
def test_samples_parse_with_info_and_log(sample, capsys):
    for name in ("iotest-dirtylog-10G-4M.vhdx", "iotest-dynamic-1G.vhdx",
                 "test-disk2vhd.vhdx"):
        path = sample(name)
        assert _cli_in_process("info", str(path)) == 0
        assert _cli_in_process("log", str(path)) == 0
    out = capsys.readouterr().out
    assert "creator:  Microsoft Windows 6.2.9200.16384" in out
    assert "Disk2VHD" in out and "creator:  d2v" in out
    assert "dirty: 1 entry replayed in memory" in out
    assert "sequence log+0xc000..log+0xc000 (seq 7..7, 1 entries): ACTIVE" in out


def test_hyperv_sample_stale_entries_are_inactive_with_reason(sample, capsys):
    path = sample("iotest-dynamic-1G.vhdx")
    assert _cli_in_process("log", str(path)) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("log+")]
    assert len(lines) == 2
    for ln in lines:
        assert ": inactive: the header's LogGuid is zero (no active log)" in ln
    assert "seq 4371089312299158168" in lines[1] and "FlushedFileOffset 0x0" in lines[1]


def test_dirty_sample_replays_like_qemu(require_qemu, sample, tmp_path):
    path = sample("iotest-dirtylog-10G-4M.vhdx")
    ours = _crashsim_read(path, tmp_path / "ours.raw")
    key = path.read_bytes()[:4 * MiB]  # the read replayed in memory only
    theirs = tmp_path / "theirs.vhdx"
    shutil.copy(path, theirs)
    res = _qemu("qemu-img", "check", "-r", "all", str(theirs), check=False)
    assert res.returncode == 0 and "1 corruptions" in res.stdout
    assert_same_raw(ours, _convert(theirs, tmp_path / "theirs.raw"))
    assert path.read_bytes()[:4 * MiB] == key


@pytest.mark.parametrize("name", ["iotest-dynamic-1G.vhdx", "test-disk2vhd.vhdx"])
def test_clean_samples_read_like_qemu(require_qemu, sample, tmp_path, name):
    path = sample(name)
    assert_same_raw(_crashsim_read(path, tmp_path / "ours.raw"),
                    _convert(path, tmp_path / "theirs.raw"))


# -- 4. a crash between the log flush and the in-place apply --------------------------------
class CrashBeforeApply(VhdxDriver):
    """Stops the allocating write once its log entry is durable, before the BAT apply."""

    def make_log_writer(self, sequence):
        writer = super().make_log_writer(sequence)

        def hook(step: str) -> None:
            if step == "apply":
                raise Stop
        writer.on_step = hook
        return writer


def test_crash_after_log_flush_replays_the_same_under_qemu_and_crashsim(require_qemu,
                                                                         tmp_path):
    img = tmp_path / "d.vhdx"
    create_image(GiB, rng=random.Random(1)).to_file(img)
    ops = [Op("guest_write", 0, 65536, 0x11), Op("guest_write", 512 * MiB, 8192, 0x22)]
    _write_ops(img, ops)
    crash = Op("guest_write", 300 * MiB, 16384, 0x33)
    with FileDevice(img) as dev:
        drv = CrashBeforeApply(random.Random(5))
        run_sync(drv.open(dev))
        with pytest.raises(Stop):
            run_sync(drv.write(crash.offset, crash.data()))
    res = _qemu("qemu-img", "info", str(img), check=False)
    assert res.returncode != 0 and "needs to be replayed" in res.stderr  # really dirty
    ours = _crashsim_read(img, tmp_path / "ours.raw")
    theirs = tmp_path / "theirs.vhdx"
    shutil.copy(img, theirs)
    assert "1 corruptions" in _qemu("qemu-img", "check", "-r", "all", str(theirs)).stdout
    qraw = _convert(theirs, tmp_path / "theirs.raw")
    assert_same_raw(ours, qraw)
    assert_raw_matches_ops(qraw, GiB, ops + [crash])  # the durable entry wins: "new"


def test_guid_published_without_entry_stalls_qemu_but_not_crashsim(require_qemu, tmp_path):
    img = tmp_path / "e.vhdx"
    create_image(64 * MiB, rng=random.Random(1)).to_file(img)

    class CrashAfterGuid(VhdxDriver):
        def make_log_writer(self, sequence):
            writer = super().make_log_writer(sequence)

            def hook(step: str) -> None:
                if step == "write-entry":
                    raise Stop
            writer.on_step = hook
            return writer

    with FileDevice(img) as dev:
        drv = CrashAfterGuid(random.Random(2))
        run_sync(drv.open(dev))
        with pytest.raises(Stop):
            run_sync(drv.write(0, b"\x01" * 4096))
    _check_clean(img)  # QEMU sees nothing wrong ...
    res = _qemu("qemu-io", "-c", "write -P 0x02 8M 4k", str(img), check=False)
    assert "Operation not supported" in res.stdout + res.stderr  # ... but is stuck
    assert _cli_in_process("write", str(img), "8MiB", "4KiB", "--pattern", "2") == 0
    _check_clean(img)
    res = _qemu("qemu-io", "-c", "write -P 0x03 9M 4k", str(img), check=False)
    assert res.returncode == 0 and "Operation not supported" not in res.stdout + res.stderr
    raw = _convert(img, tmp_path / "e.raw")
    assert _read(raw, 8 * MiB, 4096) == b"\x02" * 4096
    assert _read(raw, 9 * MiB, 4096) == b"\x03" * 4096


# -- CLI: create, replay, and bad input ---------------------------------------------------------
def test_cli_create_matches_qemu_info(require_qemu, tmp_path):
    img = tmp_path / "n.vhdx"
    assert _cli_in_process("create", str(img), "--size", "1GiB", "--block-size", "2MiB",
                           "--log-size", "2MiB") == 0
    _check_clean(img)
    info = json.loads(_qemu("qemu-img", "info", "--output=json", str(img)).stdout)
    assert info["virtual-size"] == GiB and info["cluster-size"] == 2 * MiB


def test_cli_replay_in_memory_then_in_place(tmp_path, capsys):
    img = tmp_path / "r.vhdx"
    create_image(64 * MiB, rng=random.Random(1)).to_file(img)
    with FileDevice(img) as dev:
        drv = CrashBeforeApply(random.Random(5))
        run_sync(drv.open(dev))
        with pytest.raises(Stop):
            run_sync(drv.write(0, b"\x09" * 4096))
    before = img.read_bytes()
    assert _cli_in_process("replay", str(img)) == 0
    out = capsys.readouterr().out
    assert "entry seq 1 valid" in out and "branches: replayed" in out
    assert img.read_bytes() == before
    assert _cli_in_process("replay", str(img), "--in-place") == 0
    assert img.read_bytes() != before
    assert _cli_in_process("replay", str(img)) == 0
    assert "branches: clean" in capsys.readouterr().out


def _one_line_error(res: subprocess.CompletedProcess, path: Path, text: str) -> None:
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"crashsim: error: {path}: ") and text in lines[0]


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a disk image" * 1000)
    _one_line_error(_cli("info", str(junk)), junk, "not a VHDX file")
    good = tmp_path / "good.vhdx"
    create_image(64 * MiB, rng=random.Random(1)).to_file(good)
    short = tmp_path / "short.vhdx"
    short.write_bytes(good.read_bytes()[:100_000])
    _one_line_error(_cli("log", str(short)), short, "truncated")
    cut = tmp_path / "cut.vhdx"
    cut.write_bytes(good.read_bytes()[:3 * MiB])
    _one_line_error(_cli("read", str(cut), "-o", str(tmp_path / "x")), cut,
                    "beyond the end of the file")
    _one_line_error(_cli("create", str(tmp_path / "n.vhdx"), "--size", "12 parsecs"),
                    tmp_path / "n.vhdx", "bad --size")
    _one_line_error(_cli("create", str(tmp_path / "n.vhdx"), "--size=-1GiB"),
                    tmp_path / "n.vhdx", "bad --size")
    missing = tmp_path / "missing.vhdx"
    _one_line_error(_cli("info", str(missing)), missing, "no such file")
    _one_line_error(_cli("write", str(good), "1GiB", "4KiB"), good, "outside")
    assert "(at offset 0x" in _cli("info", str(junk)).stderr


def test_cli_refuses_a_pipe_and_a_symlink_loop_by_what_they_are(tmp_path):
    fifo = tmp_path / "disk.vhdx"
    os.mkfifo(fifo)  # with no writer, the open waited forever; a pipe with one read as
    _one_line_error(_cli("info", str(fifo)), fifo, "not a regular file")  # "empty"
    loop = tmp_path / "loop.vhdx"
    loop.symlink_to(loop)  # was "no such file", though the link is there
    _one_line_error(_cli("log", str(loop)), loop, "cannot open: ")


def test_cli_read_output_errors_name_the_output_file(tmp_path):
    good = tmp_path / "good.vhdx"
    create_image(8 * MiB, rng=random.Random(1)).to_file(good)
    before = good.read_bytes()
    missing = tmp_path / "nonexist" / "x.raw"
    _one_line_error(_cli("read", str(good), "-o", str(missing)), missing,
                    "cannot create the output file: No such file or directory")
    _one_line_error(_cli("read", str(good), "-o", str(tmp_path)), tmp_path,
                    "cannot create the output file: Is a directory")
    if os.path.exists("/dev/full"):  # a write that fails after the open succeeded
        _one_line_error(_cli("read", str(good), "-o", "/dev/full"), Path("/dev/full"),
                        "cannot write the output file: ")
    # -o the image itself would truncate the image before reading it
    _one_line_error(_cli("read", str(good), "-o", str(good)), good,
                    "the output file is the image being read")
    assert good.read_bytes() == before
    assert _cli_in_process("read", str(good), "-o", str(tmp_path / "ok.raw")) == 0
    assert (tmp_path / "ok.raw").stat().st_size == 8 * MiB
