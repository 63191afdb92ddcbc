"""The simulated block device (SimPy 4): a volatile write-back cache over durable media.

This module owns the device's behaviour in simulated time and the trace it records. The
crash semantics that the trace is later judged by live in ``crashstates.py``; the two
agree on the rules below (design.md §2).

Fault and semantics model
-------------------------
* Media is the SparseImage handed in (a fork of the trace's base). Only what reaches
  media survives a power cut in the device's *own* state; the crash-state enumeration
  explores every other state the rules allow.
* Addressing is in 512-byte logical sectors. A write's offset and length must be whole
  sectors: writers read-modify-write smaller updates, as QEMU's block layer does.
* The atomic unit (``atomic_write_bytes``, 512 or 4096) is what the device writes to
  media all-or-nothing. A write covers the unit-aligned pieces of the address space that
  it touches; unit ``i`` of a write is the ``i``-th of those pieces. A 4096-atomic
  device therefore never tears an aligned 4 KiB write, and a 512-atomic one can tear it
  into 8 pieces.
* ``write`` without FUA (write-back mode) completes once its data is in the cache. The
  cache is bounded in bytes: a write waits while it does not fit, and a write larger
  than the whole cache is admitted once the cache is empty, so it always progresses.
* ``write`` with FUA, or any write in write-through mode, bypasses the cache and
  completes once all its units are on media. **FUA is not a barrier**: it orders
  nothing but its own data. Older cached data for the same unit is written first or,
  when the new data covers it entirely, dropped, so media never goes back in time.
* ``flush`` completes once every write that completed *before the flush was
  submitted* is on media, plus the flush latency. Writes still in flight when it is
  submitted are not covered, even if they finish before the flush does.
* A destage process moves cached data to media one atomic unit at a time, each taking
  ``destage_latency_us``: ``fifo`` takes the oldest cached unit, ``random`` a seeded
  random unit, ``elevator`` sweeps upward by offset and wraps (C-SCAN). Per device unit
  the cache keeps versions in arrival order and only ever destages the oldest one, so a
  newer version never lands before an older one; a newer version that covers an older
  one replaces it in the cache (and inherits the flushes waiting for it), unless the
  older one is already being written to media, by the destage or by a FUA write
  writing it back first: that one lands, and the newer version stays queued after it.
* Reads return the newest completed data: cached versions over media.
* ``resize`` changes the file length at once; it is durable when made.
* Faults (each off by default): ``lying_flush`` acknowledges a flush after its latency
  but covers nothing; ``garbage`` (used by the enumeration, not the device) lets a torn
  unit read as random bytes.

The trace records every submit and completion with its simulated time, the device's
destages as ``(at_step, io_id, unit_index)`` and resizes as ``(at_step, size_bytes)``.
"""
from __future__ import annotations

import random
import traceback
from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict, deque
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Iterator

import simpy

from .blockdev import IOGen
from .errors import PluginError, defined_at, plugin_line
from .image import SECTOR_BYTES, SparseImage
from .trace import StepKind, Trace, Write

FAULTS = frozenset({"garbage", "lying_flush"})
MODES = ("writeback", "writethrough")
DESTAGE_POLICIES = ("fifo", "random", "elevator")


class DeviceError(ValueError):
    """A command the device cannot accept (bad alignment) or a bad configuration."""


@dataclass
class DeviceConfig:
    atomic_write_bytes: int = 512
    mode: str = "writeback"
    capacity_bytes: int = 1 << 20
    destage: str = "fifo"
    write_latency_us: float = 100.0
    flush_latency_us: float = 2000.0
    destage_latency_us: float = 20.0
    faults: frozenset[str] = frozenset()
    seed: int = 0

    def __post_init__(self) -> None:
        self.faults = frozenset(self.faults)
        if self.atomic_write_bytes not in (512, 4096):
            raise DeviceError(f"atomic_write_bytes={self.atomic_write_bytes}: use 512 or 4096")
        if self.mode not in MODES:
            raise DeviceError(f"mode={self.mode!r}: use one of {', '.join(MODES)}")
        if self.destage not in DESTAGE_POLICIES:
            raise DeviceError(f"destage={self.destage!r}: use one of "
                              f"{', '.join(DESTAGE_POLICIES)}")
        if self.capacity_bytes < SECTOR_BYTES:
            raise DeviceError(f"capacity_bytes={self.capacity_bytes}: must be >= 512")
        if self.faults - FAULTS:
            raise DeviceError(f"unknown faults {sorted(self.faults - FAULTS)}: "
                              f"known are {sorted(FAULTS)}")
        for name in ("write_latency_us", "flush_latency_us", "destage_latency_us"):
            if getattr(self, name) < 0:
                raise DeviceError(f"{name}={getattr(self, name)}: must be >= 0")


@dataclass
class SimTrace(Trace):
    """A Trace plus what only the simulation knows: transaction times for the timeline."""

    tx_times: list[tuple[str, int, float]] = field(default_factory=list)
    end_time_us: float = 0.0


class _FlushWait:
    """A flush waiting for a set of cached versions to reach media."""

    __slots__ = ("remaining", "event")

    def __init__(self, remaining: int, event: simpy.Event):
        self.remaining = remaining
        self.event = event


class _Entry:
    """One cached version of one device unit: a write's piece of that unit."""

    __slots__ = ("seq", "io_id", "unit_rel", "unit", "offset", "data", "waiters",
                 "in_flight")

    def __init__(self, seq: int, io_id: int, unit_rel: int, unit: int, offset: int,
                 data: bytes):
        self.seq, self.io_id, self.unit_rel, self.unit = seq, io_id, unit_rel, unit
        self.offset, self.data = offset, data
        self.waiters: list[_FlushWait] = []
        self.in_flight = False

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


def write_units(offset: int, data: bytes, unit_bytes: int
                ) -> Iterator[tuple[int, int, int, bytes]]:
    """(device unit, unit index within the write, offset, bytes) of each piece."""
    end = offset + len(data)
    first = offset // unit_bytes
    for unit in range(first, (end - 1) // unit_bytes + 1):
        start, stop = max(offset, unit * unit_bytes), min(end, (unit + 1) * unit_bytes)
        yield unit, unit - first, start, data[start - offset:stop - offset]


class SimDevice:
    """The BlockDevice protocol on a SimPy environment; see the module docstring."""

    sector_bytes = SECTOR_BYTES

    def __init__(self, env: simpy.Environment, image: SparseImage, config: DeviceConfig,
                 trace: Trace):
        self.env, self.media, self.config, self.trace = env, image, config, trace
        trace.atomic_write_bytes = config.atomic_write_bytes
        trace.writethrough = config.mode == "writethrough"
        trace.lying_flush = "lying_flush" in config.faults
        self._unit_bytes = config.atomic_write_bytes
        self._queues: dict[int, list[_Entry]] = {}  # device unit -> versions, oldest first
        self._heads: list[int] = []  # sorted device units that have cached versions
        self._order: OrderedDict[int, _Entry] = OrderedDict()  # seq -> entry (arrival)
        self._used_bytes = 0
        self._admission: deque[tuple[int, simpy.Event]] = deque()
        self._seq = 0
        self._next_io = len(trace.writes) + len(trace.steps)
        self._size_bytes = image.size_bytes
        self._rng = random.Random(config.seed)
        self._sweep_unit = 0
        self._media_lock = simpy.Resource(env, capacity=1)
        self._wake = env.event()
        self._destage = self._destage_loop()
        env.process(self._destage)

    def close(self) -> None:
        """Stop the destage process for good. Its suspended generator holds the device,
        which holds the environment that holds the generator: a cycle only a full
        garbage collection frees, and with it the media and the cache (at 960 writes,
        80 MiB kept by an exploration that froze it with the live objects)."""
        self._destage.close()

    # -- BlockDevice protocol ---------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    @property
    def cached_bytes(self) -> int:
        return self._used_bytes

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(self.media.read(offset, length))
        if length <= 0 or not self._heads:
            return bytes(out)
        first, last = offset // self._unit_bytes, (offset + length - 1) // self._unit_bytes
        lo, hi = bisect_left(self._heads, first), bisect_right(self._heads, last)
        for unit in self._heads[lo:hi]:
            for e in self._queues[unit]:
                start, stop = max(offset, e.offset), min(offset + length, e.end)
                if start < stop:
                    out[start - offset:stop - offset] = e.data[start - e.offset:stop - e.offset]
        return bytes(out)

    def write(self, offset: int, data: bytes, fua: bool = False) -> IOGen:
        data = bytes(data)
        self._check_aligned(offset, data)
        io_id = self._new_io()
        w = Write(io_id, offset, data, fua)
        self.trace.writes[io_id] = w
        self._step("write_submit", io_id)
        yield self.env.timeout(self.config.write_latency_us)
        if fua or self.trace.writethrough:
            yield from self._write_to_media(w)
        else:
            yield from self._admit(len(data))
            self._cache_insert(w)
        self._size_bytes = max(self._size_bytes, w.end)
        self._step("write_complete", io_id)

    def flush(self) -> IOGen:
        io_id = self._new_io()
        self._step("flush_submit", io_id)
        if not self.trace.lying_flush and self._order:
            # Everything cached now belongs to a completed write: exactly what to cover.
            wait = _FlushWait(len(self._order), self.env.event())
            for e in self._order.values():
                e.waiters.append(wait)
            yield wait.event
        yield self.env.timeout(self.config.flush_latency_us)
        self._step("flush_complete", io_id)

    def resize(self, size_bytes: int) -> None:
        self.media.resize(size_bytes)
        self._size_bytes = size_bytes
        self.trace.resizes.append((len(self.trace.steps), size_bytes))

    # -- recording --------------------------------------------------------------------
    def _new_io(self) -> int:
        io_id = self._next_io
        self._next_io += 1
        return io_id

    def _step(self, kind: StepKind, io_id: int) -> None:
        self.trace.add_step(kind, io_id, float(self.env.now))

    def _check_aligned(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset % SECTOR_BYTES or not data or len(data) % SECTOR_BYTES:
            raise DeviceError(f"write at offset {offset:#x} length {len(data)}: offset and "
                              f"length must be whole 512-byte sectors (read-modify-write "
                              f"smaller updates)")

    # -- the cache --------------------------------------------------------------------
    def _admit(self, size: int) -> IOGen:
        if not self._admission and self._fits(size):
            self._used_bytes += size
            return
        event = self.env.event()
        self._admission.append((size, event))
        yield event

    def _fits(self, size: int) -> bool:
        return self._used_bytes + size <= self.config.capacity_bytes or self._used_bytes == 0

    def _admit_waiting(self) -> None:
        while self._admission and self._fits(self._admission[0][0]):
            size, event = self._admission.popleft()
            self._used_bytes += size  # reserved now, so the next waiter sees it
            event.succeed()

    def _cache_insert(self, w: Write) -> None:
        for unit, rel, off, piece in write_units(w.offset, w.data, self._unit_bytes):
            entry = _Entry(self._seq, w.io_id, rel, unit, off, piece)
            self._seq += 1
            queue = self._queues.get(unit)
            if queue is None:
                queue = self._queues[unit] = []
                insort(self._heads, unit)
            for old in [e for e in queue if not e.in_flight and
                        off <= e.offset and e.end <= entry.end]:
                # Replaced before reaching media: its flushes now wait for the new data.
                entry.waiters += old.waiters
                queue.remove(old)
                self._forget(old)
            queue.append(entry)
            self._order[entry.seq] = entry
        self._admit_waiting()
        if not self._wake.triggered:
            self._wake.succeed()

    def _forget(self, e: _Entry) -> None:
        del self._order[e.seq]
        self._used_bytes -= len(e.data)

    def _unqueue(self, e: _Entry) -> None:
        queue = self._queues[e.unit]
        queue.remove(e)
        if not queue:
            del self._queues[e.unit]
            del self._heads[bisect_left(self._heads, e.unit)]
        self._forget(e)

    @staticmethod
    def _notify(waiters: list[_FlushWait]) -> None:
        for wait in waiters:
            wait.remaining -= 1
            if wait.remaining == 0:
                wait.event.succeed()

    # -- media ------------------------------------------------------------------------
    def _media_put(self, io_id: int, unit_rel: int, offset: int, data: bytes) -> None:
        self.media.write(offset, data)
        self.trace.destages.append((len(self.trace.steps), io_id, unit_rel))

    def _pick(self) -> _Entry:
        policy = self.config.destage
        if policy == "fifo":
            return next(iter(self._order.values()))  # oldest overall is its unit's head
        if policy == "random":
            return self._queues[self._rng.choice(self._heads)][0]
        i = bisect_left(self._heads, self._sweep_unit)
        unit = self._heads[i if i < len(self._heads) else 0]
        self._sweep_unit = unit + 1
        return self._queues[unit][0]

    def _destage_loop(self) -> IOGen:
        while True:
            if not self._order:
                self._wake = self.env.event()
                yield self._wake
                continue
            with self._media_lock.request() as req:
                yield req
                if not self._order:
                    continue
                yield from self._write_back(self._pick())
                self._admit_waiting()

    def _write_back(self, e: _Entry) -> IOGen:
        """One cached version to media; the caller holds the media lock."""
        # In flight, it is no longer the cache's to replace: a covering write arriving
        # meanwhile queues behind it instead of dropping what is being written.
        e.in_flight = True
        yield self.env.timeout(self.config.destage_latency_us)
        self._media_put(e.io_id, e.unit_rel, e.offset, e.data)
        self._unqueue(e)
        self._notify(e.waiters)

    def _write_to_media(self, w: Write) -> IOGen:
        """FUA / write-through: straight to media, older cached versions first."""
        latency = self.config.destage_latency_us
        with self._media_lock.request() as req:
            yield req
            pieces = list(write_units(w.offset, w.data, self._unit_bytes))
            for unit, rel, off, piece in pieces:
                while older := [e for e in self._queues.get(unit, ())
                                if not _covers(off, piece, e)]:
                    yield from self._write_back(older[0])
                yield self.env.timeout(latency)
                self._media_put(w.io_id, rel, off, piece)
            # Cached versions this write covers all completed before it completes now,
            # including any that arrived while it was writing: they never reach media.
            for unit, _, off, piece in pieces:
                for e in [e for e in self._queues.get(unit, ()) if _covers(off, piece, e)]:
                    self._unqueue(e)
                    self._notify(e.waiters)
            self._admit_waiting()


def _covers(offset: int, piece: bytes, e: _Entry) -> bool:
    return offset <= e.offset and e.end <= offset + len(piece)


class TxRecorder:
    """The TxReporter handed to writers: marks in the trace, times for the timeline.

    The oracle reads "A acknowledged" as transactions 0..A-1 done, so transactions must
    start in order, once each, and be acknowledged in order, once each, after they
    started. A writer that breaks this gets a PluginError naming its call, not verdicts
    judged against counts that mean something else."""

    def __init__(self, trace: Trace, env: simpy.Environment):
        self.trace, self.env = trace, env
        self.tx_times: list[tuple[str, int, float]] = []
        self.started = self.acked = 0

    def start(self, tx: int) -> None:
        if tx != self.started:
            self._broken(f"tx.start({tx!r})", f"the next transaction to start is "
                         f"{self.started}")
        self.started += 1
        self.trace.mark("start", tx)
        self.tx_times.append(("start", tx, float(self.env.now)))

    def ack(self, tx: int) -> None:
        if tx != self.acked or tx >= self.started:
            why = (f"transaction {tx} was already acknowledged" if
                   isinstance(tx, int) and 0 <= tx < self.acked else
                   f"transaction {tx} has not started" if tx == self.acked else
                   f"the next transaction to acknowledge is {self.acked}")
            self._broken(f"tx.ack({tx!r})", why)
        self.acked += 1
        self.trace.mark("ack", tx)
        self.tx_times.append(("ack", tx, float(self.env.now)))

    @staticmethod
    def _broken(call: str, why: str) -> None:
        caller = traceback.extract_stack(limit=3)[0]
        raise PluginError(f"{caller.filename}:{caller.lineno}: {call}: {why}; each "
                          f"transaction i = 0, 1, ... is started once, in order, and "
                          f"acknowledged once, in order, after it started")


def run_simulation(writer: Any, config: DeviceConfig) -> tuple[SimTrace, SimDevice]:
    """Run ``writer``'s workload on a fresh device; the trace and the device at the end.

    The run stops when the workload's process ends: the destage process does not carry
    on afterwards, so nothing is recorded past the workload's last step.
    """
    try:
        base = writer.format_image()
    except Exception as exc:
        raise PluginError(f"{plugin_line(exc)}: the writer's format_image() raised "
                          f"{type(exc).__name__}: {exc}") from None
    _check_plugin_result(writer.format_image, base, SparseImage,
                         "a crashsim.image.SparseImage")
    trace = SimTrace(base=base)
    env = simpy.Environment()
    dev = SimDevice(env, base.fork(), config, trace)
    tx = TxRecorder(trace, env)
    trace.tx_times = tx.tx_times
    try:
        work = writer.run(dev, tx)
        _check_plugin_result(writer.run, work, Generator,
                             "a generator (its I/O is yield from dev.write/flush)")
        proc = env.process(work)
        env.run(until=proc)
    except PluginError:
        raise
    except RuntimeError as exc:
        if "until" in str(exc) and "not triggered" in str(exc):
            trace.failed = ("Deadlock: the workload waits for an event that never "
                            "happens (no simulated events left)")
        else:
            trace.failed = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # the workload's own error is a result, not our crash
        trace.failed = f"{type(exc).__name__}: {exc}"
    trace.end_time_us = float(env.now)
    return trace, dev


def _check_plugin_result(method: Any, value: Any, kind: type, wanted: str) -> None:
    # Caught here, a wrong return type is one line on the plugin; later it is a
    # traceback inside crashsim or a WORKLOAD FAILED that blames the workload.
    if not isinstance(value, kind):
        raise PluginError(f"{defined_at(method)}: the writer's {method.__name__}() "
                          f"returned {type(value).__name__}; it must return {wanted}")


def simulate(writer: Any, config: DeviceConfig) -> SimTrace:
    """Simulate the workload once; deterministic for a given config (and its seed)."""
    trace, dev = run_simulation(writer, config)
    dev.close()
    return trace
