"""The guest view of the workload's ranges, read again only where the image changed.

The oracle views every recovered state: the bytes of each range the workload wrote.
Read in full, that costs one BAT lookup and one data read per range, so a long
workload paid for its length at every state. Two recovered states mostly differ in a
few sectors: a torn log entry, the headers recovery rewrote, one data block. So the
last view is kept with where each range's bytes came from, and the next one reads
again only the ranges whose BAT entries or data sectors differ; the rest are the
bytes already read, which ``SparseImage.changes_between`` vouches for.

The read set stays whole: the reads a reused range would have made are noted on the
device (``note_reads``), so the oracle's read-set memo sees the same reads either way.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...image import PAGE_SECTORS, SECTOR_BYTES, SparseImage
from .driver import VhdxDriver, zeros

MAX_LAYERS_APART = 8  # images further apart than this are viewed in full


@dataclass
class _Seen:
    """A view as read: the image (frozen), the shape and BAT it was read through,
    and for each range its bytes, BAT indices and the file spans it read."""
    image: SparseImage
    ranges: list[tuple[int, int]]
    shape: tuple[int, int, int]
    bat: list[int]
    parts: list[bytes]
    bat_of: list[tuple[int, ...]]
    spans: list[list[tuple[int, int]]]
    by_page: dict[int, list[int]]  # page -> ranges that read in it


class RangeViews:
    """The last view read, and how to read the next one from it."""

    def __init__(self) -> None:
        self._seen: _Seen | None = None
        self.ranges_read = 0  # ranges read from the image, for tests and profiles
        self.ranges_reused = 0

    def read(self, drv: VhdxDriver, dev, ranges: list[tuple[int, int]]) -> list[bytes]:
        image = getattr(dev, "image", None)
        shape = (drv.virtual_size, drv.block_size, drv.metadata.chunk_ratio)
        redo = self._stale(image, ranges, shape, drv.bat)
        if redo is None:
            return self._read_all(drv, image, ranges, shape)
        seen = self._seen
        parts, bat_of, spans = list(seen.parts), list(seen.bat_of), list(seen.spans)
        for i in redo:
            parts[i], bat_of[i], spans[i] = _read_range(drv, *ranges[i])
        note = getattr(dev, "note_reads", None)
        if note is not None:
            note([s for i, got in enumerate(seen.spans) if i not in redo for s in got])
        self.ranges_read += len(redo)
        self.ranges_reused += len(ranges) - len(redo)
        same_places = all(spans[i] == seen.spans[i] for i in redo)
        self._keep(image, ranges, shape, drv.bat, parts, bat_of, spans,
                   seen.by_page if same_places else None)
        return parts

    def _stale(self, image: SparseImage | None, ranges, shape, bat: list[int]
               ) -> set[int] | None:
        """The ranges to read again; None to read them all."""
        seen = self._seen
        # The file size may differ: sectors past the end of either read as zeros unless
        # a layer holds them, and then they are among the changed ones.
        if seen is None or image is None or seen.ranges is not ranges or \
                seen.shape != shape:
            return None
        changed = image.changes_between(seen.image, MAX_LAYERS_APART)
        if changed is None:
            return None
        redo: set[int] = set()
        for page, sectors in changed.items():
            for i in seen.by_page.get(page, ()):
                if i not in redo and _overlaps(seen.spans[i], sectors):
                    redo.add(i)
        if bat != seen.bat:
            old = seen.bat
            redo.update(i for i, idx in enumerate(seen.bat_of)
                        if any(j >= len(bat) or j >= len(old) or bat[j] != old[j]
                               for j in idx))
        return redo

    def _read_all(self, drv: VhdxDriver, image, ranges, shape) -> list[bytes]:
        read = [_read_range(drv, off, n) for off, n in ranges]
        parts = [r[0] for r in read]
        self.ranges_read += len(ranges)
        self._keep(image, ranges, shape, drv.bat, parts, [r[1] for r in read],
                   [r[2] for r in read])
        return parts

    def _keep(self, image, ranges, shape, bat, parts, bat_of, spans,
              by_page: dict[int, list[int]] | None = None) -> None:
        frozen = image.frozen() if image is not None else None
        if frozen is None:
            self._seen = None
            return
        if by_page is not None:  # every range reads where it did: the index holds
            self._seen = _Seen(frozen, ranges, shape, list(bat), parts, bat_of, spans,
                               by_page)
            return
        by_page = {}
        for i, got in enumerate(spans):
            for off, n in got:
                first, last = off // SECTOR_BYTES, (off + n - 1) // SECTOR_BYTES
                for page in range(first // PAGE_SECTORS, last // PAGE_SECTORS + 1):
                    by_page.setdefault(page, []).append(i)
        self._seen = _Seen(frozen, ranges, shape, list(bat), parts, bat_of, spans, by_page)


def _read_range(drv: VhdxDriver, offset: int, length: int
                ) -> tuple[bytes, tuple[int, ...], list[tuple[int, int]]]:
    """``drv.read`` of one range, with the BAT indices and file spans it used."""
    parts, bat_of, spans = [], [], []
    for ext in drv.extents(offset, length):
        bat_of.append(drv.bat_index_of(ext.block))
        where = drv.extent_source(ext)
        if where is None:
            parts.append(zeros(ext.length))
        else:
            parts.append(drv.io.read(where, ext.length))
            spans.append((where, ext.length))
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    return data, tuple(bat_of), spans


def _overlaps(spans: list[tuple[int, int]], sectors: list[int]) -> bool:
    for off, n in spans:
        first, last = off // SECTOR_BYTES, (off + n - 1) // SECTOR_BYTES
        if any(first <= x <= last for x in sectors):
            return True
    return False
