"""The block-device interface that writers and recoveries are written against.

Writers are generator functions so that one body of code runs both as a SimPy process on
the simulated device (where ``write`` and ``flush`` yield SimPy events) and synchronously
on a plain image or file (where they yield nothing). A writer calls::

    data = dev.read(offset, length)          # reads are immediate
    yield from dev.write(offset, data, fua=False)
    yield from dev.flush()
    dev.resize(size_bytes)                   # the file length; durable when made

``run_sync`` drives such a generator on a device that never yields.

A reader that uses some bytes only through a pure function of them (a log scan that
keeps what it parsed from a page, never the page) may read them with ``read_summary``.
On the oracle's device (``readset.ReadLogDevice``) such a read is noted with its value,
so a crash state whose bytes there differ but give an equal value can share a verdict.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Generator, Hashable, Protocol

from .image import SparseImage
from .trace import Trace, Write

IOGen = Generator[Any, Any, Any]


class BlockDevice(Protocol):
    sector_bytes: int

    @property
    def size_bytes(self) -> int: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes, fua: bool = False) -> IOGen: ...
    def flush(self) -> IOGen: ...
    def resize(self, size_bytes: int) -> None: ...


def read_summary(dev: Any, offset: int, length: int, summarise: Callable[[bytes], Any],
                 key: Hashable | None) -> Any:
    """``summarise(dev.read(offset, length))``. The caller promises to use those bytes
    only through the value returned; ``summarise`` must be deterministic, free of side
    effects, and the same function for every call with the same ``key`` (None: no
    key, a plain read). Its value must compare equal (``==``) exactly when what the
    caller does with it is the same."""
    own = getattr(dev, "read_summary", None)
    if own is not None:
        return own(offset, length, summarise, key)
    return summarise(dev.read(offset, length))


class NotSynchronous(RuntimeError):
    """A generator handed to run_sync tried to wait on a simulated event."""


def run_sync(gen: IOGen) -> Any:
    """Run a writer generator to completion on a synchronous device; return its value."""
    try:
        event = next(gen)
    except StopIteration as stop:
        return stop.value
    gen.close()
    raise NotSynchronous(f"generator yielded {event!r} on a synchronous device")


class ImageDevice:
    """A synchronous device over a SparseImage, recording a serial trace if asked.

    Every command completes before the next is issued, so the trace it records has each
    submit directly followed by its completion. This is the device recovery runs on: its
    trace is what the recovery-crash exploration cuts power in.
    """

    sector_bytes = 512

    def __init__(self, image: SparseImage, trace: Trace | None = None):
        self.image = image
        self.trace = trace
        self._next_io = 0 if trace is None else len(trace.writes) + len(trace.steps)
        self.generation = 0  # bumped by every change, so readers may memoise by it

    @property
    def size_bytes(self) -> int:
        return self.image.size_bytes

    def read(self, offset: int, length: int) -> bytes:
        return self.image.read(offset, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> IOGen:
        data = bytes(data)
        self.image.write(offset, data)
        self.generation += 1
        if self.trace is not None:
            io_id = self._new_io()
            self.trace.writes[io_id] = Write(io_id, offset, data, fua)
            self.trace.add_step("write_submit", io_id)
            self.trace.add_step("write_complete", io_id)
        return
        yield  # a generator that never waits

    def flush(self) -> IOGen:
        if self.trace is not None:
            io_id = self._new_io()
            self.trace.add_step("flush_submit", io_id)
            self.trace.add_step("flush_complete", io_id)
        return
        yield

    def resize(self, size_bytes: int) -> None:
        self.image.resize(size_bytes)
        self.generation += 1
        if self.trace is not None:
            self.trace.resizes.append((len(self.trace.steps), size_bytes))

    def _new_io(self) -> int:
        io_id = self._next_io
        self._next_io += 1
        return io_id


class FileDevice:
    """A real file as a block device: writes go to the file, flush is fsync."""

    sector_bytes = 512

    def __init__(self, path: str | os.PathLike, writable: bool = True):
        self.path = os.fspath(path)
        self._f = open(self.path, "r+b" if writable else "rb")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "FileDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size_bytes(self) -> int:
        return os.fstat(self._f.fileno()).st_size

    def read(self, offset: int, length: int) -> bytes:
        self._f.seek(offset)
        data = self._f.read(length)
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes, fua: bool = False) -> IOGen:
        self._f.seek(offset)
        self._f.write(data)
        if fua:
            self._f.flush()
            os.fsync(self._f.fileno())
        return
        yield

    def flush(self) -> IOGen:
        self._f.flush()
        os.fsync(self._f.fileno())
        return
        yield

    def resize(self, size_bytes: int) -> None:
        self._f.flush()
        self._f.truncate(size_bytes)
