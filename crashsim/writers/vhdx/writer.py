"""The ``vhdx`` writer plugin: QEMU's VHDX protocol with crashsim's fixes, under test.

Two workload kinds:

``guest_write``
    A guest write through ``VhdxDriver`` followed by a guest flush; the transaction is
    acknowledged after the flush. The view is the virtual disk, read through the BAT.
``log_write``
    A raw logged update of file bytes through ``LogWriter.log_write``. Op offsets are
    relative to the *payload area*, which starts where the freshly created image ends
    (past the headers, log, BAT and metadata), so a workload cannot overwrite the
    structures that make the file a VHDX. The view is those file bytes.

Recovery is an open with the fixed replay policy (a LogGuid left set without entries
is cleared). The liveness probe allocates one more block the workload never touches.
"""
from __future__ import annotations

import functools
import random
from typing import Any, ClassVar

from ...blockdev import BlockDevice, IOGen
from ...image import SparseImage
from ...model import Op
from ...parts import Parts
from ...sizes import parse_size
from ..base import ProbeFailed, Recovery, RecoveryError, TxReporter
from .create import LOG_OFFSET, create_image
from .driver import BAT_SECTOR_BYTES, VhdxDriver, validate
from .format import (FULLY_PRESENT, HEADER_BLOCK, HEADER_SLOTS, REGION_TABLE_BYTES,
                     REGION_TABLE_OFFSETS, ZERO_GUID, MiB, bat_entry_count,
                     is_bitmap_index, nonzero_entries_of, payload_block_of, round_up,
                     unpack_bat_entry)
from .replay import FIXED_POLICY, ReplayPolicy
from .view import RangeViews

# Defect switches: each a realistic mistake, wired in variants.py (step overrides or a
# ReplayPolicy flip).
DEFECTS: dict[str, str] = {
    "no-flush-after-log": "the entry is not flushed before the in-place apply starts",
    "clear-guid-before-apply-flush": "applied sectors are written without a flush and the "
                                     "LogGuid is cleared before they are durable",
    "fua-as-barrier": "the last entry sector is written with FUA instead of flushing the "
                      "entry, as if FUA ordered the earlier entry sectors",
    "replay-skips-checksum": "replay does not verify the entry checksum",
    "bad-partial-merge": "a partial 4 KiB log sector is zero-filled instead of read-merged "
                         "from the file",
    "guid-after-apply": "the LogGuid is published only after the in-place apply (the entry "
                        "never protects the apply)",
    "ack-before-flush": "a guest write is acknowledged before the guest flush",
    "bat-before-data": "the BAT entry is logged before the guest data is written",
    "apply-before-log": "the update is written in place before the log entry",
    "no-apply": "the entry is flushed but never applied in place; the LogGuid is cleared",
}

PROBE_BYTES = 4096
PROBE_PATTERN = 0x5A


class VhdxWriter:
    kind: ClassVar[str] = "vhdx"
    # Judging reads the image only through the device and is deterministic, so the
    # oracle may reuse a verdict for states that differ only where it never read.
    reads_through_device: ClassVar[bool] = True
    # Its view reads again only what changed since the last one (view.py), which costs
    # less than the oracle's memo of whole views.
    views_incrementally: ClassVar[bool] = True
    op_kinds: ClassVar[frozenset[str]] = frozenset({"guest_write", "log_write"})
    defects_available: ClassVar[dict[str, str]] = DEFECTS
    recovery_policy: ClassVar[ReplayPolicy] = FIXED_POLICY
    driver_class: ClassVar[type[VhdxDriver]] = VhdxDriver

    def __init__(self, *, ops: list[Op], image: dict[str, Any], defects: list[str],
                 seed: int) -> None:
        unknown = sorted(set(defects) - set(self.defects_available))
        if unknown:
            known = ", ".join(sorted(self.defects_available)) or "none"
            raise ValueError(f"writer {self.kind!r} has no defect {unknown[0]!r} "
                             f"(available: {known})")
        kinds = {op.kind for op in ops}
        if len(kinds) > 1 or not kinds <= self.op_kinds:
            raise ValueError(f"writer {self.kind!r} runs either guest_write or log_write "
                             f"ops, not {sorted(kinds)}")
        self.ops = ops
        self.defects = frozenset(defects)
        if self.defects:
            from .variants import defect_driver_class, defect_policy  # variants subclass us
            self.driver_class = defect_driver_class(self.defects)
            self.recovery_policy = defect_policy(self.recovery_policy, self.defects)
        self.seed = seed
        self._workload_blocks: frozenset[int] | None = None
        self._attach_memo: tuple[BlockDevice, int, VhdxDriver] | None = None
        self._views = RangeViews()
        self._ranges_end: tuple[list[tuple[int, int]], int] | None = None
        self.op_kind = next(iter(kinds), "guest_write")
        self.virtual_size = parse_size(image.get("virtual_size", 64 * MiB))
        self.block_size = parse_size(image.get("block_size", MiB))
        self.log_size = parse_size(image.get("log_size", MiB))
        self.payload_base = self._payload_base()
        self._check_ops()

    def _payload_base(self) -> int:
        entries = bat_entry_count(self.virtual_size, self.block_size, 512)
        return LOG_OFFSET + self.log_size + round_up(entries * 8, MiB) + MiB

    def _check_ops(self) -> None:
        if self.op_kind != "guest_write":
            return
        for op in self.ops:
            if op.offset < 0 or op.offset + op.length > self.virtual_size:
                raise ValueError(f"guest_write at {op.offset:#x} length {op.length:#x} "
                                 f"lies outside the {self.virtual_size}-byte virtual disk")

    def _rng(self, purpose: str) -> random.Random:
        return random.Random(f"vhdx:{self.seed}:{purpose}")

    def _driver(self, purpose: str) -> VhdxDriver:
        return self.driver_class(self._rng(purpose))

    # -- format and workload ----------------------------------------------------------------
    def format_image(self) -> SparseImage:
        return create_image(self.virtual_size, self.block_size, self.log_size,
                            rng=self._rng("format"))

    def run(self, dev: BlockDevice, tx: TxReporter) -> IOGen:
        drv = self._driver("run")
        yield from drv.open(dev, policy=self.recovery_policy)
        for i, op in enumerate(self.ops):
            tx.start(i)
            if "ack-before-flush" in self.defects and op.kind == "guest_write":
                yield from drv.write(op.offset, op.data())
                tx.ack(i)  # the defect: the guest flush has not happened yet
                yield from drv.flush()
                continue
            yield from self.apply_op(drv, op)
            tx.ack(i)

    def apply_op(self, drv: VhdxDriver, op: Op) -> IOGen:
        if op.kind == "guest_write":
            yield from drv.write(op.offset, op.data())
            yield from drv.flush()
        else:
            yield from drv.log.log_write(self.payload_base + op.offset, op.data())

    # -- recovery and checks ----------------------------------------------------------------
    def recover(self, dev: BlockDevice) -> IOGen:
        drv = self._driver("recover")
        result = yield from drv.open(dev, policy=self.recovery_policy)
        return Recovery(list(result.decisions), list(result.branches))

    def view(self, dev: BlockDevice, ranges: list[tuple[int, int]]) -> list[bytes] | Parts:
        # One part per range, unjoined: the model matches range by range, often by
        # the identity of a cached page, which joining would throw away.
        if self.op_kind == "log_write":
            return [dev.read(self.payload_base + off, n) for off, n in ranges]
        drv = self._attached(dev)
        end = self._end_of(ranges)
        if end > drv.virtual_size:  # the metadata shrank the disk: corrupt, not a crash
            raise RecoveryError(f"the virtual disk is {drv.virtual_size} bytes, too small "
                                f"for the workload's range ending at {end:#x}")
        return self._views.read(drv, dev, ranges)

    def _end_of(self, ranges: list[tuple[int, int]]) -> int:
        if self._ranges_end is None or self._ranges_end[0] is not ranges:
            self._ranges_end = (ranges, max((off + n for off, n in ranges), default=0))
        return self._ranges_end[1]

    def _attached(self, dev: BlockDevice) -> VhdxDriver:
        """A driver over ``dev`` as it is, for reading only. The oracle's view, key
        and structure check each need one; while the device is unchanged they share
        it, as attaching parses headers, regions, metadata and BAT again."""
        generation = getattr(dev, "generation", None)
        memo = self._attach_memo
        if generation is not None and memo is not None and memo[0] is dev \
                and memo[1] == generation:
            return memo[2]
        drv = self._driver("attach").attach(dev)
        if generation is not None:
            self._attach_memo = (dev, generation, drv)
        return drv

    def check_structure(self, dev: BlockDevice) -> list[str]:
        problems = validate(dev, self.recovery_policy)
        if problems:
            return problems
        try:
            drv = self._attached(dev)
        except RecoveryError as exc:
            return [str(exc)]
        return self._stray_blocks(drv)

    def workload_blocks(self) -> frozenset[int]:
        if self._workload_blocks is None:
            self._workload_blocks = frozenset(self._blocks_written())
        return self._workload_blocks

    def _blocks_written(self) -> set[int]:
        if self.op_kind != "guest_write":
            return set()
        blocks = set()
        for op in self.ops:
            if op.length:
                first = op.offset // self.block_size
                last = (op.offset + op.length - 1) // self.block_size
                blocks.update(range(first, last + 1))
        return blocks

    def _stray_blocks(self, drv: VhdxDriver) -> list[str]:
        return list(_stray_blocks_of(drv.bat_blob, drv.metadata.chunk_ratio,
                                     drv.metadata.data_blocks,
                                     frozenset(self.workload_blocks())))

    def structure_key(self, dev: BlockDevice) -> bytes | None:
        """The file size and every structure byte that check_structure and probe read:
        file identifier, both headers, both region tables, the metadata table and
        items, the BAT, and the log region while a LogGuid is published. Left out:
        payload data (the probe allocates a block the workload never writes) and the
        log while no LogGuid is published (its entries then carry older GUIDs, which no
        scan accepts, and the probe's session GUID comes from its own seeded stream)."""
        try:
            drv = self._attached(dev)
        except RecoveryError:
            return None
        h, md = drv.headers.current, drv.regions.metadata
        spans = [(0, 1024), (HEADER_SLOTS[0], HEADER_BLOCK), (HEADER_SLOTS[1], HEADER_BLOCK),
                 (REGION_TABLE_OFFSETS[0], REGION_TABLE_BYTES),
                 (REGION_TABLE_OFFSETS[1], REGION_TABLE_BYTES),
                 (md.file_offset, drv.metadata_bytes_read),
                 (drv.regions.bat.file_offset, 8 * drv.metadata.bat_entries)]
        if h.log_guid != ZERO_GUID:
            spans.append((h.log_offset, h.log_length))
        parts = [dev.size_bytes.to_bytes(8, "little")]
        parts += [dev.read(off, n) for off, n in spans]
        return b"".join(parts)

    # -- liveness -------------------------------------------------------------------------
    def probe_block(self) -> int:
        used = self.workload_blocks()
        blocks = -(-self.virtual_size // self.block_size)
        return next((b for b in range(blocks - 1, -1, -1) if b not in used), blocks - 1)

    def probe(self, dev: BlockDevice) -> IOGen:
        offset = self.probe_block() * self.block_size
        data = bytes([PROBE_PATTERN]) * min(PROBE_BYTES, self.virtual_size - offset)
        try:
            drv = self._driver("probe")
            yield from drv.open(dev, policy=self.recovery_policy)
            yield from drv.write(offset, data)
            yield from drv.flush()
            again = self._driver("probe-reopen")
            yield from again.open(dev, policy=self.recovery_policy)
            back = again.read(offset, len(data))
        except (RecoveryError, ValueError) as exc:
            raise ProbeFailed(f"allocating write at guest offset {offset:#x} failed: "
                              f"{exc}") from None
        if back != data:
            raise ProbeFailed(f"allocating write at guest offset {offset:#x} did not read "
                              f"back after reopening")


@functools.lru_cache(maxsize=64)
def _stray_blocks_of(blob: bytes, ratio: int, blocks: int, expected: frozenset[int]
                     ) -> tuple[str, ...]:
    """Allocated blocks the workload never wrote, BAT sector by BAT sector, each
    sector's answer memoised by its bytes: each allocation makes a new BAT, and
    walking all of each made a long workload pay for its length again and again."""
    out: list[str] = []
    for c in range(0, len(blob), BAT_SECTOR_BYTES):
        piece = blob[c:c + BAT_SECTOR_BYTES]
        if piece.count(0) != len(piece):
            out += _stray_in_sector(piece, c // 8, ratio, blocks, expected)
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _stray_in_sector(piece: bytes, first: int, ratio: int, blocks: int,
                     expected: frozenset[int]) -> tuple[str, ...]:
    out = []
    for k, value in nonzero_entries_of(piece):
        i = first + k
        if is_bitmap_index(i, ratio):
            continue
        block = payload_block_of(i, ratio)
        state, off = unpack_bat_entry(value)
        if state == FULLY_PRESENT and block < blocks and block not in expected:
            out.append(f"BAT entry {i} (block {block}) is "
                       f"allocated at {off:#x} but the workload never wrote it")
    return tuple(out)
