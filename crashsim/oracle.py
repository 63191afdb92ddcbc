"""The oracle: recover a crash state and say old, new, or which violation.

With A transactions acknowledged and I started at the crash, the recovered view must
equal the reference model after k transactions for some A <= k <= I. The checks run in
order of severity, and the first that fails names the outcome:

``recovery-error``  recovery raised, refused the image, or crashed
``lost``            the view matches only some k < A: an acknowledged update vanished
``mixed``           the view matches no k at all
``structure``       the image breaks its format's own rules
``stuck``           all of the above pass, but one more transaction fails
``old`` / ``new``   k == A / k > A

What recovery did depends only on the image content, so ``Judge`` caches that part by
content and applies A and I afterwards. More than that, it depends only on the bytes
judging *read*: ``readset.py`` reuses a result for a state of the same step that differs
only in sectors the judging of an earlier state never read. A writer that names the bytes its structure
check and probe depend on (``structure_key``) also gets those two results shared between
recovered images that differ elsewhere (mostly in log or payload bytes): they are the
costliest part of judging, and a key is confirmed byte for byte, never by hash alone.
"""
from __future__ import annotations

import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from time import perf_counter
from typing import Callable

import crc32c

from .blockdev import ImageDevice, run_sync
from .errors import PluginError, defined_at
from .readset import ReadLogDevice, ReadSetMemo
from .image import SparseImage
from .model import RangeModel
from .parts import Parts
from .trace import Trace
from .writers.base import ProbeFailed, Recovery, RecoveryError

PASSING = ("old", "new")
CACHE_ENTRIES = 1 << 16  # recovered contents a Judge remembers, to bound its memory
CHECKS_CACHE_ENTRIES = 8  # structure keys are ~200 KiB; recent ones get all the hits


@dataclass
class Examined:
    """What recovering one image content produced, before A and I are applied."""

    recovery: Recovery
    error: str | None = None
    matched_k: list[int] = field(default_factory=list)
    structure: list[str] = field(default_factory=list)
    probe_error: str | None = None
    view: bytes | None = None
    recovery_trace: Trace | None = None


@dataclass
class Verdict:
    outcome: str
    matched_k: list[int]
    detail: str
    examined: Examined

    @property
    def passed(self) -> bool:
        return self.outcome in PASSING


def classify(ex: Examined, acked: int, started: int) -> Verdict:
    if ex.error is not None:
        return Verdict("recovery-error", [], ex.error, ex)
    ks = ex.matched_k
    allowed = [k for k in ks if acked <= k <= started]
    if not allowed:
        if any(k < acked for k in ks):
            return Verdict("lost", ks, f"view equals the model after {max(ks)} "
                           f"transactions, but {acked} were acknowledged", ex)
        return Verdict("mixed", ks, f"view matches the model after no number of "
                       f"transactions (allowed {acked}..{started})", ex)
    if ex.structure:
        return Verdict("structure", ks, "; ".join(ex.structure), ex)
    if ex.probe_error is not None:
        return Verdict("stuck", ks, ex.probe_error, ex)
    outcome = "old" if acked in allowed else "new"
    return Verdict(outcome, ks, "", ex)


class Judge:
    """Recovers images with a writer and checks them against a model, with a cache."""

    def __init__(self, writer, model: RangeModel, *, probe: bool = True,
                 keep_views: bool = False, share_checks: bool = True,
                 share_reads: bool = True, device: Trace | None = None):
        self.writer = writer
        self.model = model
        # Recovery runs on the same device as the workload: a recording of it must
        # keep that device's unit, cache mode and faults, or cutting it would tear
        # writes the device keeps whole and lose writes it already made durable.
        self._device = {} if device is None else {
            "atomic_write_bytes": device.atomic_write_bytes,
            "writethrough": device.writethrough, "lying_flush": device.lying_flush}
        self.probe = probe
        self.keep_views = keep_views
        self.share_checks = share_checks
        self._checks = _KeyedCache(CHECKS_CACHE_ENTRIES)
        self._memo = ReadSetMemo(enabled=share_reads and
                                 getattr(writer, "reads_through_device", False))
        self._views = ReadSetMemo(enabled=self._memo.enabled and
                                  not getattr(writer, "views_incrementally", False),
                                  across_steps=True)
        self.memo_hits = 0
        self.recoveries = 0  # states recovered and checked in full (no cache, no memo)
        # Seconds in the writer's own code (recovery, view, structure check, probe, and
        # the device reads they make): what the bench sets apart from crashsim's cost.
        self.writer_s = 0.0
        self._cache: dict[object, Examined] = {}
        self._recorded: dict[object, Examined] = {}
        self.cache_hits = 0

    def judge(self, image: SparseImage | Callable[[], SparseImage], acked: int, started: int,
              key: object | None = None, record: bool = False) -> Verdict:
        return classify(self.examine(image, key, record), acked, started)

    def examine(self, image: SparseImage | Callable[[], SparseImage],
                key: object | None = None, record: bool = False) -> Examined:
        """Recover ``image`` (cached by ``key``); ``record`` keeps recovery's own trace.
        ``image`` may be a function that builds it, called only on a cache miss."""
        cache = self._recorded if record else self._cache
        if key is not None:
            hit = cache.get(key)
            if hit is not None:
                self.cache_hits += 1
                return hit
        if callable(image):
            image = image()
        ex = None if record else self._memo.find(image)
        if ex is None:
            ex = self._examine(image, record)
        else:
            self.memo_hits += 1
        if key is not None:
            cache[key] = ex
            if record:
                self._cache.setdefault(key, ex)
            for kept in (cache, self._cache):
                while len(kept) > CACHE_ENTRIES:  # oldest first; only speed depends on it
                    del kept[next(iter(kept))]
        return ex

    def forget(self) -> None:
        """Drop cached recoveries (the memory cap's first resort); verdicts do not change."""
        self._cache.clear()
        self._recorded.clear()

    def _examine(self, image: SparseImage, record: bool) -> Examined:
        reads = self._memo.reads_for(image) if not record else None
        self.recoveries += 1
        ex = self._examine_on(image, record, reads)
        if reads is not None:
            self._memo.add(image, reads, ex)
        return ex

    def _examine_on(self, image: SparseImage, record: bool,
                    reads: list[tuple[int, int]] | None) -> Examined:
        work = image.fork()
        rec_trace = Trace(base=image, **self._device) if record else None
        dev = ImageDevice(work, trace=rec_trace) if reads is None else \
            ReadLogDevice(work, reads, state=image)
        try:
            recovery = self._in_writer(run_sync, self.writer.recover(dev)) or Recovery()
        except RecoveryError as exc:
            return Examined(Recovery(branches=["refused"]), error=f"refused: {exc}",
                            recovery_trace=rec_trace)
        except Exception as exc:  # a crashing recovery is a finding, not our crash
            return Examined(Recovery(branches=["crashed"]),
                            error=_crash_text(exc, "recovery"), recovery_trace=rec_trace)
        ex = Examined(recovery, recovery_trace=rec_trace)
        stage = "view"  # which of the writer's methods a crash came from
        try:
            view = self._view_of(image, work, dev, reads)
            stage = "structure check"
            checks = self._checks_of(dev)
            ex.structure = list(checks.structure)
        except RecoveryError as exc:
            ex.error = f"unreadable after recovery: {exc}"
            return ex
        except PluginError:
            raise
        except Exception as exc:
            ex.error = _crash_text(exc, stage)
            return ex
        ex.matched_k = self.model.matching(view)
        if self.keep_views:
            ex.view = _joined(view)
        if self.probe and ex.matched_k and not ex.structure:
            ex.probe_error = self._probe_once(work, checks, reads, image)
        return ex

    def _view_of(self, image: SparseImage, work: SparseImage, dev: ImageDevice,
                 reads: list[tuple[int, int]] | None):
        """The writer's view of the recovered ``work``, or the view of an earlier
        recovered state of this step that agrees with it wherever a view read. Most
        states that recovery sees differently (a torn log entry) read the same data."""
        if reads is None or not self._views.enabled:
            return self._checked_view(dev)
        overlay = {**image.sectors, **work.sectors}
        seen = self._views.find_over(overlay, work.size_bytes, image.parent)
        if seen is not None:
            reads += seen.reads  # the same bytes were read, so note them for this state
            return seen.result
        mark = len(reads)
        view = self._checked_view(dev)
        self._views.add_over(overlay, work.size_bytes, image.parent, reads[mark:], view)
        return view

    def _checked_view(self, dev: ImageDevice) -> bytes | list[bytes] | Parts:
        view = self._in_writer(self.writer.view, dev, self.model.ranges)
        # a view of another type fails deep in the model's matching, as crashsim's bug
        if isinstance(view, (bytes, Parts)) or isinstance(view, list) and \
                all(isinstance(part, bytes) for part in view):
            return view
        raise PluginError(f"{defined_at(self.writer.view)}: the writer's view() returned "
                          f"{_type_name(view)}; it must return bytes, a list of bytes "
                          f"(one per range) or a Parts")

    def _checks_of(self, dev: ImageDevice) -> "_Checks":
        key = None
        if self.share_checks and hasattr(self.writer, "structure_key"):
            key = self._in_writer(self.writer.structure_key, dev)
        checks = self._checks.get(key) if key is not None else None
        if checks is None:
            checks = _Checks(list(self._in_writer(self.writer.check_structure, dev)))
            if key is not None:
                self._checks.put(key, checks)
        return checks

    def _probe_once(self, recovered: SparseImage, checks: "_Checks",
                    reads: list[tuple[int, int]] | None = None,
                    state: SparseImage | None = None) -> str | None:
        if not checks.probed:
            checks.probe_error, checks.probed = self._probe(recovered, reads, state), True
        return checks.probe_error

    def _probe(self, recovered: SparseImage, reads: list[tuple[int, int]] | None = None,
               state: SparseImage | None = None) -> str | None:
        dev = ImageDevice(recovered.fork()) if reads is None else \
            ReadLogDevice(recovered.fork(), reads, state=state)
        try:
            self._in_writer(run_sync, self.writer.probe(dev))
        except (ProbeFailed, RecoveryError) as exc:
            return f"next transaction failed: {exc}"
        except Exception as exc:
            return _crash_text(exc, "next transaction")
        return None

    def _in_writer(self, fn: Callable, *args):
        t0 = perf_counter()
        try:
            return fn(*args)
        finally:
            self.writer_s += perf_counter() - t0

    def view_of(self, image: SparseImage) -> bytes | None:
        """The recovered view of one image, for a diff; None when recovery fails."""
        dev = ImageDevice(image.fork())
        try:
            run_sync(self.writer.recover(dev))
            return _joined(self.writer.view(dev, self.model.ranges))
        except Exception:
            return None


def _type_name(value: object) -> str:
    if isinstance(value, list):
        odd = next(p for p in value if not isinstance(p, bytes))
        return f"a list holding {type(odd).__name__}"
    return type(value).__name__


def _joined(view: bytes | list[bytes] | Parts) -> bytes:
    return b"".join(view) if isinstance(view, (list, Parts)) else view


@dataclass
class _Checks:
    """Structure problems and probe outcome of one structure key."""

    structure: list[str]
    probe_error: str | None = None
    probed: bool = False


class _KeyedCache:
    """A small LRU map from long byte keys to values. Entries are found by CRC-32C and
    confirmed by comparing the whole key, so two keys can never be confused."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, int], list[tuple[bytes, object]]] = \
            OrderedDict()
        self._count = 0

    def get(self, key: bytes):
        slot = (len(key), crc32c.crc32c(key))
        for stored, value in self._entries.get(slot, ()):
            if stored == key:
                self._entries.move_to_end(slot)
                return value
        return None

    def put(self, key: bytes, value: object) -> None:
        slot = (len(key), crc32c.crc32c(key))
        self._entries.setdefault(slot, []).append((key, value))
        self._entries.move_to_end(slot)
        self._count += 1
        while self._count > self.max_entries:
            _, dropped = self._entries.popitem(last=False)
            self._count -= len(dropped)


def _crash_text(exc: BaseException, what: str) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" at {frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno}" if frame else ""
    return f"{what} crashed: {type(exc).__name__}: {exc}{where}"
