"""Crash states of a trace: what the disk may hold after a power cut at step p.

This module owns the crash semantics of design.md §2 (contract), the enumeration of
states simplest first, the state IDs that name them, and shrinking. It reads any Trace:
one the SimPy device recorded, or the serial trace of a recovery run on ImageDevice
(whose base may itself be a crash state).

Rules at crash point p (after the first p steps)
------------------------------------------------
* A write is *durable* when it completed before a flush was submitted and that flush
  completed within the first p steps; or it is FUA and completed within them; or the
  device is write-through and it completed within them. With ``trace.lying_flush``,
  flushes make nothing durable. Once durable, always durable.
* Every other write submitted within the first p steps is *pending*.
* Durable content, per 512-byte sector: the durable writes applied over the base in
  completion order.
* Each atomic unit holds its durable content, or the content of any one pending write
  that covers it, except a pending write that completed before any durable write to its
  sectors there was submitted: it must land before that write, so the device cannot
  show it over newer durable data, and that candidate is *not legal* for the unit. This
  holds whichever durable write's data the sector ends up showing. A pending write's
  part of a unit is its own bytes; the unit's other sectors keep durable content.
  Units are independent and pending writes are unordered among themselves.

Units are the atomic-unit-aligned pieces of the address space a write covers; a write's
unit ``i`` is the ``i``-th such piece (device unit ``offset // atomic + i``).

Known limitations: legal states never generated
-----------------------------------------------
Every generated state is one a contract-abiding device can produce. Two kinds of legal
state are not generated:

* **One pending write per unit, on top.** A unit holds its durable content with at most
  one pending write's piece laid over it. So when a write covers only part of a unit
  (with 4096 B units, a write smaller than 4 KiB or not aligned to it; with 512 B units,
  a write of part of a sector, which SimDevice rejects), these are missed:
  pieces of two or more pending writes in the same unit (pending writes to sectors 0
  and 1 of one 4 KiB unit: both surviving is never generated), and a pending write
  that landed before a durable write that overwrote part of its piece, so that only its
  bytes outside that durable write show (a cached 4 KiB write, then a FUA write to its
  sector 0: the cached write's sectors 1-7 never survive with the FUA data on sector 0).
  The simulated device produces both kinds, and then the ``device`` tier is not its own
  media: it shows the newest legal pending piece alone, or the durable content. With
  512 B units and whole-sector writes every piece is a whole unit, and nothing of this
  kind is missed.
* **Durable content follows completion order.** Two overlapping writes that are both
  durable at p and were concurrent (neither completed before the other was submitted)
  may reach media in either order; crashsim always puts the one that completed later on
  top, and never generates the states where the earlier one's bytes show where they
  overlap (FUA writes w0 and w1 to sector 0, submitted together, w0 completing first:
  sector 0 is only ever w1's once both completed). This holds for every unit size. The
  simulated device itself produces the other order with 4096 B units: a cached write
  arriving in a unit a multi-unit FUA write has already written, and overlapping only
  part of the FUA write's piece there, reaches media after it although it completed
  first; once flushed, its bytes show there in the device's media and in no generated
  state.

State IDs (contract)
--------------------
``p<step>:none`` is the durable content alone. Otherwise ``p<step>:`` is followed by
picks joined by ``+``, sorted by io id, no two sharing a device unit:
``w<io>`` the whole write, ``w<io>[0-3,5]`` only those units, ``w<io>[0-3]!g4`` units
0-3 plus unit 4 as garbage. ``w<io>!g4`` is every unit but 4, with 4 as garbage. An ID
is fully explicit: with the trace it rebuilds its state without any seed. Garbage bytes
are derived from (p, io, unit) alone for that reason.

Performance: ``iter_steps`` keeps one durable overlay and changes it in place until a
snapshot shares it, then stacks a fresh layer (merging layers of similar size, so the
chain stays logarithmic). Pending writes are copied on write per snapshot. A state's
image is a thin layer over the shared durable overlay, and its content key is an
additive hash updated by the sectors that layer changes.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .image import SECTOR_BYTES, SparseImage
from .trace import Trace, Write

TIERS = ("device", "subset", "torn", "random")
_ZERO = bytes(SECTOR_BYTES)
_MASK = (1 << 128) - 1
_INF = float("inf")


class TraceError(ValueError):
    """The trace is inconsistent (a completion without a submit, an unknown io)."""


# -- content hashing -----------------------------------------------------------------

def sector_hash(index: int, data: bytes) -> int:
    """Hash of one sector at one index; an all-zero sector counts as absent (0)."""
    if data == _ZERO:
        return 0
    digest = hashlib.blake2b(data, digest_size=16, salt=index.to_bytes(16, "little"))
    return int.from_bytes(digest.digest(), "little")


def _hashes_of(sectors: dict[int, bytes]) -> dict[int, int]:
    """Each non-zero sector's hash (a zero sector hashes to 0)."""
    out = {}
    for x, data in sectors.items():
        h = sector_hash(x, data)
        if h:
            out[x] = h
    return out


def image_hash(image: SparseImage) -> int:
    """The additive content hash of a whole image (sum of its sector hashes)."""
    total = 0
    for idx, data in image.changed_sectors().items():
        total += sector_hash(idx, data)
    return total & _MASK


def key_of(size_bytes: int, content_hash: int) -> str:
    return f"ck{size_bytes:x}-{content_hash & _MASK:032x}"


def garbage_bytes(p: int, io_id: int, unit: int, length: int) -> bytes:
    """The deterministic random content of a garbage unit (no seed: IDs must replay)."""
    return hashlib.shake_256(f"crashsim-garbage:{p}:{io_id}:{unit}".encode()).digest(length)


# -- pending writes ------------------------------------------------------------------

class PendingWrite:
    """A write that is pending at a step: its units, their legality, what is on media."""

    __slots__ = ("write", "first_unit", "n_units", "unit_bytes", "submit_step",
                 "complete_step", "illegal", "on_media", "epoch", "_sectors")

    def __init__(self, write: Write, unit_bytes: int, submit_step: int, epoch: int):
        self.write = write
        self.unit_bytes = unit_bytes
        self.first_unit = write.offset // unit_bytes
        last = (write.end - 1) // unit_bytes if write.data else self.first_unit - 1
        self.n_units = last - self.first_unit + 1
        self.submit_step = submit_step
        self.complete_step: int | None = None
        self.illegal: frozenset[int] = frozenset()  # unit indices superseded by durable data
        self.on_media: set[int] = set()  # unit indices whose newest media version is ours
        self.epoch = epoch
        # unit -> [(sector, bytes, hash)] of whole-sector pieces; shared by copies
        self._sectors: dict[int, list[tuple[int, bytes, int]] | None] = {}

    def copy(self, epoch: int) -> "PendingWrite":
        new = PendingWrite.__new__(PendingWrite)
        for name in PendingWrite.__slots__:
            setattr(new, name, getattr(self, name))
        new.on_media = set(self.on_media)
        new.epoch = epoch
        return new

    @property
    def io_id(self) -> int:
        return self.write.io_id

    @property
    def units(self) -> range:
        """Device units this write covers."""
        return range(self.first_unit, self.first_unit + self.n_units)

    def legal(self, rel: int) -> bool:
        return 0 <= rel < self.n_units and rel not in self.illegal

    @property
    def legal_units(self) -> list[int]:
        if not self.illegal:
            return list(range(self.n_units))
        return [r for r in range(self.n_units) if r not in self.illegal]

    def piece(self, rel: int) -> tuple[int, bytes]:
        """(offset, bytes) of this write inside its unit ``rel``."""
        w, ub = self.write, self.unit_bytes
        unit = self.first_unit + rel
        start, stop = max(w.offset, unit * ub), min(w.end, (unit + 1) * ub)
        return start, w.data[start - w.offset:stop - w.offset]

    def unit_sectors(self, rel: int) -> list[tuple[int, bytes, int]] | None:
        """The whole sectors of unit ``rel`` with their hashes; None if a piece is partial."""
        if rel not in self._sectors:
            off, data = self.piece(rel)
            if off % SECTOR_BYTES or len(data) % SECTOR_BYTES:
                self._sectors[rel] = None
            else:
                first = off // SECTOR_BYTES
                self._sectors[rel] = [
                    (first + i, chunk, sector_hash(first + i, chunk))
                    for i, chunk in enumerate(data[k:k + SECTOR_BYTES]
                                              for k in range(0, len(data), SECTOR_BYTES))]
        return self._sectors[rel]

    def order_key(self) -> tuple[float, int, int]:
        """Later completing (then later submitted) wins when two picks meet."""
        done = _INF if self.complete_step is None else self.complete_step
        return done, self.submit_step, self.io_id

    def __repr__(self) -> str:
        return (f"PendingWrite(io={self.io_id}, units={self.n_units}, "
                f"illegal={sorted(self.illegal)}, on_media={sorted(self.on_media)})")


@dataclass(frozen=True)
class Pick:
    """One write's part of a state: clean units and garbage units (indices in the write)."""

    io_id: int
    n_units: int
    clean: frozenset[int]
    garbage: frozenset[int] = frozenset()

    @property
    def applied(self) -> frozenset[int]:
        return self.clean | self.garbage


@dataclass
class CrashState:
    """One state of the disk after a crash at step ``p``, named by ``state_id``.

    ``image`` is a thin layer over the step's shared durable overlay; ``content_key`` is
    equal for equal content (across steps too), so it can key caches of verdicts.
    """

    tier: str
    p: int
    built: SparseImage | None  # None until ``image`` is first asked for
    survivors: list[int]
    torn_count: int  # legal units of partly applied writes not applied cleanly
    garbage_units: list[tuple[int, int]]
    content_key: str
    picked: tuple[Pick, ...] | None = None  # see ``picks``
    step: "StepStates | None" = field(default=None, repr=False, compare=False)
    assign: "Assignment | None" = field(default=None, repr=False, compare=False)
    named: str | None = field(default=None, compare=False)  # see ``state_id``

    @property
    def picks(self) -> tuple[Pick, ...]:
        """Made from the assignment on first use, like the ID: grouping every
        enumerated state's units into picks cost 6% of judging the bench workload."""
        if self.picked is None:
            self.picked = _picks(self.step, self.assign) if self.assign else ()
        return self.picked

    @property
    def state_id(self) -> str:
        """Formatted on first use: only failures and replays need it, and formatting
        every enumerated state's cost 4% of judging the bench workload."""
        if self.named is None:
            self.named = format_state_id(self.p, self.picks)
        return self.named

    @state_id.setter
    def state_id(self, value: str) -> None:
        self.named = value

    @property
    def torn(self) -> list[tuple[int, int]]:
        """(io, unit) of those units, in order; listed only when asked for (failures)."""
        out: list[tuple[int, int]] = []
        for pick in self.picks:
            pw = self.step.by_io[pick.io_id]
            if _is_torn(pw, pick):
                out += [(pick.io_id, r) for r in pw.legal_units if r not in pick.clean]
        return out

    @property
    def image(self) -> SparseImage:
        """Built on first use: most states are judged from the verdict cache by their
        content key alone, and never need their image."""
        if self.built is None:
            self.built, _ = _build(self.step, self.assign)
        return self.built


class _PrefixView(Sequence):
    """The first n items of an append-only list, without copying it."""

    def __init__(self, items: list[int], n: int):
        self._items, self._n = items, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self._items[:self._n][i]
        return self._items[range(self._n)[i]]

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._items, self._n)

    def __contains__(self, x: object) -> bool:
        return x in set(itertools.islice(self._items, self._n))

    def __repr__(self) -> str:
        return repr(list(self))


# -- the states of one step ----------------------------------------------------------

class StepStates:
    """What a crash at step ``p`` may leave: durable content plus pending choices."""

    def __init__(self, trace: Trace, p: int, durable: SparseImage, durable_hash: int,
                 durable_ids: Sequence[int], pending: dict[int, PendingWrite],
                 unit_hist: dict[int, int]):
        self.trace, self.p = trace, p
        self.durable, self.durable_hash = durable, durable_hash
        self.durable_ids = durable_ids
        self.by_io = pending
        self._unit_hist = unit_hist  # legal candidates per unit -> number of such units
        self._candidates: dict[int, list[int]] | None = None
        self._durable_hashes: dict[int, int] = {}
        # The walker's sector hashes of the durable content, while it stands at p.
        self.lent_hashes: dict[int, int] | None = None
        self._deltas: dict[tuple[int, int], tuple[int, int] | None] = {}

    def unit_delta(self, io: int, rel: int) -> tuple[int, int] | None:
        """(hash change, end byte) of putting unit ``rel`` of ``io`` over the durable
        content; None when its piece is not whole sectors. Cached: enumeration asks for
        the same units many times."""
        key = (io, rel)
        if key in self._deltas:
            return self._deltas[key]
        fast = self.by_io[io].unit_sectors(rel)
        out = None
        if fast is not None:
            out = (sum(hx - self.durable_sector_hash(x) for x, _, hx in fast),
                   (fast[-1][0] + 1) * SECTOR_BYTES)
        self._deltas[key] = out
        return out

    def durable_sector_hash(self, x: int) -> int:
        lent = self.lent_hashes
        if lent is not None:
            return lent.get(x, 0)
        h = self._durable_hashes.get(x)
        if h is None:
            h = self._durable_hashes[x] = sector_hash(x, self.durable.sector(x))
        return h

    @property
    def pending(self) -> list[PendingWrite]:
        return [self.by_io[io] for io in sorted(self.by_io)]

    @property
    def unit_bytes(self) -> int:
        return self.trace.atomic_write_bytes

    @property
    def legal_count(self) -> int:
        """Exact number of legal states (unit choices, not distinct contents)."""
        return math.prod((1 + n) ** units for n, units in self._unit_hist.items())

    @property
    def legal_log10(self) -> float:
        return sum(units * math.log10(1 + n) for n, units in self._unit_hist.items())

    @property
    def unit_candidates(self) -> dict[int, list[int]]:
        """Device unit -> legal pending ios for it, in winning order (last wins)."""
        if self._candidates is None:
            cands: dict[int, list[int]] = {}
            for pw in sorted(self.by_io.values(), key=PendingWrite.order_key):
                for rel in pw.legal_units:
                    cands.setdefault(pw.first_unit + rel, []).append(pw.io_id)
            self._candidates = cands
        return self._candidates

    @property
    def device_picks(self) -> list[Pick]:
        """The device's own media at p, in pick form: per unit, the newest version the
        device destaged by then, when it is a legal pending one. Exact whenever writes
        cover whole units; where they do not, it is the closest generated state (see the
        known limitations at the top of this module)."""
        picks = []
        for pw in self.pending:
            clean = frozenset(r for r in pw.on_media if pw.legal(r))
            if clean:
                picks.append(Pick(pw.io_id, pw.n_units, clean))
        return picks

    def __repr__(self) -> str:
        return (f"StepStates(p={self.p}, durable={len(self.durable_ids)}, "
                f"pending={sorted(self.by_io)}, legal={self.legal_count})")


class _Builder:
    """Walks a trace step by step, keeping the step's state up to date incrementally."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.ub = trace.atomic_write_bytes
        self.epoch = 0
        self.layers = [trace.base.fork()]  # durable overlays over the base, bottom first
        self.shared = False
        self.last_sealed: SparseImage | None = None
        # The durable content as one map, lent to the step's sealed layer: reads of a
        # durable sector no longer walk a stack of layers that deepens with the trace.
        # With it, each sector's hash, lent to the steps: a step's states no longer hash
        # the durable sectors under their pending units again at every step.
        self.flat: dict[int, bytes] = trace.base.changed_sectors()
        self.flat_hashes = _hashes_of(self.flat)
        self.flat_lent_to: SparseImage | None = None
        self.hashes_lent_to: list[StepStates] = []
        self.hash = sum(self.flat_hashes.values()) & _MASK  # image_hash, hashed once
        self.submit: dict[int, int] = {}
        self.complete: dict[int, int] = {}
        self.pending: dict[int, PendingWrite] = {}
        self.unflushed: dict[int, None] = {}  # completed, not durable, in completion order
        self.flush_cover: dict[int, list[int]] = {}
        self.durable_list: list[int] = []
        # (complete, io) in order. Tuples, and unit_cands emptied are dropped: a long trace
        # keeps one per sector and unit written, and lists were containers that every
        # full garbage collection walked (55,000 of them at 160 writes).
        self.sector_hist: dict[int, tuple[tuple[int, int], ...]] = {}
        self.floor: dict[int, bytes] = {}  # sector before its first (partial) durable write
        # Per sector, the latest submit step of any durable write to it: a pending write
        # that completed before it must land under that write, whichever write's data
        # the sector shows (completion order may put an older one's on top).
        self.newest_submit: dict[int, int] = {}
        self.unit_cands: dict[int, list[int]] = {}
        self.unit_legal: dict[int, int] = {}
        self.hist: Counter[int] = Counter()
        self.last_destage: dict[int, int] = {}
        self.resize_i = 0
        self.destage_i = 0

    # -- snapshots --------------------------------------------------------------------
    def snapshot(self, p: int) -> StepStates:
        self.epoch += 1
        self.shared = True
        durable = self.layers[-1].seal()  # shared from now on, so never written again
        if self.last_sealed is not None and self.last_sealed is not durable:
            durable.take_pages(self.last_sealed)  # one step's page cache, not every step's
        self.last_sealed = durable
        if self.flat_lent_to is not durable:
            durable.lend_flat(self.flat)
            self.flat_lent_to = durable
        step = StepStates(self.trace, p, durable, self.hash,
                          _PrefixView(self.durable_list, len(self.durable_list)),
                          dict(self.pending), dict(self.hist))
        step.lent_hashes = self.flat_hashes
        self.hashes_lent_to.append(step)
        return step

    def _own(self, io: int) -> PendingWrite:
        pw = self.pending[io]
        if pw.epoch != self.epoch:
            pw = self.pending[io] = pw.copy(self.epoch)
        return pw

    def _writable(self) -> SparseImage:
        if self.shared:
            self._compact()
            self.layers.append(self.layers[-1].fork())
            self.shared = False
        return self.layers[-1]

    def _compact(self) -> None:
        # Merge the top layers while they are of similar size: depth stays logarithmic
        # and each sector is copied O(log n) times. Old layers stay intact for old states.
        while len(self.layers) >= 2 and \
                2 * len(self.layers[-1].sectors) >= len(self.layers[-2].sectors):
            top = self.layers.pop()
            self.layers[-1] = top.merged_with_parent()

    # -- steps ------------------------------------------------------------------------
    def apply_step(self, i: int) -> None:
        step = self.trace.steps[i]
        io = step.io_id
        if step.kind == "write_submit":
            self._submit(io, i)
        elif step.kind == "write_complete":
            self._complete(io, i)
        elif step.kind == "flush_submit":
            self.flush_cover[io] = [] if self.trace.lying_flush else list(self.unflushed)
        elif step.kind == "flush_complete":
            if io not in self.flush_cover:
                raise TraceError(f"trace step {i}: flush {io} completes but was never "
                                 f"submitted")
            covered = [x for x in self.flush_cover.pop(io) if x in self.pending]
            self._make_durable(covered)
        else:
            raise TraceError(f"trace step {i}: unknown step kind {step.kind!r}")

    def apply_side_events(self, p: int) -> None:
        """Resizes and destages recorded between step p and step p+1."""
        resizes, destages = self.trace.resizes, self.trace.destages
        while self.resize_i < len(resizes) and resizes[self.resize_i][0] <= p:
            self._resize(resizes[self.resize_i][1])
            self.resize_i += 1
        while self.destage_i < len(destages) and destages[self.destage_i][0] <= p:
            _, io, rel = destages[self.destage_i]
            self._destaged(io, rel)
            self.destage_i += 1

    def _submit(self, io: int, i: int) -> None:
        w = self.trace.writes.get(io)
        if w is None:
            raise TraceError(f"trace step {i}: write {io} is submitted but has no "
                             f"entry in trace.writes")
        if io in self.submit:
            raise TraceError(f"trace step {i}: write {io} is submitted twice")
        self.submit[io] = i
        pw = self.pending[io] = PendingWrite(w, self.ub, i, self.epoch)
        for unit in pw.units:
            self.unit_cands.setdefault(unit, []).append(io)
            self._set_legal_count(unit, self.unit_legal.get(unit, 0) + 1)

    def _complete(self, io: int, i: int) -> None:
        if io not in self.pending or io in self.complete:
            raise TraceError(f"trace step {i}: write {io} completes but is not in flight")
        self.complete[io] = i
        self._own(io).complete_step = i
        if self.trace.writes[io].fua or self.trace.writethrough:
            self._make_durable([io])
        else:
            self.unflushed[io] = None

    def _set_legal_count(self, unit: int, n: int | None) -> None:
        old = self.unit_legal.get(unit)
        if old is not None:
            self.hist[old] -= 1
            if not self.hist[old]:
                del self.hist[old]
        if n is None:
            self.unit_legal.pop(unit, None)
        else:
            self.unit_legal[unit] = n
            self.hist[n] += 1

    # -- durability -------------------------------------------------------------------
    def _make_durable(self, ios: list[int]) -> None:
        for io in sorted(ios, key=lambda x: self.complete[x]):
            pw = self.pending.pop(io)
            self.unflushed.pop(io, None)
            for unit in pw.units:
                cands = self.unit_cands[unit]
                cands.remove(io)
                if not cands:
                    del self.unit_cands[unit]
                n = self.unit_legal[unit] - (0 if unit - pw.first_unit in pw.illegal else 1)
                self._set_legal_count(unit, n if cands else None)
            self.durable_list.append(io)
            self._apply_durable(pw.write)
            for unit in pw.units:
                for other in self.unit_cands.get(unit, ()):
                    self._recheck(other, unit)

    def _apply_durable(self, w: Write) -> None:
        c = self.complete[w.io_id]
        s = self.submit[w.io_id]
        for x in range(w.offset // SECTOR_BYTES, (w.end - 1) // SECTOR_BYTES + 1):
            if s > self.newest_submit.get(x, -1):
                self.newest_submit[x] = s
            full = w.offset <= x * SECTOR_BYTES and w.end >= (x + 1) * SECTOR_BYTES
            hist = self.sector_hist.get(x)
            current = self.flat.get(x, _ZERO)
            if hist is None or c > hist[-1][0]:
                if hist is None or full:
                    if not full:
                        self.floor[x] = current
                    else:
                        self.floor.pop(x, None)
                    self.sector_hist[x] = ((c, w.io_id),)
                else:
                    self.sector_hist[x] = hist + ((c, w.io_id),)
                self._set_sector(x, _overlay(w, x, current))
                continue
            # Made durable out of completion order (a FUA write overtook it): slot it in.
            pos = sum(1 for cc, _ in hist if cc < c)
            if any(_full(self.trace.writes[io], x) for _, io in hist[pos:]):
                continue  # a later full write hides it entirely
            hist = self.sector_hist[x] = hist[:pos] + ((c, w.io_id),) + hist[pos:]
            value = self.floor.get(x, _ZERO)
            for _, io in hist:
                value = _overlay(self.trace.writes[io], x, value)
            self._set_sector(x, value)
        top = self.layers[-1]
        if w.end > top.size_bytes:
            self._writable().size_bytes = w.end

    def _set_sector(self, x: int, data: bytes) -> None:
        if self.flat.get(x, _ZERO) == data:
            return
        self._writable().put_sector(x, data)
        self._take_flat_back()
        self.flat[x] = data
        h = sector_hash(x, data)
        self.hash = (self.hash - self.flat_hashes.get(x, 0) + h) & _MASK
        self.flat_hashes[x] = h

    def _take_flat_back(self) -> None:
        """The flat map and hashes, no longer lent: the layer and steps they were lent
        to work as before, from their own layers."""
        if self.flat_lent_to is not None:
            self.flat_lent_to.lend_flat(None)
            self.flat_lent_to = None
        for step in self.hashes_lent_to:
            step.lent_hashes = None
        self.hashes_lent_to.clear()

    def _recheck(self, io: int, unit: int) -> None:
        pw = self.pending[io]
        rel = unit - pw.first_unit
        legal = True
        if pw.complete_step is not None:
            start, data = pw.piece(rel)
            first, last = start // SECTOR_BYTES, (start + len(data) - 1) // SECTOR_BYTES
            newest = self.newest_submit
            legal = all(newest.get(x, -1) < pw.complete_step for x in range(first, last + 1))
        if legal == (rel not in pw.illegal):
            return
        pw = self._own(io)
        pw.illegal = pw.illegal - {rel} if legal else pw.illegal | {rel}
        self._set_legal_count(unit, self.unit_legal[unit] + (1 if legal else -1))

    # -- size and device progress -----------------------------------------------------
    def _resize(self, size_bytes: int) -> None:
        top = self._writable()
        shrink = size_bytes < top.size_bytes
        top.resize(size_bytes)
        if shrink:
            self._take_flat_back()
            self.flat = top.changed_sectors()  # rare: a shrink cuts and masks sectors
            self.flat_hashes = _hashes_of(self.flat)
            # Sectors cut or truncated by the shrink start a new history.
            for x in [x for x in self.sector_hist if x >= size_bytes // SECTOR_BYTES]:
                del self.sector_hist[x]
                self.floor.pop(x, None)
                self.newest_submit.pop(x, None)
            self.hash = sum(self.flat_hashes.values()) & _MASK

    def _destaged(self, io: int, rel: int) -> None:
        w = self.trace.writes.get(io)
        if w is None:
            raise TraceError(f"trace destage names write {io}, which is not in the trace")
        unit = w.offset // self.ub + rel
        prev = self.last_destage.get(unit)
        if prev == io:
            return
        if prev in self.pending:
            pw = self.pending[prev]
            self._own(prev).on_media.discard(unit - pw.first_unit)
        self.last_destage[unit] = io
        if io in self.pending:
            self._own(io).on_media.add(rel)


def _full(w: Write, x: int) -> bool:
    return w.offset <= x * SECTOR_BYTES and w.end >= (x + 1) * SECTOR_BYTES


def _overlay(w: Write, x: int, under: bytes) -> bytes:
    """Sector x after write w lands over content ``under``."""
    start = x * SECTOR_BYTES
    lo, hi = max(w.offset, start), min(w.end, start + SECTOR_BYTES)
    piece = w.data[lo - w.offset:hi - w.offset]
    if hi - lo == SECTOR_BYTES:
        return piece
    return under[:lo - start] + piece + under[hi - start:]


def iter_steps(trace: Trace, first: int = 0) -> Iterator[StepStates]:
    """The crash states of every step p = first .. n, built incrementally in one pass.
    Steps before ``first`` are applied without snapshots, which is several times
    cheaper: a worker given a late chunk of steps gets there fast."""
    b = _Builder(trace)
    b.apply_side_events(0)
    if first <= 0:
        yield b.snapshot(0)
    for i in range(len(trace.steps)):
        b.apply_step(i)
        b.apply_side_events(i + 1)
        if i + 1 >= first:
            yield b.snapshot(i + 1)


class StepWalker:
    """``iter_steps`` that keeps its place between walks: a worker handed chunks of crash
    points in increasing order walks on from where the last chunk ended instead of from
    step 0, and keeps the page caches of the durable layers it built."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self._b: _Builder | None = None
        self._at = 0  # the crash point the builder stands at

    @property
    def at(self) -> int | None:
        """The crash point the walker stands at; None before its first walk."""
        return None if self._b is None else self._at

    def steps(self, first: int = 0) -> Iterator[StepStates]:
        """The crash states of every step p = first .. n; stop when you like."""
        if self._b is None or first < self._at:
            self._b = _Builder(self.trace)
            self._b.apply_side_events(0)
            self._at = 0
        while self._at < first:
            self._advance()
        yield self._b.snapshot(self._at)
        while self._at < len(self.trace.steps):
            self._advance()
            yield self._b.snapshot(self._at)

    def _advance(self) -> None:
        assert self._b is not None
        self._b.apply_step(self._at)
        self._at += 1
        self._b.apply_side_events(self._at)


def step_at(trace: Trace, p: int) -> StepStates:
    if not 0 <= p <= trace.n_steps:
        raise ValueError(f"step p{p} is outside the trace (crash points are p0.."
                         f"p{trace.n_steps})")
    for st in iter_steps(trace):
        if st.p == p:
            return st
    raise AssertionError("unreachable")


def count_summary(step: StepStates) -> dict[str, object]:
    return {"p": step.p, "pending": len(step.by_io), "durable": len(step.durable_ids),
            "pending_units": sum(pw.n_units for pw in step.by_io.values()),
            "legal_count": step.legal_count, "legal_log10": step.legal_log10}


# -- building one state --------------------------------------------------------------

Assignment = dict[int, tuple[int, bool]]  # device unit -> (io, garbage?)


def _assignment(step: StepStates, picks: Sequence[Pick]) -> Assignment:
    out: Assignment = {}
    for pick in picks:
        first = step.by_io[pick.io_id].first_unit
        for rel in pick.clean:
            out[first + rel] = (pick.io_id, False)
        for rel in pick.garbage:
            out[first + rel] = (pick.io_id, True)
    return out


def _picks(step: StepStates, assign: Assignment) -> tuple[Pick, ...]:
    choices = set(assign.values())
    if len(choices) == 1:  # one write, all clean or all garbage (tears, single writes)
        units_of = {choices.pop(): list(assign)}
    else:
        units_of = {}
        for unit, choice in assign.items():  # group first: one dict op per unit
            units_of.setdefault(choice, []).append(unit)
    clean: dict[int, frozenset[int]] = {}
    garbage: dict[int, frozenset[int]] = {}
    for (io, is_garbage), units in units_of.items():
        first = step.by_io[io].first_unit
        (garbage if is_garbage else clean)[io] = frozenset([u - first for u in units])
    return tuple(Pick(io, step.by_io[io].n_units, clean.get(io, frozenset()),
                      garbage.get(io, frozenset()))
                 for io in sorted(clean.keys() | garbage.keys()))


def _quick_key(step: StepStates, assign: Assignment) -> str | None:
    """The content key of a state, without building it, when every unit is clean and
    in whole sectors (the common case); None otherwise. Most candidate states are seen
    already, and this lets the enumerator skip building them."""
    h = step.durable_hash
    size = step.durable.size_bytes
    by_io, delta_of = step.by_io, step.unit_delta
    for unit, (io, is_garbage) in assign.items():
        delta = None if is_garbage else delta_of(io, unit - by_io[io].first_unit)
        if delta is None:
            return None
        h += delta[0]
        if delta[1] > size:
            size = delta[1]
    return key_of(size, h)


def _build(step: StepStates, assign: Assignment) -> tuple[SparseImage, str]:
    """The state's own layer over the durable overlay, and its content key."""
    img = step.durable.fork()
    sectors = img.sectors
    h = step.durable_hash
    slow: set[int] = set()
    for unit, (io, is_garbage) in assign.items():  # units are disjoint: order is free
        pw = step.by_io[io]
        rel = unit - pw.first_unit
        fast = None if is_garbage else pw.unit_sectors(rel)
        if fast is not None:
            for x, data, _ in fast:
                sectors[x] = data
            delta, end = step.unit_delta(io, rel)
            h += delta
            if end > img.size_bytes:
                img.size_bytes = end
            continue
        off, data = pw.piece(rel)
        img.write(off, garbage_bytes(step.p, io, rel, len(data)) if is_garbage else data)
        slow.update(range(off // SECTOR_BYTES, (off + len(data) - 1) // SECTOR_BYTES + 1))
    for x in slow:
        h += sector_hash(x, sectors[x]) - step.durable_sector_hash(x)
    return img, key_of(img.size_bytes, h)


def _state(step: StepStates, img: SparseImage | None, key: str, tier: str,
           assign: Assignment, picks: tuple[Pick, ...] | None = None) -> CrashState:
    """The state of ``assign``; its torn and surviving writes are counted from the
    assignment (in C, by ``Counter``), its picks made only if asked for."""
    units = Counter(assign.values())  # (io, garbage?) -> how many units
    torn = 0
    clean_of = {io: n for (io, is_garbage), n in units.items() if not is_garbage}
    survivors = sorted({io for io, _ in units})
    for io in survivors:
        pw = step.by_io[io]
        legal = pw.n_units - len(pw.illegal)
        clean = clean_of.get(io, 0)
        if clean != legal or (io, True) in units:
            torn += legal - clean
    garbage: list[tuple[int, int]] = []
    if len(clean_of) < len(units):
        garbage = sorted((io, unit - step.by_io[io].first_unit)
                         for unit, (io, is_garbage) in assign.items() if is_garbage)
    return CrashState(tier, step.p, img, survivors, torn, garbage, key, picks, step, assign)


def _is_torn(pw: PendingWrite, pick: Pick) -> bool:
    # clean units are always legal ones, so a count tells whether all were applied
    return len(pick.clean) != pw.n_units - len(pw.illegal) or bool(pick.garbage)


def state_from_picks(step: StepStates, picks: Sequence[Pick], tier: str) -> CrashState:
    """Build a state from already validated, non-overlapping picks."""
    assign = _assignment(step, picks)
    img, key = _build(step, assign)
    return _state(step, img, key, tier, assign, _picks(step, assign))


# -- enumeration ---------------------------------------------------------------------

class _Enumerator:
    def __init__(self, step: StepStates, budget: int, seed: int, garbage: bool):
        self.step, self.budget, self.seed, self.garbage = step, budget, seed, garbage
        self.states: list[CrashState] = []
        self.seen: set[str] = set()

    @property
    def remaining(self) -> int:
        return self.budget - len(self.states)

    def add(self, tier: str, assign: Assignment, key: str | None = None) -> bool:
        """Add the state unless seen; False once the budget is spent."""
        if self.remaining <= 0:
            return False
        if key is None:
            key = _quick_key(self.step, assign)
        if key in self.seen:
            return True
        img = None
        if key is None:  # garbage or part sectors: the key needs the image
            img, key = _build(self.step, assign)
        if key not in self.seen:
            self.seen.add(key)
            self.states.append(_state(self.step, img, key, tier, assign))
        return self.remaining > 0

    def device(self) -> None:
        self.add("device", _assignment(self.step, self.step.device_picks))

    def subsets(self) -> None:
        ios = sorted(self.step.by_io)
        k = len(ios)
        if k <= self.remaining.bit_length() - 1:  # 2^k fits the remaining budget
            groups: Iterator[tuple[int, ...]] = itertools.chain.from_iterable(
                itertools.combinations(ios, r) for r in range(k + 1))
        else:  # the simplest corners of the space only
            singles = [(io,) for io in ios]
            all_but_one = [tuple(x for x in ios if x != io) for io in ios]
            groups = iter([(), *singles, tuple(ios), *all_but_one])
        for group in groups:
            if not self.add("subset", self._whole(group)):
                return

    def _whole(self, group: Sequence[int]) -> Assignment:
        assign: Assignment = {}
        for pw in sorted((self.step.by_io[io] for io in group), key=PendingWrite.order_key):
            for rel in pw.legal_units:
                assign[pw.first_unit + rel] = (pw.io_id, False)
        return assign

    def torn(self) -> None:
        variants = [False, True] if self.garbage else [False]
        for with_garbage in variants:
            for pw in self.step.pending:
                for assign, key in _tears(self.step, pw, with_garbage):
                    if not self.add("torn", assign, key):
                        return

    def random(self) -> None:
        cands = _distinct_candidates(self.step)
        units = sorted(cands)
        if not units or self.remaining <= 0:
            return
        rng = random.Random(self.seed * 1_000_003 + self.step.p)
        choices = [[None, *cands[u]] for u in units]
        if math.prod(len(c) for c in choices) <= self.remaining:
            space = list(itertools.product(*choices))
            rng.shuffle(space)
            samples: Iterator[tuple] = iter(space)
        else:
            tries = 4 * self.remaining + 16
            rnd = rng.random
            samples = (tuple(c[int(rnd() * len(c))] for c in choices) for _ in range(tries))
        tried: set[tuple] = set()
        for sample in samples:
            if sample in tried:
                continue  # the same choice again: building it would only find it seen
            tried.add(sample)
            assign = {u: (io, False) for u, io in zip(units, sample) if io is not None}
            if not self.add("random", assign):
                return


def _distinct_candidates(step: StepStates) -> dict[int, list[int]]:
    """Per unit, the pending ios that give it distinct content other than the durable
    one. A candidate equal to the durable content, or to an earlier candidate, only
    repeats a state, and sampling such choices wastes the random tier's tries."""
    out: dict[int, list[int]] = {}
    for unit, ios in step.unit_candidates.items():
        seen = {0}  # a zero delta is the durable content itself
        keep = []
        for io in ios:
            found = step.unit_delta(io, unit - step.by_io[io].first_unit)
            if found is None:
                keep.append(io)  # partial sectors: compared only once built
                continue
            delta = found[0]
            if delta not in seen:
                seen.add(delta)
                keep.append(io)
        if keep:
            out[unit] = keep
    return out


def _tears(step: StepStates, pw: PendingWrite, with_garbage: bool
           ) -> Iterator[tuple[Assignment, str | None]]:
    """Prefix [0:j] and suffix [j:] of each boundary j; garbage marks the boundary unit.
    Each comes with its content key when running sums over the write's units give it
    cheaply (clean, whole-sector units), else None."""
    io, first, n = pw.io_id, pw.first_unit, pw.n_units
    sums = None if with_garbage or pw.illegal else _unit_sums(step, pw)
    clean = (io, False)
    for j in range(1, n):
        for lo, hi, boundary in ((0, j, j), (j, n, j - 1)):
            if pw.illegal:
                assign = {first + r: clean for r in range(lo, hi) if pw.legal(r)}
            else:
                assign = dict.fromkeys(range(first + lo, first + hi), clean)
            if with_garbage:
                if not pw.legal(boundary):
                    continue
                assign[first + boundary] = (io, True)
            if assign:
                yield assign, None if sums is None else _range_key(step, sums, lo, hi)


def _unit_sums(step: StepStates, pw: PendingWrite) -> tuple[list[int], list[int]] | None:
    """Running hash deltas over the write's units, and each unit's end byte."""
    sums, ends = [0], []
    for r in range(pw.n_units):
        delta = step.unit_delta(pw.io_id, r)
        if delta is None:
            return None
        sums.append(sums[-1] + delta[0])
        ends.append(delta[1])
    return sums, ends


def _range_key(step: StepStates, sums: tuple[list[int], list[int]], lo: int, hi: int
               ) -> str:
    total, ends = sums
    return key_of(max(step.durable.size_bytes, ends[hi - 1]),
                  step.durable_hash + total[hi] - total[lo])


def enumerate_states(step: StepStates, budget: int, seed: int = 0,
                     garbage: bool = False) -> list[CrashState]:
    """Up to ``budget`` distinct states of a step, simplest first, tier by tier."""
    en = _Enumerator(step, budget, seed, garbage)
    for tier in (en.device, en.subsets, en.torn, en.random):
        if en.remaining <= 0:
            break
        tier()
    return en.states


# -- state IDs -----------------------------------------------------------------------

_ID_RE = re.compile(r"p(\d+):(.+)\Z")
_PICK_RE = re.compile(r"w(\d+)(?:\[([0-9,\-]*)\])?(?:!g([0-9,\-]+))?\Z")


def format_units(units: Sequence[int] | frozenset[int]) -> str:
    """Sorted unit indices as ranges: {0,1,2,3,5} -> '0-3,5'."""
    out: list[str] = []
    ordered = sorted(units)
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:  # a run ends at i - 1
            a, b = ordered[start], ordered[i - 1]
            out.append(str(a) if a == b else f"{a}-{b}")
            start = i
    return ",".join(out)


def parse_units(text: str, where: str, n_units: int | None = None) -> frozenset[int]:
    units: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{where}: bad unit range {part!r} (use e.g. 0-3,5)")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"{where}: unit range {part!r} runs backwards")
        if n_units is not None:
            # one unit past the write is enough for the caller to refuse the range:
            # [0-999999999999] must not build a set of a trillion units first
            b = min(b, max(a, n_units))
        units.update(range(a, b + 1))
    return frozenset(units)


def format_state_id(p: int, picks: Sequence[Pick]) -> str:
    parts = []
    for pick in sorted(picks, key=lambda k: k.io_id):
        if not pick.applied:
            continue
        text = f"w{pick.io_id}"
        if pick.clean | pick.garbage != frozenset(range(pick.n_units)):
            text += f"[{format_units(pick.clean)}]"
        if pick.garbage:
            text += f"!g{format_units(pick.garbage)}"
        parts.append(text)
    return f"p{p}:" + ("+".join(parts) if parts else "none")


@dataclass(frozen=True)
class StateChoice:
    p: int
    picks: tuple[Pick, ...]


def parse_state_id(trace: Trace, state_id: str, *,
                   step: StepStates | None = None) -> StateChoice:
    """Parse and validate an ID against the trace; ValueError says what is wrong."""
    text = state_id.strip()
    m = _ID_RE.match(text)
    if not m:
        raise ValueError(f"state ID {state_id!r} is malformed: expected p<step>:none or "
                         f"p<step>:w<io>[units]+... (e.g. p12:w3+w5[0-3]!g4)")
    p = int(m.group(1))
    if step is None or step.p != p:
        step = step_at(trace, p)
    body = m.group(2)
    if body == "none":
        return StateChoice(p, ())
    picks = [_parse_pick(step, part, state_id) for part in body.split("+")]
    _check_disjoint(step, picks, state_id)
    return StateChoice(p, tuple(sorted(picks, key=lambda k: k.io_id)))


def _parse_pick(step: StepStates, part: str, state_id: str) -> Pick:
    m = _PICK_RE.match(part)
    where = f"state ID {state_id!r}"
    if not m:
        raise ValueError(f"{where}: pick {part!r} is malformed (expected w<io>, "
                         f"w<io>[0-3,5] or w<io>[0-3]!g4)")
    io = int(m.group(1))
    pw = step.by_io.get(io)
    if pw is None:
        pending = ", ".join(map(str, sorted(step.by_io))) or "none"
        raise ValueError(f"{where}: write {io} is not pending at p{step.p} "
                         f"(pending: {pending})")
    garbage = parse_units(m.group(3) or "", where, pw.n_units)
    if m.group(2) is None:
        clean = frozenset(range(pw.n_units)) - garbage
    else:
        clean = parse_units(m.group(2), where, pw.n_units)
    if clean & garbage:
        raise ValueError(f"{where}: write {io} units {format_units(clean & garbage)} "
                         f"are both clean and garbage")
    for rel in sorted(clean | garbage):
        if not 0 <= rel < pw.n_units:
            raise ValueError(f"{where}: write {io} has units 0-{pw.n_units - 1}; unit "
                             f"{rel} is out of range")
        if not pw.legal(rel):
            raise ValueError(f"{where}: unit {rel} of write {io} is not legal at "
                             f"p{step.p}: newer durable data there was submitted after "
                             f"write {io} completed")
    return Pick(io, pw.n_units, clean, garbage)


def _check_disjoint(step: StepStates, picks: list[Pick], state_id: str) -> None:
    owner: dict[int, tuple[int, int]] = {}
    for pick in picks:
        first = step.by_io[pick.io_id].first_unit
        for rel in pick.applied:
            unit = first + rel
            if unit in owner and owner[unit][0] != pick.io_id:
                io2, rel2 = owner[unit]
                raise ValueError(f"state ID {state_id!r}: unit {rel2} of write {io2} and "
                                 f"unit {rel} of write {pick.io_id} are the same device "
                                 f"unit; a unit holds one version")
            if unit in owner:
                raise ValueError(f"state ID {state_id!r}: write {pick.io_id} is picked "
                                 f"twice")
            owner[unit] = (pick.io_id, rel)


def build_state(trace: Trace, state_id: str, *, step: StepStates | None = None
                ) -> CrashState:
    """Rebuild exactly the state an ID names (no seed or re-simulation needed)."""
    choice = parse_state_id(trace, state_id, step=step)
    if step is None or step.p != choice.p:
        step = step_at(trace, choice.p)
    return state_from_picks(step, choice.picks, "replay")


# -- shrinking -----------------------------------------------------------------------

def _score(cs: CrashState) -> tuple[int, int, int, int]:
    applied = sum(len(k.applied) for k in cs.picks)
    return len(cs.survivors), cs.torn_count, len(cs.garbage_units), applied


def shrink(trace: Trace, state: CrashState, is_failing: Callable[[CrashState], bool],
           max_tries: int = 200) -> CrashState:
    """A smallest failing state found greedily: fewest surviving writes, then fewest
    torn units, then fewest garbage and applied units. Deterministic."""
    step = state.step if state.step is not None and state.step.p == state.p \
        else step_at(trace, state.p)
    best = state if state.picks or state.state_id.endswith(":none") else \
        build_state(trace, state.state_id, step=step)
    tries = 0

    def attempt(picks: Sequence[Pick]) -> CrashState | None:
        nonlocal tries
        if tries >= max_tries:
            return None
        tries += 1
        cs = state_from_picks(step, picks, "shrunk")
        return cs if _score(cs) <= _score(best) and is_failing(cs) else None

    def drop_survivors() -> None:
        nonlocal best
        changed = True
        while changed and tries < max_tries:
            changed = False
            for i in range(len(best.picks)):
                cs = attempt(best.picks[:i] + best.picks[i + 1:])
                if cs is not None:
                    best, changed = cs, True
                    break

    drop_survivors()
    for io in [k.io_id for k in best.picks]:
        if all(k.io_id != io for k in best.picks):
            continue
        for candidate in _unit_candidates(step, best, io):
            if tries >= max_tries:
                break
            cs = attempt(candidate)
            if cs is not None:
                best = cs
                break
    drop_survivors()
    return best


def _unit_candidates(step: StepStates, cs: CrashState, io: int) -> Iterator[list[Pick]]:
    """Replacements of one pick by simpler unit sets: whole, then contiguous pieces."""
    picks = list(cs.picks)
    idx = next(i for i, k in enumerate(picks) if k.io_id == io)
    pick = picks[idx]
    pw = step.by_io[io]
    taken = set().union(*(({step.by_io[k.io_id].first_unit + r for r in k.applied})
                          for k in picks if k.io_id != io))
    free = [r for r in pw.legal_units if pw.first_unit + r not in taken]
    legal = len(pw.legal_units)
    current_torn = 0 if pick.clean == set(pw.legal_units) and not pick.garbage else \
        legal - len(pick.clean)
    options: list[tuple[int, int, frozenset[int]]] = [(legal - len(free), 0, frozenset(free))]
    for j in range(1, len(free)):
        options.append((legal - j, 1, frozenset(free[:j])))
        options.append((legal - (len(free) - j), 2, frozenset(free[j:])))
    for torn, _, units in sorted(options, key=lambda t: (t[0], t[1], sorted(t[2]))):
        if torn > current_torn or (units == pick.clean and not pick.garbage):
            continue
        yield picks[:idx] + [Pick(io, pw.n_units, units)] + picks[idx + 1:]
