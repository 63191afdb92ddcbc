"""``Parts``: a view's values range by range, as a sequence that shares what did not change.

A long workload has one range per write, and each crash state's view differs from the
last in a few of them. Copying a list of every range per view cost time and, worse,
memory traffic in proportion to the workload's length (each copy touches every item).
A ``Parts`` holds its items in fixed chunks of CHUNK_ITEMS; ``replaced`` copies only
the chunks it changes and the short list of chunks, so successive views share their
unchanged chunks as the very same objects. A consumer that keeps something per chunk
(the model's match mask) works out again only the chunks that are new.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any, Iterable, Iterator

CHUNK_ITEMS = 32


class Parts(Sequence):
    __slots__ = ("chunks", "_len")

    def __init__(self, chunks: list[tuple[Any, ...]], length: int):
        self.chunks = chunks  # never changed once made: other Parts may share it
        self._len = length

    @classmethod
    def of(cls, items: Iterable[Any], like: Parts | None = None) -> Parts:
        """The items as Parts; chunks equal to ``like``'s are ``like``'s own objects."""
        items = list(items)
        chunks = [tuple(items[i:i + CHUNK_ITEMS]) for i in range(0, len(items), CHUNK_ITEMS)]
        if like is not None and like._len == len(items):
            chunks = [old if new == old else new for new, old in zip(chunks, like.chunks)]
        return cls(chunks, len(items))

    def replaced(self, changes: dict[int, Any]) -> Parts:
        """A copy with item i set to changes[i]; untouched chunks are shared."""
        if not changes:
            return self
        chunks = list(self.chunks)
        by_chunk: dict[int, list[int]] = {}
        for i in changes:
            if not 0 <= i < self._len:
                raise IndexError(i)
            by_chunk.setdefault(i // CHUNK_ITEMS, []).append(i)
        for c, idx in by_chunk.items():
            chunk = list(chunks[c])
            for i in idx:
                chunk[i % CHUNK_ITEMS] = changes[i]
            chunks[c] = tuple(chunk)
        return Parts(chunks, self._len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self)[i]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        return self.chunks[i // CHUNK_ITEMS][i % CHUNK_ITEMS]

    def __iter__(self) -> Iterator[Any]:
        return chain.from_iterable(self.chunks)

    def __eq__(self, other) -> bool:
        if isinstance(other, Parts):
            return self._len == other._len and self.chunks == other.chunks
        return isinstance(other, list) and list(self) == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Parts({list(self)!r})"
