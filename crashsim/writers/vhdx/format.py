"""VHDX on-disk structures: parse and build, byte for byte (vhdx-log-format.md §1-§6).

This module owns the layout of every structure crashsim reads or writes: the file type
identifier, the two headers, the region table, the metadata region, BAT entries and the
metadata log's entries, descriptors and data sectors. It does no I/O: functions take and
return bytes, so the replay, the log writer and the guest driver share one definition.

Every parser raises only ``VhdxCorrupt(reason, offset)`` on bad input, naming the file
offset of the structure it rejected and, in ``code``, a short stable name of the rule that
failed (used by replay for its branch names).
"""
from __future__ import annotations

import functools
import itertools
import struct
import sys
import uuid
from array import array
from dataclasses import dataclass, field, replace
from typing import Iterator

import crc32c

from ..base import RecoveryError

KiB = 1 << 10
MiB = 1 << 20
LOG_SECTOR = 4096

FILE_SIGNATURE = b"vhdxfile"
HEADER_SLOTS = (0x10000, 0x20000)
HEADER_BLOCK = 4 * KiB
REGION_TABLE_OFFSETS = (0x30000, 0x40000)
REGION_TABLE_BYTES = 64 * KiB
HEADER_SECTION_END = 1 * MiB
METADATA_TABLE_BYTES = 64 * KiB
MAX_FILE_BYTES = 1 << 46  # 64 TiB: VHDX's own limit; anything larger is garbage
# A 32-byte zero descriptor may zero up to 64 TiB in place, one 4 KiB write at a time:
# crashsim replays (and its writer logs) at most this much zeroing per sequence.
MAX_REPLAY_ZERO_BYTES = 64 * MiB

ZERO_GUID = uuid.UUID(int=0)
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_GUID = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_GUID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_GUID = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_GUID = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

# BAT entry states (§5)
NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, UNMAPPED_V095 = 0, 1, 2, 3, 5
FULLY_PRESENT, PARTIALLY_PRESENT = 6, 7
SB_PRESENT = 6
STATE_NAMES = {0: "NOT_PRESENT", 1: "UNDEFINED", 2: "ZERO", 3: "UNMAPPED", 4: "INVALID(4)",
               5: "UNMAPPED(v0.95)", 6: "FULLY_PRESENT", 7: "PARTIALLY_PRESENT"}
BAT_STATE_MASK = 0x7
BAT_OFFSET_MASK = 0xFFFFFFFFFFF00000

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")          # 80 bytes
_REGION_HEADER = struct.Struct("<4sIII")                # 16 bytes
_REGION_ENTRY = struct.Struct("<16sQII")                # 32 bytes
_META_HEADER = struct.Struct("<8sHH20s")                # 32 bytes
_META_ENTRY = struct.Struct("<16sIIII")                 # 32 bytes
_LOG_HEADER = struct.Struct("<4sIIIQII16sQQ")           # 64 bytes
_DESC = struct.Struct("<4s4s8sQQ")                      # 32 bytes ('desc')
_ZERO_DESC = struct.Struct("<4sIQQQ")                   # 32 bytes ('zero')
_DATA_HEAD = struct.Struct("<4sI")

META_IS_USER, META_IS_VIRTUAL_DISK, META_IS_REQUIRED = 1, 2, 4


class VhdxCorrupt(RecoveryError):
    """The bytes are not a valid VHDX structure. ``code`` names the rule that failed."""

    def __init__(self, reason: str, offset: int | None = None, code: str = "corrupt"):
        super().__init__(reason, offset)
        self.code = code


# -- checksums -------------------------------------------------------------------------
def crc32c_with_zeroed_field(blob: bytes, field_offset: int = 4) -> int:
    """CRC-32C over ``blob`` with its 4-byte checksum field counted as zero."""
    crc = crc32c.crc32c(blob[:field_offset])
    crc = crc32c.crc32c(b"\0\0\0\0", crc)
    return crc32c.crc32c(blob[field_offset + 4:], crc)


def with_checksum(blob: bytes, field_offset: int = 4) -> bytes:
    crc = crc32c_with_zeroed_field(blob, field_offset)
    return blob[:field_offset] + struct.pack("<I", crc) + blob[field_offset + 4:]


@functools.lru_cache(maxsize=4096)
def _guid_of(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=raw)


def _guid(raw: bytes) -> uuid.UUID:
    # Every open parses the same few GUIDs again; UUID() is costly, so they are shared.
    return _guid_of(bytes(raw))


@functools.lru_cache(maxsize=4096)
def guid_text(guid: uuid.UUID) -> str:
    """str(guid), shared: a full log rejects dozens of stale entries per recovery, each
    with a message naming two GUIDs, and UUID formats itself in Python."""
    return str(guid)


def parse_cache(maxsize: int = 256):
    """Memoise a pure parser of bytes. Judging opens each crash state three times and
    most states share their headers, region table and metadata, so the same bytes are
    parsed again and again. Only successes are cached (errors are raised anew); lists in
    the result are copied so a caller can never change the cached value."""
    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            try:
                value = cached(*args)
            except (TypeError, ValueError):  # a bytearray or writable view: unhashable
                value = cached(*(bytes(a) if isinstance(a, (bytearray, memoryview))
                                 else a for a in args))
            return _fresh(value) if type(value) in (list, tuple) else value
        call.cache_clear = cached.cache_clear
        return call
    return wrap


def _fresh(value):
    if type(value) is list:
        return list(value)
    if type(value) is tuple and any(type(v) in (list, tuple) for v in value):
        return tuple(_fresh(v) for v in value)
    return value


def _need(blob: bytes, length: int, what: str, offset: int) -> None:
    if len(blob) < length:
        raise VhdxCorrupt(f"{what} is truncated: {len(blob)} of {length} bytes present",
                          offset, "truncated")


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


# -- file type identifier (§2.1) ---------------------------------------------------------
def build_file_identifier(creator: str) -> bytes:
    """The first 1 KiB of the file (the rest of the 64 KiB identifier is zero)."""
    name = creator.encode("utf-16-le")[:512]
    return (FILE_SIGNATURE + name).ljust(1024, b"\0")


@parse_cache()
def parse_file_identifier(blob: bytes) -> str:
    """The creator string; raises VhdxCorrupt unless the signature is "vhdxfile"."""
    _need(blob, 8, "file type identifier", 0)
    if blob[:8] != FILE_SIGNATURE:
        raise VhdxCorrupt(f"not a VHDX file: signature {blob[:8]!r}, expected "
                          f"{FILE_SIGNATURE!r}", 0, "signature")
    raw = blob[8:520]
    end = next((i for i in range(0, len(raw) - 1, 2) if raw[i:i + 2] == b"\0\0"), len(raw))
    return raw[:end - end % 2].decode("utf-16-le", errors="replace")


# -- headers (§3) -----------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_length: int
    log_offset: int
    log_version: int = 0
    version: int = 1

    def pack(self) -> bytes:
        """The 80-byte structure with a zero checksum field."""
        return _HEADER.pack(b"head", 0, self.sequence_number, self.file_write_guid.bytes_le,
                            self.data_write_guid.bytes_le, self.log_guid.bytes_le,
                            self.log_version, self.version, self.log_length,
                            self.log_offset)

    def evolve(self, **changes) -> "Header":
        return replace(self, **changes)


def header_block(header: Header, old_block: bytes = b"") -> bytes:
    """The 4 KiB header block: the 80-byte structure over the slot's old bytes, with the
    CRC over all 4 KiB (QEMU keeps whatever reserved bytes the slot already had)."""
    rest = bytes(old_block[80:HEADER_BLOCK]).ljust(HEADER_BLOCK - 80, b"\0")
    return with_checksum(header.pack() + rest)


def check_header(block: bytes, offset: int) -> Header:
    """Parse one header slot; raises VhdxCorrupt saying why it is not valid."""
    _need(block, HEADER_BLOCK, "header", offset)
    block = bytes(block[:HEADER_BLOCK])
    sig, crc, seq, fw, dw, lg, log_ver, ver, log_len, log_off = _HEADER.unpack_from(block)
    if sig != b"head":
        raise VhdxCorrupt(f"header signature is {sig!r}, expected b'head'", offset,
                          "header-signature")
    if crc != crc32c_with_zeroed_field(block):
        raise VhdxCorrupt("header checksum mismatch", offset + 4, "header-checksum")
    if ver != 1:
        raise VhdxCorrupt(f"header version is {ver}, expected 1", offset + 66,
                          "header-version")
    return Header(seq, _guid(fw), _guid(dw), _guid(lg), log_len, log_off, log_ver, ver)


@parse_cache()
def choose_header(block1: bytes, block2: bytes) -> tuple[int, Header, list[str]]:
    """(slot index 0/1, current header, notes about the other slot) per §3, with QEMU's
    Disk2VHD exception for equal sequence numbers and byte-identical structures."""
    found: list[Header | None] = []
    notes: list[str] = []
    for i, (blob, off) in enumerate(zip((block1, block2), HEADER_SLOTS)):
        try:
            found.append(check_header(blob, off))
        except VhdxCorrupt as exc:
            found.append(None)
            notes.append(f"header {i + 1}: {exc}")
    h1, h2 = found
    if h1 is None and h2 is None:
        # Each note names its own offset already; the error keeps header 1's for callers
        # without appending it to the message a second time.
        exc = VhdxCorrupt("no valid VHDX header: " + "; ".join(notes), None, "no-header")
        exc.offset = HEADER_SLOTS[0]
        raise exc
    if h2 is None or (h1 is not None and h1.sequence_number > h2.sequence_number):
        return 0, h1, notes
    if h1 is None or h2.sequence_number > h1.sequence_number:
        return 1, h2, notes
    if bytes(block1[:80]) == bytes(block2[:80]):
        notes.append("both headers have sequence number "
                     f"{h1.sequence_number} and identical content (Disk2VHD): using header 1")
        return 0, h1, notes
    raise VhdxCorrupt(f"both headers have sequence number {h1.sequence_number} but differ",
                      HEADER_SLOTS[1], "header-sequence-tie")


def check_log_geometry(header: Header, offset: int) -> None:
    """QEMU's checks on LogOffset/LogVersion/LogLength, made even on clean images."""
    if header.log_offset < MiB or header.log_offset % MiB:
        raise VhdxCorrupt(f"log offset {header.log_offset:#x} is not a 1 MiB multiple of "
                          f"at least 1 MiB", offset + 72, "log-offset")
    if header.log_version != 0:
        raise VhdxCorrupt(f"log version is {header.log_version}, expected 0", offset + 64,
                          "log-version")
    if header.log_length % MiB:
        raise VhdxCorrupt(f"log length {header.log_length:#x} is not a multiple of 1 MiB",
                          offset + 68, "log-length")
    if header.log_offset + header.log_length > MAX_FILE_BYTES:
        raise VhdxCorrupt("log region lies beyond the largest VHDX file", offset + 72,
                          "log-offset")


# -- region table (§4) ------------------------------------------------------------------
@dataclass(frozen=True)
class RegionEntry:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool = False


def build_region_table(entries: list[RegionEntry]) -> bytes:
    body = b"".join(_REGION_ENTRY.pack(e.guid.bytes_le, e.file_offset, e.length,
                                       int(e.required)) for e in entries)
    blob = _REGION_HEADER.pack(b"regi", 0, len(entries), 0) + body
    return with_checksum(blob.ljust(REGION_TABLE_BYTES, b"\0"))


@parse_cache()
def parse_region_table(blob: bytes, offset: int) -> list[RegionEntry]:
    _need(blob, REGION_TABLE_BYTES, "region table", offset)
    blob = bytes(blob[:REGION_TABLE_BYTES])
    sig, crc, count, _ = _REGION_HEADER.unpack_from(blob)
    if sig != b"regi":
        raise VhdxCorrupt(f"region table signature is {sig!r}, expected b'regi'", offset,
                          "region-signature")
    if crc != crc32c_with_zeroed_field(blob):
        raise VhdxCorrupt("region table checksum mismatch", offset + 4, "region-checksum")
    if count > 2047:
        raise VhdxCorrupt(f"region table has {count} entries (at most 2047)", offset + 8,
                          "region-count")
    entries = []
    for i in range(count):
        g, off, length, flags = _REGION_ENTRY.unpack_from(blob, 16 + 32 * i)
        entries.append(RegionEntry(_guid(g), off, length, bool(flags & 1)))
    return entries


@dataclass(frozen=True)
class Regions:
    bat: RegionEntry
    metadata: RegionEntry


def known_regions(entries: list[RegionEntry], offset: int,
                  reserved: list[tuple[int, int]] = ()) -> Regions:
    """The BAT and metadata regions; rejects duplicates, overlaps, misalignment and
    unknown required regions, as QEMU's vhdx_open_region_tables does."""
    claimed = [(0, HEADER_SECTION_END)] + [r for r in reserved if r[1] > r[0]]
    found: dict[uuid.UUID, RegionEntry] = {}
    for i, e in enumerate(entries):
        where = offset + 16 + 32 * i
        if e.file_offset % MiB or e.length % MiB or e.length == 0:
            raise VhdxCorrupt(f"region {e.guid} at {e.file_offset:#x} length {e.length:#x} "
                              f"is not 1 MiB aligned", where, "region-alignment")
        if e.file_offset + e.length > MAX_FILE_BYTES:
            raise VhdxCorrupt(f"region {e.guid} lies beyond the largest VHDX file", where,
                              "region-range")
        span = (e.file_offset, e.file_offset + e.length)
        if any(span[0] < hi and lo < span[1] for lo, hi in claimed):
            raise VhdxCorrupt(f"region {e.guid} [{span[0]:#x}, {span[1]:#x}) overlaps "
                              f"another region", where, "region-overlap")
        claimed.append(span)
        if e.guid in (BAT_GUID, METADATA_GUID):
            if e.guid in found:
                raise VhdxCorrupt(f"region {e.guid} appears twice", where,
                                  "region-duplicate")
            found[e.guid] = e
        elif e.required:
            raise VhdxCorrupt(f"unknown required region {e.guid}", where, "region-unknown")
    for g, name in ((BAT_GUID, "BAT"), (METADATA_GUID, "metadata")):
        if g not in found:
            raise VhdxCorrupt(f"region table has no {name} region", offset, "region-missing")
    return Regions(found[BAT_GUID], found[METADATA_GUID])


# -- metadata region --------------------------------------------------------------------
@dataclass(frozen=True)
class Metadata:
    block_size: int
    virtual_size: int
    logical_sector_size: int = 512
    physical_sector_size: int = 4096
    page83: uuid.UUID = ZERO_GUID
    leave_blocks_allocated: bool = False
    has_parent: bool = False

    @property
    def chunk_ratio(self) -> int:
        return chunk_ratio(self.logical_sector_size, self.block_size)

    @property
    def data_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def bat_entries(self) -> int:
        return bat_entry_count(self.virtual_size, self.block_size,
                               self.logical_sector_size, self.has_parent)


def build_metadata(md: Metadata) -> bytes:
    """The metadata region's content, laid out as QEMU lays it out (items at 64 KiB)."""
    flags = int(md.leave_blocks_allocated) | (int(md.has_parent) << 1)
    vd = META_IS_VIRTUAL_DISK | META_IS_REQUIRED
    items = [(FILE_PARAMETERS_GUID, struct.pack("<II", md.block_size, flags),
              META_IS_REQUIRED),
             (VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", md.virtual_size), vd),
             (PAGE83_GUID, md.page83.bytes_le, vd),
             (LOGICAL_SECTOR_GUID, struct.pack("<I", md.logical_sector_size), vd),
             (PHYSICAL_SECTOR_GUID, struct.pack("<I", md.physical_sector_size), vd)]
    table = _META_HEADER.pack(b"metadata", 0, len(items), bytes(20))
    data = b""
    for guid, value, item_flags in items:
        table += _META_ENTRY.pack(guid.bytes_le, METADATA_TABLE_BYTES + len(data),
                                  len(value), item_flags, 0)
        data += value
    return table.ljust(METADATA_TABLE_BYTES, b"\0") + data


_KNOWN_ITEMS = {FILE_PARAMETERS_GUID: 8, VIRTUAL_DISK_SIZE_GUID: 8, PAGE83_GUID: 16,
                LOGICAL_SECTOR_GUID: 4, PHYSICAL_SECTOR_GUID: 4, PARENT_LOCATOR_GUID: 0}


@parse_cache()
def metadata_bytes_needed(table: bytes, region: RegionEntry) -> int:
    """How much of the metadata region holds the table and its items (so a reader
    need not read the whole region); never more than the region."""
    if len(table) < 32 or table[:8] != b"metadata":
        return min(len(table), region.length)
    _, _, count, _ = _META_HEADER.unpack_from(table)
    end = METADATA_TABLE_BYTES
    for i in range(min(count, (len(table) - 32) // 32)):
        g, off, length, _, _ = _META_ENTRY.unpack_from(table, 32 + 32 * i)
        want = _KNOWN_ITEMS.get(_guid(g))
        if want is not None:  # parse_metadata reads known items only, ``want`` bytes each
            end = max(end, off + min(length, want))
    return min(end, region.length)


@parse_cache()
def parse_metadata_parts(table: bytes, rest: bytes, region: RegionEntry) -> Metadata:
    """``parse_metadata`` of ``table + rest``, cached on the two parts. The table is a
    page the image keeps, whose hash Python works out once; joined to the few bytes of
    items past it, it made new bytes at every open, hashed in full to look them up (7%
    of judging the bench workload)."""
    return parse_metadata.__wrapped__(table + rest, region)


@parse_cache()
def parse_metadata(blob: bytes, region: RegionEntry) -> Metadata:
    """Parse the metadata region (``blob`` = its bytes, at least the table and items)."""
    base = region.file_offset
    _need(blob, METADATA_TABLE_BYTES, "metadata table", base)
    sig, _, count, _ = _META_HEADER.unpack_from(blob)
    if sig != b"metadata":
        raise VhdxCorrupt(f"metadata table signature is {sig!r}, expected b'metadata'",
                          base, "metadata-signature")
    if 32 + 32 * count > METADATA_TABLE_BYTES:
        raise VhdxCorrupt(f"metadata table has {count} entries, more than fit", base + 10,
                          "metadata-count")
    values: dict[uuid.UUID, bytes] = {}
    for i in range(count):
        where = base + 32 + 32 * i
        g, off, length, flags, _ = _META_ENTRY.unpack_from(blob, 32 + 32 * i)
        guid = _guid(g)
        if guid in values:
            raise VhdxCorrupt(f"metadata item {guid} appears twice", where,
                              "metadata-duplicate")
        if guid not in _KNOWN_ITEMS:
            if flags & META_IS_REQUIRED:
                raise VhdxCorrupt(f"unknown required metadata item {guid}", where,
                                  "metadata-unknown")
            continue
        want = _KNOWN_ITEMS[guid]
        if off < METADATA_TABLE_BYTES or off + length > region.length or length < want:
            raise VhdxCorrupt(f"metadata item {guid} at +{off:#x} length {length} lies "
                              f"outside the metadata region", where, "metadata-range")
        values[guid] = bytes(blob[off:off + max(want, 0)]).ljust(want, b"\0")
    return _metadata_from_items(values, base)


def _metadata_from_items(values: dict[uuid.UUID, bytes], base: int) -> Metadata:
    for guid in (FILE_PARAMETERS_GUID, VIRTUAL_DISK_SIZE_GUID, LOGICAL_SECTOR_GUID,
                 PHYSICAL_SECTOR_GUID, PAGE83_GUID):
        if guid not in values:
            raise VhdxCorrupt(f"required metadata item {guid} is missing", base,
                              "metadata-missing")
    block_size, flags = struct.unpack("<II", values[FILE_PARAMETERS_GUID])
    (vsize,) = struct.unpack("<Q", values[VIRTUAL_DISK_SIZE_GUID])
    (logical,) = struct.unpack("<I", values[LOGICAL_SECTOR_GUID])
    (physical,) = struct.unpack("<I", values[PHYSICAL_SECTOR_GUID])
    md = Metadata(block_size, vsize, logical, physical, _guid(values[PAGE83_GUID]),
                  bool(flags & 1), bool(flags & 2))
    if md.has_parent and PARENT_LOCATOR_GUID not in values:
        raise VhdxCorrupt("differencing image without a parent locator", base,
                          "metadata-missing")
    _check_metadata_values(md, base)
    return md


def _check_metadata_values(md: Metadata, base: int) -> None:
    if md.block_size < MiB or md.block_size > 256 * MiB or md.block_size & (md.block_size - 1):
        raise VhdxCorrupt(f"block size {md.block_size} is not a power of two in "
                          f"[1 MiB, 256 MiB]", base, "metadata-block-size")
    for name, value in (("logical", md.logical_sector_size),
                        ("physical", md.physical_sector_size)):
        if value not in (512, 4096):
            raise VhdxCorrupt(f"{name} sector size {value} is not 512 or 4096", base,
                              "metadata-sector-size")
    if md.virtual_size == 0 or md.virtual_size % md.logical_sector_size \
            or md.virtual_size > MAX_FILE_BYTES:
        raise VhdxCorrupt(f"virtual disk size {md.virtual_size} is not a positive multiple "
                          f"of the logical sector size (at most 64 TiB)", base,
                          "metadata-virtual-size")


# -- BAT (§5) ---------------------------------------------------------------------------
def chunk_ratio(logical_sector_size: int, block_size: int) -> int:
    """Payload entries between two sector-bitmap entries: 2^23 x sector / block."""
    return ((1 << 23) * logical_sector_size) // block_size


def bat_index(block: int, ratio: int) -> int:
    """BAT entry index of payload block ``block``: one sector-bitmap entry follows every
    ``ratio`` payload entries."""
    return block + block // ratio


def bitmap_index(chunk: int, ratio: int) -> int:
    return (chunk + 1) * (ratio + 1) - 1


def bat_entry_count(virtual_size: int, block_size: int, logical_sector_size: int,
                    has_parent: bool = False) -> int:
    """QEMU's vhdx_calc_bat_entries."""
    ratio = chunk_ratio(logical_sector_size, block_size)
    blocks = -(-virtual_size // block_size)
    if has_parent:
        return -(-blocks // ratio) * (ratio + 1)
    return blocks + (blocks - 1) // ratio


def pack_bat_entry(state: int, file_offset: int) -> int:
    if file_offset % MiB:
        raise ValueError(f"BAT file offset {file_offset:#x} is not a multiple of 1 MiB")
    return (file_offset & BAT_OFFSET_MASK) | (state & BAT_STATE_MASK)


def unpack_bat_entry(value: int) -> tuple[int, int]:
    """(state, file offset in bytes)."""
    return value & BAT_STATE_MASK, value & BAT_OFFSET_MASK


def payload_block_of(index: int, ratio: int) -> int:
    """The payload block of BAT entry ``index`` (not a sector-bitmap entry)."""
    return index - index // (ratio + 1)


def is_bitmap_index(index: int, ratio: int) -> bool:
    return (index + 1) % (ratio + 1) == 0


@parse_cache(maxsize=64)
def nonzero_entries_of(blob: bytes) -> list[tuple[int, int]]:
    """(index, value) of the entries of the BAT in ``blob`` that are not all zero. A zero
    entry is NOT_PRESENT at offset 0, valid in every slot, so checks can skip it."""
    values = struct.unpack(f"<{len(blob) // 8}Q", blob[:len(blob) // 8 * 8])
    return list(itertools.compress(enumerate(values), values))


@parse_cache(maxsize=64)
def highest_bat_offset(blob: bytes) -> int:
    """The largest file offset an entry of the BAT in ``blob`` names (0: none). The
    offset fills an entry's high bits, so the largest entry names it."""
    values = struct.unpack(f"<{len(blob) // 8}Q", blob[:len(blob) // 8 * 8])
    return max(values, default=0) & BAT_OFFSET_MASK


def parse_bat(blob: bytes, count: int) -> array:
    """The ``count`` entries, padded with zeros, as an array of unsigned 64-bit ints: made
    in C from the bytes (a list of a 1 GiB image's 1,024 ints cost 10 us per open)."""
    raw = blob[:8 * count]
    if len(raw) < 8 * count:
        raw = bytes(raw).ljust(8 * count, b"\0")
    bat = array("Q")
    bat.frombytes(raw)
    if sys.byteorder != "little":
        bat.byteswap()
    return bat


# -- log entries (§6) -------------------------------------------------------------------
@dataclass(frozen=True)
class LogEntryHeader:
    checksum: int
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    log_guid: uuid.UUID
    flushed_file_offset: int
    last_file_offset: int

    @property
    def descriptor_sectors(self) -> int:
        return descriptor_sectors(self.descriptor_count)


@dataclass(frozen=True)
class LogDescriptor:
    kind: str                  # "desc" (one data sector) or "zero"
    file_offset: int
    sequence_number: int
    length: int = LOG_SECTOR   # bytes covered; ZeroLength for "zero"
    leading: bytes = b""       # "desc": bytes 0..7 of the target sector, raw
    trailing: bytes = b""      # "desc": bytes 4092..4095, raw


@dataclass
class LogEntry:
    header: LogEntryHeader
    descriptors: list[LogDescriptor]
    data_sectors: list[bytes] = field(default_factory=list)  # raw 4 KiB, one per "desc"

    def writes(self) -> Iterator[tuple[int, bytes | int]]:
        """(file offset, 4 KiB sector bytes) for "desc", (file offset, length) for "zero"."""
        data = iter(self.data_sectors)
        for d in self.descriptors:
            if d.kind == "desc":
                yield d.file_offset, rebuild_sector(d, next(data))
            else:
                yield d.file_offset, d.length

    @property
    def end_offset(self) -> int:
        """The file offset just past the last byte this entry writes."""
        ends = [d.file_offset + d.length for d in self.descriptors]
        return max(ends, default=0)


def descriptor_sectors(count: int) -> int:
    """Sectors holding the header and ``count`` descriptors (at least 1)."""
    return -(-(count + 2) // 128)


def rebuild_sector(desc: LogDescriptor, data_sector: bytes) -> bytes:
    return desc.leading + bytes(data_sector[8:4092]) + desc.trailing


@dataclass(frozen=True)
class SectorUpdate:
    """One 4 KiB-aligned update of the file: a full sector, or a run of zeros."""
    file_offset: int
    data: bytes | None = None     # 4096 bytes, or None for zeros
    zero_length: int = 0


def entry_sector_count(updates: list[SectorUpdate]) -> int:
    data = sum(1 for u in updates if u.data is not None)
    return descriptor_sectors(len(updates)) + data


def build_log_entry(*, sequence_number: int, tail: int, log_guid: uuid.UUID,
                    flushed_file_offset: int, last_file_offset: int,
                    updates: list[SectorUpdate]) -> bytes:
    """The whole entry: header + descriptor sectors + data sectors, checksummed."""
    seq = sequence_number
    descs, datas = [], []
    for u in updates:
        if u.file_offset % LOG_SECTOR:
            raise ValueError(f"log update at {u.file_offset:#x} is not 4 KiB aligned")
        if u.data is None:
            descs.append(_ZERO_DESC.pack(b"zero", 0, u.zero_length, u.file_offset, seq))
            continue
        if len(u.data) != LOG_SECTOR:
            raise ValueError("a 'desc' update must carry exactly one 4 KiB sector")
        descs.append(_DESC.pack(b"desc", u.data[4092:], u.data[:8], u.file_offset, seq))
        datas.append(_DATA_HEAD.pack(b"data", seq >> 32) + u.data[8:4092]
                     + struct.pack("<I", seq & 0xFFFFFFFF))
    dsect = descriptor_sectors(len(descs))
    length = (dsect + len(datas)) * LOG_SECTOR
    head = _LOG_HEADER.pack(b"loge", 0, length, tail, seq, len(descs), 0,
                            log_guid.bytes_le, flushed_file_offset, last_file_offset)
    blob = (head + b"".join(descs)).ljust(dsect * LOG_SECTOR, b"\0") + b"".join(datas)
    return with_checksum(blob)


@parse_cache(maxsize=4096)
def parse_log_entry_header(blob: bytes, offset: int) -> LogEntryHeader:
    """The 64-byte entry header; VhdxCorrupt unless the signature is "loge"."""
    _need(blob, 64, "log entry header", offset)
    sig, crc, length, tail, seq, count, _, g, ffo, lfo = _LOG_HEADER.unpack_from(blob)
    if sig != b"loge":
        raise VhdxCorrupt(f"no log entry signature ({sig!r})", offset, "no-signature")
    return LogEntryHeader(crc, length, tail, seq, count, _guid(g), ffo, lfo)


def check_entry_header(h: LogEntryHeader, *, log_length: int, log_guid: uuid.UUID,
                       offset: int) -> None:
    """The header-level validity rules of §7 step 2 (before descriptors are read)."""
    if h.entry_length == 0 or h.entry_length % LOG_SECTOR or h.entry_length > log_length:
        raise VhdxCorrupt(f"entry length {h.entry_length:#x} is not a non-zero 4 KiB "
                          f"multiple of at most the log length {log_length:#x}",
                          offset + 8, "entry-length")
    if h.sequence_number == 0:
        raise VhdxCorrupt("entry sequence number is 0", offset + 16, "zero-sequence")
    if log_guid == ZERO_GUID:
        raise VhdxCorrupt(f"the header's LogGuid is zero (no active log), so entry "
                          f"GUID {guid_text(h.log_guid)} is stale", offset + 32,
                          "guid-mismatch")
    if h.log_guid is not log_guid and h.log_guid != log_guid:
        # The header's GUID is left out, so a stale entry reads the same under every
        # later log session (replay's first decision line names the header's).
        raise VhdxCorrupt(f"entry log GUID {guid_text(h.log_guid)} is not the header's "
                          f"LogGuid (stale entry)", offset + 32, "guid-mismatch")
    if h.descriptor_count * 32 > h.entry_length:
        raise VhdxCorrupt(f"{h.descriptor_count} descriptors do not fit in an entry of "
                          f"{h.entry_length:#x} bytes", offset + 24, "descriptor-count")
    if h.descriptor_sectors * LOG_SECTOR > h.entry_length:
        raise VhdxCorrupt(f"{h.descriptor_sectors} descriptor sectors exceed the entry "
                          f"length {h.entry_length:#x}", offset + 24, "descriptor-count")
    if max(h.flushed_file_offset, h.last_file_offset) > MAX_FILE_BYTES:
        raise VhdxCorrupt("entry file offsets lie beyond the largest VHDX file",
                          offset + 48, "file-offset-range")


def parse_descriptors(blob: bytes, h: LogEntryHeader, offset: int) -> list[LogDescriptor]:
    """Every descriptor of an entry (``blob`` starts at the entry header)."""
    out = []
    for i in range(h.descriptor_count):
        pos = 64 + 32 * i
        where = offset + pos
        raw = bytes(blob[pos:pos + 32])
        _need(raw, 32, f"descriptor {i}", where)
        sig = raw[:4]
        if sig == b"desc":
            _, trailing, leading, foff, seq = _DESC.unpack(raw)
            d = LogDescriptor("desc", foff, seq, LOG_SECTOR, leading, trailing)
        elif sig == b"zero":
            _, _, zlen, foff, seq = _ZERO_DESC.unpack(raw)
            if zlen % LOG_SECTOR:
                raise VhdxCorrupt(f"descriptor {i}: zero length {zlen:#x} is not a 4 KiB "
                                  f"multiple", where + 8, "descriptor")
            d = LogDescriptor("zero", foff, seq, zlen)
        else:
            raise VhdxCorrupt(f"descriptor {i}: signature {sig!r} is neither 'desc' nor "
                              f"'zero'", where, "descriptor")
        if d.file_offset % LOG_SECTOR:
            raise VhdxCorrupt(f"descriptor {i}: file offset {d.file_offset:#x} is not 4 KiB "
                              f"aligned", where + 16, "descriptor")
        if d.sequence_number != h.sequence_number:
            raise VhdxCorrupt(f"descriptor {i}: sequence number {d.sequence_number} differs "
                              f"from the entry's {h.sequence_number}", where + 24,
                              "descriptor")
        out.append(d)
    return out


def check_layout(h: LogEntryHeader, descs: list[LogDescriptor], offset: int) -> None:
    """EntryLength must equal (descriptor sectors + data sectors) x 4 KiB, and every
    descriptor must write below the entry's LastFileOffset (rounded up to 1 MiB)."""
    data = sum(1 for d in descs if d.kind == "desc")
    want = (h.descriptor_sectors + data) * LOG_SECTOR
    if want != h.entry_length:
        raise VhdxCorrupt(f"entry length {h.entry_length:#x} does not match its "
                          f"{len(descs)} descriptors ({want:#x} bytes)", offset + 8, "layout")
    limit = max(round_up(h.last_file_offset, MiB), h.flushed_file_offset)
    for i, d in enumerate(descs):
        if d.file_offset + d.length > limit:
            raise VhdxCorrupt(f"descriptor {i} writes [{d.file_offset:#x}, "
                              f"{d.file_offset + d.length:#x}) beyond LastFileOffset "
                              f"{h.last_file_offset:#x}", offset + 64 + 32 * i,
                              "descriptor-range")


def check_data_sector(sector: bytes, seq: int, index: int, offset: int,
                      check_signature: bool = True) -> None:
    _need(sector, LOG_SECTOR, f"data sector {index}", offset)
    sig, high = _DATA_HEAD.unpack_from(sector)
    (low,) = struct.unpack_from("<I", sector, 4092)
    if check_signature and sig != b"data":
        raise VhdxCorrupt(f"data sector {index}: signature {sig!r}, expected b'data'",
                          offset, "data-sector")
    if (high << 32 | low) != seq:
        raise VhdxCorrupt(f"data sector {index}: sequence {high << 32 | low} differs from "
                          f"the entry's {seq}", offset, "data-sequence")


def entry_checksum_ok(blob: bytes, h: LogEntryHeader) -> bool:
    return crc32c_with_zeroed_field(bytes(blob[:h.entry_length])) == h.checksum
