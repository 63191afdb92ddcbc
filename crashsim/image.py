"""Sparse copy-on-write disk images.

A crash state is never a full copy of the disk. It is a chain of sector overlays over
an immutable base: base <- durable writes <- the chosen pending units <- recovery's own
writes. Each layer holds only the 512-byte sectors it changed, so building a state costs
what the state differs by, not what the disk holds.

Reads are the hot path of judging a state (recovery, view, structure, probe all read
through four or more layers). A layer can be *sealed*: a promise that it and its parents
never change again. A read then takes the bulk of its bytes from the sealed layer's cache
of flattened 64 KiB pages and patches in only the sectors the thin layers above it hold,
instead of walking the whole chain once per sector.

A sealed layer may also be lent a *flat map*: every visible sector of its chain in one
dict, kept by whoever builds the chain (the step walker, which has the durable content
at hand anyway). A sector read then stops there instead of walking a chain that deepens
with the workload. The lender takes the map back before it changes it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from typing import Iterator

SECTOR_BYTES = 512
PAGE_SECTORS = 128  # 64 KiB pages in a sealed layer's read cache
SMALL_LAYER_SECTORS = 16  # up to this many sectors, scanning beats an index
_ZERO_SECTOR = bytes(SECTOR_BYTES)
_ZERO_PAGE = bytes(SECTOR_BYTES * PAGE_SECTORS)


class SparseImage:
    """A byte-addressed image made of 512-byte sectors; absent sectors read as zero."""

    __slots__ = ("sectors", "parent", "size_bytes", "_pages", "_index", "_twin", "_flat",
                 "__weakref__")

    def __init__(self, size_bytes: int = 0, parent: "SparseImage | None" = None):
        self.sectors: dict[int, bytes] = {}
        self.parent = parent
        self.size_bytes = size_bytes if parent is None else max(size_bytes, parent.size_bytes)
        self._pages: dict[int, bytes] | None = None  # None: not sealed
        self._index: dict[int, list[int]] | None = None  # page -> its sectors held here
        self._twin: weakref.ref | None = None  # a merged-away layer with this content
        self._flat: dict[int, bytes] | None = None  # lent: the chain's visible sectors

    # -- sealing --------------------------------------------------------------------
    def seal(self) -> "SparseImage":
        """Promise that this layer and every parent stay unchanged from now on."""
        if self._pages is None:
            self._pages = {}
        return self

    @property
    def sealed(self) -> bool:
        return self._pages is not None

    def lend_flat(self, flat: dict[int, bytes] | None) -> None:
        """Lend this sealed layer ``flat``, which must map every sector of its chain's
        visible content (absent ones read as zero), or take a lent map back (None). The
        lender must take it back before changing it: the layer trusts it as it is."""
        if flat is not None and self._pages is None:
            raise RuntimeError("a flat map is lent to sealed layers only")
        self._flat = flat

    def take_pages(self, older: "SparseImage") -> None:
        """Move the page cache of ``older``, an ancestor, to this sealed layer, less
        the pages a layer in between changes; ``older`` keeps an empty cache (rebuilt
        on demand). Consecutive steps differ in a few pages, and rebuilding all the
        others every step would cost more than judging; copying the cache instead of
        moving it cost time in proportion to the pages a long workload had read."""
        if self._pages is None or older._pages is None or older is self:
            return
        pages, older._pages = older._pages, {}
        changed = self.changes_between(older, max_layers=64)
        if changed is None:
            return  # no shared layer near: start empty
        for p in changed:
            pages.pop(p, None)
        pages.update(self._pages)
        self._pages = pages

    def changes_between(self, other: "SparseImage", max_layers: int = 8
                        ) -> dict[int, list[int]] | None:
        """The sectors, by page, where this image and ``other`` may differ: those of
        the layers above the nearest layer they share (or share a twin of), on either
        side; None if there is none within ``max_layers`` of each."""
        depth: dict[int, int] = {}
        theirs: list[SparseImage] = []
        keep: list[SparseImage] = []  # twins stay alive while their ids are keys
        layer: SparseImage | None = other
        while layer is not None and len(theirs) < max_layers:
            depth.setdefault(id(layer), len(theirs))
            twin = layer._twin() if layer._twin is not None else None
            if twin is not None:
                keep.append(twin)
                depth.setdefault(id(twin), len(theirs))
            theirs.append(layer)
            layer = layer.parent
        mine: list[SparseImage] = []
        layer = self
        while layer is not None and len(mine) < max_layers:
            d = depth.get(id(layer))
            twin = layer._twin() if layer._twin is not None else None
            if d is None and twin is not None:
                d = depth.get(id(twin))
            if d is not None:
                changed: dict[int, list[int]] = {}
                for above in mine + theirs[:d]:
                    for page, sectors in above._page_index().items():
                        changed.setdefault(page, []).extend(sectors)
                return changed
            mine.append(layer)
            layer = layer.parent
        return None

    def frozen(self, max_sectors: int = 4096) -> "SparseImage | None":
        """This image's content as one new layer over its first sealed ancestor, which
        later writes to this image do not change; None when its unsealed layers hold
        more than ``max_sectors`` or no ancestor is sealed."""
        layers: list[SparseImage] = []
        layer: SparseImage | None = self
        while layer is not None and layer._pages is None:
            layers.append(layer)
            layer = layer.parent
        if layer is None or sum(len(x.sectors) for x in layers) > max_sectors:
            return None
        if not layers:
            return self
        top = SparseImage(parent=layer)
        for x in reversed(layers):
            top.sectors.update(x.sectors)
        top.size_bytes = self.size_bytes
        return top

    def merged_with_parent(self) -> "SparseImage":
        """One layer with this layer's content over its parent's parent: the twin of
        this layer, so caches made for this one stay usable."""
        parent = self.parent
        merged = SparseImage(parent=parent.parent if parent is not None else None)
        merged.sectors = {**(parent.sectors if parent is not None else {}), **self.sectors}
        merged.size_bytes = self.size_bytes
        twin = self._twin() if self._twin is not None else None
        merged._twin = weakref.ref(twin if twin is not None else self)
        return merged

    def _check_writable(self) -> None:
        if self._pages is not None:
            raise RuntimeError("write to a sealed image layer; fork() it first")

    def _note_new(self, first: int, last: int) -> list[int] | None:
        """Sectors first..last this layer does not hold yet, to add to its page index
        once written (recovery interleaves writes and reads: rebuilding the index
        after every write would cost more than the reads it speeds up)."""
        if self._index is None:
            return None
        return [i for i in range(first, last + 1) if i not in self.sectors]

    def _index_new(self, fresh: list[int] | None) -> None:
        if fresh:
            index = self._index
            for i in fresh:
                index.setdefault(i // PAGE_SECTORS, []).append(i)

    def _page_index(self) -> dict[int, list[int]]:
        """Which of this layer's sectors lie in each page, so a read finds the few it
        needs without scanning them all. Rebuilt after any write."""
        index = self._index
        if index is None:
            index = self._index = {}
            for i in self.sectors:
                index.setdefault(i // PAGE_SECTORS, []).append(i)
        return index

    # -- layering -------------------------------------------------------------------
    def fork(self) -> "SparseImage":
        """A writable child; writes to it never reach this image."""
        return SparseImage(self.size_bytes, parent=self)

    def flattened(self) -> "SparseImage":
        """One layer holding the same content, so that deep chains stay cheap to read."""
        flat = SparseImage(self.size_bytes)
        for layer in reversed(list(self._layers())):
            flat.sectors.update(layer.sectors)
        return flat

    def _layers(self) -> Iterator["SparseImage"]:
        layer: SparseImage | None = self
        while layer is not None:
            yield layer
            layer = layer.parent

    # -- sector access --------------------------------------------------------------
    def sector(self, index: int) -> bytes:
        layer: SparseImage | None = self
        while layer is not None:
            flat = layer._flat
            if flat is not None:
                return flat.get(index, _ZERO_SECTOR)
            data = layer.sectors.get(index)
            if data is not None:
                return data
            layer = layer.parent
        return _ZERO_SECTOR

    def holds_any(self, first: int, last: int) -> bool:
        """Whether this layer itself (not its parents) holds a sector in first..last."""
        return bool(self.sectors) and bool(_sectors_in([self], first, last))

    def put_sector(self, index: int, data: bytes) -> None:
        self._check_writable()
        fresh = self._note_new(index, index)
        self.sectors[index] = data
        self._index_new(fresh)

    # -- byte access ----------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        first, last = offset // SECTOR_BYTES, (offset + length - 1) // SECTOR_BYTES
        start = offset - first * SECTOR_BYTES
        if first == last:
            return self.sector(first)[start:start + length]
        blob = self._span(first, last)
        return blob[start:start + length]

    def _span(self, first: int, last: int) -> bytes:
        """Sectors first..last: bulk from the first sealed layer (or the bottom layer),
        then the sectors of the unsealed layers above it, lowest first."""
        overlays = []
        layer: SparseImage = self
        while layer._pages is None and layer.parent is not None:
            if layer.sectors:
                overlays.append(layer)
            layer = layer.parent
        if layer._pages is not None:
            blob = layer._paged(first, last)
        else:
            get = layer.sectors.get
            blob = b"".join([get(i, _ZERO_SECTOR) for i in range(first, last + 1)])
        patches = _sectors_in(overlays, first, last)
        if not patches:
            return blob
        buf = bytearray(blob)
        for i, data in patches.items():
            pos = (i - first) * SECTOR_BYTES
            buf[pos:pos + SECTOR_BYTES] = data
        return bytes(buf)

    def _paged(self, first: int, last: int) -> bytes:
        pages = self._pages
        p0, p1 = first // PAGE_SECTORS, last // PAGE_SECTORS
        parts = []
        for p in range(p0, p1 + 1):
            page = pages.get(p)
            if page is None:
                page = pages[p] = self._build_page(p)
            parts.append(page)
        blob = parts[0] if len(parts) == 1 else b"".join(parts)
        pos = (first - p0 * PAGE_SECTORS) * SECTOR_BYTES
        end = pos + (last - first + 1) * SECTOR_BYTES
        return blob if pos == 0 and end == len(blob) else blob[pos:end]

    def _build_page(self, p: int) -> bytes:
        first = p * PAGE_SECTORS
        last = first + PAGE_SECTORS - 1
        if self._flat is not None:
            get = self._flat.get
            found = [get(i) for i in range(first, last + 1)]
            if not any(found):
                return _ZERO_PAGE
            return b"".join([_ZERO_SECTOR if d is None else d for d in found])
        patches = _sectors_in(list(self._layers()), first, last)
        if not patches:
            return _ZERO_PAGE
        return b"".join([patches.get(i, _ZERO_SECTOR) for i in range(first, last + 1)])

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        self._check_writable()
        end = offset + len(data)
        if end > self.size_bytes:
            self.size_bytes = end
        fresh = self._note_new(offset // SECTOR_BYTES, (end - 1) // SECTOR_BYTES)
        self._write_sectors(offset, data)
        self._index_new(fresh)

    def _write_sectors(self, offset: int, data: bytes) -> None:
        pos = 0
        index = offset // SECTOR_BYTES
        skew = offset - index * SECTOR_BYTES
        if skew:
            head = min(SECTOR_BYTES - skew, len(data))
            old = self.sector(index)
            self.sectors[index] = old[:skew] + data[:head] + old[skew + head:]
            pos, index = head, index + 1
        mv = memoryview(data)
        while pos + SECTOR_BYTES <= len(data):
            self.sectors[index] = bytes(mv[pos:pos + SECTOR_BYTES])
            pos += SECTOR_BYTES
            index += 1
        if pos < len(data):
            old = self.sector(index)
            self.sectors[index] = bytes(mv[pos:]) + old[len(data) - pos:]

    def resize(self, size_bytes: int) -> None:
        """Grow or shrink; sectors past a shrink read as zero again when regrown."""
        self._check_writable()
        if size_bytes < self.size_bytes:
            # Sectors may be deleted or masked: the page index is rebuilt on the next
            # read. Only on a shrink: dropping it on every growth made a simulation
            # that extends its file per allocation rebuild it per allocation, quadratic
            # in the workload (640 writes: 9 of 18 seconds of simulation).
            self._index = None
            last = (size_bytes + SECTOR_BYTES - 1) // SECTOR_BYTES
            for layer in self._layers():
                if layer is self:
                    for idx in [i for i in layer.sectors if i >= last]:
                        del layer.sectors[idx]
                elif any(i >= last for i in layer.sectors):
                    # A parent may not be changed: mask its tail with zero sectors.
                    for idx in [i for i in layer.sectors if i >= last]:
                        self.sectors.setdefault(idx, _ZERO_SECTOR)
            if size_bytes % SECTOR_BYTES:
                keep = size_bytes % SECTOR_BYTES
                old = self.sector(last - 1)
                self.sectors[last - 1] = old[:keep] + bytes(SECTOR_BYTES - keep)
        self.size_bytes = size_bytes

    # -- identity -------------------------------------------------------------------
    def changed_sectors(self) -> dict[int, bytes]:
        """Every sector set in any layer, with its visible value."""
        out: dict[int, bytes] = {}
        for layer in self._layers():
            for idx, data in layer.sectors.items():
                out.setdefault(idx, data)
        return out

    def content_key(self) -> str:
        """Digest of the visible content: equal keys mean equal images."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.size_bytes.to_bytes(8, "little"))
        for idx, data in sorted(self.changed_sectors().items()):
            if data != _ZERO_SECTOR:
                h.update(idx.to_bytes(8, "little"))
                h.update(data)
        return h.hexdigest()

    # -- files ----------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SparseImage":
        """Load a file, skipping holes and all-zero sectors."""
        size = os.path.getsize(path)
        img = cls(size)
        with open(path, "rb") as f:
            for start, end in _data_extents(f.fileno(), size):
                f.seek(start)
                pos = start
                while pos < end:
                    chunk = f.read(min(1 << 20, end - pos))
                    if not chunk:
                        break
                    _store_nonzero(img, pos, chunk)
                    pos += len(chunk)
        return img

    def to_file(self, path: str | os.PathLike) -> None:
        """Write a sparse file with the same content; a write that fails (a full disk)
        leaves no partial image behind to be mistaken for the state."""
        opened = False
        try:
            with open(path, "wb") as f:
                opened = True
                f.truncate(self.size_bytes)
                for idx, data in sorted(self.changed_sectors().items()):
                    if data != _ZERO_SECTOR and idx * SECTOR_BYTES < self.size_bytes:
                        f.seek(idx * SECTOR_BYTES)
                        f.write(data[: self.size_bytes - idx * SECTOR_BYTES])
        except BaseException:
            # The failure may come from the final flush, at close. Never unlink what
            # is not a plain file (a device node given as the path).
            if opened and os.path.isfile(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise


def _sectors_in(layers_top_first: list[SparseImage], first: int, last: int
                ) -> dict[int, bytes]:
    """The visible sectors in first..last that these layers hold (upper layers win).
    A small layer is scanned whole; a larger one through its page index."""
    found: dict[int, bytes] = {}
    for layer in reversed(layers_top_first):
        secs = layer.sectors
        if len(secs) <= SMALL_LAYER_SECTORS:
            for i, data in secs.items():
                if first <= i <= last:
                    found[i] = data
            continue
        index = layer._page_index()
        for p in range(first // PAGE_SECTORS, last // PAGE_SECTORS + 1):
            for i in index.get(p, ()):
                if first <= i <= last:
                    found[i] = secs[i]
    return found


def _store_nonzero(img: SparseImage, pos: int, chunk: bytes) -> None:
    # Files are read in whole sectors except perhaps the very last one.
    for off in range(0, len(chunk), SECTOR_BYTES):
        piece = chunk[off:off + SECTOR_BYTES]
        if piece.count(0) != len(piece):
            img.sectors[(pos + off) // SECTOR_BYTES] = piece.ljust(SECTOR_BYTES, b"\0")


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the non-hole ranges of a file; the whole file if unsupported."""
    seek_data = getattr(os, "SEEK_DATA", None)
    if seek_data is None:
        yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, seek_data)
        except OSError:
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end
