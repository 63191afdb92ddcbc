"""Regression tests for what ``crashsim fuzz`` found: each builds the crashing input from
an image (or log, or scenario) crashsim makes plus the exact mutation the campaign
recorded, and asserts the clean, documented error that replaced the crash."""
from __future__ import annotations

import functools
import random
import struct
import time
import uuid

import pytest

from crashsim import fuzz
from crashsim.blockdev import ImageDevice, run_sync
from crashsim.cli import main
from crashsim.dmlog import DmLogError, discard_entry, flush_entry, read_log, to_trace
from crashsim.dmlog import replay as dmlog_replay
from crashsim.dmlog import write_entry, write_log
from crashsim.image import SparseImage
from crashsim.model import Op, RangeModel
from crashsim.oracle import Judge
from crashsim.scenario import ScenarioError, load_scenario
from crashsim.writers.base import ProbeFailed, RecoveryError
from crashsim.writers.vhdx import format as vf
from crashsim.writers.vhdx.create import create_image
from crashsim.writers.vhdx.driver import VhdxDriver
from crashsim.writers.vhdx.log import BlockIO, HeaderSession, LogBusy, LogWriter
from crashsim.writers.vhdx.replay import FIXED_POLICY, QEMU_POLICY, ReplayPolicy, replay
from crashsim.writers.vhdx.writer import VhdxWriter

MiB = vf.MiB
META = 3 * MiB              # metadata region of a fresh 64 MiB image
SIZE_ITEM = META + 0x10008  # its virtual disk size item (MiB-aligned regions, QEMU layout)


@functools.cache
def _seeds() -> dict[str, fuzz.VhdxSeed]:
    return {s.name: s for s in fuzz.crashsim_vhdx_seeds()}


def _seed(name: str) -> tuple[fuzz.VhdxSeed, SparseImage]:
    seed = _seeds()[name]
    return seed, seed.image.fork()


def _header_field(img: SparseImage, slot: int, rel: int, data: bytes) -> None:
    """Overwrite a field of header slot ``slot`` and recompute its checksum."""
    off = vf.HEADER_SLOTS[slot]
    block = bytearray(img.read(off, vf.HEADER_BLOCK))
    block[rel:rel + len(data)] = data
    img.write(off, vf.with_checksum(bytes(block)))


def _virtual_size(img: SparseImage, size: int) -> None:
    assert img.read(SIZE_ITEM, 8) == struct.pack("<Q", 64 * MiB)  # the item is there
    img.write(SIZE_ITEM, struct.pack("<Q", size))


# -- format parsers on cut-short input (vhdx-parse, seed 1 input 1: struct.error) --------
def test_short_data_sector_is_truncated_not_struct_error():
    with pytest.raises(vf.VhdxCorrupt) as exc:
        vf.check_data_sector(b"data" + bytes(3), 1, 0, 0x1000)
    assert exc.value.code == "truncated" and exc.value.offset == 0x1000
    with pytest.raises(vf.VhdxCorrupt, match="truncated"):
        vf.check_data_sector(b"data" + bytes(4000), 1, 0, 0)  # no room for the low half


def test_short_descriptor_is_truncated_not_struct_error():
    blob = vf.build_log_entry(sequence_number=5, tail=0, log_guid=uuid.UUID(int=1),
                              flushed_file_offset=0, last_file_offset=8 * MiB,
                              updates=[vf.SectorUpdate(4 * MiB, b"a" * 4096)])
    h = vf.parse_log_entry_header(blob, 0)
    with pytest.raises(vf.VhdxCorrupt) as exc:
        vf.parse_descriptors(blob[:70], h, 0)  # "desc" present, the rest cut off
    assert exc.value.code == "truncated" and exc.value.offset == 64


# -- a metadata change shrinks the virtual disk (vhdx-oracle: ValueError in view) --------
def test_shrunk_virtual_disk_makes_the_view_refuse_not_crash():
    """Seed cli-made (then clean-64M): metadata item VirtualDiskSize := 0x100000 while
    the workload writes at 3 MiB. The oracle now reports "unreadable after recovery"."""
    img = create_image(64 * MiB, rng=random.Random(1))
    _virtual_size(img, MiB)
    ops = [Op("guest_write", 3 * MiB, 96 * 1024, 0x5C)]
    writer = VhdxWriter(ops=ops, image={"virtual_size": 64 * MiB}, defects=[], seed=1)
    dev = ImageDevice(img.fork())
    run_sync(writer.recover(dev))
    with pytest.raises(RecoveryError, match="virtual disk is 1048576 bytes"):
        writer.view(dev, [(3 * MiB, 96 * 1024)])
    verdict = Judge(writer, RangeModel(ops)).judge(img, 0, 1)
    assert verdict.outcome == "recovery-error"
    assert verdict.detail.startswith("unreadable after recovery")


def test_shrunk_virtual_disk_in_a_recorded_trace_view_and_probe():
    """Recorded-trace writer with built-in VHDX recovery: the view refuses, and the probe
    (at the last untouched block of the *recorded* disk) fails as ProbeFailed."""
    seed, img = _seed("clean-64M")
    recorded = seed.writer("recorded")
    _virtual_size(img, 4096)
    dev = ImageDevice(img.fork())
    run_sync(recorded.recover(dev))
    with pytest.raises(RecoveryError, match="guest disk is 4096 bytes"):
        recorded.view(dev, [(0, 64 * 1024)])
    with pytest.raises(ProbeFailed, match="outside the 4096-byte virtual disk"):
        run_sync(recorded.probe(ImageDevice(img.fork())))


# -- sequence numbers at 2^64-1 (vhdx-oracle: struct.error in Header.pack) ---------------
def test_header_sequence_at_maximum_refuses_the_next_update():
    """Seed clean-1G-32M-blocks: header 2 SequenceNumber := 0xffffffffffffffff."""
    seed, img = _seed("clean-1G-32M-blocks")
    _header_field(img, 1, 8, b"\xff" * 8)
    with pytest.raises(ProbeFailed, match="sequence number is 2\\^64-1"):
        run_sync(seed.writer("fixed").probe(ImageDevice(img.fork())))
    with pytest.raises(vf.VhdxCorrupt) as exc:
        run_sync(HeaderSession.load(ImageDevice(img)).update(BlockIO(ImageDevice(img))))
    assert exc.value.code == "header-sequence-max"


def test_dirty_log_with_header_sequence_at_maximum_is_refused_by_replay():
    seed, img = _seed("dirty-bat-entry")
    current = HeaderSession.load(ImageDevice(img)).slot
    _header_field(img, current, 8, b"\xff" * 8)
    for policy in (FIXED_POLICY, ReplayPolicy(), QEMU_POLICY):
        with pytest.raises(vf.VhdxCorrupt, match="2\\^64-1"):
            run_sync(replay(ImageDevice(img.fork()), policy=policy))


def test_log_sequence_exhausted_after_replay_refuses_the_next_entry():
    """Seed dirty-bat-entry, every log entry resequenced to 0xffffffffffffffff (header,
    descriptors, data sectors; checksum recomputed): the replay is fine, the next
    allocating write in that session is LogBusy, not struct.error."""
    seed, _ = _seed("dirty-bat-entry")
    m = fuzz.VhdxMutator(seed, random.Random(1))
    for span in seed.of("log-entry"):
        m.reseq_entry(int(span.tag), (1 << 64) - 1)
        m.fix_crc(span)
    drv = VhdxDriver(random.Random(0))
    result = run_sync(drv.open(ImageDevice(m.img.fork())))
    assert "replayed" in result.branches and result.next_sequence == 1 << 64
    with pytest.raises(LogBusy) as exc:
        run_sync(drv.write(5 * MiB, b"x" * 4096))
    assert exc.value.code == "sequence-max"


def test_log_sequence_exhausted_is_exit_2_for_vhdx_write(tmp_path, capsys):
    seed, _ = _seed("dirty-bat-entry")
    m = fuzz.VhdxMutator(seed, random.Random(1))
    for span in seed.of("log-entry"):
        m.reseq_entry(int(span.tag), (1 << 64) - 1)
        m.fix_crc(span)
    path = tmp_path / "seq.vhdx"
    m.img.to_file(path)
    assert main(["vhdx", "write", str(path), "5MiB", "4KiB"]) == 2
    assert "log sequence numbers are exhausted" in capsys.readouterr().err


# -- zero descriptors that zero far too much (vhdx-cli hang; profile of the first run) ----
def _inject(img: SparseImage, pos: int, seq: int, guid: uuid.UUID,
            updates: list[vf.SectorUpdate], tail: int, flushed: int, last: int) -> None:
    """Write a checksummed log entry at log position ``pos`` (1 MiB log at 1 MiB,
    wrapping) and publish its GUID in header slot 2, as the campaign's op_inject does."""
    blob = vf.build_log_entry(sequence_number=seq, tail=tail, log_guid=guid,
                              flushed_file_offset=flushed, last_file_offset=last,
                              updates=updates)
    first = min(len(blob), MiB - pos)
    img.write(MiB + pos, blob[:first])
    img.write(MiB, blob[first:])
    _header_field(img, 1, 48, guid.bytes_le)


def test_zero_run_of_256_mib_is_refused_before_any_write(tmp_path):
    """Seed dirty-wrapped: entry injected at log+0xff000, seq 0xe7d8006b, zero 0x10000000
    at 0x310000 and a data sector at 0x3ff000; tail 0xff000, FlushedFileOffset 0x400000,
    LastFileOffset 0x10310000; header 2 publishes its GUID. `crashsim vhdx write`
    replayed 65536 zero sectors with an fsync each (a hang); now it refuses at once."""
    seed, img = _seed("dirty-wrapped")
    guid = uuid.UUID("d7e11b1b-7aa6-440d-8800-7596a28f5b37")
    updates = [vf.SectorUpdate(0x310000, None, 0x10000000),
               vf.SectorUpdate(0x3FF000, bytes(4096))]
    _inject(img, 0xFF000, 0xE7D8006B, guid, updates, 0xFF000, 0x400000, 0x10310000)
    dev = ImageDevice(img.fork())
    with pytest.raises(vf.VhdxCorrupt) as exc:
        run_sync(replay(dev, policy=FIXED_POLICY))
    assert exc.value.code == "zero-run-too-large"
    assert dev.image.sectors == {}  # refused before the first write
    path = tmp_path / "zero.vhdx"
    img.to_file(path)
    t0 = time.monotonic()
    assert main(["vhdx", "write", str(path), "0", "4KiB"]) == 2
    assert time.monotonic() - t0 < 10


def test_zero_run_at_the_limit_still_replays_and_the_writer_refuses_more():
    seed, img = _seed("clean-64M")
    guid = uuid.UUID(int=0xABC)
    limit = vf.MAX_REPLAY_ZERO_BYTES
    _inject(img, 0, 3, guid, [vf.SectorUpdate(8 * MiB, None, limit)], 0, img.size_bytes,
            8 * MiB + limit)
    result = run_sync(replay(ImageDevice(img.fork()), policy=FIXED_POLICY))
    assert result.replayed_entries == 1
    bio = BlockIO(ImageDevice(seed.image.fork()))
    w = LogWriter(bio, HeaderSession.load(bio, random.Random(2)))
    with pytest.raises(ValueError, match="may zero at most 64 MiB"):
        run_sync(w.log_write(8 * MiB, bytes(limit + 4096)))


# -- metadata far away (found while reproducing: a 1 GiB read for an unknown item) -------
def test_unknown_metadata_item_far_away_is_not_read():
    img = create_image(64 * MiB, rng=random.Random(1))
    table = bytearray(img.read(META, vf.METADATA_TABLE_BYTES))
    (count,) = struct.unpack_from("<H", table, 10)
    struct.pack_into("<16sIIII", table, 32 + 32 * count, uuid.UUID(int=7).bytes_le,
                     999 * MiB, 8, 0, 0)
    struct.pack_into("<H", table, 10, count + 1)
    region = vf.RegionEntry(vf.METADATA_GUID, META, 1000 * MiB)
    assert vf.metadata_bytes_needed(bytes(table), region) < 2 * vf.METADATA_TABLE_BYTES


# -- scenario files (scenario-load: KeyError/TypeError in _line_of and the YAML load) -----
def _scenario_error(tmp_path, text: str) -> list[str]:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path)
    assert exc.value.lines
    for line in exc.value.lines:
        assert line.startswith(f"{path}:")
    return [line[len(str(path)) + 1:] for line in exc.value.lines]


def _repo_scenario(name: str) -> str:
    return (fuzz.REPO_SCENARIOS / name).read_text()


def test_merge_key_in_place_of_expect_names_a_line(tmp_path):
    """vhdx-defect-bat-before-data.yaml, key 'expect' := '<<' (KeyError before)."""
    text = _repo_scenario("vhdx-defect-bat-before-data.yaml").replace("expect:", "<<:")
    assert _scenario_error(tmp_path, text)[0].startswith("1: violations: unknown key")


def test_merge_key_in_a_model_op_names_its_line(tmp_path):
    """qemu-vhdx-blklogwrites.yaml, third model op's key 'guest_write' := '<<'."""
    text = _repo_scenario("qemu-vhdx-blklogwrites.yaml")
    text = text.replace("- guest_write: {offset: 2MiB", "- <<: {offset: 2MiB")
    lines = _scenario_error(tmp_path, text)
    line_no = next(i for i, ln in enumerate(text.splitlines(), 1) if "<<:" in ln)
    assert lines[0].startswith(f"{line_no}: model.ops.2.offset: unknown key")


def test_mapping_key_holding_a_list_is_a_yaml_error(tmp_path):
    """vhdx-defect-no-flush-after-log.yaml, value 'log_write' := '{violations: []}'."""
    text = _repo_scenario("vhdx-defect-no-flush-after-log.yaml").replace(
        "- log_write: {offset: 2KiB", "- {violations: []}: {offset: 2KiB")
    assert _scenario_error(tmp_path, text) == ["0: YAML: unhashable type: 'CommentedSeq'"]


def test_mapping_given_for_a_choice_is_reported_not_dropped(tmp_path):
    """wal-clean.yaml, cache destage := '{violations: [old]}': the union filter used to
    drop the only error, leaving a ScenarioError with no line at all."""
    text = _repo_scenario("wal-clean.yaml").replace("destage: random",
                                                    "destage: {violations: [old]}")
    lines = _scenario_error(tmp_path, text)
    assert lines[0].startswith("5: device.cache.destage: Input should be")


# -- dm-log-writes (dmlog-trace: MemoryError/OverflowError for a huge discard) -----------
def test_huge_discard_after_a_far_write_is_a_dmlog_error(tmp_path):
    path = tmp_path / "far.log"
    write_log(path, [write_entry(1 << 40, b"a" * 512), discard_entry(0, 1 << 40),
                     flush_entry()])
    log = read_log(path)
    with pytest.raises(DmLogError) as exc:
        to_trace(log, SparseImage(MiB), "qemu", (1 << 49) + 512)
    assert exc.value.entry_index == 1 and exc.value.offset == 0x600
    assert "discard of 0x2000000000000 bytes" in str(exc.value)
    with pytest.raises(DmLogError, match="entry 1 at offset 0x600"):
        dmlog_replay(log, SparseImage(MiB))


def test_discard_within_the_limit_still_becomes_zeros(tmp_path):
    path = tmp_path / "ok.log"
    write_log(path, [write_entry(0, b"a" * 1024), discard_entry(0, 2), flush_entry()])
    image = dmlog_replay(read_log(path), SparseImage(4096))
    assert image.read(0, 1024) == bytes(1024)
