"""Fuzz tests: garbage into every parser and recovery path gives only the documented error.

VHDX parsers and recovery raise only ``RecoveryError`` (``VhdxCorrupt``, ``LogBusy``),
the dm-log-writes reader only ``DmLogError`` naming the entry (or super block) and the
offset, the scenario loader only ``ScenarioError`` whose lines read ``file:line: ...``.
Mutations start from valid inputs crashsim makes (``crashsim.fuzz`` builds the seeds and
the structure-aware mutators) and recompute checksums, so they get past the CRC to the
deeper checks. Where it means something, a property is checked too: valid structures
round-trip, and recovery is idempotent. Random damage of the log region alone is
covered by tests/test_vhdx_properties.py.
"""
from __future__ import annotations

import functools
import random
import re
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crashsim import fuzz
from crashsim.blockdev import ImageDevice, run_sync
from crashsim.dmlog import (DmLogError, discard_entry, flush_entry, mark_entry, read_log,
                            write_entry, write_log)
from crashsim.scenario import ScenarioError, check_writer, load_scenario
from crashsim.writers.base import RecoveryError
from crashsim.writers.vhdx import format as vf
from crashsim.writers.vhdx.driver import VhdxDriver, validate
from crashsim.writers.vhdx.log import HeaderSession
from crashsim.writers.vhdx.replay import (FIXED_POLICY, QEMU_POLICY, ReplayPolicy, replay,
                                          scan_log)

MiB = vf.MiB
POLICIES = (FIXED_POLICY, ReplayPolicy(), QEMU_POLICY)


def fuzzing(n: int):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@functools.cache
def seeds() -> dict[str, fuzz.VhdxSeed]:
    return {s.name: s for s in fuzz.crashsim_vhdx_seeds()}


SEED_NAMES = ["clean-64M", "clean-4k-sectors", "clean-1G-32M-blocks", "allocated-5G",
              "dirty-bat-entry", "dirty-3-entries", "dirty-wrapped", "guid-without-entry"]
u64 = st.integers(0, 2 ** 64 - 1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _put(blob: bytearray, rel: int, width: int, value: int) -> None:
    blob[rel:rel + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


# -- file identifier and headers --------------------------------------------------------
@fuzzing(150)
@given(st.binary(max_size=1100),
       st.text(st.characters(min_codepoint=1, max_codepoint=0xFFFF,
                             exclude_categories=("Cs",)), max_size=256))
def test_file_identifier_garbage_and_round_trip(junk, creator):
    try:
        vf.parse_file_identifier(junk)
    except vf.VhdxCorrupt as exc:
        assert exc.code in ("signature", "truncated")
    assert vf.parse_file_identifier(vf.build_file_identifier(creator)) == creator


headers = st.builds(vf.Header, u64, st.uuids(), st.uuids(), st.uuids(),
                    st.integers(0, 2 ** 32 - 1), u64, st.integers(0, 2 ** 16 - 1))


@fuzzing(100)
@given(headers, st.sampled_from(fuzz.HEADER_FIELDS), st.integers(0, 2 ** 128 - 1),
       st.booleans(), st.integers(0, vf.HEADER_BLOCK))
def test_header_fields_with_recomputed_checksum(header, field, value, fix, cut):
    block = bytearray(vf.header_block(header))
    assert vf.check_header(bytes(block), 0x10000) == header  # round trip
    name, rel, width = field
    _put(block, rel, width, value)
    if fix:
        block = bytearray(vf.with_checksum(bytes(block)))
    for blob in (bytes(block), bytes(block[:cut])):
        try:
            h = vf.check_header(blob, 0x10000)
        except vf.VhdxCorrupt as exc:
            assert exc.offset is not None and 0x10000 <= exc.offset < 0x10000 + 0x1000
            continue
        assert h.pack()[8:] == blob[8:80]  # what was accepted is what is stored
        try:
            vf.check_log_geometry(h, 0x10000)
        except vf.VhdxCorrupt:
            continue
        assert h.log_offset % MiB == 0 and h.log_length % MiB == 0


@fuzzing(80)
@given(st.lists(st.tuples(st.sampled_from([0, 1]), st.sampled_from(fuzz.HEADER_FIELDS),
                          st.integers(0, 2 ** 128 - 1), st.booleans()), max_size=3))
def test_header_session_load_on_mutated_slots(changes):
    img = seeds()["clean-64M"].image.fork()
    for slot, (name, rel, width), value, fix in changes:
        off = vf.HEADER_SLOTS[slot]
        block = bytearray(img.read(off, vf.HEADER_BLOCK))
        _put(block, rel, width, value)
        img.write(off, vf.with_checksum(bytes(block)) if fix else bytes(block))
    try:
        session = HeaderSession.load(ImageDevice(img))
    except RecoveryError:
        return
    valid = []
    for off in vf.HEADER_SLOTS:
        try:
            valid.append(vf.check_header(img.read(off, vf.HEADER_BLOCK), off))
        except vf.VhdxCorrupt:
            pass
    assert session.current.sequence_number == max(h.sequence_number for h in valid)


# -- region table -----------------------------------------------------------------------
mib_offsets = st.one_of(st.integers(0, 64).map(lambda k: k * MiB), u64)
mib_lengths = st.one_of(st.integers(0, 8).map(lambda k: k * MiB), st.integers(0, 2 ** 32 - 1))
region_entries = st.lists(st.builds(
    vf.RegionEntry, st.one_of(st.sampled_from(fuzz.KNOWN_GUIDS), st.uuids()),
    mib_offsets, mib_lengths, st.booleans()), max_size=6)


@fuzzing(150)
@given(region_entries)
def test_region_table_round_trip_and_known_regions(entries):
    off = vf.REGION_TABLE_OFFSETS[0]
    assert vf.parse_region_table(vf.build_region_table(entries), off) == entries
    log = [(MiB, 2 * MiB)]
    try:
        regions = vf.known_regions(entries, off, log)
    except vf.VhdxCorrupt:
        return
    spans = [(r.file_offset, r.file_offset + r.length)
             for r in (regions.bat, regions.metadata)]
    assert regions.bat.guid == vf.BAT_GUID and regions.metadata.guid == vf.METADATA_GUID
    for lo, hi in spans:
        assert lo % MiB == 0 and hi % MiB == 0 and lo >= vf.HEADER_SECTION_END
        assert hi <= MiB or lo >= 2 * MiB  # never over the log
    assert spans[0][1] <= spans[1][0] or spans[1][1] <= spans[0][0]


@fuzzing(100)
@given(st.sampled_from(fuzz.REGION_FIELDS), st.integers(0, 2 ** 128 - 1), st.booleans(),
       st.integers(0, vf.REGION_TABLE_BYTES))
def test_region_table_fields_with_recomputed_checksum(field, value, fix, cut):
    off = vf.REGION_TABLE_OFFSETS[1]
    blob = bytearray(seeds()["clean-64M"].image.read(off, vf.REGION_TABLE_BYTES))
    name, rel, width = field
    _put(blob, rel, width, value)
    if fix:
        blob = bytearray(vf.with_checksum(bytes(blob)))
    for data in (bytes(blob), bytes(blob[:cut])):
        try:
            entries = vf.parse_region_table(data, off)
            vf.known_regions(entries, off, [(MiB, 2 * MiB)])
        except vf.VhdxCorrupt as exc:
            assert off <= exc.offset < off + vf.REGION_TABLE_BYTES
            continue
        assert len(entries) == struct.unpack_from("<I", data, 8)[0] <= 2047


# -- metadata ---------------------------------------------------------------------------
metadata = st.builds(vf.Metadata, st.sampled_from([1 << k for k in range(20, 29)]),
                     st.integers(1, 1 << 37).map(lambda n: n * 512),
                     st.just(512), st.sampled_from([512, 4096]), st.uuids(), st.booleans())


@fuzzing(100)
@given(metadata, st.data())
def test_metadata_round_trip_then_mutated_fields(md, data):
    region = vf.RegionEntry(vf.METADATA_GUID, 3 * MiB, MiB)
    blob = bytearray(vf.build_metadata(md))
    assert vf.parse_metadata(bytes(blob), region) == md
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        if data.draw(st.booleans(), label="table field"):
            name, rel, width = data.draw(st.sampled_from(fuzz.METADATA_TABLE_FIELDS))
        else:  # the items follow the table: file parameters, size, page83, sectors
            rel, width = data.draw(st.sampled_from([(65536, 4), (65540, 4), (65544, 8),
                                                    (65568, 4), (65572, 4)]))
        _put(blob, rel, width, data.draw(st.integers(0, 2 ** 128 - 1), label="value"))
    need = vf.metadata_bytes_needed(bytes(blob[:vf.METADATA_TABLE_BYTES]), region)
    assert 0 <= need <= region.length
    try:
        got = vf.parse_metadata(bytes(blob[:max(need, vf.METADATA_TABLE_BYTES)]), region)
    except vf.VhdxCorrupt as exc:
        assert exc.code.startswith(("metadata", "truncated"))
        return
    assert got.block_size & (got.block_size - 1) == 0 and MiB <= got.block_size
    assert got.logical_sector_size in (512, 4096) and got.physical_sector_size in (512, 4096)
    assert 0 < got.virtual_size <= vf.MAX_FILE_BYTES
    assert got.virtual_size % got.logical_sector_size == 0


@fuzzing(100)
@given(st.binary(min_size=0, max_size=4096), mib_lengths)
def test_metadata_bytes_needed_stays_inside_the_region(table, length):
    region = vf.RegionEntry(vf.METADATA_GUID, 3 * MiB, length)
    assert 0 <= vf.metadata_bytes_needed(b"metadata" + table, region) <= length
    assert 0 <= vf.metadata_bytes_needed(table, region) <= length


# -- BAT --------------------------------------------------------------------------------
@fuzzing(100)
@given(st.binary(max_size=2048), st.integers(0, 400), st.integers(0, 7),
       st.integers(0, (1 << 44) - 1))
def test_bat_parse_pads_and_entries_round_trip(blob, count, state, block):
    bat = vf.parse_bat(blob, count)
    assert len(bat) == count
    padded = bytes(blob[:8 * count]).ljust(8 * count, b"\0")
    assert vf.nonzero_entries_of(padded) == [(i, v) for i, v in enumerate(bat) if v]
    assert vf.unpack_bat_entry(vf.pack_bat_entry(state, block * MiB)) == (state, block * MiB)


bat_changes = st.lists(st.tuples(st.integers(0, 5125), st.integers(0, 7),
                                 st.one_of(st.integers(0, 64).map(lambda k: k * MiB), u64)),
                       min_size=1, max_size=6)


@fuzzing(120)
@given(bat_changes)
def test_driver_bat_load_check_and_validate_on_mutated_entries(changes):
    seed = seeds()["allocated-5G"]
    img = seed.image.fork()
    for index, state, offset in changes:
        value = (offset & vf.BAT_OFFSET_MASK) | state
        img.write(seed.geometry["bat_offset"] + 8 * index, struct.pack("<Q", value))
    assert all(isinstance(p, str) for p in validate(ImageDevice(img)))
    drv = VhdxDriver(random.Random(0))
    try:
        drv.attach(ImageDevice(img))
        drv.check_bat()
    except RecoveryError:
        return
    for op in seed.ops:
        try:
            drv.read(op.offset, op.length)
        except RecoveryError:
            pass


@fuzzing(200)
@given(st.lists(u64, max_size=40), st.integers(0, 7))
def test_the_highest_bat_offset_is_that_of_the_largest_entry(values, tail_bytes):
    """What check_bat compares with the file size, from the cached summary of the BAT's
    bytes, against every entry unpacked (a trailing partial entry is not an entry)."""
    blob = struct.pack(f"<{len(values)}Q", *values) + b"\xff" * tail_bytes
    expected = max((vf.unpack_bat_entry(v)[1] for v in values), default=0)
    assert vf.highest_bat_offset(blob) == expected
    assert vf.highest_bat_offset(blob) == expected  # and again, from the cache


# -- log entries ------------------------------------------------------------------------
updates = st.lists(st.one_of(
    st.builds(lambda k, b: vf.SectorUpdate(k * 4096, bytes([b]) * 4096),
              st.integers(256, 4096), st.integers(0, 255)),
    st.builds(lambda k, n: vf.SectorUpdate(k * 4096, None, n * 4096),
              st.integers(256, 4096), st.integers(1, 64))), min_size=1, max_size=140)


def _entry(ups, seq=7, guid=uuid.UUID(int=5)):
    end = max(u.file_offset + (u.zero_length if u.data is None else 4096) for u in ups)
    return vf.build_log_entry(sequence_number=seq, tail=0, log_guid=guid,
                              flushed_file_offset=MiB, last_file_offset=end, updates=ups)


@fuzzing(60)
@given(updates, st.integers(1, 2 ** 64 - 1))
def test_log_entry_round_trip(ups, seq):
    guid = uuid.UUID(int=99)
    blob = _entry(ups, seq, guid)
    h = vf.parse_log_entry_header(blob, 0)
    vf.check_entry_header(h, log_length=len(blob) + 4096, log_guid=guid, offset=0)
    descs = vf.parse_descriptors(blob, h, 0)
    vf.check_layout(h, descs, 0)
    start = h.descriptor_sectors * 4096
    datas = [blob[p:p + 4096] for p in range(start, len(blob), 4096)]
    for k, sector in enumerate(datas):
        vf.check_data_sector(sector, seq, k, start + 4096 * k)
    assert vf.entry_checksum_ok(blob, h)
    want = [(u.file_offset, u.data if u.data is not None else u.zero_length) for u in ups]
    assert list(vf.LogEntry(h, descs, datas).writes()) == want


entry_fields = st.one_of(
    st.sampled_from(fuzz.LOG_ENTRY_FIELDS).map(lambda f: (f[0], f[1], f[2])),
    st.tuples(st.sampled_from(fuzz.DESCRIPTOR_FIELDS), st.integers(0, 2)).map(
        lambda t: (t[0][0], 64 + 32 * t[1] + t[0][1], t[0][2])),
    st.sampled_from(fuzz.DATA_SECTOR_FIELDS).map(lambda f: (f[0], 4096 + f[1], f[2])))


@fuzzing(300)
@given(st.lists(st.tuples(entry_fields, st.integers(0, 2 ** 128 - 1)), min_size=1,
                max_size=3), st.booleans(), st.integers(0, 3 * 4096))
def test_mutated_log_entry_gives_only_vhdx_corrupt(changes, fix, cut):
    guid = uuid.UUID(int=99)
    ups = [vf.SectorUpdate(MiB, b"\x11" * 4096), vf.SectorUpdate(2 * MiB, None, 8192),
           vf.SectorUpdate(3 * MiB, b"\x22" * 4096)]
    blob = bytearray(_entry(ups, 9, guid))
    for (name, rel, width), value in changes:
        _put(blob, rel, width, value)
    if fix:
        blob = bytearray(vf.with_checksum(bytes(blob)))
    for data in (bytes(blob), bytes(blob[:cut])):
        _parse_entry_steps(data, guid)


def _parse_entry_steps(data: bytes, guid: uuid.UUID) -> None:
    try:
        h = vf.parse_log_entry_header(data, 0)
        vf.entry_checksum_ok(data, h)
        vf.check_entry_header(h, log_length=MiB, log_guid=guid, offset=0)
        descs = vf.parse_descriptors(data, h, 0)
        vf.check_layout(h, descs, 0)
        start = h.descriptor_sectors * 4096
        for k, p in enumerate(range(start, h.entry_length, 4096)):
            vf.check_data_sector(data[p:p + 4096], h.sequence_number, k, p)
    except vf.VhdxCorrupt as exc:
        assert exc.code and exc.offset is not None


# -- whole images: scan, replay, open, oracle -------------------------------------------
@fuzzing(200)
@given(st.sampled_from(SEED_NAMES), st.randoms(use_true_random=False))
def test_scan_replay_and_open_of_mutated_images_raise_only_recovery_errors(name, rnd):
    seed = seeds()[name]
    img = fuzz.VhdxMutator(seed, rnd).mutate()
    fuzz.parse_structures(img, rnd)
    for policy in POLICIES:
        try:
            scan_log(ImageDevice(img), HeaderSession.load(ImageDevice(img)).current, policy)
        except RecoveryError:
            pass
        try:
            run_sync(replay(ImageDevice(img.fork()), policy=policy))
        except RecoveryError:
            pass
    assert all(isinstance(p, str) for p in validate(ImageDevice(img)))
    _open_is_idempotent(img, seed)


def _open_is_idempotent(img, seed: fuzz.VhdxSeed) -> None:
    """Recovery that succeeds leaves an image a second open takes as it is: nothing is
    replayed again, and the disk reads the same."""
    dev = ImageDevice(img.fork())
    first = VhdxDriver(random.Random(0))
    try:
        run_sync(first.open(dev, policy=FIXED_POLICY))
    except RecoveryError:
        return
    again = VhdxDriver(random.Random(1))
    try:  # replay may have rewritten the file identifier, which an open checks first
        result = run_sync(again.open(dev, policy=FIXED_POLICY))
    except RecoveryError:
        return
    assert "replayed" not in result.branches and "guid-reset" not in result.branches
    for op in seed.ops:
        if op.offset + op.length <= first.virtual_size:
            try:
                want = first.read(op.offset, op.length)
            except RecoveryError:
                continue
            assert again.read(op.offset, op.length) == want


@fuzzing(120)
@given(st.sampled_from(SEED_NAMES), st.randoms(use_true_random=False))
def test_oracle_recover_view_check_probe_raise_only_documented_errors(name, rnd):
    seed = seeds()[name]
    img = fuzz.VhdxMutator(seed, rnd).mutate()
    fuzz.oracle_paths(img, seed, rnd)  # lets only RecoveryError/ProbeFailed escape
    fuzz.open_paths(img, seed.ops)


# -- dm-log-writes ----------------------------------------------------------------------
dm_entries = st.lists(st.one_of(
    st.builds(lambda s, n, b, fua: write_entry(s, bytes([b]) * (512 * n), fua=fua),
              st.integers(0, 4096), st.integers(1, 8), st.integers(0, 255), st.booleans()),
    st.just(flush_entry()),
    st.builds(discard_entry, st.integers(0, 4096), st.integers(1, 64)),
    st.builds(mark_entry, st.text(st.characters(min_codepoint=1, max_codepoint=0x7F),
                                  max_size=900))), max_size=8)


@fuzzing(80)
@given(dm_entries, st.integers(0, 10 ** 6))
def test_dmlog_round_trip_then_cut_anywhere(workdir, entries, cut):
    path = workdir / "round.log"
    write_log(path, entries)
    log = read_log(path)
    assert [(e.sector, e.flags, e.data, e.mark) for e in log.entries] == \
        [(e.sector, e.flags, e.data, e.mark) for e in entries]
    blob = path.read_bytes()
    cut %= len(blob) + 1
    path.write_bytes(blob[:cut])
    try:
        read_log(path)
    except DmLogError as exc:
        fuzz.check_dmlog_error(exc, path)
        assert exc.offset <= len(blob)
        assert exc.entry_index is None or exc.entry_index < len(entries)


@fuzzing(300)
@given(st.sampled_from(["linux-512", "qemu-4096", "empty"]), st.randoms(use_true_random=False))
def test_mutated_dmlog_gives_only_dmlog_error(workdir, name, rnd):
    seed = next(s for s in _dm_seeds(workdir) if s.name == name)
    path = workdir / "mutated.log"
    path.write_bytes(fuzz.DmLogMutator(seed, rnd, workdir / "rebuilt.log").mutate())
    fuzz.dmlog_read_paths(path)  # a DmLogError must name file, entry and offset
    fuzz.dmlog_trace_paths(path, rnd)


@fuzzing(100)
@given(st.binary(max_size=3000), st.sampled_from([b"", struct.pack(
    "<QQQI", 0x6A736677736872, 1, 3, 512)]))
def test_random_bytes_as_a_dmlog(workdir, junk, prefix):
    path = workdir / "random.log"
    path.write_bytes(prefix + junk)
    fuzz.dmlog_read_paths(path)
    fuzz.dmlog_trace_paths(path, random.Random(0))


@functools.cache
def _dm_seeds_in(path: str) -> list[fuzz.DmLogSeed]:
    return fuzz.dmlog_seeds(Path(path))


def _dm_seeds(workdir: Path) -> list[fuzz.DmLogSeed]:
    return _dm_seeds_in(str(workdir))


# -- scenarios --------------------------------------------------------------------------
yamlish = st.lists(st.tuples(
    st.sampled_from(["", "  ", "    ", "- ", "  - ", "\t"]),
    st.sampled_from(fuzz.SCENARIO_KEYS),
    st.one_of(st.sampled_from(fuzz.SCENARIO_VALUES), st.text(max_size=20))),
    max_size=12).map(lambda lines: "\n".join(f"{i}{k}: {v}" for i, k, v in lines))


def _load(path: Path) -> None:
    try:
        sc = load_scenario(path)
        check_writer(path, sc)
        sc.ops()
    except ScenarioError as exc:
        assert exc.lines
        for line in exc.lines:
            assert re.match(re.escape(str(path)) + r":\d+: \S", line), line


@fuzzing(200)
@given(st.one_of(yamlish, st.text(max_size=300)))
def test_random_yamlish_text_gives_only_scenario_errors(workdir, text):
    path = workdir / "random.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load(path)


@fuzzing(250)
@given(st.integers(0, 10 ** 6), st.randoms(use_true_random=False))
def test_mutated_scenarios_give_only_scenario_errors(workdir, pick, rnd):
    texts = fuzz.scenario_seeds()
    name, text = texts[pick % len(texts)]
    if not (workdir / "rec.log").exists():  # the trace seed names this log
        write_log(workdir / "rec.log", [write_entry(8, b"\xa1" * 4096), flush_entry()])
    path = workdir / "mutated.yaml"
    path.write_bytes(fuzz.ScenarioMutator(text, rnd, [t for _, t in texts]).mutate())
    _load(path)


# -- entry header rejections -------------------------------------------------------------
GUIDS = [uuid.UUID(int=0), uuid.UUID(int=1), uuid.UUID(int=2)]


@fuzzing(200)
@given(st.sampled_from([0, 4096, 8192, 4095, 1 << 20, 2 << 20]), st.integers(0, 3),
       st.integers(0, 300), st.integers(0, 2), st.integers(0, 2),
       st.sampled_from([0, 1 << 30, 1 << 60]), st.integers(0, 255))
def test_a_stale_entry_is_rejected_alike_whatever_the_headers_guid(
        length, seq, count, entry_guid, header_guid, offset, slot):
    """Rejections of entries whose GUID is not the header's are shared between log
    sessions (``replay._rejection``): each must be the one the full check gives."""
    from crashsim.writers.vhdx import replay as r
    head = struct.pack("<4sIIIQII16sQQ", b"loge", 0, length, 0, seq, count, 0,
                       GUIDS[entry_guid].bytes_le, offset, offset)
    pos = slot * 4096
    h = vf.parse_log_entry_header(head, pos)
    shared = r._rejection(head, h, 1 << 20, GUIDS[header_guid], pos)
    full = r._header_rejection(h, 1 << 20, GUIDS[header_guid], pos)
    assert (shared is None) == (full is None)
    if full is not None:
        assert (shared.reason, shared.code, shared.position) == \
            (full.reason, full.code, full.position)
