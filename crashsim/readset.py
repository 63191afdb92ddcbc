"""Read-set memoisation: judge a crash state once for all states that differ unread.

Judging a state (recovery, view, structure check, probe) is a deterministic function of
the bytes it reads and of the device size: each read's place follows from the bytes
read before it, and each write from the bytes read. So if state S' holds the same
bytes as an already judged state S in every sector S's judging read, and has the same
size, judging S' reads the same bytes, writes the same bytes and reaches the same
result. The memo keeps the recently judged states with the sectors their judging read;
a new state reuses the result of the first whose read sectors it agrees with.

States of one step are thin layers over one sealed durable layer, so two of them can
differ only in the sectors of their own layers: only those are compared, and only where
the earlier judging read. A typical hit: a torn write into a block that no structure
yet points to, which recovery, the view and the checks all leave unread. A memo made
``across_steps`` also compares with states of the few steps before, whose durable layer
is an ancestor: the sectors made durable in between are compared as well. The oracle's
view memo does (a view reads little that a step makes durable); for whole verdicts it
found no hits, only cost.

A read made with ``blockdev.read_summary`` is one the writer uses only through a pure
function of its bytes (the VHDX scan keeps the entries it parsed from a log page, never
the page). Where a state's own sectors differ from a judged state's there, the function
is run on the state's bytes, and an equal value agrees: torn log entries that fail the
same check in the same way then share one recovery. Such a read is noted with its value
only when every byte of it comes from the state, not from what judging wrote first.

A writer opts in with ``reads_through_device = True``: its recovery, view, checks and
probe read the image only through the device they are given and are deterministic.
A writer that hands the image to an external tool must not, since the tool's reads
cannot be seen.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from .blockdev import ImageDevice
from .image import PAGE_SECTORS, SECTOR_BYTES, SparseImage

RECENT_STATES = 32  # judged states kept: nearly every hit is among them
MAX_LAYERS_APART = 4  # an older step's durable layer further down is not compared with


class ReadLogDevice(ImageDevice):
    """An ImageDevice that notes the (offset, length) of every read. ``state`` is the
    crash state's own layer, which ``image`` forks: a summarised read is noted as such
    only if no layer in between (judging's own writes) holds a sector of it."""

    def __init__(self, image: SparseImage, reads: list, state: SparseImage | None = None):
        super().__init__(image)
        self.reads = reads
        self.state = state

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.image.read(offset, length)

    def read_summary(self, offset: int, length: int, summarise: Callable[[bytes], Any],
                     key: Hashable | None) -> Any:
        try:
            value = summarise(self.image.read(offset, length))
        except BaseException:
            self.reads.append((offset, length))  # a failure is the bytes' own finding
            raise
        if key is None or length <= 0 or self._written_over(offset, length):
            self.reads.append((offset, length))
        else:
            self.reads.append(Summarised(offset, length, key, summarise, value))
        return value

    def _written_over(self, offset: int, length: int) -> bool:
        if self.state is None:
            return True  # which layer is the state's is not known
        first, last = offset // SECTOR_BYTES, (offset + length - 1) // SECTOR_BYTES
        layer: SparseImage | None = self.image
        while layer is not self.state:
            if layer is None or layer.holds_any(first, last):
                return True
            layer = layer.parent
        return False

    def note_reads(self, spans: "list[tuple[int, int]] | ReadGroup") -> None:
        """Note reads a caller answered itself, having found those sectors unchanged
        since it last read them: the read set must hold them all the same."""
        if isinstance(spans, ReadGroup):
            self.reads.append(spans)
        else:
            self.reads.extend(spans)


class ReadGroup(tuple):
    """Reads noted as one by a caller that notes the same ones state after state (the
    VHDX view's data spans, one per workload range). Their merged sectors are worked
    out once per group, so a read set holding it costs the same to add whatever the
    number of ranges; reads noted one by one made that cost grow with the workload."""

    def merged(self) -> tuple[list[int], list[int], frozenset[int]]:
        m = self.__dict__.get("_merged")
        if m is None:
            starts, ends = _merged_sectors(self)
            m = self.__dict__["_merged"] = (starts, ends, _pages_in(starts, ends))
        return m


class Summarised:
    """A read noted with the value its summary function gave (``read_summary``)."""

    __slots__ = ("offset", "length", "key", "summarise", "value")

    def __init__(self, offset: int, length: int, key: Hashable,
                 summarise: Callable[[bytes], Any], value: Any):
        self.offset, self.length, self.key = offset, length, key
        self.summarise, self.value = summarise, value

    @property
    def span(self) -> tuple[int, int]:
        return self.offset, self.length


_FAILED = object()  # a summary function that raised on a state's bytes
_UNSEEN = object()


@dataclass
class _Judged:
    durable: SparseImage  # the sealed layer the state was a thin layer over
    sectors: dict[int, bytes]  # the state's own layer over the durable layer
    own_pages: frozenset[int]  # pages those sectors lie in
    size_bytes: int
    pages: frozenset[int]  # pages any read besides the groups touched: a first filter
    starts: list[int]  # merged sector intervals read, sorted (besides the groups)
    ends: list[int]
    groups: tuple[ReadGroup, ...]
    result: object
    reads: list  # as noted, for a caller that reuses the result
    # Summarised reads (sorted, none overlapping) and the sector intervals read plainly;
    # starts/ends above hold both, so every comparison that ignores summaries is safe.
    summaries: tuple[Summarised, ...] = ()
    sum_firsts: tuple[int, ...] = ()
    sum_lasts: tuple[int, ...] = ()
    raw_starts: list[int] | None = None
    raw_ends: list[int] | None = None


class ReadSetMemo:
    """Recently judged states, with the sectors judging read."""

    def __init__(self, enabled: bool, across_steps: bool = False):
        self.enabled = enabled
        self.across_steps = across_steps
        self._judged: list[_Judged] = []
        self.summary_hits = 0  # found by an equal summary where the bytes differed

    def _applies(self, image: SparseImage) -> bool:
        return self.enabled and image.parent is not None and image.parent.sealed

    def find(self, image: SparseImage):
        """The result of a judged state that ``image`` agrees with where it was read."""
        if not self._applies(image):
            return None
        found = self.find_over(image.sectors, image.size_bytes, image.parent, image)
        return None if found is None else found.result

    def find_over(self, sectors: dict[int, bytes], size_bytes: int,
                  durable: SparseImage, image: SparseImage | None = None
                  ) -> "_Judged | None":
        """The judged entry that content ``sectors`` over ``durable`` agrees with.
        ``image``, that content as an image, lets a differing summarised read agree."""
        own = _pages_of(sectors)
        values: dict = {}  # each summary function run once on this state's bytes
        moved_since: dict[int, dict[int, list[int]] | None] = {}
        for judged in reversed(self._judged):
            if judged.size_bytes != size_bytes:
                continue
            if judged.durable is durable:
                if _unread_pages(judged, own) and _unread_pages(judged, judged.own_pages):
                    return judged  # neither state's own sectors were read at all
                unsure = _unsure_summaries(sectors, judged, durable, image)
                if unsure is not None and all(
                        _same_summary(judged.summaries[i], image, values) for i in unsure):
                    self.summary_hits += bool(unsure)
                    return judged
                continue
            if not self.across_steps:
                continue
            key = id(judged.durable)
            if key not in moved_since:
                moved_since[key] = durable.changes_between(judged.durable, MAX_LAYERS_APART)
            moved = moved_since[key]
            if moved is not None and _agrees_across(sectors, judged, durable, moved):
                return judged
        return None

    def reads_for(self, image: SparseImage) -> list[tuple[int, int]] | None:
        """A list to note the reads of judging ``image`` in, or None if no memo."""
        return [] if self._applies(image) else None

    def add(self, image: SparseImage, reads: list[tuple[int, int]], result: object) -> None:
        self.add_over(image.sectors, image.size_bytes, image.parent, reads, result)

    def add_over(self, sectors: dict[int, bytes], size_bytes: int, durable: SparseImage,
                 reads: list[tuple[int, int]], result: object) -> None:
        if len(self._judged) >= RECENT_STATES:
            del self._judged[0]  # lookups compare the newest ones only
        groups = tuple({id(r): r for r in reads if type(r) is ReadGroup}.values())
        # Read again with the same function, a range gave the same value: one is kept.
        summaries = sorted({(r.key, r.offset, r.length): r for r in reads
                            if type(r) is Summarised}.values(), key=lambda r: r.offset)
        plain = [r for r in reads if type(r) is tuple] if groups or summaries else reads
        starts, ends = _merged_sectors(plain)
        extra: dict[str, object] = {}
        if summaries:
            raw_starts, raw_ends = starts, ends
            starts, ends = _merged_sectors(plain + [r.span for r in summaries])
            firsts, lasts = _bounds(summaries)
            if all(a > b for a, b in zip(firsts[1:], lasts)):  # overlapping: all plain
                extra = dict(summaries=tuple(summaries), sum_firsts=firsts, sum_lasts=lasts,
                             raw_starts=raw_starts, raw_ends=raw_ends)
        pages = _pages_in(starts, ends)  # a group's pages stay its own: no union to build
        self._judged.append(_Judged(durable, sectors, _pages_of(sectors), size_bytes, pages,
                                    starts, ends, groups, result, list(reads), **extra))


def merged_reads(reads: list) -> tuple[list[int], list[int]]:
    """The sector intervals of ``reads``, groups and summaries spelled out: what was
    read, however it was noted."""
    return _merged_sectors([s for r in reads for s in (
        r if type(r) is ReadGroup else (r.span,) if type(r) is Summarised else (r,))])


def _bounds(summaries: list[Summarised]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (tuple(r.offset // SECTOR_BYTES for r in summaries),
            tuple((r.offset + r.length - 1) // SECTOR_BYTES for r in summaries))


def _unread_pages(judged: _Judged, pages: frozenset[int]) -> bool:
    return judged.pages.isdisjoint(pages) and \
        all(group.merged()[2].isdisjoint(pages) for group in judged.groups)


def _page_read(judged: _Judged, page: int) -> bool:
    return page in judged.pages or any(page in group.merged()[2] for group in judged.groups)


def _pages_in(starts: list[int], ends: list[int]) -> frozenset[int]:
    return frozenset(p for a, b in zip(starts, ends)
                     for p in range(a // PAGE_SECTORS, b // PAGE_SECTORS + 1))


def _was_read(judged: _Judged, x: int) -> bool:
    return _in(judged.starts, judged.ends, x) or _in_group(judged, x)


def _in(starts, ends, x: int) -> bool:
    i = bisect_right(starts, x) - 1
    return i >= 0 and x <= ends[i]


def _in_group(judged: _Judged, x: int) -> bool:
    for group in judged.groups:
        starts, ends, _ = group.merged()
        i = bisect_right(starts, x) - 1
        if i >= 0 and x <= ends[i]:
            return True
    return False


def _pages_of(sectors: dict[int, bytes]) -> frozenset[int]:
    return frozenset(x // PAGE_SECTORS for x in sectors)


def _merged_sectors(reads: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Sorted, merged sector intervals of ``reads``, in one pass over them sorted by
    offset (judging rereads headers a lot: duplicates go first)."""
    starts: list[int] = []
    ends: list[int] = []
    last = -2
    for off, n in sorted(set(reads)):
        if n <= 0:
            continue
        a, b = off // SECTOR_BYTES, (off + n - 1) // SECTOR_BYTES
        if a <= last + 1:
            if b > last:
                ends[-1] = last = b
        else:
            starts.append(a)
            ends.append(b)
            last = b
    return starts, ends


def _unsure_summaries(sectors: dict[int, bytes], judged: _Judged, durable: SparseImage,
                      image: SparseImage | None) -> set[int] | None:
    """Where either state's own layer differs: None if in a sector read plainly, else
    the summarised reads (by index) whose summary of ``image`` must be compared; an
    empty set means equal content in every sector read."""
    unsure: set[int] = set()
    for mine, theirs in ((sectors, judged.sectors), (judged.sectors, sectors)):
        for x, data in mine.items():
            if not _was_read(judged, x):
                continue
            other = theirs.get(x)
            if other is None:
                other = durable.sector(x)
            if other != data:
                i = _summary_holding(judged, x) if image is not None else None
                if i is None:
                    return None
                unsure.add(i)
    return unsure


def _summary_holding(judged: _Judged, x: int) -> int | None:
    """The summarised read sector ``x`` lies in, unless it was also read plainly."""
    if not judged.summaries:
        return None
    i = bisect_right(judged.sum_firsts, x) - 1
    if i < 0 or x > judged.sum_lasts[i]:
        return None
    if _in(judged.raw_starts, judged.raw_ends, x) or _in_group(judged, x):
        return None
    return i


def _same_summary(read: Summarised, image: SparseImage, seen: dict | None) -> bool:
    key = (read.key, read.offset, read.length)
    value = _UNSEEN if seen is None else seen.get(key, _UNSEEN)
    if value is _UNSEEN:
        try:
            value = read.summarise(image.read(read.offset, read.length))
        except Exception:
            value = _FAILED
        if seen is not None:
            seen[key] = value
    return value is not _FAILED and (value is read.value or value == read.value)


def _agrees_across(sectors: dict[int, bytes], judged: _Judged, durable: SparseImage,
                   moved: dict[int, list[int]]) -> bool:
    """Equal content where read, for a judged state of an earlier step, whose durable
    layer is ``durable``'s ancestor: the sectors the layers in between hold (``moved``,
    by page) may differ as well. Summarised reads count as plain ones here."""
    candidates = [x for x in sectors if _page_read(judged, x // PAGE_SECTORS)]
    candidates += [x for x in judged.sectors if _page_read(judged, x // PAGE_SECTORS)]
    for page, held in moved.items():
        if _page_read(judged, page):
            candidates += held
    old = judged.durable
    for x in candidates:
        if not _was_read(judged, x):
            continue
        mine, theirs = sectors.get(x), judged.sectors.get(x)
        if (durable.sector(x) if mine is None else mine) != \
                (old.sector(x) if theirs is None else theirs):
            return False
    return True
