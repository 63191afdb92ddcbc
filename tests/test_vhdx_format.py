"""VHDX structures: byte layouts, validity rules, BAT arithmetic, and image creation."""
from __future__ import annotations

import random
import struct
import uuid

import pytest

from crashsim.blockdev import ImageDevice, run_sync
from crashsim.writers.vhdx import format as f
from crashsim.writers.vhdx.create import create_image
from crashsim.writers.vhdx.driver import VhdxDriver, validate

MiB = f.MiB


def _header(seq: int, log_guid: uuid.UUID = f.ZERO_GUID) -> f.Header:
    return f.Header(seq, uuid.UUID(int=1), uuid.UUID(int=2), log_guid, MiB, MiB)


# -- checksums and headers -------------------------------------------------------------
def test_crc32c_is_castagnoli_with_zeroed_field():
    assert f.crc32c_with_zeroed_field(b"1234" + b"\xff" * 4 + b"56789", 4) == \
        f.crc32c_with_zeroed_field(b"1234" + bytes(4) + b"56789", 4)
    import crc32c
    assert crc32c.crc32c(b"123456789") == 0xE3069283


def test_header_round_trip_and_crc_covers_whole_4k():
    block = f.header_block(_header(7), b"\0" * 80 + b"\x11" * 4016)
    assert len(block) == 4096 and block[:4] == b"head"
    assert f.check_header(block, 0x10000) == _header(7)
    tampered = block[:4000] + b"\x12" + block[4001:]
    with pytest.raises(f.VhdxCorrupt) as exc:
        f.check_header(tampered, 0x10000)
    assert exc.value.code == "header-checksum" and exc.value.offset == 0x10004


def test_header_version_and_signature_rules():
    bad_version = f.header_block(_header(1).evolve(version=2))
    with pytest.raises(f.VhdxCorrupt, match="version is 2"):
        f.check_header(bad_version, 0)
    with pytest.raises(f.VhdxCorrupt, match="signature"):
        f.check_header(b"HEAD" + bytes(4092), 0)
    with pytest.raises(f.VhdxCorrupt, match="truncated"):
        f.check_header(b"head", 0)


def test_choose_header_by_sequence_and_validity():
    a, b = f.header_block(_header(5)), f.header_block(_header(6))
    assert f.choose_header(a, b)[:2] == (1, _header(6))
    assert f.choose_header(b, a)[:2] == (0, _header(6))
    slot, h, notes = f.choose_header(a, bytes(4096))
    assert (slot, h.sequence_number) == (0, 5) and "header 2" in notes[0]
    with pytest.raises(f.VhdxCorrupt, match="no valid VHDX header"):
        f.choose_header(bytes(4096), bytes(4096))


def test_no_valid_header_names_each_offset_once():
    with pytest.raises(f.VhdxCorrupt) as exc:
        good = f.header_block(_header(3))
        f.choose_header(b"HEAD" + bytes(4092), good[:100] + b"\x01" + good[101:])
    text = str(exc.value)
    assert text == ("no valid VHDX header: header 1: header signature is b'HEAD', expected "
                    "b'head' (at offset 0x10000); header 2: header checksum mismatch (at "
                    "offset 0x20004)")
    assert (exc.value.offset, exc.value.code) == (0x10000, "no-header")


def test_cli_info_on_a_sample_with_both_headers_damaged(sample, capsys):
    from crashsim import vhdx_cli
    path = sample("iotest-dynamic-1G.vhdx")
    with open(path, "r+b") as fh:
        for slot in f.HEADER_SLOTS:
            fh.seek(slot)
            fh.write(b"XXXX")
    assert vhdx_cli.main(["vhdx", "info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"crashsim: error: {path}: no valid VHDX header: header 1: header signature is "
        f"b'XXXX', expected b'head' (at offset 0x10000); header 2: header signature is "
        f"b'XXXX', expected b'head' (at offset 0x20000)"]


def _short_image(content: bytes):
    from crashsim.image import SparseImage
    img = SparseImage(len(content))
    if content:
        img.write(0, content)
    return img


def _short_file(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("content,message", [
    (b"", "file is empty (0 bytes), too short to be a VHDX, whose first header ends at "
          "0x11000 (at offset 0x0)"),
    (bytes(100), "file is 100 bytes, too short to be a VHDX, whose first header ends at "
                 "0x11000; not a VHDX file either: signature b'" + "\\x00" * 8 + "', "
                 "expected b'vhdxfile' (at offset 0x0)"),
    (b"vhd", "file is 3 bytes, too short to be a VHDX, whose first header ends at "
             "0x11000; not a VHDX file either: signature b'vhd', expected b'vhdxfile' "
             "(at offset 0x0)"),
    # a VHDX cut inside its first header: the signature is right, the rest is missing
    (b"vhdxfile" + bytes(92), "file is truncated: 100 bytes, too short to hold the VHDX "
                              "headers (at offset 0x64)"),
])
def test_empty_or_short_file_is_called_short_with_its_size(tmp_path, capsys, content,
                                                           message):
    from crashsim import vhdx_cli
    from crashsim.writers.vhdx.log import check_signature
    with pytest.raises(f.VhdxCorrupt) as exc:
        check_signature(ImageDevice(_short_image(content)))
    assert str(exc.value) == message and exc.value.code == "truncated"
    path = _short_file(tmp_path, "short.vhdx", content)
    for command in ("info", "log", "read", "replay"):
        assert vhdx_cli.main(["vhdx", command, str(path)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"crashsim: error: {path}: {message}"]


def test_equal_sequence_numbers_disk2vhd_exception():
    a = f.header_block(_header(1))
    slot, h, notes = f.choose_header(a, a)
    assert slot == 0 and "Disk2VHD" in notes[-1]
    other = f.header_block(_header(1, uuid.UUID(int=9)))
    with pytest.raises(f.VhdxCorrupt) as exc:
        f.choose_header(a, other)
    assert exc.value.code == "header-sequence-tie"


def test_log_geometry_checks():
    f.check_log_geometry(_header(1), 0x10000)
    for bad in (_header(1).evolve(log_offset=MiB // 2), _header(1).evolve(log_version=1),
                _header(1).evolve(log_length=MiB + 4096)):
        with pytest.raises(f.VhdxCorrupt):
            f.check_log_geometry(bad, 0x10000)


# -- region table and metadata -------------------------------------------------------------
def test_region_table_round_trip_and_rules():
    entries = [f.RegionEntry(f.BAT_GUID, 2 * MiB, MiB),
               f.RegionEntry(f.METADATA_GUID, 3 * MiB, MiB)]
    blob = f.build_region_table(entries)
    assert len(blob) == 64 * 1024
    assert f.parse_region_table(blob, 0x30000) == entries
    regions = f.known_regions(entries, 0x30000, [(MiB, 2 * MiB)])
    assert regions.bat.file_offset == 2 * MiB
    with pytest.raises(f.VhdxCorrupt, match="checksum"):
        f.parse_region_table(blob[:100] + b"x" + blob[101:], 0x30000)
    with pytest.raises(f.VhdxCorrupt, match="overlaps"):
        f.known_regions(entries, 0x30000, [(MiB, 3 * MiB)])
    with pytest.raises(f.VhdxCorrupt, match="no metadata region"):
        f.known_regions(entries[:1], 0x30000)
    unknown = entries + [f.RegionEntry(uuid.UUID(int=5), 5 * MiB, MiB, required=True)]
    with pytest.raises(f.VhdxCorrupt, match="unknown required"):
        f.known_regions(unknown, 0x30000)


def test_metadata_round_trip_and_limits():
    md = f.Metadata(2 * MiB, 10 << 30, 512, 4096, uuid.UUID(int=3))
    region = f.RegionEntry(f.METADATA_GUID, 3 * MiB, MiB)
    assert f.parse_metadata(f.build_metadata(md), region) == md
    bad = f.build_metadata(f.Metadata(3 * MiB, 1 << 30))
    with pytest.raises(f.VhdxCorrupt, match="block size"):
        f.parse_metadata(bad, region)
    with pytest.raises(f.VhdxCorrupt, match="signature"):
        f.parse_metadata(bytes(128 * 1024), region)


def test_metadata_parsed_in_two_parts_is_the_metadata_parsed_whole():
    md = f.Metadata(2 * MiB, 10 << 30, 512, 4096, uuid.UUID(int=3))
    region = f.RegionEntry(f.METADATA_GUID, 3 * MiB, MiB)
    blob = f.build_metadata(md)
    cut = f.METADATA_TABLE_BYTES
    assert len(blob) > cut  # the items lie past the table, as in every image
    assert f.parse_metadata_parts(blob[:cut], blob[cut:], region) == md
    bad = f.build_metadata(f.Metadata(3 * MiB, 1 << 30))
    for _ in range(2):  # errors are not cached: the same error again
        with pytest.raises(f.VhdxCorrupt, match="block size"):
            f.parse_metadata_parts(bad[:cut], bad[cut:], region)
    with pytest.raises(f.VhdxCorrupt, match="truncated"):
        f.parse_metadata_parts(blob[:100], b"", region)


# -- BAT arithmetic ---------------------------------------------------------------------
def test_chunk_ratio_and_bat_index_with_interleaved_bitmaps():
    assert f.chunk_ratio(512, MiB) == 4096
    assert f.chunk_ratio(512, 32 * MiB) == 128
    assert f.bat_index(4095, 4096) == 4095
    assert f.bat_index(4096, 4096) == 4097      # entry 4096 is chunk 0's sector bitmap
    assert f.bitmap_index(0, 4096) == 4096
    assert f.bat_index(4607, 4096) == 4608      # first entry of BAT sector 9
    # the samples: 10 GiB / 1 MiB -> 10242 entries; 1 GiB / 32 MiB -> 32 entries
    assert f.bat_entry_count(10 << 30, MiB, 512) == 10242
    assert f.bat_entry_count(1 << 30, 32 * MiB, 512) == 32


def test_bat_entry_pack_unpack():
    v = f.pack_bat_entry(f.FULLY_PRESENT, 5 * MiB)
    assert v == 5 * MiB | 6 and f.unpack_bat_entry(v) == (6, 5 * MiB)
    with pytest.raises(ValueError):
        f.pack_bat_entry(f.FULLY_PRESENT, 5 * MiB + 4096)


# -- log entries --------------------------------------------------------------------------
def test_descriptor_sector_count():
    assert [f.descriptor_sectors(n) for n in (0, 126, 127, 254, 255)] == [1, 1, 2, 2, 3]


def test_log_entry_round_trip_with_zero_and_many_descriptors():
    guid = uuid.UUID(int=77)
    sectors = [bytes([i % 251 + 1]) * 4096 for i in range(130)]
    updates = [f.SectorUpdate(4096 * i, s) for i, s in enumerate(sectors)]
    updates.append(f.SectorUpdate(4096 * 200, None, 3 * 4096))
    blob = f.build_log_entry(sequence_number=(5 << 32) + 3, tail=0, log_guid=guid,
                             flushed_file_offset=2 * MiB, last_file_offset=4 * MiB,
                             updates=updates)
    h = f.parse_log_entry_header(blob, 0)
    assert h.descriptor_sectors == 2 and h.entry_length == len(blob) == (2 + 130) * 4096
    f.check_entry_header(h, log_length=MiB, log_guid=guid, offset=0)
    descs = f.parse_descriptors(blob, h, 0)
    f.check_layout(h, descs, 0)
    assert f.entry_checksum_ok(blob, h)
    entry = f.LogEntry(h, descs, [blob[p:p + 4096] for p in range(8192, len(blob), 4096)])
    writes = list(entry.writes())
    assert writes[:130] == [(4096 * i, s) for i, s in enumerate(sectors)]
    assert writes[130] == (4096 * 200, 3 * 4096)
    f.check_data_sector(entry.data_sectors[0], (5 << 32) + 3, 0, 0)


def test_leading_and_trailing_bytes_are_raw_copies():
    sector = bytes(range(256)) * 16
    blob = f.build_log_entry(sequence_number=1, tail=0, log_guid=uuid.UUID(int=1),
                             flushed_file_offset=MiB, last_file_offset=MiB,
                             updates=[f.SectorUpdate(0, sector)])
    desc = blob[64:96]
    assert desc[:4] == b"desc" and desc[4:8] == sector[4092:] and desc[8:16] == sector[:8]
    data = blob[4096:8192]
    assert data[:4] == b"data" and data[8:4092] == sector[8:4092]


@pytest.mark.parametrize("field_offset,value,code", [
    (8, 4097, "entry-length"), (16, 0, "zero-sequence"), (32, b"\x01" * 16, "guid-mismatch"),
    (24, 300, "descriptor-count")])
def test_entry_header_rules(field_offset, value, code):
    guid = uuid.UUID(int=1)
    blob = bytearray(f.build_log_entry(sequence_number=1, tail=0, log_guid=guid,
                                       flushed_file_offset=MiB, last_file_offset=MiB,
                                       updates=[f.SectorUpdate(0, b"\x01" * 4096)]))
    if isinstance(value, bytes):
        blob[field_offset:field_offset + 16] = value
    elif field_offset == 16:
        blob[16:24] = struct.pack("<Q", value)
    else:
        blob[field_offset:field_offset + 4] = struct.pack("<I", value)
    h = f.parse_log_entry_header(bytes(blob), 0)
    with pytest.raises(f.VhdxCorrupt) as exc:
        f.check_entry_header(h, log_length=MiB, log_guid=guid, offset=0)
    assert exc.value.code == code


def test_bad_descriptor_and_data_sector():
    guid = uuid.UUID(int=1)
    blob = bytearray(f.build_log_entry(sequence_number=9, tail=0, log_guid=guid,
                                       flushed_file_offset=MiB, last_file_offset=MiB,
                                       updates=[f.SectorUpdate(0, b"\x01" * 4096)]))
    h = f.parse_log_entry_header(bytes(blob), 0)
    bad = bytearray(blob)
    bad[64 + 24:64 + 32] = struct.pack("<Q", 8)
    with pytest.raises(f.VhdxCorrupt, match="sequence number 8 differs"):
        f.parse_descriptors(bytes(bad), h, 0)
    bad = bytearray(blob)
    bad[64 + 16:64 + 24] = struct.pack("<Q", 100)
    with pytest.raises(f.VhdxCorrupt, match="not 4 KiB"):
        f.parse_descriptors(bytes(bad), h, 0)
    with pytest.raises(f.VhdxCorrupt, match="sequence 0 differs"):
        f.check_data_sector(b"data" + bytes(4092), 9, 0, 0)


def test_garbage_never_raises_anything_but_vhdx_corrupt():
    rng = random.Random(4)
    for _ in range(300):
        junk = rng.randbytes(rng.choice([0, 3, 64, 4096, 70000]))
        for parse in (lambda b: f.parse_file_identifier(b),
                      lambda b: f.check_header(b, 0),
                      lambda b: f.parse_region_table(b, 0),
                      lambda b: f.parse_metadata(b, f.RegionEntry(f.METADATA_GUID, MiB, MiB)),
                      lambda b: f.parse_log_entry_header(b, 0)):
            try:
                parse(junk)
            except f.VhdxCorrupt:
                pass


# -- create ---------------------------------------------------------------------------
def test_create_layout_matches_qemu():
    img = create_image(1 << 30, rng=random.Random(1))
    dev = ImageDevice(img)
    assert img.read(0, 8) == b"vhdxfile"
    assert f.parse_file_identifier(img.read(0, 1024)) == "crashsim"
    h1 = f.check_header(img.read(0x10000, 4096), 0x10000)
    h2 = f.check_header(img.read(0x20000, 4096), 0x20000)
    assert h2.sequence_number == h1.sequence_number + 1
    assert (h1.log_offset, h1.log_length, h1.log_guid) == (MiB, MiB, f.ZERO_GUID)
    regions = f.parse_region_table(img.read(0x30000, 65536), 0x30000)
    assert [(r.guid, r.file_offset) for r in regions] == [(f.BAT_GUID, 2 * MiB),
                                                          (f.METADATA_GUID, 3 * MiB)]
    assert img.read(0x40000, 65536) == img.read(0x30000, 65536)
    assert img.size_bytes == 4 * MiB
    drv = VhdxDriver()
    run_sync(drv.open(dev))
    assert drv.metadata.virtual_size == 1 << 30 and drv.metadata.block_size == MiB
    assert drv.metadata.physical_sector_size == 4096
    assert validate(dev) == []


def test_create_is_deterministic_per_seed():
    a = create_image(64 * MiB, rng=random.Random(5)).content_key()
    b = create_image(64 * MiB, rng=random.Random(5)).content_key()
    c = create_image(64 * MiB, rng=random.Random(6)).content_key()
    assert a == b != c


def test_create_rejects_bad_geometry():
    with pytest.raises(ValueError, match="block size"):
        create_image(1 << 30, block_size_bytes=3 * MiB)
    with pytest.raises(ValueError, match="log size"):
        create_image(1 << 30, log_size_bytes=4096)
    with pytest.raises(ValueError, match="virtual size"):
        create_image(1000)


def test_create_refuses_a_log_too_long_for_the_headers_length_field(tmp_path, capsys):
    # LogLength is a u32: a 4 GiB log used to crash packing the header (exit 3)
    from crashsim.cli import main
    path = tmp_path / "n.vhdx"
    assert main(["vhdx", "create", str(path), "--size", "1GiB", "--log-size", "4GiB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"crashsim: error: {path}: log size")
    assert "at most 4095 MiB" in err and not path.exists()
    create_image(64 * MiB, log_size_bytes=4095 * MiB)  # the largest that fits


def test_large_log_and_block_sizes_place_regions_in_order():
    img = create_image(200 << 30, block_size_bytes=32 * MiB, log_size_bytes=4 * MiB)
    regions = f.parse_region_table(img.read(0x30000, 65536), 0x30000)
    assert regions[0].file_offset == 5 * MiB and regions[1].file_offset == 6 * MiB
    drv = VhdxDriver()
    run_sync(drv.open(ImageDevice(img)))
    assert len(drv.bat) == f.bat_entry_count(200 << 30, 32 * MiB, 512)


def test_parse_size_accepts_units_and_rejects_junk():
    from crashsim.sizes import parse_size
    assert [parse_size(v) for v in (4096, "64KiB", "1MiB", "2G", "1TiB", "3k")] == \
        [4096, 65536, MiB, 2 << 30, 1 << 40, 3072]
    for bad, why in (("-1GiB", "negative"), (-5, "negative"), ("12 parsecs", "expected"),
                     ("", "expected"), (1.5, "expected")):
        with pytest.raises(ValueError, match=why):
            parse_size(bad)


@pytest.mark.parametrize("magic,tool", [(b"BZh91AY&SY", "bzip2"), (b"\x1f\x8b\x08", "gzip"),
                                        (b"\xfd7zXZ\x00", "xz")])
def test_a_compressed_image_says_to_decompress_it(tmp_path, capsys, magic, tool):
    from crashsim import vhdx_cli
    path = _short_file(tmp_path, "disk.vhdx.z", magic + bytes(100))
    for command in ("info", "log", "read", "replay"):
        assert vhdx_cli.main(["vhdx", command, str(path)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"crashsim: error: {path}: {tool}-compressed, not a VHDX image: decompress it "
            f"first ({tool} -dc {path} > disk.vhdx) (at offset 0x0)"]


def test_read_refuses_a_terminal_for_stdout(tmp_path):
    import os
    import pty
    import subprocess
    import sys
    path = tmp_path / "disk.vhdx"
    create_image_file = ["create", str(path), "--size", "16MiB"]
    assert subprocess.run([sys.executable, "-m", "crashsim", "vhdx", *create_image_file],
                          capture_output=True).returncode == 0
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "crashsim", "vhdx", "read", str(path)],
                              stdout=follower, stderr=subprocess.PIPE, text=True,
                              timeout=60)
        os.close(follower)
        follower = -1
        assert proc.returncode == 2
        assert proc.stderr.splitlines() == [
            f"crashsim: error: {path}: refusing to write the raw virtual disk to a "
            f"terminal: use -o FILE, or redirect stdout (> disk.raw)"]
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
