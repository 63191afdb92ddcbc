"""The guest view of the workload's ranges, read again only where the image changed.

The oracle views every recovered state: the bytes of each range the workload wrote.
Read in full, that costs one BAT lookup and one data read per range, so a long
workload paid for its length at every state. Two recovered states mostly differ in a
few sectors: a torn log entry, the headers recovery rewrote, one data block. So the
last view is kept with where each range's bytes came from, and the next one reads
again only the ranges whose BAT entries or data sectors differ; the rest are the
bytes already read, which ``SparseImage.changes_between`` vouches for.

The read set stays whole: every range's data spans are noted on the device as one
``ReadGroup`` (``note_reads``), so the oracle's read-set memo sees what a full view
reads, at a cost that does not grow with the number of ranges.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import MutableSequence

from ...image import PAGE_SECTORS, SECTOR_BYTES, SparseImage
from ...parts import Parts
from ...readset import ReadGroup
from .driver import VhdxDriver, zeros

MAX_LAYERS_APART = 8  # images further apart than this are viewed in full
RECENT_LAYOUTS = 4  # file layouts of the ranges kept with their page maps and read group


@dataclass
class _Seen:
    """A view as read: the image (frozen), the shape and BAT it was read through,
    and for each range its bytes, BAT indices and the file spans it read."""
    image: SparseImage
    ranges: list[tuple[int, int]]
    shape: tuple[int, int, int]
    bat: MutableSequence[int]  # a copy of the driver's (an array)
    parts: Parts  # of bytes
    bat_of: Parts  # of tuple[int, ...]
    spans: Parts  # of list[tuple[int, int]]
    by_page: dict[int, list[int]]  # page -> ranges that read in it
    by_bat: dict[int, list[int]]  # BAT index -> ranges that map through it
    group: ReadGroup  # every range's spans, noted as one read


class RangeViews:
    """The last view read, and how to read the next one from it."""

    def __init__(self) -> None:
        self._seen: _Seen | None = None
        # A long workload's views flip between a few layouts (a block allocated in one
        # crash state, not yet in the next): two thirds of the layouts a moved range
        # made at 160 writes were one of the last four, each merged again before.
        self._layouts: list[tuple[Parts, dict[int, list[int]], ReadGroup]] = []
        self.ranges_read = 0  # ranges read from the image, for tests and profiles
        self.ranges_reused = 0
        self.layouts_reused = 0

    def read(self, drv: VhdxDriver, dev, ranges: list[tuple[int, int]]) -> Parts:
        image = getattr(dev, "image", None)
        shape = (drv.virtual_size, drv.block_size, drv.metadata.chunk_ratio)
        redo = self._stale(image, ranges, shape, drv.bat)
        if redo is None:
            return self._read_all(drv, image, ranges, shape)
        seen = self._seen
        read = {i: _read_range(drv, *ranges[i]) for i in redo}
        parts = seen.parts.replaced({i: r[0] for i, r in read.items()})
        spans = seen.spans.replaced({i: r[2] for i, r in read.items()})
        self.ranges_read += len(redo)
        self.ranges_reused += len(ranges) - len(redo)
        # A range's BAT indices follow from its offset and the shape, equal here.
        moved = [i for i in redo if spans[i] != seen.spans[i]]
        self._keep(image, ranges, shape, drv.bat, parts, seen.bat_of, spans, seen, moved)
        _note(dev, self._seen.group if self._seen is not None else
              ReadGroup(chain.from_iterable(spans)))
        return parts

    def _stale(self, image: SparseImage | None, ranges, shape, bat: MutableSequence[int]
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
            if len(bat) != len(seen.bat):
                return None
            for j in _differing(bat, seen.bat):
                redo.update(seen.by_bat.get(j, ()))
        return redo

    def _read_all(self, drv: VhdxDriver, image, ranges, shape) -> Parts:
        read = [_read_range(drv, off, n) for off, n in ranges]
        parts = Parts.of(r[0] for r in read)
        self.ranges_read += len(ranges)
        self._keep(image, ranges, shape, drv.bat, parts, Parts.of(r[1] for r in read),
                   Parts.of(r[2] for r in read))
        return parts

    def _keep(self, image, ranges, shape, bat, parts, bat_of, spans,
              prev: _Seen | None = None, moved: list[int] | None = None) -> None:
        """Keep this view for the next. From ``prev``, the last one (read with the same
        shape, so through the same BAT indices), only the ranges ``moved`` to other
        file spans change the indices: a long workload flips between states with a
        block allocated and not, and rebuilding them every time cost in proportion to
        its length."""
        frozen = image.frozen() if image is not None else None
        if frozen is None:
            self._seen = None
            return
        if prev is None:
            by_bat: dict[int, list[int]] = {}
            for i, idx in enumerate(bat_of):
                for j in idx:
                    by_bat.setdefault(j, []).append(i)
            by_page = _with_pages({}, range(len(spans)), spans)
            group = self._remember(spans, by_page)
        elif moved:
            by_bat = prev.by_bat
            by_page, group = self._layout(spans, prev, moved)
        else:
            by_bat, by_page, group = prev.by_bat, prev.by_page, prev.group
        self._seen = _Seen(frozen, ranges, shape, bat[:], parts, bat_of, spans,
                           by_page, by_bat, group)

    def _layout(self, spans: Parts, prev: _Seen, moved: list[int]
                ) -> tuple[dict[int, list[int]], ReadGroup]:
        """The page map and read group of the ranges' file spans ``spans``: one of the
        recent layouts if equal (both follow from the spans alone), else ``prev``'s
        with the ``moved`` ranges' pages changed and a new group."""
        for old, by_page, group in self._layouts:
            if old == spans:
                self.layouts_reused += 1
                return by_page, group
        by_page = dict(prev.by_page)
        for i in moved:
            for page in _pages_of(prev.spans[i]):
                by_page[page] = [r for r in by_page[page] if r != i]
        by_page = _with_pages(by_page, moved, spans)
        return by_page, self._remember(spans, by_page)

    def _remember(self, spans: Parts, by_page: dict[int, list[int]]) -> ReadGroup:
        """A new read group for ``spans``, kept with them as the latest layout."""
        group = ReadGroup(chain.from_iterable(spans))
        self._layouts = [(spans, by_page, group)] + self._layouts[:RECENT_LAYOUTS - 1]
        return group


def _pages_of(spans: list[tuple[int, int]]) -> list[int]:
    out = []
    for off, n in spans:
        first, last = off // SECTOR_BYTES, (off + n - 1) // SECTOR_BYTES
        out += range(first // PAGE_SECTORS, last // PAGE_SECTORS + 1)
    return out


def _with_pages(by_page: dict[int, list[int]], which, spans) -> dict[int, list[int]]:
    """``by_page`` with ranges ``which`` added at the pages of their spans (lists are
    copied before they grow: an older view may share them)."""
    for i in which:
        for page in _pages_of(spans[i]):
            by_page[page] = by_page.get(page, []) + [i]
    return by_page


def _note(dev, group: ReadGroup) -> None:
    note = getattr(dev, "note_reads", None)
    if note is not None:
        note(group)


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


def _differing(new: MutableSequence[int], old: MutableSequence[int], chunk: int = 64
               ) -> list[int]:
    """Indices where two equally long BATs differ; slices compare in C, so a BAT of
    many entries costs little when a few differ."""
    out = []
    for c in range(0, len(new), chunk):
        if new[c:c + chunk] != old[c:c + chunk]:
            out += [j for j in range(c, min(c + chunk, len(new))) if new[j] != old[j]]
    return out


def _overlaps(spans: list[tuple[int, int]], sectors: list[int]) -> bool:
    for off, n in spans:
        first, last = off // SECTOR_BYTES, (off + n - 1) // SECTOR_BYTES
        if any(first <= x <= last for x in sectors):
            return True
    return False
