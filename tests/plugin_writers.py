"""Small writer plugins for tests, named in scenarios as ``plugin_writers:Class`` (pytest
puts this folder on sys.path). ``InPlace`` is correct: each one-sector write goes home,
is flushed, then acknowledged. The others each break one rule on purpose."""
from __future__ import annotations

import os
import signal

from crashsim.image import SparseImage
from crashsim.writers.base import ProbeFailed, Recovery

SECTOR = 512


class InPlace:
    kind = "in-place"
    op_kinds = frozenset({"log_write"})
    defects_available: dict[str, str] = {}

    def __init__(self, *, ops, image, defects, seed):
        self.ops = ops
        self.size = image["virtual_size"]

    def format_image(self) -> SparseImage:
        return SparseImage(SECTOR + self.size)

    def run(self, dev, tx):
        for i, op in enumerate(self.ops):
            tx.start(i)
            yield from dev.write(SECTOR + op.offset, op.data())
            yield from dev.flush()
            self.acknowledge(tx, i)

    def acknowledge(self, tx, i: int) -> None:
        tx.ack(i)

    def recover(self, dev):
        return Recovery(decisions=["nothing to recover"], branches=["clean"])
        yield  # a generator, as the protocol asks, though it does no I/O

    def view(self, dev, ranges):
        return b"".join(dev.read(SECTOR + off, n) for off, n in ranges)

    def check_structure(self, dev):
        return []

    def probe(self, dev):
        data = b"\x5a" * SECTOR
        yield from dev.write(SECTOR, data)
        yield from dev.flush()
        if dev.read(SECTOR, SECTOR) != data:
            raise ProbeFailed("probe write did not read back")


class ZeroingRecovery(InPlace):
    """Recovery zeroes the first 4 KiB, flushes, then writes them back: a crash in
    between loses acknowledged data, found only by crashing recovery itself."""

    def recover(self, dev):
        data = dev.read(SECTOR, 4096)
        yield from dev.write(SECTOR, bytes(4096))
        yield from dev.flush()
        yield from dev.write(SECTOR, data)
        yield from dev.flush()
        return Recovery(decisions=["rewrote the first 4 KiB"], branches=["rewrite"])


class SegfaultingRecovery(InPlace):
    """Recovery kills its process when the second sector holds the second write."""

    def recover(self, dev):
        if dev.read(SECTOR + SECTOR, 1) == b"\xa2":
            os.kill(os.getpid(), signal.SIGSEGV)
        return Recovery(decisions=["ok"], branches=["clean"])
        yield


class DoubleAck(InPlace):
    def acknowledge(self, tx, i: int) -> None:
        tx.ack(i)
        tx.ack(i)  # the second acknowledgement of the same transaction


class RaisingFormat(InPlace):
    def format_image(self) -> SparseImage:
        raise RuntimeError("no room for the superblock")


class NoSeed(InPlace):
    def __init__(self, *, ops, image, defects):  # the protocol passes seed= too
        super().__init__(ops=ops, image=image, defects=defects, seed=0)


class BytesFormat(InPlace):
    def format_image(self):  # bytes, not the SparseImage the protocol asks for
        return bytes(SECTOR + self.size)


class PlainRun(InPlace):
    def run(self, dev, tx):  # no yield: a plain function, not a generator
        for i, _ in enumerate(self.ops):
            tx.start(i)


class CountingView(InPlace):
    def view(self, dev, ranges):  # a count, not the bytes the protocol asks for
        return sum(n for _, n in ranges)


class CrashingView(InPlace):
    def view(self, dev, ranges):
        return {}[ranges[0]]  # a bug in the writer's view: KeyError


class CrashingCheck(InPlace):
    def check_structure(self, dev):
        return [1 / 0]  # a bug in the writer's structure check


class CrashingProbe(InPlace):
    def probe(self, dev):
        yield from dev.flush()
        raise AssertionError("the probe's own bug")
