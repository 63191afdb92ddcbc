"""Read-set memoisation: judge a crash state once for all states that differ unread.

Judging a state (recovery, view, structure check, probe) is a deterministic function of
the bytes it reads and of the device size: each read's place follows from the bytes
read before it, and each write from the bytes read. So if state S' holds the same
bytes as an already judged state S in every sector S's judging read, and has the same
size, judging S' reads the same bytes, writes the same bytes and reaches the same
result. The memo keeps, per step, the judged states with the sectors their judging
read; a new state of that step reuses the result of the first whose read sectors it
agrees with.

States of one step are thin layers over one sealed durable layer, so two of them can
differ only in the sectors of their own layers: only those are compared, and only where
the earlier judging read. A typical hit: a torn write into a block that no structure
yet points to, which recovery, the view and the checks all leave unread.

A writer opts in with ``reads_through_device = True``: its recovery, view, checks and
probe read the image only through the device they are given and are deterministic.
A writer that hands the image to an external tool must not, since the tool's reads
cannot be seen.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from .blockdev import ImageDevice
from .image import PAGE_SECTORS, SECTOR_BYTES, SparseImage

RECENT_STATES = 32  # judged states kept per durable layer: nearly every hit is among them


class ReadLogDevice(ImageDevice):
    """An ImageDevice that notes the (offset, length) of every read."""

    def __init__(self, image: SparseImage, reads: list[tuple[int, int]]):
        super().__init__(image)
        self.reads = reads

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.image.read(offset, length)


@dataclass
class _Judged:
    sectors: dict[int, bytes]  # the state's own layer over the durable layer
    own_pages: frozenset[int]  # pages those sectors lie in
    size_bytes: int
    pages: frozenset[int]  # pages any read touched: a cheap first filter
    starts: list[int]  # merged sector intervals read, sorted
    ends: list[int]
    result: object
    reads: list[tuple[int, int]]  # as noted, for a caller that reuses the result


class ReadSetMemo:
    """Judged states of the current durable layer, with the sectors judging read."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._durable: SparseImage | None = None
        self._judged: list[_Judged] = []

    def _applies(self, image: SparseImage) -> bool:
        return self.enabled and image.parent is not None and image.parent.sealed

    def find(self, image: SparseImage):
        """The result of a judged state that ``image`` agrees with where it was read."""
        if not self._applies(image):
            return None
        found = self.find_over(image.sectors, image.size_bytes, image.parent)
        return None if found is None else found.result

    def find_over(self, sectors: dict[int, bytes], size_bytes: int,
                  durable: SparseImage) -> "_Judged | None":
        """The judged entry that content ``sectors`` over ``durable`` agrees with."""
        if durable is not self._durable:
            return None
        own = _pages_of(sectors)
        for judged in reversed(self._judged):
            if judged.size_bytes != size_bytes:
                continue
            if judged.pages.isdisjoint(own) and judged.pages.isdisjoint(judged.own_pages):
                return judged  # neither state's own sectors were read at all
            if _agrees(sectors, judged, durable):
                return judged
        return None

    def reads_for(self, image: SparseImage) -> list[tuple[int, int]] | None:
        """A list to note the reads of judging ``image`` in, or None if no memo."""
        return [] if self._applies(image) else None

    def add(self, image: SparseImage, reads: list[tuple[int, int]], result: object) -> None:
        self.add_over(image.sectors, image.size_bytes, image.parent, reads, result)

    def add_over(self, sectors: dict[int, bytes], size_bytes: int, durable: SparseImage,
                 reads: list[tuple[int, int]], result: object) -> None:
        if durable is not self._durable:
            self._durable, self._judged = durable, []
        if len(self._judged) >= RECENT_STATES:
            del self._judged[0]  # lookups compare the newest ones only
        starts, ends = _merged_sectors(reads)
        pages = frozenset(p for a, b in zip(starts, ends)
                          for p in range(a // PAGE_SECTORS, b // PAGE_SECTORS + 1))
        self._judged.append(_Judged(sectors, _pages_of(sectors), size_bytes, pages,
                                    starts, ends, result, list(reads)))


def _pages_of(sectors: dict[int, bytes]) -> frozenset[int]:
    return frozenset(x // PAGE_SECTORS for x in sectors)


def _merged_sectors(reads: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    spans = sorted({(off // SECTOR_BYTES, (off + n - 1) // SECTOR_BYTES)
                    for off, n in set(reads) if n > 0})  # judging rereads headers a lot
    starts: list[int] = []
    ends: list[int] = []
    for a, b in spans:
        if ends and a <= ends[-1] + 1:
            ends[-1] = max(ends[-1], b)
        else:
            starts.append(a)
            ends.append(b)
    return starts, ends


def _agrees(sectors: dict[int, bytes], judged: _Judged, durable: SparseImage) -> bool:
    """Equal content in every read sector where either state's own layer differs."""
    pages, starts, ends = judged.pages, judged.starts, judged.ends
    for mine, theirs in ((sectors, judged.sectors), (judged.sectors, sectors)):
        for x, data in mine.items():
            if x // PAGE_SECTORS not in pages:
                continue
            i = bisect_right(starts, x) - 1
            if i < 0 or x > ends[i]:
                continue
            other = theirs.get(x)
            if other is None:
                other = durable.sector(x)
            if other != data:
                return False
    return True
