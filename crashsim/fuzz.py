"""``crashsim fuzz``: structure-aware fuzzing of crashsim's own parsers and recovery.

A tool that judges other programs' crash safety must itself never crash. This module
owns the fuzzing campaign: the seed inputs (VHDX images crashsim makes - clean,
allocated, with a dirty log - and real sample images; dm-log-writes logs; scenario
files), structure-aware mutations of each (fields overwritten with checksums recomputed
so a mutation gets past the CRC, log entries injected, sequence numbers and GUIDs
aligned), the targets that run crashsim's parsers and its whole recovery path on a
mutated input, and the bookkeeping of what crashed.

A *crasher* is any exception other than the one a target documents (``RecoveryError``,
such as ``VhdxCorrupt``, for VHDX images; ``DmLogError`` for dm-log-writes logs;
``ScenarioError`` for scenario files; exit status 0 or 2 for the ``crashsim vhdx``
commands), an error message that breaks its contract (a scenario line that is not
``file:line: ...``), or an input that runs longer than ``INPUT_TIMEOUT_S`` (a hang).
Crashers are deduplicated by (exception type, file:line of the innermost crashsim frame;
file:function for hangs) and each is saved once with its traceback and the mutations
that made it.

Input ``i`` of a campaign with seed ``s`` is drawn from ``random.Random`` seeded with
``(s, i)`` over a corpus that is built deterministically, so an input can be made again.
"""
from __future__ import annotations

import argparse
import bz2
import contextlib
import hashlib
import io
import random
import re
import resource
import signal
import struct
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .blockdev import ImageDevice, run_sync
from .dmlog import DmLogError, discard_entry, flush_entry, mark_entry, read_log, to_trace
from .dmlog import LogEntry as DmEntry
from .dmlog import replay as dmlog_replay
from .dmlog import write_entry, write_log
from .external import private_tempdir
from .image import SparseImage
from .model import Op, merge_ranges
from .writers.base import ProbeFailed, RecoveryError
from .writers.vhdx import format as vf
from .writers.vhdx.create import create_image
from .writers.vhdx.driver import VhdxDriver, validate
from .writers.vhdx.log import BlockIO, HeaderSession, LogWriter, sector_updates
from .writers.vhdx.replay import (FIXED_POLICY, QEMU_POLICY, ReplayPolicy, ReplayResult,
                                  describe_scan, scan_log)
from .writers.vhdx.variants import VhdxQemuWriter
from .writers.vhdx.writer import VhdxWriter

MiB = vf.MiB
KiB = vf.KiB
LOG_SECTOR = vf.LOG_SECTOR
INPUT_TIMEOUT_S = 20.0            # one input through one target; longer is a hang
CLI_TIMEOUT_S = 90.0
PROGRESS_EVERY_S = 60.0
CLI_EVERY = 8                     # every 8th VHDX input also goes through `crashsim vhdx`
CLI_MAX_VIRTUAL_BYTES = 1 << 30   # `vhdx read` streams the whole virtual disk
SAVE_MAX_FILE_BYTES = 2 << 30     # larger images are saved as a sector dump, not a file
MEMORY_LIMIT_BYTES = 8 << 30      # a runaway allocation becomes a MemoryError crasher
PROBE_SHARE = 0.3                 # the liveness probe is costly: a share of the inputs
FAMILY_WEIGHTS = {"vhdx": 6, "dmlog": 2, "scenario": 2}
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_SCENARIOS = PACKAGE_DIR.parent / "scenarios"
DEFAULT_SAMPLES = PACKAGE_DIR.parents[1] / "shared" / "vhdx-samples"
POLICIES = (FIXED_POLICY, ReplayPolicy(), QEMU_POLICY)


class InputTimeout(BaseException):
    """One input ran past INPUT_TIMEOUT_S. A BaseException, so that no ``except
    Exception`` in the code under test swallows it."""


class ContractError(Exception):
    """A documented error was raised, but its message breaks the documented form."""


class CliCrash(Exception):
    """``crashsim vhdx ...`` exited with a status other than 0 or 2 (3: a traceback)."""

    def __init__(self, argv: list[str], status: int, stderr: str):
        super().__init__(f"crashsim {' '.join(argv[:2])} exited {status}")
        self.stderr = stderr
        self.key = _key_from_text(stderr, status)


# -- interesting values -----------------------------------------------------------------
INTERESTING = (0, 1, 2, 3, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x1FF, 0x200, 0xFFF, 0x1000,
               0x1001, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32,
               MiB - 1, MiB, MiB + 1, 2 * MiB, 256 * MiB, vf.MAX_FILE_BYTES - MiB,
               vf.MAX_FILE_BYTES, vf.MAX_FILE_BYTES + MiB, 1 << 63, (1 << 64) - 1)
KNOWN_GUIDS = (vf.BAT_GUID, vf.METADATA_GUID, vf.FILE_PARAMETERS_GUID,
               vf.VIRTUAL_DISK_SIZE_GUID, vf.PAGE83_GUID, vf.LOGICAL_SECTOR_GUID,
               vf.PHYSICAL_SECTOR_GUID, vf.PARENT_LOCATOR_GUID, vf.ZERO_GUID)
SIGNATURES = (b"head", b"regi", b"loge", b"desc", b"zero", b"data", b"meta", b"vhdx",
              b"\0\0\0\0", b"\xff\xff\xff\xff")


def interesting(rng: random.Random, width: int, extra: Sequence[int] = ()) -> int:
    """A boundary value (or a near miss, or random bits) that fits ``width`` bytes."""
    pool = INTERESTING + tuple(extra)
    r = rng.random()
    if r < 0.7:
        value = rng.choice(pool)
    elif r < 0.85:
        value = rng.choice(pool) + rng.choice((-4096, -512, -8, -1, 1, 8, 512, 4096))
    else:
        value = rng.getrandbits(8 * width)
    return value % (1 << (8 * width))


def _how_many(rng: random.Random, most: int) -> int:
    """1..most, each half as likely as the one before: mostly single mutations."""
    return rng.choices(range(1, most + 1), [1 << (most - k) for k in range(most)])[0]


def _le(value: int, width: int) -> bytes:
    return (value % (1 << (8 * width))).to_bytes(width, "little")


# -- VHDX seeds -------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """Where one structure of a seed image lies; ``tag`` adds detail (a metadata item's
    GUID, a log entry's position in the log, a slot number)."""
    kind: str
    offset: int
    length: int
    tag: str = ""


@dataclass
class VhdxSeed:
    name: str
    image: SparseImage
    ops: list[Op]                    # guest writes inside the virtual disk (the view)
    spans: list[Span] = field(default_factory=list)
    geometry: dict[str, int] = field(default_factory=dict)
    _writers: dict[str, object] = field(default_factory=dict)

    def of(self, kind: str) -> list[Span]:
        return [s for s in self.spans if s.kind == kind]

    def writer(self, kind: str):
        """A writer plugin configured like this image: the ``vhdx`` writer ("fixed"),
        ``vhdx-qemu`` ("qemu") or a recorded trace with built-in VHDX recovery."""
        g = self.geometry
        if "virtual_size" not in g or not self.ops:
            return None
        if kind not in self._writers:
            self._writers[kind] = _make_writer(kind, self.ops, g, self.image)
        return self._writers[kind]


def _make_writer(kind: str, ops: list[Op], g: dict[str, int], image: SparseImage):
    if kind == "recorded":
        from .scenario import RECORDED_WRITER, Scenario
        from .writers.recorded import RecordedWriter
        sc = Scenario.model_validate({
            "name": "fuzz-recorded", "writer": {"kind": RECORDED_WRITER},
            "trace": {"log": "unused.log", "final_size": g["size"]},
            "recovery": {"builtin": "vhdx"}, "model": {"ops": [
                {"guest_write": {"offset": o.offset, "length": o.length,
                                 "pattern": o.pattern}} for o in ops]}})
        w = RecordedWriter(ops=ops, scenario=sc)
        w.geometry(ImageDevice(image))  # as load_trace does, from the unmutated image
        return w
    cls = VhdxQemuWriter if kind == "qemu" else VhdxWriter
    return cls(ops=ops, defects=[], seed=1, image={
        "virtual_size": g["virtual_size"], "block_size": g["block_size"],
        "log_size": max(g["log_length"], MiB)})


def describe_vhdx(seed: VhdxSeed) -> VhdxSeed:
    """Fill in where the seed's structures lie, as read by crashsim's own parsers."""
    seed.spans, seed.geometry = vhdx_layout(seed.image)
    return seed


def vhdx_layout(img: SparseImage) -> tuple[list[Span], dict[str, int]]:
    spans = [Span("identifier", 0, 1024)]
    spans += [Span("header", off, vf.HEADER_BLOCK, str(i))
              for i, off in enumerate(vf.HEADER_SLOTS)]
    spans += [Span("region-table", off, vf.REGION_TABLE_BYTES, str(i))
              for i, off in enumerate(vf.REGION_TABLE_OFFSETS)]
    geo = {"size": img.size_bytes, "log_offset": MiB, "log_length": MiB}
    try:
        drv = VhdxDriver(random.Random(0)).attach(ImageDevice(img))
    except RecoveryError:
        return spans, geo
    h, md, bat = drv.headers.current, drv.regions.metadata, drv.regions.bat
    geo.update(log_offset=h.log_offset, log_length=h.log_length,
               bat_offset=bat.file_offset, bat_entries=len(drv.bat),
               metadata_offset=md.file_offset, virtual_size=drv.metadata.virtual_size,
               block_size=drv.metadata.block_size, chunk_ratio=drv.metadata.chunk_ratio)
    spans += _log_spans(img, h)
    spans += _metadata_spans(img, md)
    spans.append(Span("bat", bat.file_offset,
                      min(bat.length, vf.round_up(max(len(drv.bat), 1) * 8, LOG_SECTOR))))
    present = [vf.unpack_bat_entry(v)[1] for _, v in vf.nonzero_entries_of(drv.bat_blob)
               if vf.unpack_bat_entry(v)[0] == vf.FULLY_PRESENT]
    spans += [Span("payload", off, LOG_SECTOR) for off in present[:16]]
    return spans, geo


def _log_spans(img: SparseImage, h: vf.Header) -> list[Span]:
    out = []
    for start in range(0, h.log_length, MiB):
        blob = img.read(h.log_offset + start, min(MiB, h.log_length - start))
        for rel in range(0, len(blob), LOG_SECTOR):
            if blob[rel:rel + 4] == b"loge":
                pos = start + rel
                (length,) = struct.unpack_from("<I", blob, rel + 8)
                length = min(max(length, LOG_SECTOR), h.log_length)
                out.append(Span("log-entry", h.log_offset + pos, length, str(pos)))
    return out


def _metadata_spans(img: SparseImage, md: vf.RegionEntry) -> list[Span]:
    table = img.read(md.file_offset, vf.METADATA_TABLE_BYTES)
    out = [Span("metadata-table", md.file_offset, vf.METADATA_TABLE_BYTES)]
    (count,) = struct.unpack_from("<H", table, 10)
    for i in range(min(count, 32)):
        raw, off, length = struct.unpack_from("<16sII", table, 32 + 32 * i)
        if 0 < length <= 64 and off + length <= md.length:
            out.append(Span("metadata-item", md.file_offset + off, length,
                            str(uuid.UUID(bytes_le=raw))))
    return out


class _Stop(Exception):
    """Ends a writer at a chosen protocol step, as a power cut there would."""


def _stop_at(step: str) -> Callable[[str], None]:
    def hook(name: str) -> None:
        if name == step:
            raise _Stop(step)
    return hook


def _guest_writes(img: SparseImage, ops: list[Op], seed: int, stop: str | None = None
                  ) -> None:
    """Guest writes through the driver; with ``stop`` the last one is cut at that step
    of its log write (e.g. "apply": the entry is flushed, nothing applied in place)."""
    drv = VhdxDriver(random.Random(seed))
    run_sync(drv.open(ImageDevice(img)))
    for k, op in enumerate(ops):
        if stop is not None and k == len(ops) - 1:
            drv.log.on_step = _stop_at(stop)
        try:
            run_sync(drv.write(op.offset, op.data()))
            run_sync(drv.flush())
        except _Stop:
            return


def _pending_entries(img: SparseImage, updates: list[tuple[int, bytes]], seed: int, *,
                     position: int = 0, sequence: int = 1) -> None:
    """Log entries written and flushed but never applied: a dirty log."""
    bio = BlockIO(ImageDevice(img))
    w = LogWriter(bio, HeaderSession.load(bio, random.Random(seed)), sequence=sequence,
                  position=position)
    for offset, data in updates:
        run_sync(w.append(sector_updates(bio, offset, data)))
    run_sync(w.flush_log())


def _guid_without_entry(img: SparseImage, seed: int) -> None:
    bio = BlockIO(ImageDevice(img))
    w = LogWriter(bio, HeaderSession.load(bio, random.Random(seed)))
    w.on_step = _stop_at("write-entry")
    try:
        run_sync(w.log_write(6 * MiB, b"\x51" * 4096))
    except _Stop:
        pass


def _gw(offset: int, length: int, pattern: int) -> Op:
    return Op("guest_write", offset, length, pattern)


def crashsim_vhdx_seeds(workdir: Path | None = None) -> list[VhdxSeed]:
    """Images crashsim makes: clean, allocated, dirty logs (and, given a ``workdir``,
    one made by ``crashsim vhdx create``/``write``)."""
    seeds = []

    def add(name: str, img: SparseImage, ops: list[Op]) -> None:
        seeds.append(describe_vhdx(VhdxSeed(name, img, ops)))

    payload = 6 * MiB  # file bytes past the structures of a fresh 64 MiB image
    add("clean-64M", create_image(64 * MiB, rng=random.Random(11)),
        [_gw(0, 64 * KiB, 0x11), _gw(63 * MiB, 4096, 0x12)])
    add("clean-4k-sectors", create_image(64 * MiB, logical_sector_bytes=4096,
                                         physical_sector_bytes=4096,
                                         rng=random.Random(12)), [_gw(0, 8192, 0x13)])
    add("clean-1G-32M-blocks", create_image(1 << 30, 32 * MiB, 2 * MiB,
                                            rng=random.Random(13)),
        [_gw(0, 4096, 0x14), _gw(1000 * MiB, 4096, 0x15)])
    ops = [_gw(0, 64 * KiB, 0x21), _gw(MiB + 512, 8192, 0x22),
           _gw(4 << 30, 4096, 0x23), _gw((5 << 30) - 4096, 4096, 0x24)]
    img = create_image(5 << 30, rng=random.Random(14))  # block 4096 follows a bitmap entry
    _guest_writes(img, ops, 15)
    add("allocated-5G", img, ops)
    ops = [_gw(0, 64 * KiB, 0x31), _gw(2 * MiB, 4096, 0x32)]
    img = create_image(64 * MiB, rng=random.Random(16))
    _guest_writes(img, ops, 17, stop="apply")
    add("dirty-bat-entry", img, ops)
    img = create_image(64 * MiB, rng=random.Random(18))
    _pending_entries(img, [(payload, b"\x41" * 4096), (payload + 8192, bytes(3 * 4096)),
                           (payload + 512, b"\x42" * 9000)], 19)
    add("dirty-3-entries", img, [_gw(0, 4096, 0x43)])
    img = create_image(64 * MiB, rng=random.Random(20))
    _pending_entries(img, [(payload, b"\x44" * 8192)], 21, position=MiB - LOG_SECTOR,
                     sequence=7)
    add("dirty-wrapped", img, [_gw(0, 4096, 0x45)])
    img = create_image(64 * MiB, rng=random.Random(22))
    _guid_without_entry(img, 23)
    add("guid-without-entry", img, [_gw(0, 4096, 0x46)])
    if workdir is not None:
        add("cli-made", _cli_made_image(workdir), [_gw(3 * MiB, 96 * KiB, 0x5C)])
    return seeds


def _cli_made_image(workdir: Path) -> SparseImage:
    from .cli import main
    path = workdir / "cli-made.vhdx"
    with contextlib.redirect_stdout(io.StringIO()):
        main(["vhdx", "create", str(path), "--size", "256MiB", "--block-size", "2MiB",
              "--seed", "23"])
        main(["vhdx", "write", str(path), "3MiB", "96KiB", "--pattern", "0x5c",
              "--seed", "24"])
    return SparseImage.from_file(path)


def sample_vhdx_seeds(dirs: Sequence[Path], workdir: Path) -> list[VhdxSeed]:
    """``*.vhdx`` and ``*.vhdx.bz2`` files of ``dirs``; bz2 ones are decompressed sparsely
    into ``workdir`` and every image is loaded without its holes."""
    seeds = []
    for d in dirs:
        for p in sorted(Path(d).iterdir()):
            if p.name.endswith(".vhdx.bz2"):
                path = _bunzip_sparse(p, workdir)
            elif p.suffix == ".vhdx":
                path = p
            else:
                continue
            seed = describe_vhdx(VhdxSeed(f"sample:{path.name}", SparseImage.from_file(path),
                                          []))
            vs = seed.geometry.get("virtual_size")
            if vs:
                seed.ops = [_gw(0, min(64 * KiB, vs), 1), _gw(vs - 512, 512, 2)]
            seeds.append(seed)
    return seeds


def _bunzip_sparse(src: Path, workdir: Path) -> Path:
    out = workdir / src.name[:-len(".bz2")]
    with bz2.open(src) as f, open(out, "wb") as g:
        while chunk := f.read(MiB):
            if chunk.count(0) == len(chunk):
                g.seek(len(chunk), 1)
            else:
                g.write(chunk)
        g.truncate()
    return out


# -- VHDX mutations ---------------------------------------------------------------------
HEADER_FIELDS = (("signature", 0, 4), ("sequence_number", 8, 8),
                 ("file_write_guid", 16, 16), ("data_write_guid", 32, 16),
                 ("log_guid", 48, 16), ("log_version", 64, 2), ("version", 66, 2),
                 ("log_length", 68, 4), ("log_offset", 72, 8))
REGION_FIELDS = (("signature", 0, 4), ("entry_count", 8, 4)) + tuple(
    f for i in range(4) for f in ((f"entry{i}.guid", 16 + 32 * i, 16),
                                  (f"entry{i}.file_offset", 32 + 32 * i, 8),
                                  (f"entry{i}.length", 40 + 32 * i, 4),
                                  (f"entry{i}.required", 44 + 32 * i, 4)))
METADATA_TABLE_FIELDS = (("signature", 0, 8), ("entry_count", 10, 2)) + tuple(
    f for i in range(6) for f in ((f"entry{i}.guid", 32 + 32 * i, 16),
                                  (f"entry{i}.offset", 48 + 32 * i, 4),
                                  (f"entry{i}.length", 52 + 32 * i, 4),
                                  (f"entry{i}.flags", 56 + 32 * i, 4)))
LOG_ENTRY_FIELDS = (("signature", 0, 4), ("entry_length", 8, 4), ("tail", 12, 4),
                    ("sequence_number", 16, 8), ("descriptor_count", 24, 4),
                    ("reserved", 28, 4), ("log_guid", 32, 16),
                    ("flushed_file_offset", 48, 8), ("last_file_offset", 56, 8))
DESCRIPTOR_FIELDS = (("signature", 0, 4), ("trailing_or_reserved", 4, 4),
                     ("leading_or_zero_length", 8, 8), ("file_offset", 16, 8),
                     ("sequence_number", 24, 8))
DATA_SECTOR_FIELDS = (("signature", 0, 4), ("sequence_high", 4, 4),
                      ("sequence_low", 4092, 4))
FIELDS = {"header": HEADER_FIELDS, "region-table": REGION_FIELDS,
          "metadata-table": METADATA_TABLE_FIELDS, "log-entry": LOG_ENTRY_FIELDS}


class VhdxMutator:
    """Structure-aware mutations of one seed image, in memory; each is noted in words
    exact enough to rebuild the input by hand (offsets and values)."""

    def __init__(self, seed: VhdxSeed, rng: random.Random):
        self.seed, self.rng, self.geo = seed, rng, seed.geometry
        self.img = seed.image.fork()
        self.notes: list[str] = []

    def mutate(self, count: int | None = None) -> SparseImage:
        n = count if count is not None else _how_many(self.rng, 4)
        ops, weights = zip(*_VHDX_OPS)
        for _ in range(n):
            self.rng.choices(ops, weights)[0](self)
        return self.img

    # -- helpers ----------------------------------------------------------------------
    @property
    def extra(self) -> list[int]:
        g = self.geo
        vals = [g["size"], g["size"] + MiB, vf.round_up(g["size"], MiB), g["log_offset"],
                g["log_length"]]
        vals += [g[k] for k in ("bat_offset", "metadata_offset", "virtual_size",
                                "block_size") if k in g]
        return vals

    def put(self, offset: int, data: bytes, what: str) -> None:
        self.img.write(offset, data)
        shown = data.hex() if len(data) <= 16 else f"{len(data)} bytes"
        self.notes.append(f"{what}: write {shown} at {offset:#x}")

    def fix_crc(self, span: Span) -> None:
        if span.kind in ("header", "region-table"):
            blob = self.img.read(span.offset, span.length)
            self.img.write(span.offset + 4, vf.with_checksum(blob)[4:8])
        elif span.kind == "log-entry":
            self.fix_entry_crc(int(span.tag))
        else:
            return
        self.notes.append(f"  checksum of the {span.kind} at {span.offset:#x} recomputed")

    def fix_entry_crc(self, pos: int) -> None:
        (length,) = struct.unpack("<I", self.log_read(pos + 8, 4))
        n = min(length, self.geo["log_length"])
        if n >= 8:
            crc = vf.crc32c_with_zeroed_field(self.log_read(pos, n))
            self.log_write(pos + 4, struct.pack("<I", crc))

    def log_read(self, pos: int, n: int) -> bytes:
        """``n`` log bytes from log position ``pos``, wrapping at the end of the log."""
        off, length = self.geo["log_offset"], self.geo["log_length"]
        pos %= length
        first = min(n, length - pos)
        return self.img.read(off + pos, first) + self.img.read(off, n - first)

    def log_write(self, pos: int, data: bytes) -> None:
        off, length = self.geo["log_offset"], self.geo["log_length"]
        pos %= length
        first = min(len(data), length - pos)
        self.img.write(off + pos, data[:first])
        if first < len(data):
            self.img.write(off, data[first:])

    def guid(self) -> uuid.UUID:
        pool = list(KNOWN_GUIDS) + [uuid.UUID(int=self.rng.getrandbits(128))]
        pool += [self.current_header().log_guid] * 2
        return self.rng.choice(pool)

    def current_header(self) -> vf.Header:
        try:
            return HeaderSession.load(ImageDevice(self.img)).current
        except RecoveryError:
            return vf.Header(1, vf.ZERO_GUID, vf.ZERO_GUID, vf.ZERO_GUID, MiB, MiB)

    def field_value(self, name: str, width: int) -> bytes:
        if name.endswith("signature"):
            return self.rng.choice(SIGNATURES)[:width].ljust(width, b"\0")
        if width == 16:
            return self.guid().bytes_le
        return _le(interesting(self.rng, width, self.extra), width)

    # -- operators --------------------------------------------------------------------
    def op_field(self) -> None:
        kinds = [k for k in FIELDS if self.seed.of(k)]
        kind = self.rng.choice(kinds)
        span = self.rng.choice(self.seed.of(kind))
        name, rel, width = self.rng.choice(FIELDS[kind])
        self.put(span.offset + rel, self.field_value(name, width),
                 f"{kind} at {span.offset:#x} field {name}")
        if self.rng.random() < 0.85:
            self.fix_crc(span)

    def op_flip(self) -> None:
        span = self.rng.choice(self.seed.spans)
        for _ in range(self.rng.randint(1, 8)):
            at = span.offset + self.rng.randrange(span.length)
            old = self.img.read(at, 1)[0]
            mask = 1 << self.rng.randrange(8) if self.rng.random() < 0.7 else \
                self.rng.randint(1, 255)
            self.put(at, bytes([old ^ mask]), f"flip in the {span.kind} at {span.offset:#x}")
        if self.rng.random() < 0.5:
            self.fix_crc(span)

    def op_bat(self) -> None:
        g = self.geo
        if "bat_offset" not in g:
            return self.op_random_write()
        count, ratio, rng = g["bat_entries"], g["chunk_ratio"], self.rng
        idx = rng.choice([0, 1, count - 1, count, count + 1, ratio, ratio - 1,
                          rng.randrange(max(count, 1))]) % max(count + 2, 1)
        offset = rng.choice([0, MiB, g["log_offset"], g["bat_offset"], g["metadata_offset"],
                             g["size"] - g["block_size"], g["size"],
                             vf.round_up(g["size"], MiB), g["size"] + MiB,
                             vf.MAX_FILE_BYTES - MiB, (1 << 64) - MiB,
                             rng.randrange(0, g["size"] + 64 * MiB, MiB)])
        value = (offset & vf.BAT_OFFSET_MASK) | rng.randrange(8)
        if rng.random() < 0.15:
            value |= rng.getrandbits(17) << 3  # reserved bits
        if rng.random() < 0.1:
            value = rng.getrandbits(64)
        self.put(g["bat_offset"] + 8 * idx, _le(value, 8), f"BAT entry {idx}")

    def op_metadata_value(self) -> None:
        items = self.seed.of("metadata-item")
        if not items:
            return self.op_field()
        span, rng = self.rng.choice(items), self.rng
        guid = uuid.UUID(span.tag)
        if guid == vf.FILE_PARAMETERS_GUID and rng.random() < 0.6:
            rel, data = 0, _le(rng.choice([0, 1, MiB // 2, MiB, MiB + 1, 3 * MiB, 32 * MiB,
                                           256 * MiB, 512 * MiB, 1 << 31, 0xFFFFFFFF]), 4)
        elif guid == vf.FILE_PARAMETERS_GUID:
            rel, data = 4, _le(rng.choice([0, 1, 2, 3, 4, 0xFFFFFFFF]), 4)
        elif guid == vf.VIRTUAL_DISK_SIZE_GUID:
            vs = self.geo.get("virtual_size", MiB)
            rel, data = 0, _le(rng.choice([0, 511, 512, 4096, MiB, vs - 512, vs + 512,
                                           vs // 2, vs * 2, 1 << 40, vf.MAX_FILE_BYTES,
                                           vf.MAX_FILE_BYTES + 512,
                                           interesting(rng, 8)]), 8)
        elif guid in (vf.LOGICAL_SECTOR_GUID, vf.PHYSICAL_SECTOR_GUID):
            rel, data = 0, _le(rng.choice([0, 1, 256, 511, 512, 1024, 4096, 8192,
                                           0xFFFFFFFF]), 4)
        else:
            rel, data = 0, rng.randbytes(span.length)
        self.put(span.offset + rel, data, f"metadata item {guid}")

    def op_guid(self) -> None:
        entries, rng = self.seed.of("log-entry"), self.rng
        choice = rng.randrange(3) if entries else 2
        if choice == 0:  # the header publishes an entry's GUID
            g = self.img.read(rng.choice(entries).offset + 32, 16)
            self.set_header_guid(g, rng.random() < 0.5)
        elif choice == 1:  # an entry takes the header's GUID
            e = rng.choice(entries)
            self.put(e.offset + 32, self.current_header().log_guid.bytes_le,
                     f"log entry at {e.offset:#x} log_guid := the header's")
            self.fix_crc(e)
        else:
            g = rng.choice([vf.ZERO_GUID, uuid.UUID(int=rng.getrandbits(128))])
            self.set_header_guid(g.bytes_le, rng.random() < 0.5)

    def set_header_guid(self, guid_le: bytes, both: bool) -> None:
        spans = self.seed.of("header")
        for span in (spans if both else [self.rng.choice(spans)]):
            self.put(span.offset + 48, guid_le, f"header at {span.offset:#x} log_guid")
            self.fix_crc(span)

    def op_sequence(self) -> None:
        entries, rng = self.seed.of("log-entry"), self.rng
        if not entries or rng.random() < 0.3:
            return self.header_sequence()
        e = rng.choice(entries)
        pos = int(e.tag)
        (old,) = struct.unpack("<Q", self.log_read(pos + 16, 8))
        seq = rng.choice([old + 1, old - 1, 0, 1, (1 << 64) - 1, (1 << 63),
                          interesting(rng, 8)]) % (1 << 64)
        self.reseq_entry(pos, seq)
        self.fix_crc(e)

    def reseq_entry(self, pos: int, seq: int) -> None:
        """Give entry ``pos`` sequence ``seq`` everywhere it is stored, so it stays valid."""
        head = self.log_read(pos, 64)
        length, _, _, count = struct.unpack_from("<IIQI", head, 8)
        length = min(length, self.geo["log_length"])
        self.log_write(pos + 16, _le(seq, 8))
        for i in range(min(count, (length - 64) // 32 if length > 64 else 0, 512)):
            if self.log_read(pos + 64 + 32 * i, 4) in (b"desc", b"zero"):
                self.log_write(pos + 64 + 32 * i + 24, _le(seq, 8))
        for p in range(vf.descriptor_sectors(count) * LOG_SECTOR, length, LOG_SECTOR):
            self.log_write(pos + p + 4, _le(seq >> 32, 4))
            self.log_write(pos + p + 4092, _le(seq, 4))
        self.notes.append(f"log entry at log+{pos:#x}: sequence number := {seq:#x} in its "
                          f"header, descriptors and data sectors")

    def header_sequence(self) -> None:
        a, b = self.seed.of("header")
        src, dst = (a, b) if self.rng.random() < 0.5 else (b, a)
        seq = self.img.read(src.offset + 8, 8)
        if self.rng.random() < 0.5:
            seq = _le(interesting(self.rng, 8), 8)
        self.put(dst.offset + 8, seq, f"header at {dst.offset:#x} sequence_number")
        self.fix_crc(dst)

    def op_descriptor(self) -> None:
        entries, rng = self.seed.of("log-entry"), self.rng
        if not entries:
            return self.op_inject()
        e = rng.choice(entries)
        pos = int(e.tag)
        length, _, _, count = struct.unpack_from("<IIQI", self.log_read(pos, 64), 8)
        dsect = vf.descriptor_sectors(count)
        data_sectors = max(0, min(length, self.geo["log_length"]) // LOG_SECTOR - dsect)
        if data_sectors and rng.random() < 0.3:
            k = rng.randrange(data_sectors)
            name, rel, width = rng.choice(DATA_SECTOR_FIELDS)
            at = pos + (dsect + k) * LOG_SECTOR + rel
            what = f"log entry at log+{pos:#x} data sector {k} field {name}"
        else:
            i = rng.randrange(max(1, min(count, 126)))
            name, rel, width = rng.choice(DESCRIPTOR_FIELDS)
            at = pos + 64 + 32 * i + rel
            what = f"log entry at log+{pos:#x} descriptor {i} field {name}"
        value = self.descriptor_value(name, width)
        self.log_write(at, value)
        where = at % self.geo["log_length"]
        self.notes.append(f"{what}: write {value.hex()} at log+{where:#x}")
        if rng.random() < 0.85:
            self.fix_crc(e)

    def descriptor_value(self, name: str, width: int) -> bytes:
        rng = self.rng
        if name == "file_offset":
            return _le(rng.choice(self.update_targets() + [rng.getrandbits(64), 1, 4095]), 8)
        if name == "leading_or_zero_length":
            return _le(rng.choice([0, LOG_SECTOR, 2 * LOG_SECTOR, MiB, 4095,
                                   vf.MAX_FILE_BYTES, interesting(rng, 8)]), 8)
        return self.field_value(name, width)

    def update_targets(self) -> list[int]:
        g, rng = self.geo, self.rng
        out = [0, 0x10000, 0x20000, 0x30000, 0x40000, g["log_offset"],
               g["log_offset"] + g["log_length"] - LOG_SECTOR, g["size"] - LOG_SECTOR,
               vf.round_up(g["size"], LOG_SECTOR), g["size"] + MiB,
               vf.MAX_FILE_BYTES - LOG_SECTOR, rng.randrange(0, g["size"] + 8 * MiB, 4096)]
        out += [g[k] for k in ("bat_offset", "metadata_offset") if k in g]
        out += [g["metadata_offset"] + vf.METADATA_TABLE_BYTES] if "metadata_offset" in g \
            else []
        return [vf.round_up(v, LOG_SECTOR) for v in out]

    def op_inject(self) -> None:
        """Write one or two valid log entries (checksummed) somewhere in the log and
        make the header publish their GUID: replay will apply them."""
        g, rng = self.geo, self.rng
        if g["log_length"] < 4 * LOG_SECTOR:
            return self.op_field()
        header = self.current_header()
        guid = header.log_guid if header.log_guid != vf.ZERO_GUID and rng.random() < 0.7 \
            else uuid.UUID(int=rng.getrandbits(128), version=4)
        pos = rng.choice([0, g["log_length"] - LOG_SECTOR,
                          rng.randrange(0, g["log_length"], LOG_SECTOR)])
        tail = pos
        seq = rng.choice([1, header.sequence_number, (1 << 64) - 2, interesting(rng, 8) or 1])
        for k in range(rng.choice([1, 1, 2])):
            blob, what = self.entry_blob(guid, seq + k, tail)
            if len(blob) > g["log_length"] - LOG_SECTOR:
                break
            self.log_write(pos, blob)
            self.notes.append(f"log entry injected at log+{pos:#x}: seq {seq + k:#x}, "
                              f"guid {guid}, {len(blob)} bytes: {what}")
            pos = (pos + len(blob)) % g["log_length"]
        if rng.random() < 0.85:
            self.set_header_guid(guid.bytes_le, rng.random() < 0.5)

    def entry_blob(self, guid: uuid.UUID, seq: int, tail: int) -> tuple[bytes, str]:
        g, rng = self.geo, self.rng
        updates = [self.random_update() for _ in range(rng.randint(1, 4))]
        end = max(u.file_offset + (u.zero_length if u.data is None else LOG_SECTOR)
                  for u in updates)
        size = g["size"]
        flushed = rng.choice([size, size, 0, size - LOG_SECTOR, size + MiB, end])
        last = rng.choice([max(size, end), max(size, end), end, vf.round_up(end, MiB),
                           vf.MAX_FILE_BYTES, end - 1, size])
        what = ", ".join(
            f"zero {u.zero_length:#x} at {u.file_offset:#x}" if u.data is None
            else f"data {u.data[:8].hex()}.. at {u.file_offset:#x}" for u in updates) + \
            f"; tail {tail:#x}; FlushedFileOffset {flushed:#x}; LastFileOffset {last:#x}"
        blob = vf.build_log_entry(sequence_number=seq % (1 << 64), tail=tail % (1 << 32),
                                  log_guid=guid, flushed_file_offset=flushed % (1 << 64),
                                  last_file_offset=last % (1 << 64), updates=updates)
        return blob, what

    def random_update(self) -> vf.SectorUpdate:
        rng = self.rng
        target = rng.choice(self.update_targets())
        if rng.random() < 0.3:
            length = rng.choice([LOG_SECTOR, 2 * LOG_SECTOR, 64 * KiB, MiB, 16 * MiB,
                                 vf.round_up(interesting(rng, 4), LOG_SECTOR) or LOG_SECTOR])
            return vf.SectorUpdate(target, None, length)
        sector = bytearray(self.img.read(target, LOG_SECTOR))
        for _ in range(rng.randint(0, 8)):
            sector[rng.randrange(LOG_SECTOR)] = rng.randrange(256)
        if rng.random() < 0.2:
            sector = bytearray(rng.randbytes(LOG_SECTOR))
        return vf.SectorUpdate(target, bytes(sector))

    def op_copy(self) -> None:
        rng = self.rng
        kind = rng.choice([k for k in ("header", "region-table", "log-entry")
                           if self.seed.of(k)])
        spans = self.seed.of(kind)
        src = rng.choice(spans)
        blob = self.img.read(src.offset, src.length)
        if kind == "log-entry":
            dst = rng.randrange(0, self.geo["log_length"], LOG_SECTOR)
            self.log_write(dst, self.log_read(int(src.tag), src.length))
            self.notes.append(f"log entry at log+{int(src.tag):#x} copied to log+{dst:#x}")
            return
        dst = rng.choice([s for s in spans if s != src] or spans)
        self.put(dst.offset, blob, f"{kind} at {src.offset:#x} copied to {dst.offset:#x}")

    def op_resize(self) -> None:
        g, rng = self.geo, self.rng
        size = rng.choice([0, 512, 4096, 0x20000, 0x21000 - 1, 0x21000, 0x30000, MiB,
                           g["log_offset"] + g["log_length"] // 2, g["size"] - 512,
                           g["size"] - MiB, g["size"] + 1, g["size"] + MiB,
                           g["size"] + 64 * MiB] +
                          [g[k] + LOG_SECTOR for k in ("bat_offset", "metadata_offset")
                           if k in g])
        size = max(0, size)
        self.img.resize(size)
        self.notes.append(f"file resized to {size:#x}")

    def op_random_write(self) -> None:
        rng = self.rng
        if rng.random() < 0.3:
            span = rng.choice(self.seed.spans)
            self.put(span.offset, bytes(min(span.length, 64 * KiB)),
                     f"{span.kind} at {span.offset:#x} zeroed")
            return
        at = rng.randrange(max(self.img.size_bytes, 1))
        data = rng.randbytes(rng.choice([1, 2, 8, 64, LOG_SECTOR]))
        self.put(at, data, "random bytes")

    def op_region_table(self) -> None:
        rng = self.rng
        span = rng.choice(self.seed.of("region-table"))
        try:
            entries = vf.parse_region_table(self.img.read(span.offset, span.length),
                                            span.offset)
        except RecoveryError:
            entries = []
        for _ in range(rng.randint(1, 2)):
            entries = self.perturb_regions(list(entries))
        blob = vf.build_region_table(entries[:2047])
        targets = self.seed.of("region-table") if rng.random() < 0.5 else [span]
        for t in targets:
            self.img.write(t.offset, blob)
        self.notes.append(f"region table(s) at {[hex(t.offset) for t in targets]} rebuilt "
                          f"(checksummed) with entries {entries}")

    def perturb_regions(self, entries: list[vf.RegionEntry]) -> list[vf.RegionEntry]:
        rng = self.rng
        how = rng.randrange(5)
        if how == 0 and entries:
            entries.pop(rng.randrange(len(entries)))
        elif how == 1 and entries:
            entries.insert(rng.randrange(len(entries) + 1), rng.choice(entries))
        elif how == 2:
            entries.append(vf.RegionEntry(self.guid(), rng.choice(self.extra + [0, MiB]),
                                          interesting(rng, 4), rng.random() < 0.5))
        elif entries:
            i = rng.randrange(len(entries))
            e = entries[i]
            entries[i] = vf.RegionEntry(
                e.guid if how == 3 else self.guid(),
                interesting(rng, 8, self.extra) if rng.random() < 0.5 else e.file_offset,
                interesting(rng, 4, [MiB, 2 * MiB, self.room_after(e.file_offset)])
                if rng.random() < 0.5 else e.length,
                rng.random() < 0.5)
        return entries

    def room_after(self, offset: int) -> int:
        """The 1 MiB-aligned length from ``offset`` to the end of the file."""
        return max(0, (self.img.size_bytes - offset) // MiB * MiB)

    def op_metadata_table(self) -> None:
        tables = self.seed.of("metadata-table")
        if not tables:
            return self.op_field()
        t, rng = tables[0], self.rng
        table = bytearray(self.img.read(t.offset, 32 * 12))
        (count,) = struct.unpack_from("<H", table, 10)
        count = min(count, 10)
        how = rng.randrange(3)
        if how == 0 and count:  # duplicate an entry
            i = rng.randrange(count)
            table[32 + 32 * count:64 + 32 * count] = table[32 + 32 * i:64 + 32 * i]
            count += 1
        elif how == 1:  # an unknown item, perhaps required, or a parent locator
            g = rng.choice([uuid.UUID(int=rng.getrandbits(128)), vf.PARENT_LOCATOR_GUID])
            table[32 + 32 * count:64 + 32 * count] = struct.pack(
                "<16sIIII", g.bytes_le, rng.choice([vf.METADATA_TABLE_BYTES, 0, 70000,
                                                    MiB - 8, 64 * MiB, (1 << 32) - 8]),
                rng.choice([0, 8, 64, 0xFFFFFFFF]), rng.randrange(8), 0)
            count += 1
        elif count:  # drop the last entry
            count -= 1
        struct.pack_into("<H", table, 10, count)
        self.put(t.offset, bytes(table), f"metadata table at {t.offset:#x} rebuilt "
                 f"({'duplicate' if how == 0 else 'added' if how == 1 else 'dropped'} "
                 f"entry, count {count})")


_VHDX_OPS = ((VhdxMutator.op_field, 6), (VhdxMutator.op_flip, 3), (VhdxMutator.op_bat, 4),
             (VhdxMutator.op_metadata_value, 3), (VhdxMutator.op_guid, 2),
             (VhdxMutator.op_sequence, 2), (VhdxMutator.op_descriptor, 3),
             (VhdxMutator.op_inject, 5), (VhdxMutator.op_copy, 1),
             (VhdxMutator.op_resize, 1), (VhdxMutator.op_random_write, 1),
             (VhdxMutator.op_region_table, 1), (VhdxMutator.op_metadata_table, 1))


# -- dm-log-writes seeds and mutations --------------------------------------------------
@dataclass
class DmLogSeed:
    name: str
    blob: bytes
    sectorsize: int
    entry_offsets: list[int]
    entries: list[DmEntry]


def dmlog_seeds(workdir: Path) -> list[DmLogSeed]:
    """Logs in both layouts crashsim reads: Linux's (marks, discards, FUA, preflush,
    metadata) at 512 and 4096-byte sectors, and QEMU's (writes and flushes only)."""
    long_mark = "m" * 700  # spills past the header sector into data sectors
    specs = {
        "linux-512": (512, [write_entry(8, b"\xa1" * 4096, fua=True), flush_entry(),
                            write_entry(0, bytes(range(256)) * 2), discard_entry(16, 8),
                            mark_entry("fsync-done"), mark_entry(long_mark),
                            write_entry(24, b"\xb2" * 1024, flush=True, fua=True,
                                        metadata=True), flush_entry()]),
        "qemu-4096": (4096, [write_entry(1, b"\x11" * 8192, sectorsize=4096),
                             flush_entry(), write_entry(0, b"\x22" * 4096, sectorsize=4096),
                             flush_entry()]),
        "empty": (512, []),
    }
    seeds = []
    for name, (sectorsize, entries) in specs.items():
        path = workdir / f"{name}.log"
        write_log(path, entries, sectorsize)
        read = read_log(path).entries
        seeds.append(DmLogSeed(name, path.read_bytes(), sectorsize,
                               [e.log_offset for e in read], read))
    return seeds


DMLOG_ENTRY_FIELDS = (("sector", 0, 8), ("nr_sectors", 8, 8), ("flags", 16, 8),
                      ("data_len", 24, 8))
DMLOG_SUPER_FIELDS = (("magic", 0, 8), ("version", 8, 8), ("nr_entries", 16, 8),
                      ("sectorsize", 24, 4))


class DmLogMutator:
    """Mutations of a dm-log-writes log that know where its super block and entry
    headers are."""

    def __init__(self, seed: DmLogSeed, rng: random.Random, scratch: Path):
        self.seed, self.rng, self.scratch = seed, rng, scratch
        self.blob = bytearray(seed.blob)
        self.notes: list[str] = []

    def mutate(self) -> bytes:
        ops = (self.op_super, self.op_entry, self.op_entry, self.op_flip, self.op_cut,
               self.op_splice, self.op_append, self.op_rebuild, self.op_rebuild)
        for _ in range(_how_many(self.rng, 3)):
            self.rng.choice(ops)()
        if self.rng.random() < 0.02:
            self.blob = bytearray(self.rng.randbytes(self.rng.randrange(2048)))
            self.notes.append(f"replaced by {len(self.blob)} random bytes")
        return bytes(self.blob)

    def put(self, at: int, data: bytes, what: str) -> None:
        self.blob[at:at + len(data)] = data
        self.notes.append(f"{what}: {data.hex()} at {at:#x}")

    def op_super(self) -> None:
        name, rel, width = self.rng.choice(DMLOG_SUPER_FIELDS)
        n = len(self.seed.entry_offsets)
        extra = {"magic": [0x6A736677736872], "version": [1],
                 "nr_entries": [n - 1, n + 1, n * 2],
                 "sectorsize": [32, 64, 512, 1000, 4096, 1 << 23, 1 << 24]}[name]
        self.put(rel, _le(interesting(self.rng, width, extra), width), f"super {name}")

    def op_entry(self) -> None:
        if not self.seed.entry_offsets:
            return self.op_super()
        at = self.rng.choice(self.seed.entry_offsets)
        name, rel, width = self.rng.choice(DMLOG_ENTRY_FIELDS)
        if name == "flags" and self.rng.random() < 0.6:
            value = self.rng.choice([self.rng.randrange(32), 32, 1 << 63, 8 | 4, 1 | 2 | 16])
        else:
            value = interesting(self.rng, width, [1 << 55, 2048, 480, 481, 4064])
        self.put(at + rel, _le(value, width), f"entry header at {at:#x} {name}")

    def op_rebuild(self) -> None:
        """A well-formed log again, with entries at boundary sectors and sizes."""
        rng, ss = self.rng, self.seed.sectorsize
        entries = list(self.seed.entries)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(entries) + 1)
            sector = interesting(rng, 8, [1 << 40, 1 << 55]) // (1 if rng.random() < 0.5
                                                                else ss)
            if rng.random() < 0.5:
                new = discard_entry(sector, interesting(rng, 8, [1 << 40, 8, 2048]))
            else:
                new = write_entry(sector, rng.randbytes(ss), sectorsize=ss,
                                  fua=rng.random() < 0.5, flush=rng.random() < 0.3)
            entries.insert(at, new)
            self.notes.append(f"entry {at} inserted: {new.flags=:#x} {new.sector=:#x} "
                              f"{new.nr_sectors=:#x}")
        write_log(self.scratch, entries, ss)
        self.blob = bytearray(self.scratch.read_bytes())
        self.notes.append("log rewritten from these entries")

    def op_flip(self) -> None:
        if not self.blob:
            return
        at = self.rng.randrange(len(self.blob))
        self.put(at, bytes([self.blob[at] ^ self.rng.randint(1, 255)]), "flip")

    def op_cut(self) -> None:
        points = self.seed.entry_offsets + [len(self.blob), self.seed.sectorsize]
        cut = self.rng.choice([self.rng.randrange(len(self.blob) + 1),
                               self.rng.choice(points) + self.rng.choice([-1, 0, 1, 8, 32])])
        cut = max(0, min(cut, len(self.blob)))
        del self.blob[cut:]
        self.notes.append(f"truncated to {cut:#x} bytes")

    def op_splice(self) -> None:
        offs = self.seed.entry_offsets
        if len(offs) < 2:
            return self.op_cut()
        i = self.rng.randrange(len(offs) - 1)
        piece = self.blob[offs[i]:offs[i + 1]]
        if self.rng.random() < 0.5:
            del self.blob[offs[i]:offs[i + 1]]
            self.notes.append(f"entry bytes [{offs[i]:#x}, {offs[i + 1]:#x}) removed")
        else:
            self.blob[offs[i]:offs[i]] = piece
            self.notes.append(f"entry bytes [{offs[i]:#x}, {offs[i + 1]:#x}) duplicated")

    def op_append(self) -> None:
        extra = self.rng.choice([bytes(self.seed.sectorsize),
                                 self.rng.randbytes(self.rng.randrange(1, 600)),
                                 self.blob[-self.seed.sectorsize:]])
        self.blob += extra
        self.notes.append(f"{len(extra)} bytes appended")


# -- scenario seeds and mutations -------------------------------------------------------
BUILTIN_SCENARIOS = {
    "vhdx-min.yaml": "name: vhdx-min\nwriter: {kind: vhdx}\nworkload:\n  image: "
                     "{virtual_size: 64MiB, block_size: 1MiB, log_size: 1MiB}\n  ops:\n"
                     "    - guest_write: {offset: 0, length: 64KiB, pattern: 0x10}\n"
                     "explore: {seed: 1, max_states_per_step: 4}\nexpect: pass\n",
    "wal-random.yaml": "name: wal-random\ndevice:\n  atomic_write_bytes: 512\n  cache: "
                       "{mode: writeback, capacity_bytes: 256KiB, destage: random}\n"
                       "writer: {kind: wal, defects: []}\nworkload:\n  image: "
                       "{virtual_size: 4MiB, log_size: 1MiB}\n  random: {count: 5, seed: 7, "
                       "kind: log_write, max_length: 16KiB}\n"
                       "expect: {violations: [lost, mixed]}\n",
    "trace.yaml": "name: trace-min\ndevice: {atomic_write_bytes: 512}\ntrace:\n"
                  "  log: rec.log\n  format: dm-log-writes\n  final_size: 1MiB\n"
                  "recovery: {builtin: none}\nview: builtin\nprobe: none\nmodel:\n  ops:\n"
                  "    - guest_write: {offset: 4KiB, length: 4KiB, pattern: 0xa1}\n",
}
SCENARIO_VALUES = (
    "0", "-1", "1", "0x", "0xff", "0x100", "256", "512", "4096", "1e309", ".nan", ".inf",
    "-.inf", "~", "null", "true", "false", "[]", "{}", "''", '""', "64TiB", "1PiB", "2EiB",
    "511", "99999999999999999999999999999", "-0", "0.5", "1.5MiB", "4KiB", "1GiB", "1MiB",
    "3MiB", "1TiB", "-1MiB", "0MiB", "12 MiB", "!!binary aGVsbG8=", "!!set {a: null}",
    "!!omap [a: 1]", "!!str 5", "!!int 5", "!!float 1", "!!python/name:os.system",
    "2001-12-14", "12:30:45", '"\\0"', '"\\ud800"', '"{image}"', '"{log}"',
    "[qemu-img, check]", "[{log}]", "a:b", "no.such.module:Thing",
    "crashsim.writers.wal:WalWriter", "pass", "{violations: []}", "{violations: [lost]}",
    "{violations: [old]}", "vhdx", "vhdx-qemu", "vhdx-2013", "wal", "blklogwrites",
    "dm-log-writes", "builtin", "qemu-img", "qemu-io", "none", "writeback", "writethrough",
    "random", "[garbage, lying_flush]", "guest_write", "log_write",
    "'" + "x" * 3000 + "'", "\u00e9\U0001F600", "&a 5", "*a", "*undefined", "? [a, b]",
    "|\n  text", "[" * 120, "{a: " * 60, "rec.log", "/dev/null", "..", "-")
SCENARIO_KEYS = (
    "name", "description", "device", "atomic_write_bytes", "cache", "mode",
    "capacity_bytes", "destage", "latency_us", "write", "flush", "faults", "writer",
    "kind", "defects", "workload", "image", "virtual_size", "block_size", "log_size",
    "ops", "guest_write", "log_write", "offset", "length", "pattern", "random", "count",
    "seed", "max_length", "explore", "max_states_per_step", "recovery_crash",
    "recovery_states_per_step", "shrink", "expect", "violations", "trace", "log",
    "record", "create", "format", "base_image", "final_size", "image_format",
    "timeout_s", "recovery", "command", "builtin", "ok_exit_codes", "view", "probe",
    "model", "<<", "nmae", "1", "? x")


def scenario_seeds(extra_dirs: Sequence[Path] = ()) -> list[tuple[str, str]]:
    """(name, text) of the built-in scenarios, the repository's and any in ``extra_dirs``."""
    seeds = list(BUILTIN_SCENARIOS.items())
    for d in [REPO_SCENARIOS, *extra_dirs]:
        if Path(d).is_dir():
            for p in sorted(Path(d).glob("*.yaml")):
                seeds.append((p.name, p.read_text(encoding="utf-8", errors="replace")))
    return seeds


class ScenarioMutator:
    """YAML-aware mutations of scenario text: values and keys swapped for awkward ones,
    lines moved, re-indented or spliced in from other scenarios, bytes broken."""

    def __init__(self, text: str, rng: random.Random, others: Sequence[str] = ()):
        self.text, self.rng, self.others = text, rng, others
        self.notes: list[str] = []

    def mutate(self) -> bytes:
        ops = (self.op_value, self.op_value, self.op_key, self.op_line, self.op_splice)
        for _ in range(_how_many(self.rng, 4)):
            self.rng.choice(ops)()
        data = self.text.encode("utf-8", errors="surrogatepass")
        if self.rng.random() < 0.1:
            data = self.break_bytes(bytearray(data))
        return data

    def replace_match(self, pattern: str, pool: Sequence[str], what: str) -> None:
        found = list(re.finditer(pattern, self.text, re.M))
        if not found:
            return
        m = self.rng.choice(found)
        new = self.rng.choice(pool)
        self.text = self.text[:m.start()] + new + self.text[m.end():]
        self.notes.append(f"{what} {m.group()!r} at char {m.start()} := {new!r}")

    def op_value(self) -> None:
        self.replace_match(r"(?<=: )[^,{}\[\]\n#]+|(?<=- )[^,{}\[\]\n#:]+",
                           SCENARIO_VALUES, "value")

    def op_key(self) -> None:
        self.replace_match(r"[A-Za-z_<][A-Za-z_]*(?=:)", SCENARIO_KEYS, "key")

    def op_line(self) -> None:
        lines = self.text.split("\n")
        i, j = self.rng.randrange(len(lines)), self.rng.randrange(len(lines))
        how = self.rng.randrange(5)
        if how == 0:
            del lines[i]
        elif how == 1:
            lines.insert(j, lines[i])
        elif how == 2:
            lines[i], lines[j] = lines[j], lines[i]
        elif how == 3:
            lines[i] = self.rng.choice([" ", "  ", "\t", "- "]) + lines[i]
        else:
            lines[i] = lines[i].lstrip()
        self.text = "\n".join(lines)
        done = ("deleted", "copied", "swapped", "indented", "dedented")[how]
        self.notes.append(f"line {i + 1} {done} (with line {j + 1})")

    def op_splice(self) -> None:
        if not self.others:
            return self.op_line()
        donor = self.rng.choice(self.others).split("\n")
        line = self.rng.choice(donor)
        lines = self.text.split("\n")
        at = self.rng.randrange(len(lines) + 1)
        lines.insert(at, line)
        self.text = "\n".join(lines)
        self.notes.append(f"line {line!r} inserted before line {at + 1}")

    def break_bytes(self, data: bytearray) -> bytes:
        how = self.rng.randrange(3)
        if how == 0 and data:
            at = self.rng.randrange(len(data))
            data[at] = self.rng.randrange(256)
            self.notes.append(f"byte {at} := {data[at]:#x}")
        elif how == 1:
            del data[self.rng.randrange(len(data) + 1):]
            self.notes.append(f"truncated to {len(data)} bytes")
        else:
            at = self.rng.randrange(len(data) + 1)
            data[at:at] = self.rng.choice([b"\xff", b"\0", b"\xef\xbb\xbf", b"\r", b"&a ",
                                           b"*a ", b"%YAML 1.1\n", b"---\n", b"...\n"])
            self.notes.append(f"bytes inserted at {at}")
        return bytes(data)


# -- targets ----------------------------------------------------------------------------
@dataclass
class FuzzInput:
    """One mutated input; targets read it and must not change it."""
    family: str
    index: int
    seed_name: str
    rng: random.Random
    workdir: Path
    notes: list[str]
    image: SparseImage | None = None
    vhdx_seed: VhdxSeed | None = None
    blob: bytes = b""
    path: Path | None = None

    @property
    def suffix(self) -> str:
        return {"vhdx": ".vhdx", "dmlog": ".log", "scenario": ".yaml"}.get(self.family, ".bin")

    def save(self, path: Path) -> Path:
        if self.image is None:
            path.write_bytes(self.blob)
        elif self.image.size_bytes <= SAVE_MAX_FILE_BYTES:
            self.image.to_file(path)
        else:
            path = path.with_suffix(".sectors")
            _save_sector_dump(self.image, path)
        return path


def _save_sector_dump(img: SparseImage, path: Path) -> None:
    """An image too large to write as a file: size, then (index, 512 bytes) records."""
    with open(path, "wb") as f:
        f.write(b"crashsim-sectors v1 " + str(img.size_bytes).encode() + b"\n")
        for idx, data in sorted(img.changed_sectors().items()):
            f.write(struct.pack("<Q", idx) + data)


def load_sector_dump(path: Path) -> SparseImage:
    with open(path, "rb") as f:
        img = SparseImage(int(f.readline().split()[-1]))
        while rec := f.read(8 + 512):
            img.sectors[struct.unpack_from("<Q", rec)[0]] = rec[8:]
    return img


@dataclass(frozen=True)
class Target:
    """A piece of crashsim run on each input of ``family``; ``documented`` are the errors
    it may raise (anything else is a crasher); ``every`` runs it on every n-th input;
    running longer than ``timeout_s`` is a hang."""
    name: str
    family: str
    run: Callable[[FuzzInput], None]
    documented: tuple[type[BaseException], ...] = ()
    every: int = 1
    timeout_s: float = INPUT_TIMEOUT_S


def _tolerate(fn: Callable, *args, **kwargs):
    """``fn(...)``, or None when it refuses the input with a RecoveryError."""
    try:
        return fn(*args, **kwargs)
    except RecoveryError:
        return None


def _accepts(fn: Callable, *args) -> bool:
    """Whether a checker lets the input through (it raises RecoveryError if not)."""
    try:
        fn(*args)
    except RecoveryError:
        return False
    return True


def parse_structures(img: SparseImage, rng: random.Random) -> None:
    """Every VHDX parser on the bytes where its structure lies (and on cut-short copies)."""
    _tolerate(vf.parse_file_identifier, img.read(0, rng.choice([0, 7, 8, 9, 520, 1024])))
    blocks = [img.read(off, vf.HEADER_BLOCK) for off in vf.HEADER_SLOTS]
    for blob, off in zip(blocks, vf.HEADER_SLOTS):
        _tolerate(vf.check_header, blob[:rng.choice([vf.HEADER_BLOCK, 80, 79])], off)
    chosen = _tolerate(vf.choose_header, *blocks)
    header = chosen[1] if chosen else None
    if header is not None:
        _tolerate(vf.check_log_geometry, header, vf.HEADER_SLOTS[chosen[0]])
    regions = None
    span = [(header.log_offset, header.log_offset + header.log_length)] if header else []
    for off in vf.REGION_TABLE_OFFSETS:
        blob = img.read(off, vf.REGION_TABLE_BYTES)
        _tolerate(vf.parse_region_table, blob[:rng.randrange(len(blob) + 1)], off)
        entries = _tolerate(vf.parse_region_table, blob, off)
        if entries is not None:
            regions = _tolerate(vf.known_regions, entries, off, span) or regions
    if regions is not None:
        _parse_metadata_and_bat(img, regions, rng)
    if header is not None:
        _parse_log(img, header, rng)


def _parse_metadata_and_bat(img: SparseImage, regions: vf.Regions,
                            rng: random.Random) -> None:
    md, bat = regions.metadata, regions.bat
    if md.file_offset + md.length > img.size_bytes:
        return  # the driver refuses a region past end-of-file before reading it
    table = img.read(md.file_offset, min(md.length, vf.METADATA_TABLE_BYTES))
    need = vf.metadata_bytes_needed(table, md)
    if not 0 <= need <= md.length:
        raise ContractError(f"metadata_bytes_needed gave {need} for a "
                            f"{md.length}-byte region")
    blob = table + img.read(md.file_offset + len(table), max(0, need - len(table)))
    _tolerate(vf.parse_metadata, blob[:rng.randrange(len(blob) + 1)], md)
    meta = _tolerate(vf.parse_metadata, blob, md)
    if meta is None or bat.file_offset + bat.length > img.size_bytes:
        return
    count = meta.bat_entries
    if count * 8 > bat.length:
        return
    raw = img.read(bat.file_offset, count * 8)
    entries = vf.parse_bat(raw[:rng.choice([len(raw), len(raw) // 2])], count)
    if len(entries) != count:
        raise ContractError(f"parse_bat gave {len(entries)} entries, asked for {count}")
    for i, value in vf.nonzero_entries_of(raw):
        vf.unpack_bat_entry(value)
        vf.is_bitmap_index(i, meta.chunk_ratio)


def _parse_log(img: SparseImage, header: vf.Header, rng: random.Random) -> None:
    if header.log_length == 0 or header.log_offset + header.log_length > img.size_bytes:
        return
    for start in range(0, header.log_length, MiB):
        chunk = img.read(header.log_offset + start, min(MiB, header.log_length - start))
        for rel in range(0, len(chunk), LOG_SECTOR):
            if chunk[rel:rel + 4] == b"loge":
                _parse_entry(img, header, start + rel, rng)


def _parse_entry(img: SparseImage, header: vf.Header, pos: int, rng: random.Random) -> None:
    h = _tolerate(vf.parse_log_entry_header, img.read(header.log_offset + pos, 64), pos)
    if h is None:
        return
    _tolerate(vf.check_entry_header, h, log_length=header.log_length,
              log_guid=header.log_guid, offset=pos)
    n = min(h.entry_length, header.log_length) or LOG_SECTOR
    first = min(n, header.log_length - pos)
    blob = img.read(header.log_offset + pos, first) + img.read(header.log_offset, n - first)
    _tolerate(vf.parse_descriptors, blob[:rng.randrange(len(blob) + 1)], h, pos)
    descs = _tolerate(vf.parse_descriptors, blob, h, pos)
    vf.entry_checksum_ok(blob, h)
    if descs is None or len(blob) != h.entry_length or \
            not _accepts(vf.check_layout, h, descs, pos):
        return
    start = h.descriptor_sectors * LOG_SECTOR
    datas = [blob[p:p + LOG_SECTOR] for p in range(start, h.entry_length, LOG_SECTOR)]
    for k, sector in enumerate(datas):
        cut = sector[:rng.choice([LOG_SECTOR, LOG_SECTOR, 7, 4092])]
        _tolerate(vf.check_data_sector, cut, h.sequence_number, k, pos + start)
    entry = vf.LogEntry(h, descs, datas)
    list(entry.writes())
    entry.end_offset


def scan_paths(img: SparseImage) -> None:
    """Header choice, log scan under each policy, and validate: the no-write paths."""
    dev = ImageDevice(img)
    headers = _tolerate(HeaderSession.load, dev)
    if headers is not None:
        for policy in POLICIES:
            scan = _tolerate(scan_log, dev, headers.current, policy)
            if scan is not None:
                describe_scan(scan, ReplayResult())
    problems = validate(dev)
    if not all(isinstance(p, str) for p in problems):
        raise ContractError(f"validate returned {problems!r}, not strings")


def open_paths(img: SparseImage, ops: list[Op]) -> None:
    """VhdxDriver.open (replay included) under each policy, then reads of the disk, a
    write in the same session (as ``crashsim vhdx write`` does), a fresh attach and
    validate on the recovered image."""
    for policy in POLICIES:
        dev = ImageDevice(img.fork())
        drv = VhdxDriver(random.Random(0))
        if _tolerate(lambda: run_sync(drv.open(dev, policy=policy))) is None:
            continue
        for op in ops:
            if op.offset < drv.virtual_size:
                _tolerate(drv.read, op.offset, min(op.length, drv.virtual_size - op.offset))
        if policy is FIXED_POLICY:
            _write_after_open(drv)
        _tolerate(VhdxDriver(random.Random(1)).attach, dev)
        validate(dev, policy)


def _write_after_open(drv: VhdxDriver) -> None:
    """A guest write into the last block; ValueError is the driver's documented refusal
    of a write it cannot log (too large for the log) or place."""
    offset = max(0, drv.virtual_size - LOG_SECTOR)
    try:
        run_sync(drv.write(offset, b"\x5a" * min(LOG_SECTOR, drv.virtual_size)))
        run_sync(drv.flush())
    except (RecoveryError, ValueError):
        pass


def oracle_paths(img: SparseImage, seed: VhdxSeed, rng: random.Random) -> None:
    """The writer plugin's recover, view, check_structure and probe, as Judge calls
    them (crashsim.oracle.Judge._examine): only RecoveryError/ProbeFailed may escape."""
    writer = seed.writer(rng.choice(["fixed", "fixed", "qemu", "recorded"]))
    if writer is None:
        return
    ranges = merge_ranges((op.offset, op.length) for op in seed.ops)
    work = img.fork()
    dev = ImageDevice(work)
    try:
        run_sync(writer.recover(dev))
        writer.view(dev, ranges)
        writer.check_structure(dev)
    except RecoveryError:
        return
    if rng.random() < PROBE_SHARE:
        try:
            run_sync(writer.probe(ImageDevice(work.fork())))
        except (ProbeFailed, RecoveryError):
            pass


def cli_paths(img: SparseImage, workdir: Path) -> None:
    """``crashsim vhdx info|log|replay|read`` on the image, through crashsim.cli.main."""
    if img.size_bytes > SAVE_MAX_FILE_BYTES:
        return
    clidir = workdir / "cli"
    clidir.mkdir(exist_ok=True)
    path, out = clidir / "input.vhdx", clidir / "disk.raw"
    img.to_file(path)
    commands = [["vhdx", "info", str(path)], ["vhdx", "log", str(path)],
                ["vhdx", "replay", str(path)], ["vhdx", "replay", "--policy", "qemu",
                                                str(path)]]
    vs, replayed_size = _opened_sizes(img)
    if vs is None or vs <= CLI_MAX_VIRTUAL_BYTES:
        commands.append(["vhdx", "read", str(path), "-o", str(out)])
    if replayed_size <= SAVE_MAX_FILE_BYTES:  # `write` replays into the real file
        commands.append(["vhdx", "write", str(path), "0", "4KiB"])  # last: changes the file
    for argv in commands:
        status, err = _run_cli(argv)
        if status not in (0, 2):
            raise CliCrash(argv, status, err)
    out.unlink(missing_ok=True)


def _opened_sizes(img: SparseImage) -> tuple[int | None, int]:
    """(virtual disk size, file size after replay) of the image; (None, file size) when
    it does not open."""
    drv, dev = VhdxDriver(random.Random(0)), ImageDevice(img.fork())
    if _tolerate(lambda: run_sync(drv.open(dev))) is None:
        return None, img.size_bytes
    return drv.virtual_size, dev.size_bytes


def _run_cli(argv: list[str]) -> tuple[int, str]:
    from .cli import main
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, err.getvalue()


def dmlog_read_paths(path: Path) -> None:
    """read_log; a DmLogError must name the file, the entry (or super block), the offset."""
    try:
        read_log(path)
    except DmLogError as exc:
        check_dmlog_error(exc, path)


def check_dmlog_error(exc: DmLogError, path: Path) -> None:
    where = "super block" if exc.entry_index is None else f"entry {exc.entry_index}"
    if exc.path != str(path) or not isinstance(exc.offset, int) or exc.offset < 0 \
            or where not in str(exc) or f"offset {exc.offset:#x}" not in str(exc):
        raise ContractError(f"DmLogError does not name file, entry and offset: {exc}")


def dmlog_trace_paths(path: Path, rng: random.Random) -> None:
    """A log that reads becomes a Trace (both semantics) and replays onto an image."""
    try:
        log = read_log(path)
    except DmLogError:
        return
    base = SparseImage(rng.choice([64 * KiB, MiB]))
    for semantics in ("linux", "qemu"):
        final = rng.choice([None, None, 512, MiB, 8 * MiB])
        if final is None and semantics == "qemu":  # a qemu log needs its file's size
            final = base.size_bytes
        try:
            to_trace(log, base, semantics, final, rng.choice([512, 4096]))
        except DmLogError as exc:
            check_dmlog_error(exc, path)
    try:
        upto = rng.choice([None, 1, len(log.entries)])
        dmlog_replay(log, SparseImage(base.size_bytes), upto)
    except DmLogError as exc:
        check_dmlog_error(exc, path)


def scenario_paths(path: Path) -> None:
    """load_scenario and what ``crashsim run`` does next (check_writer, ops, digest);
    every ScenarioError line must read ``file:line: ...``."""
    from .scenario import ScenarioError, check_writer, load_scenario
    try:
        sc = load_scenario(path)
        check_writer(path, sc)
        sc.ops()
        sc.digest()
    except ScenarioError as exc:
        check_scenario_error(exc, path)


def check_scenario_error(exc: Exception, path: Path) -> None:
    form = re.compile(re.escape(str(path)) + r":\d+: \S")
    lines = getattr(exc, "lines", [])
    bad = [line for line in lines if not form.match(line)]
    if not lines or bad:
        raise ContractError(f"ScenarioError lines not in file:line form: {bad or lines}")


def default_targets() -> list[Target]:
    return [
        Target("vhdx-parse", "vhdx", lambda i: parse_structures(i.image, i.rng),
               (RecoveryError,)),
        Target("vhdx-scan", "vhdx", lambda i: scan_paths(i.image), (RecoveryError,)),
        Target("vhdx-open", "vhdx", lambda i: open_paths(i.image, i.vhdx_seed.ops),
               (RecoveryError,)),
        Target("vhdx-oracle", "vhdx", lambda i: oracle_paths(i.image, i.vhdx_seed, i.rng),
               (RecoveryError, ProbeFailed)),
        # `vhdx write` replays into a real file, a write and an fsync per 4 KiB: slower
        Target("vhdx-cli", "vhdx", lambda i: cli_paths(i.image, i.workdir), (),
               every=CLI_EVERY, timeout_s=CLI_TIMEOUT_S),
        Target("dmlog-read", "dmlog", lambda i: dmlog_read_paths(i.path), ()),
        Target("dmlog-trace", "dmlog", lambda i: dmlog_trace_paths(i.path, i.rng), ()),
        Target("scenario-load", "scenario", lambda i: scenario_paths(i.path), ()),
    ]


# -- the corpus -------------------------------------------------------------------------
class Corpus:
    """Seeds of every family, and the mutated input number ``index`` drawn from them."""

    def __init__(self, workdir: Path, sample_dirs: Sequence[Path], families: set[str]):
        self.workdir = workdir
        self.vhdx: list[VhdxSeed] = []
        self.dmlog: list[DmLogSeed] = []
        self.scenarios: list[tuple[str, str]] = []
        if "vhdx" in families:
            self.vhdx = crashsim_vhdx_seeds(workdir) + sample_vhdx_seeds(sample_dirs,
                                                                          workdir)
        if "dmlog" in families:
            self.dmlog = dmlog_seeds(workdir)
        if "scenario" in families:
            self.scenarios = scenario_seeds()
            self.scenario_dir = workdir / "scenarios"
            self.scenario_dir.mkdir()
            write_log(self.scenario_dir / "rec.log",
                      [write_entry(8, b"\xa1" * 4096), flush_entry()])

    def describe(self) -> str:
        samples = sum(s.name.startswith("sample:") for s in self.vhdx)
        return (f"{len(self.vhdx)} VHDX seeds ({samples} samples), {len(self.dmlog)} "
                f"dm-log-writes logs, {len(self.scenarios)} scenarios")

    def make(self, family: str, index: int, rng: random.Random) -> FuzzInput:
        if family == "vhdx":
            seed = rng.choice(self.vhdx)
            m = VhdxMutator(seed, rng)
            img = m.mutate()
            return FuzzInput(family, index, seed.name, rng, self.workdir, m.notes,
                             image=img, vhdx_seed=seed)
        if family == "dmlog":
            seed = rng.choice(self.dmlog)
            m = DmLogMutator(seed, rng, self.workdir / "rebuilt.log")
            path = self.workdir / "input.log"
            blob = m.mutate()
            path.write_bytes(blob)
            return FuzzInput(family, index, seed.name, rng, self.workdir, m.notes, blob=blob,
                             path=path)
        name, text = rng.choice(self.scenarios)
        m = ScenarioMutator(text, rng, [t for _, t in self.scenarios])
        blob = m.mutate()
        path = self.scenario_dir / "input.yaml"
        path.write_bytes(blob)
        return FuzzInput(family, index, name, rng, self.workdir, m.notes, blob=blob, path=path)


# -- crashers and the campaign ----------------------------------------------------------
@dataclass
class Crasher:
    key: tuple[str, str]        # (exception type, file:line)
    target: str
    message: str
    traceback: str
    input_index: int
    seed_name: str
    notes: list[str]
    count: int = 1
    saved: Path | None = None


@dataclass
class CampaignResult:
    seed: int
    seconds: float = 0.0
    inputs: int = 0
    per_target: Counter = field(default_factory=Counter)
    per_family: Counter = field(default_factory=Counter)
    crashers: dict[tuple[str, str], Crasher] = field(default_factory=dict)
    corpus: str = ""

    @property
    def unique_crashers(self) -> int:
        return len(self.crashers)


def _is_own(filename: str) -> bool:
    path = Path(filename)
    return path.is_relative_to(PACKAGE_DIR) and path.name != Path(__file__).name


def _where(filename: str) -> str:
    path = Path(filename)
    return str(path.relative_to(PACKAGE_DIR.parent)) if path.is_relative_to(PACKAGE_DIR) \
        else path.name


def _type_name(exc: BaseException) -> str:
    t = type(exc)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def crash_key(exc: BaseException) -> tuple[str, str]:
    """(exception type, file:line of the innermost crashsim frame - the fuzzer's own
    frames excluded; file:function for a hang, whose line varies)."""
    if isinstance(exc, CliCrash):
        return exc.key
    origin = exc.__context__ if isinstance(exc, ContractError) else None
    frames = traceback.extract_tb((origin or exc).__traceback__)
    own = [f for f in frames if _is_own(f.filename)] or \
        [f for f in frames if Path(f.filename).name != Path(__file__).name] or frames
    if not own:
        return _type_name(exc), "?"
    fr = own[-1]
    where = fr.name if isinstance(exc, InputTimeout) else fr.lineno
    return _type_name(exc), f"{_where(fr.filename)}:{where}"


_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (\S+)', re.M)


def _key_from_text(stderr: str, status: int) -> tuple[str, str]:
    """The key of a crash that ``crashsim`` printed as a traceback (exit status 3)."""
    frames = [(f, int(n)) for f, n, _ in _FRAME.findall(stderr)]
    own = [fr for fr in frames if _is_own(fr[0])] or frames
    last = [ln for ln in stderr.splitlines() if ln and not ln.startswith((" ", "crashsim:"))]
    exc_type = last[-1].split(":", 1)[0] if last else f"exit status {status}"
    where = f"{_where(own[-1][0])}:{own[-1][1]}" if own else "?"
    return exc_type, where


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise InputTimeout in the running code after ``seconds`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise InputTimeout(f"input ran longer than {seconds:g} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _Campaign:
    def __init__(self, result: CampaignResult, out: Path | None,
                 log: Callable[[str], None]):
        self.result, self.out, self.log = result, out, log

    def run_target(self, target: Target, inp: FuzzInput) -> None:
        self.result.per_target[target.name] += 1
        try:
            with _time_limit(target.timeout_s):
                target.run(inp)
        except target.documented:
            pass
        except (Exception, InputTimeout) as exc:
            self.record(target, inp, exc)

    def record(self, target: Target, inp: FuzzInput, exc: BaseException) -> None:
        key = crash_key(exc)
        known = self.result.crashers.get(key)
        if known is not None:
            known.count += 1
            return
        text = exc.stderr if isinstance(exc, CliCrash) else "".join(
            traceback.format_exception(exc))
        c = Crasher(key, target.name, f"{_type_name(exc)}: {exc}", text, inp.index,
                    inp.seed_name, list(inp.notes))
        self.result.crashers[key] = c
        if self.out is not None:
            c.saved = self.save(c, inp)
        self.log(f"fuzz: NEW crasher {key[0]} at {key[1]} in {target.name} (input "
                 f"{inp.index}, seed {inp.seed_name})")

    def save(self, c: Crasher, inp: FuzzInput) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", c.key[0]).strip("-")
        digest = hashlib.blake2b(repr(c.key).encode(), digest_size=5).hexdigest()
        path = inp.save(self.out / f"{c.target}-{slug}-{digest}{inp.suffix}")
        self.write_sidecar(c, path)
        return path

    def write_sidecar(self, c: Crasher, path: Path) -> None:
        notes = "\n".join(f"  - {n}" for n in c.notes) or "  (none)"
        path.with_name(path.name + ".txt").write_text(
            f"target: {c.target}\nexception: {c.message}\nwhere: {c.key[1]}\n"
            f"seed input: {c.seed_name}\ncampaign seed: {self.result.seed}, input "
            f"{c.input_index}\nseen: {c.count} inputs\nmutations:\n{notes}\n\n"
            f"traceback:\n{c.traceback}")


def run_campaign(minutes: float, seed: int, corpus_dirs: list[Path], out: Path | None, *,
                 targets: Sequence[Target] | None = None,
                 log: Callable[[str], None] = print) -> CampaignResult:
    """Fuzz for ``minutes``: mutated inputs of every family through every target.

    ``corpus_dirs`` hold sample VHDX images (``*.vhdx``, ``*.vhdx.bz2``); crashsim's own
    images, logs and scenarios are always used. Crashers are saved in ``out`` (if given).
    """
    targets = list(targets) if targets is not None else default_targets()
    families = sorted({t.family for t in targets})
    result = CampaignResult(seed)
    with private_tempdir("crashsim-fuzz-") as work:
        corpus = Corpus(work, corpus_dirs, set(families))
        result.corpus = corpus.describe()
        log(f"fuzz: seed {seed}, {minutes:g} min; corpus: {result.corpus}")
        _loop(corpus, targets, families, minutes, result, _Campaign(result, out, log), log)
    if out is not None:
        for c in result.crashers.values():
            if c.saved is not None:
                _Campaign(result, out, log).write_sidecar(c, c.saved)
    log(summary(result))
    return result


def _loop(corpus: Corpus, targets: list[Target], families: list[str], minutes: float,
          result: CampaignResult, campaign: _Campaign, log: Callable[[str], None]) -> None:
    start = time.monotonic()
    deadline, next_progress = start + minutes * 60, start + PROGRESS_EVERY_S
    weights = [FAMILY_WEIGHTS.get(f, 1) for f in families]
    index = 0
    while time.monotonic() < deadline:
        rng = random.Random(f"crashsim-fuzz:{result.seed}:{index}")
        family = rng.choices(families, weights)[0]
        nth = result.per_family[family]
        inp = corpus.make(family, index, rng)
        for t in targets:
            if t.family == family and nth % t.every == 0:
                campaign.run_target(t, inp)
        result.per_family[family] += 1
        index += 1
        result.inputs = index
        result.seconds = time.monotonic() - start
        if time.monotonic() >= next_progress:
            next_progress += PROGRESS_EVERY_S
            log(progress_line(result))


def progress_line(result: CampaignResult) -> str:
    m, s = divmod(int(result.seconds), 60)
    fams = ", ".join(f"{f} {n}" for f, n in sorted(result.per_family.items()))
    return (f"fuzz: {m}:{s:02d} elapsed, {result.inputs} inputs ({fams}), "
            f"{result.unique_crashers} unique crashers")


def summary(result: CampaignResult) -> str:
    lines = [f"fuzz: done after {result.seconds / 60:.1f} min: {result.inputs} inputs, "
             f"seed {result.seed}"]
    lines += [f"fuzz:   {name:14} {n} inputs" for name, n in sorted(result.per_target.items())]
    if not result.crashers:
        lines.append("fuzz: no crashers")
    else:
        lines.append(f"fuzz: {result.unique_crashers} unique crashers:")
        for c in result.crashers.values():
            lines.append(f"fuzz:   {c.key[0]} at {c.key[1]} ({c.target}, {c.count} inputs)"
                         + (f": {c.saved}" if c.saved else ""))
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fuzz", help="fuzz crashsim's own parsers and recovery "
                              "(it must never crash)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long (default: 10)")
    p.add_argument("--seed", type=int, default=None,
                   help="campaign seed (default: random, printed)")
    p.add_argument("--samples", type=Path, action="append", default=None, metavar="DIR",
                   help="directory of sample VHDX images (*.vhdx, *.vhdx.bz2); may repeat; "
                        "default: <repo>/../shared/vhdx-samples if it exists")
    p.add_argument("--no-samples", action="store_true", help="crashsim-made inputs only")
    p.add_argument("--out", type=Path, default=Path("fuzz-crashers"),
                   help="where crashers are saved (default: fuzz-crashers/)")
    p.set_defaults(func=cmd_fuzz)
    return p


def cmd_fuzz(args: argparse.Namespace) -> int:
    from .errors import EXIT_FAIL, EXIT_OK, InputError
    if not 0 < args.minutes <= 7 * 24 * 60:
        raise InputError(f"--minutes {args.minutes}: give a duration above 0, at most a "
                         f"week")
    dirs = [] if args.no_samples else (args.samples if args.samples is not None else
                                       [d for d in [DEFAULT_SAMPLES] if d.is_dir()])
    for d in dirs:
        if not d.is_dir():
            raise InputError(f"--samples {d}: not a directory")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out}: exists and is not a directory")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    with _memory_limit(MEMORY_LIMIT_BYTES):
        result = run_campaign(args.minutes, seed, dirs, args.out)
    return EXIT_FAIL if result.crashers else EXIT_OK


@contextlib.contextmanager
def _memory_limit(limit_bytes: int) -> Iterator[None]:
    """A soft address-space limit, so that a runaway allocation in the code under test
    fails with MemoryError (a crasher) instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    new = max(limit_bytes, _address_space_bytes() + (2 << 30))  # room beyond what is used
    new = new if hard == resource.RLIM_INFINITY else min(new, hard)
    if soft != resource.RLIM_INFINITY and soft <= new:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (new, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _address_space_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0
