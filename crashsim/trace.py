"""The recorded I/O trace: the single source every crash state is derived from.

A run is simulated once. What the device saw is kept here as a list of I/O steps
(write submitted, write completed, flush submitted, flush completed), the payload of
every write, the writer's transaction marks, the device's own destage progress, and the
image size over time. Crash states at any step are computed from this record alone;
nothing is re-simulated per prefix.

Step numbering: crash point ``p`` (0 <= p <= len(steps)) is a power cut after the first
``p`` steps. A mark or destage recorded "at p" happened after step p and before step p+1,
and is counted as done for a crash at p (the strict reading: an acknowledgement given just
before the cut must be honoured).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Literal

from .image import SparseImage

StepKind = Literal["write_submit", "write_complete", "flush_submit", "flush_complete"]


@dataclass(frozen=True, slots=True)
class Write:
    io_id: int
    offset: int
    data: bytes
    fua: bool = False

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(frozen=True, slots=True)
class Step:
    kind: StepKind
    io_id: int
    time_us: float = 0.0


@dataclass(frozen=True, slots=True)
class TxMark:
    at_step: int  # number of I/O steps done when the mark was made
    kind: Literal["start", "ack"]
    tx: int


@dataclass
class Trace:
    """Everything needed to build any crash state of one run."""

    base: SparseImage
    atomic_write_bytes: int = 512
    writethrough: bool = False
    lying_flush: bool = False
    writes: dict[int, Write] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    tx_marks: list[TxMark] = field(default_factory=list)
    # (at_step, io_id, unit_index): the device's own media progress, unit relative to write
    destages: list[tuple[int, int, int]] = field(default_factory=list)
    # (at_step, size_bytes): image size changes; a resize is durable when made
    resizes: list[tuple[int, int]] = field(default_factory=list)
    failed: str | None = None  # the workload's own error, if it stopped early
    # (at_step, text): user-defined marks from a recorded log (dm-log-writes MARK entries);
    # informational only, they play no part in the oracle's transaction counts
    marks: list[tuple[int, str]] = field(default_factory=list)
    _marks_seen: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- recording -------------------------------------------------------------------
    def add_step(self, kind: StepKind, io_id: int, time_us: float = 0.0) -> None:
        self.steps.append(Step(kind, io_id, time_us))

    def mark(self, kind: Literal["start", "ack"], tx: int) -> None:
        self.tx_marks.append(TxMark(len(self.steps), kind, tx))

    # -- queries ---------------------------------------------------------------------
    def started(self, p: int) -> int:
        return bisect_right(self._mark_steps("start"), p)

    def acked(self, p: int) -> int:
        return bisect_right(self._mark_steps("ack"), p)

    def _mark_steps(self, kind: str) -> list[int]:
        """The steps of the ``kind`` marks, sorted: every crash point asks, and counting
        through all marks made a long workload pay for its length at every step."""
        key = (len(self.tx_marks), kind)
        cached = self._marks_seen.get(kind)
        if cached is None or cached[0] != key:
            cached = (key, sorted(m.at_step for m in self.tx_marks if m.kind == kind))
            self._marks_seen[kind] = cached
        return cached[1]

    def size_at(self, p: int) -> int:
        size = self.base.size_bytes
        for at, new_size in self.resizes:
            if at <= p:
                size = new_size
        return size

    @property
    def n_steps(self) -> int:
        return len(self.steps)
