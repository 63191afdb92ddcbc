"""The log writer, replay, and the guest driver's write protocol (in memory, no qemu)."""
from __future__ import annotations

import random
import struct

import pytest

from crashsim.blockdev import ImageDevice, run_sync
from crashsim.model import Op, RangeModel
from crashsim.trace import Trace
from crashsim.writers.base import ProbeFailed
from crashsim.writers.vhdx import format as f
from crashsim.writers.vhdx.create import create_image
from crashsim.writers.vhdx.driver import VhdxDriver, validate
from crashsim.writers.vhdx.log import (BlockIO, HeaderSession, LogBusy, LogWriter, log_write,
                                      sector_updates)
from crashsim.writers.vhdx.replay import (FIXED_POLICY, QEMU_POLICY, ReplayPolicy, replay,
                                          scan_log)
from crashsim.writers.vhdx import replay as replay_module
from crashsim.writers.vhdx.writer import VhdxWriter

MiB = f.MiB
PAYLOAD = 6 * MiB  # file bytes past the structures of a fresh 64 MiB image


class Stop(Exception):
    """Raised by a hook to model a crash at a chosen protocol step."""


def _stop_at(step: str):
    def hook(name: str) -> None:
        if name == step:
            raise Stop(step)
    return hook


def _image(log_size: int = MiB, virtual: int = 64 * MiB, seed: int = 1):
    return create_image(virtual, log_size_bytes=log_size, rng=random.Random(seed))


def _writer(img, seed: int = 2) -> LogWriter:
    io = BlockIO(ImageDevice(img))
    return LogWriter(io, HeaderSession.load(io, random.Random(seed)))


def _current(img) -> f.Header:
    return HeaderSession.load(ImageDevice(img)).current


def _replay(img, policy=ReplayPolicy()):
    return run_sync(replay(ImageDevice(img), policy=policy))


def _crash_before_apply(img, offset: int, data: bytes, w: LogWriter | None = None):
    w = w or _writer(img)
    w.on_step = _stop_at("apply")
    with pytest.raises(Stop):
        run_sync(w.log_write(offset, data))
    return w


# -- log_write ------------------------------------------------------------------------
def test_unaligned_log_write_merges_partial_sectors_and_clears_guid():
    img = _image()
    img.write(PAYLOAD, b"\x11" * 3 * 4096)
    run_sync(log_write(ImageDevice(img), PAYLOAD + 100, b"\xab" * 5000))
    assert img.read(PAYLOAD, 100) == b"\x11" * 100
    assert img.read(PAYLOAD + 100, 5000) == b"\xab" * 5000
    assert img.read(PAYLOAD + 5100, 3 * 4096 - 5100) == b"\x11" * (3 * 4096 - 5100)
    assert _current(img).log_guid == f.ZERO_GUID
    assert validate(ImageDevice(img)) == []


def test_entry_with_more_than_126_descriptors_and_zero_runs():
    img = _image(log_size=2 * MiB)
    data = bytearray(b"\x5c" * (140 * 4096))
    data[10 * 4096:13 * 4096] = bytes(3 * 4096)  # three zero sectors -> one 'zero' run
    w = _crash_before_apply(img, PAYLOAD, bytes(data))
    pos, entry = w.pending[0]
    assert entry.header.descriptor_count == 138 and entry.header.descriptor_sectors == 2
    kinds = [d.kind for d in entry.descriptors]
    assert kinds.count("zero") == 1 and entry.descriptors[10].length == 3 * 4096
    res = _replay(img)
    assert res.replayed_entries == 1 and "replayed" in res.branches
    assert img.read(PAYLOAD, len(data)) == bytes(data)


def test_entry_too_large_for_log_fails_before_any_io():
    img = _image()
    before = img.content_key()
    w = _writer(img)
    with pytest.raises(ValueError, match="cannot fit"):
        run_sync(w.log_write(PAYLOAD, b"\x01" * MiB))
    assert img.content_key() == before


def test_many_log_writes_go_round_the_circular_log():
    img = _image()
    w = _writer(img)
    expect = bytearray(64 * 4096)
    rng = random.Random(3)
    wrapped = 0
    for i in range(90):  # ~90 x 5 sectors: the 256-sector log wraps at least once
        off = rng.randrange(0, 56) * 4096 + rng.randrange(0, 4096)
        data = bytes([i % 250 + 1]) * rng.randrange(1, 7 * 4096)
        start = w.write_pos
        run_sync(w.log_write(PAYLOAD + off, data))
        wrapped += w.write_pos < start
        expect[off:off + len(data)] = data
    assert wrapped >= 1
    assert img.read(PAYLOAD, len(expect)) == bytes(expect)
    assert validate(ImageDevice(img)) == []


def test_replay_of_an_entry_that_wraps_around_the_log_end():
    img = _image()
    w = _writer(img)
    # 250 sectors used: the next 8-sector entry starts at sector 250 and wraps
    w.write_pos = w.read_pos = 250 * 4096
    data = bytes(range(1, 256)) * 100
    _crash_before_apply(img, PAYLOAD, data, w)
    res = _replay(img)
    assert "wrapped-entry" in res.branches and res.replayed_entries == 1
    assert any("wraps to the log start" in d for d in res.decisions)
    assert img.read(PAYLOAD, len(data)) == data


def test_a_scans_decisions_are_its_candidates_in_order_whether_pages_are_whole_or_not():
    """Whole pages add their decision lines and branches as worked out once; a page
    with an entry running past its end is gone through entry by entry. Both give what
    describing every candidate in log order gives, on logs with torn bytes too."""
    img = _image()
    w = _writer(img)
    rng = random.Random(5)
    for i in range(40):  # entries of 2 to 8 sectors: some cross a 64 KiB page's end
        run_sync(w.log_write(PAYLOAD + rng.randrange(0, 56) * 4096,
                             bytes([i % 250 + 1]) * rng.randrange(1, 7 * 4096)))
    _crash_before_apply(img, PAYLOAD, bytes(range(1, 256)) * 257, w)  # valid, crossing
    h = _current(img)
    heads = [c.position for c in scan_log(BlockIO(ImageDevice(img)), h).candidates]
    for trial in range(6):
        state = img.fork()
        for _ in range(trial * 3):  # tear a few log sectors and entry lengths
            at = h.log_offset + rng.randrange(0, h.log_length // 512) * 512
            state.write(at, bytes(rng.randrange(256) for _ in range(512)))
            state.write(h.log_offset + rng.choice(heads) + 8, struct.pack("<I", 4097))
        io = BlockIO(ImageDevice(state))
        whole = [page.whole for page in replay_module._log_pages(io, h, ReplayPolicy(), None)]
        assert any(whole) and not all(whole)
        scan = scan_log(io, h)
        described = [c._describe(h.log_length) for c in scan.candidates]
        assert scan.notes == [line for line, _ in described]
        assert scan.note_branches == list(dict.fromkeys(b for _, b in described if b))


def test_pending_entries_form_one_sequence_with_tail_at_the_first():
    img = _image()
    w = _writer(img)
    for i in range(3):
        run_sync(w.append(sector_updates(w.io, PAYLOAD + i * 4096, bytes([i + 1]) * 4096)))
    run_sync(w.flush_log())
    tails = {e.header.tail for _, e in w.pending}
    assert tails == {w.pending[0][0]}
    res = _replay(img)
    assert res.replayed_entries == 3 and "multi-entry-sequence" in res.branches
    assert img.read(PAYLOAD, 3 * 4096) == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096
    assert res.next_sequence == 4


def test_append_beyond_free_space_checkpoints_first():
    img = _image()
    w = _writer(img)
    big = sector_updates(w.io, PAYLOAD, b"\x07" * 200 * 4096)
    run_sync(w.append(big))  # 201 of 255 usable sectors now pending
    small = sector_updates(w.io, PAYLOAD + MiB, b"\x08" * 100 * 4096)
    run_sync(w.append(small))  # does not fit beside it: the first is applied first
    assert len(w.pending) == 1 and img.read(PAYLOAD, 4096) == b"\x07" * 4096
    run_sync(w.checkpoint())
    assert img.read(PAYLOAD + MiB, 4096) == b"\x08" * 4096
    assert _current(img).log_guid == f.ZERO_GUID


# -- replay rules ----------------------------------------------------------------------
def test_crash_between_log_flush_and_apply_replays_to_new():
    img = _image()
    img.write(PAYLOAD, b"\x01" * 8192)
    _crash_before_apply(img, PAYLOAD + 4096, b"\x02" * 4096)
    assert img.read(PAYLOAD + 4096, 4096) == b"\x01" * 4096
    assert validate(ImageDevice(img))[0].startswith("valid but unreplayed log")
    res = _replay(img)
    assert res.branches == ["replayed"] and res.log_guid_cleared
    assert img.read(PAYLOAD, 8192) == b"\x01" * 4096 + b"\x02" * 4096
    assert _current(img).log_guid == f.ZERO_GUID
    assert _replay(img).branches == ["clean"]


def test_replay_skips_an_entry_whose_checksum_fails():
    img = _image()
    _crash_before_apply(img, PAYLOAD, b"\x02" * 4096)
    log = _current(img).log_offset
    img.write(log + 4096 + 100, b"\xff")  # inside the data sector
    with pytest.raises(f.VhdxCorrupt, match="no active sequence"):
        _replay(img.fork())
    res = _replay(img, FIXED_POLICY)
    assert "log+0x0: entry seq 1 invalid: checksum mismatch" in res.decisions[1]
    assert "entry-invalid:checksum" in res.branches and "guid-reset" in res.branches
    assert img.read(PAYLOAD, 4096) == bytes(4096)
    # the defect switch applies it anyway
    img2 = _image()
    _crash_before_apply(img2, PAYLOAD, b"\x02" * 4096)
    img2.write(log + 4096 + 100, b"\xff")
    res = _replay(img2, ReplayPolicy(verify_checksum=False))
    assert res.replayed_entries == 1


def test_guid_published_without_entry_three_policies():
    img = _image()
    w = _writer(img)
    w.on_step = _stop_at("write-entry")
    with pytest.raises(Stop):
        run_sync(w.log_write(PAYLOAD, b"\x03" * 4096))
    assert _current(img).log_guid != f.ZERO_GUID
    with pytest.raises(f.VhdxCorrupt) as exc:
        _replay(img.fork())
    assert exc.value.code == "no-active-sequence"
    stuck = img.fork()
    res = _replay(stuck, QEMU_POLICY)
    assert res.branches == ["no-active-sequence", "guid-left-set"]
    drv = VhdxDriver()
    run_sync(drv.open(ImageDevice(stuck), policy=QEMU_POLICY))
    with pytest.raises(LogBusy, match="ENOTSUP"):
        run_sync(drv.write(0, b"\x01" * 4096))
    fixed = img.fork()
    res = _replay(fixed, FIXED_POLICY)
    assert res.branches == ["no-active-sequence", "guid-reset"]
    drv = VhdxDriver()
    run_sync(drv.open(ImageDevice(fixed)))
    run_sync(drv.write(0, b"\x01" * 4096))
    assert drv.read(0, 4096) == b"\x01" * 4096


def _two_entries(img, seqs, tails=None, gap_sectors=0):
    """Hand-build entries with the header's LogGuid at log+0 and after it."""
    w = _writer(img)
    run_sync(w.headers.update_both(w.io, log_guid=_guid()))
    pos, size = 0, img.size_bytes
    for i, seq in enumerate(seqs):
        tail = pos if tails is None else tails[i]
        blob = f.build_log_entry(sequence_number=seq, tail=tail, log_guid=w.headers.log_guid,
                                 flushed_file_offset=size,
                                 last_file_offset=size + 4096 * (i + 1),
                                 updates=[f.SectorUpdate(size + 4096 * i,
                                                         bytes([seq % 255 + 1]) * 4096)])
        img.write(w.log_offset + pos, blob)
        pos += len(blob) + gap_sectors * 4096
    return w


def _guid():
    import uuid
    return uuid.UUID(int=random.Random(9).getrandbits(128))


def test_sequence_gap_on_second_entry_only_qemu_accepts():
    spec, qemu = _image(), _image()
    for img in (spec, qemu):
        _two_entries(img, [5, 9])
    res = _replay(spec)
    assert res.replayed_entries == 1 and res.next_sequence == 10
    res = _replay(qemu, QEMU_POLICY)
    assert res.replayed_entries == 2 and res.next_sequence == 10


def test_tail_decides_what_the_spec_replays():
    img = _image()
    _two_entries(img, [5, 6], tails=[0, 0])  # head's tail points at the first entry
    res = _replay(img)
    assert res.replayed_entries == 2
    img = _image()
    _two_entries(img, [5, 6], tails=[0, 0x100000 - 4096])  # tail outside the run
    res = _replay(img.fork(), FIXED_POLICY)
    assert "sequence-not-well-formed" in res.branches
    assert _replay(img, QEMU_POLICY).replayed_entries == 2  # QEMU never reads Tail


def test_highest_sequence_wins_unless_switched_off():
    img = _image()
    _two_entries(img, [3, 7], gap_sectors=4)
    res = _replay(img.fork())
    assert res.next_sequence == 8 and "older-sequence-ignored" in res.branches
    res = _replay(img, ReplayPolicy(pick_highest_sequence=False))
    assert res.next_sequence == 4


def test_invalid_descriptor_fails_whole_open_only_under_qemu_quirks():
    img = _image()
    w = _two_entries(img, [4])
    img.write(w.log_offset + 64 + 24, struct.pack("<Q", 99))  # descriptor seq
    with pytest.raises(f.VhdxCorrupt, match="QEMU fails the whole open"):
        _replay(img.fork(), QEMU_POLICY)
    res = _replay(img, FIXED_POLICY)
    assert "entry-invalid:descriptor" in res.branches


def test_truncated_file_is_refused():
    img = _image()
    _crash_before_apply(img, PAYLOAD, b"\x04" * 4096)
    img.resize(3 * MiB)
    for policy in (ReplayPolicy(), QEMU_POLICY):
        with pytest.raises(f.VhdxCorrupt) as exc:
            _replay(img.fork(), policy)
        assert exc.value.code == "truncated"


def test_extend_to_last_file_offset_and_qemu_aligned_quirk():
    for lfo, spec_size, qemu_size in ((9 * MiB, 9 * MiB, 8 * MiB),
                                      (9 * MiB + 4096, 10 * MiB, 10 * MiB)):
        base = _image()
        base.resize(8 * MiB)
        w = _writer(base)
        run_sync(w.headers.update_both(w.io, log_guid=_guid()))
        blob = f.build_log_entry(sequence_number=1, tail=0, log_guid=_guid(),
                                 flushed_file_offset=8 * MiB, last_file_offset=lfo,
                                 updates=[f.SectorUpdate(PAYLOAD, b"\x01" * 4096)])
        base.write(MiB, blob)
        spec, qemu = base.fork(), base.fork()
        assert "extended" in _replay(spec).branches and spec.size_bytes == spec_size
        _replay(qemu, QEMU_POLICY)
        assert qemu.size_bytes == qemu_size


# -- the guest driver -------------------------------------------------------------------
def _steps(trace: Trace) -> list[tuple]:
    out = []
    for s in trace.steps:
        if s.kind == "write_submit":
            w = trace.writes[s.io_id]
            out.append(("W", w.offset, len(w.data)))
        elif s.kind == "flush_submit":
            out.append(("F",))
    return out


def test_allocating_write_follows_qemu_io_protocol():
    img = create_image(1 << 30, rng=random.Random(1))
    drv = VhdxDriver(random.Random(2))
    run_sync(drv.open(ImageDevice(img)))
    trace = Trace(base=img)
    drv.io.dev = ImageDevice(img, trace)
    run_sync(drv.write(0, b"\xab" * 65536))
    H1, H2, F = ("W", 0x10000, 512), ("W", 0x20000, 512), ("F",)
    assert _steps(trace) == [
        H1, F, H2, F,                        # DataWriteGuid (first user-visible write)
        ("W", 4 * MiB, 65536), F,            # data, then flush
        H1, F, H2, F,                        # LogGuid := fresh
        ("W", MiB, 4096), ("W", MiB + 4096, 4096), F,   # entry, no barrier inside
        ("W", 2 * MiB, 4096), F,             # BAT sector in place
        H1, F, H2, F]                        # LogGuid := 0
    assert trace.resizes == [(8, 5 * MiB)]  # after 4 I/Os of 2 steps each
    trace.steps.clear()
    run_sync(drv.write(4096, b"\xcd" * 4096))   # already allocated: data only, no log
    assert _steps(trace) == [("W", 4 * MiB + 4096, 4096)]


def test_writes_across_blocks_and_bat_sectors_read_back():
    img = create_image(6 << 30, rng=random.Random(1))
    drv = VhdxDriver(random.Random(2))
    run_sync(drv.open(ImageDevice(img)))
    ops = [Op("guest_write", MiB - 4096, 8192, 0x11),             # spans blocks 0 and 1
           Op("guest_write", 512 * MiB, 4096, 0x22),              # BAT index 512
           Op("guest_write", 4095 * MiB, 2 * MiB, 0x33),           # blocks 4095, 4096
           Op("guest_write", 4607 * MiB + 512, 1024, 0x44)]        # BAT index 4608
    for op in ops:
        run_sync(drv.write(op.offset, op.data()))
    assert drv.bat_index_of(4096) == 4097 and drv.bat_index_of(4607) == 4608
    assert f.unpack_bat_entry(drv.bat[4096])[0] == f.NOT_PRESENT  # the sector bitmap entry
    model = RangeModel(ops)
    assert b"".join(drv.read(o, n) for o, n in model.ranges) == model.view_after(len(ops))
    assert drv.read(3 * MiB, 4096) == bytes(4096)
    again = VhdxDriver()
    run_sync(again.open(ImageDevice(img)))
    assert again.bat == drv.bat
    bat_sector_9 = img.read(again.regions.bat.file_offset + 9 * 4096, 8)
    assert f.unpack_bat_entry(struct.unpack("<Q", bat_sector_9)[0])[0] == f.FULLY_PRESENT
    assert validate(ImageDevice(img)) == []


def test_same_seed_same_bytes():
    keys = []
    for seed in (7, 7, 8):
        img = _image()
        drv = VhdxDriver(random.Random(seed))
        run_sync(drv.open(ImageDevice(img)))
        run_sync(drv.write(3 * MiB, b"\x01" * 4096))
        keys.append(img.content_key())
    assert keys[0] == keys[1] != keys[2]


def test_validate_reports_bat_problems():
    img = _image()
    drv = VhdxDriver()
    run_sync(drv.open(ImageDevice(img)))
    run_sync(drv.write(0, b"\x01" * 4096))
    bat = drv.regions.bat.file_offset
    bad = img.fork()
    bad.write(bat + 8, struct.pack("<Q", f.pack_bat_entry(f.FULLY_PRESENT, 2 * MiB)))
    assert any("overlaps the log, BAT or metadata" in p for p in validate(ImageDevice(bad)))
    bad = img.fork()
    bad.write(bat + 8, struct.pack("<Q", img.read(bat, 8)[0] | (4 * MiB)))
    assert any("share the block" in p for p in validate(ImageDevice(bad)))
    bad = img.fork()
    bad.resize(4 * MiB + 4096)
    with pytest.raises(f.VhdxCorrupt, match="points after end of file"):
        run_sync(VhdxDriver().open(ImageDevice(bad)))


# -- the writer plugin --------------------------------------------------------------------
class _Tx:
    def __init__(self):
        self.marks = []

    def start(self, i):
        self.marks.append(("start", i))

    def ack(self, i):
        self.marks.append(("ack", i))


@pytest.mark.parametrize("kind", ["guest_write", "log_write"])
def test_writer_plugin_round_trip(kind):
    ops = [Op(kind, 0, 65536, 0xA1), Op(kind, MiB - 512, 1024, 0xA2),
           Op(kind, 5 * MiB + 100 * (kind == "log_write"), 3000 if kind == "log_write"
              else 3072, 0xA3)]
    w = VhdxWriter(ops=ops, image={"virtual_size": 16 * MiB, "block_size": MiB,
                                   "log_size": MiB}, defects=[], seed=4)
    img = w.format_image()
    dev = ImageDevice(img)
    tx = _Tx()
    run_sync(w.run(dev, tx))
    assert tx.marks == [("start", 0), ("ack", 0), ("start", 1), ("ack", 1),
                        ("start", 2), ("ack", 2)]
    rec = run_sync(w.recover(dev))
    assert rec.branches == ["clean"]
    model = RangeModel(ops)
    assert b"".join(w.view(dev, model.ranges)) == model.view_after(3)
    assert model.matching(w.view(dev, model.ranges)) == [3]
    assert w.check_structure(dev) == []
    run_sync(w.probe(ImageDevice(img.fork())))


def test_stray_blocks_are_found_in_every_bat_sector():
    ops = [Op("guest_write", 0, 4096, 0x01), Op("guest_write", 130 * MiB, 4096, 0x02)]
    w = VhdxWriter(ops=ops, image={"virtual_size": 256 * MiB}, defects=[], seed=1)
    img = w.format_image()
    run_sync(w.run(ImageDevice(img), _Tx()))
    assert w.check_structure(ImageDevice(img)) == []
    drv = VhdxDriver()
    run_sync(drv.open(ImageDevice(img)))
    run_sync(drv.write(200 * MiB, b"\x03" * 512))  # BAT entry 200: the fourth sector
    problems = w.check_structure(ImageDevice(img))
    assert len(problems) == 1 and problems[0].startswith("BAT entry 200 (block 200)")


def test_writer_flags_stray_blocks_and_stuck_probe():
    ops = [Op("guest_write", 0, 4096, 0x01)]
    w = VhdxWriter(ops=ops, image={"virtual_size": 16 * MiB}, defects=[], seed=1)
    img = w.format_image()
    dev = ImageDevice(img)
    run_sync(w.run(dev, _Tx()))
    drv = VhdxDriver()
    run_sync(drv.open(ImageDevice(img)))
    run_sync(drv.write(8 * MiB, b"\x02" * 512))
    assert any("never wrote it" in p for p in w.check_structure(dev))

    class QemuWriter(VhdxWriter):
        recovery_policy = QEMU_POLICY

    q = QemuWriter(ops=ops, image={"virtual_size": 16 * MiB}, defects=[], seed=1)
    stuck = q.format_image()
    lw = _writer(stuck)
    lw.on_step = _stop_at("write-entry")
    with pytest.raises(Stop):
        run_sync(lw.log_write(PAYLOAD, b"\x03" * 4096))
    run_sync(q.recover(ImageDevice(stuck)))
    with pytest.raises(ProbeFailed, match="ENOTSUP"):
        run_sync(q.probe(ImageDevice(stuck)))
    run_sync(w.recover(ImageDevice(stuck)))  # the fixed policy clears the GUID
    run_sync(w.probe(ImageDevice(stuck)))


def test_writer_rejects_unknown_defects_and_mixed_ops():
    with pytest.raises(ValueError, match="no defect"):
        VhdxWriter(ops=[], image={}, defects=["skip-flush"], seed=1)
    with pytest.raises(ValueError, match="either guest_write or log_write"):
        VhdxWriter(ops=[Op("guest_write", 0, 512, 1), Op("log_write", 0, 512, 1)],
                   image={}, defects=[], seed=1)


def test_scan_log_is_read_only():
    img = _image()
    _crash_before_apply(img, PAYLOAD, b"\x05" * 4096)
    key = img.content_key()
    scan = scan_log(ImageDevice(img), _current(img))
    assert scan.active is not None and img.content_key() == key


def test_a_changed_data_sector_under_an_unchanged_entry_header_is_seen_through_the_memos():
    """Log pages are memoised on their bytes and entries on theirs: a changed data sector
    under an unchanged entry header must still make the entry invalid, and an unchanged
    entry keeps its very candidate."""
    img = _image()
    _two_entries(img, [5, 6])
    header = _current(img)
    first = scan_log(ImageDevice(img), header, FIXED_POLICY)
    assert [c.valid for c in first.candidates] == [True, True]
    torn = img.fork()
    torn.write(header.log_offset + 4096 + 100, b"\xff")  # in entry 5's data sector
    again = scan_log(ImageDevice(torn), header, FIXED_POLICY)
    assert [(c.valid, c.code) for c in again.candidates] == [(False, "checksum"), (True, "")]
    assert again.candidates[1] is first.candidates[1]  # the same candidate
    replay_module._PAGES.clear()
    fresh = scan_log(ImageDevice(torn), header, FIXED_POLICY)
    assert [(c.valid, c.reason) for c in fresh.candidates] == \
        [(c.valid, c.reason) for c in again.candidates]


def test_page_keys_number_each_log_and_policy_and_never_reuse_a_number():
    import dataclasses
    h = _current(_image())
    place = replay_module._place
    assert place(h, FIXED_POLICY) == place(h, FIXED_POLICY)
    numbers = {place(h, FIXED_POLICY), place(h, QEMU_POLICY),
               place(dataclasses.replace(h, log_guid=_guid()), FIXED_POLICY)}
    assert len(numbers) == 3
    replay_module._PLACES.clear()  # as when full: pages memoised before must not match
    assert place(h, FIXED_POLICY) not in numbers


def test_scan_memo_gives_the_scan_a_fresh_scan_gives():
    """Log pages' candidates are memoised on the pages' bytes; every crash state of a torn, wrapping log
    scans the same as with the memo emptied first, under every policy."""
    from crashsim import crashstates
    from crashsim.explore import build_context
    from crashsim.scenario import Scenario
    from crashsim.writers.vhdx import replay as r
    sc = Scenario.model_validate({
        "name": "memo", "writer": {"kind": "vhdx"},
        "device": {"atomic_write_bytes": 512},
        "workload": {"image": {"virtual_size": 64 * MiB, "log_size": MiB},
                     "ops": [{"guest_write": {"offset": i * 2 * MiB, "length": 4096,
                                              "pattern": i + 1}} for i in range(12)]},
        "explore": {"seed": 3, "max_states_per_step": 6}})
    ctx = build_context(sc)

    def shape(scan):
        return ([(c.position, c.valid, c.reason) for c in scan.candidates],
                [[c.position for c in run.entries] for run in scan.runs],
                None if scan.active is None else scan.active.head.position,
                scan.empty_sectors, scan.header)

    scanned = 0
    for st in crashstates.iter_steps(ctx.trace):
        for state in crashstates.enumerate_states(st, 6, 3):
            dev = ImageDevice(state.image)
            header = HeaderSession.load(dev).current
            if header.log_guid == f.ZERO_GUID:
                continue
            for policy in (FIXED_POLICY, QEMU_POLICY, ReplayPolicy()):
                try:
                    memo = shape(scan_log(dev, header, policy))
                except f.VhdxCorrupt as exc:
                    memo = str(exc)
                r._PAGES.clear()
                try:
                    fresh = shape(scan_log(dev, header, policy))
                except f.VhdxCorrupt as exc:
                    fresh = str(exc)
                assert memo == fresh, state.state_id
                scanned += 1
    assert scanned > 50
