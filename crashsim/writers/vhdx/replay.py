"""Log replay on open (vhdx-log-format.md §7): scan, sequences, choice, apply, clear.

This module owns the *read* side of the metadata log: which entries are valid and why,
which sequence is active, and how it is applied. Every candidate entry (any log sector
starting with "loge") gets one line in ``ReplayResult.decisions``; the replay paths taken
get short stable names in ``ReplayResult.branches`` (for the coverage figure).

``ReplayPolicy`` selects behaviour variants: QEMU's departures from the spec
(``qemu_quirks``), crashsim's fix for a LogGuid left set without entries
(``reset_guid_without_sequence``), and switches that defect variants turn off.

On any input bytes ``replay`` either returns or raises ``VhdxCorrupt``.

In-memory replay (for read-only inspection, as DiscUtils does) is replay on a throwaway
copy-on-write layer::

    dev = ImageDevice(SparseImage.from_file(path).fork())
    result = run_sync(replay(dev))

or, for large files, on ``OverlayDevice(path)`` below, which reads the file lazily and
keeps replay's writes in memory.
"""
from __future__ import annotations

import functools
import itertools
import os
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

from ...blockdev import BlockDevice, IOGen, read_summary
from ...image import SparseImage
from .format import (HEADER_SLOTS, LOG_SECTOR, ZERO_GUID, Header, LogEntry, LogEntryHeader,
                     MiB, VhdxCorrupt, check_data_sector, check_entry_header, check_layout,
                     check_log_geometry, entry_checksum_ok, parse_descriptors,
                     MAX_REPLAY_ZERO_BYTES, guid_text, parse_cache, parse_log_entry_header,
                     round_up)
from .log import BlockIO, HeaderSession, apply_entry, as_io


@dataclass(frozen=True)
class ReplayPolicy:
    """Switches that select a replay variant; the defaults follow the spec (§7)."""

    # QEMU's departures: no sequence check on a run's 2nd entry, Tail never read, an
    # invalid descriptor in a valid-header entry fails the open, data sectors checked only
    # at apply, FlushedFileOffset checked per entry, extend only to an unaligned
    # LastFileOffset, LogGuid left set when there is no active sequence.
    qemu_quirks: bool = False
    # crashsim's fix: LogGuid set but no active sequence -> clear LogGuid (else: corrupt,
    # or with qemu_quirks leave it set, as QEMU does).
    reset_guid_without_sequence: bool = False
    verify_checksum: bool = True
    verify_data_sequence: bool = True
    pick_highest_sequence: bool = True


FIXED_POLICY = ReplayPolicy(reset_guid_without_sequence=True)
QEMU_POLICY = ReplayPolicy(qemu_quirks=True)


@dataclass
class ReplayResult:
    decisions: list[str] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)
    replayed_entries: int = 0
    next_sequence: int = 1          # the log writer's next sequence number
    log_guid_cleared: bool = False

    def branch(self, name: str) -> None:
        if name not in self.branches:
            self.branches.append(name)


@dataclass
class Candidate:
    """One log sector that starts with "loge": a valid entry or the reason it is not."""
    position: int
    header: LogEntryHeader
    entry: LogEntry | None = None
    reason: str = ""
    code: str = ""

    _note: tuple[int, str, str] | None = field(default=None, repr=False, compare=False)

    @property
    def valid(self) -> bool:
        return self.entry is not None

    def note(self, log_length: int) -> tuple[str, str]:
        """Its decision line and branch name ("" if none); made once, since candidates
        are shared by every crash state whose log holds the same entry."""
        if self._note is None or self._note[0] != log_length:
            self._note = (log_length, *self._describe(log_length))
        return self._note[1], self._note[2]

    def _describe(self, log_length: int) -> tuple[str, str]:
        seq = self.header.sequence_number
        where = f"log+{self.position:#x}"
        if self.valid:
            wraps = self.position + self.header.entry_length > log_length
            return (f"{where}: entry seq {seq} valid ({self.header.descriptor_count} "
                    f"descriptors, {self.header.entry_length:#x} bytes"
                    f"{', wraps to the log start' if wraps else ''})"), ""
        state = "inactive" if self.code == "guid-mismatch" else "invalid"
        return f"{where}: entry seq {seq} {state}: {self.reason}", f"entry-invalid:{self.code}"


@dataclass
class Run:
    """Contiguous valid entries with consecutive sequence numbers."""
    entries: list[Candidate]
    replay_from: int | None  # index of the Tail entry; None when the Tail is outside

    @property
    def head(self) -> Candidate:
        return self.entries[-1]

    @property
    def to_replay(self) -> list[Candidate]:
        return [] if self.replay_from is None else self.entries[self.replay_from:]

    def describe(self) -> str:
        first, head = self.entries[0], self.head
        return (f"sequence log+{first.position:#x}..log+{head.position:#x} "
                f"(seq {first.header.sequence_number}..{head.header.sequence_number}, "
                f"{len(self.entries)} entries)")


@dataclass
class LogScan:
    header: Header
    candidates: list[Candidate]
    runs: list[Run]
    active: Run | None
    empty_sectors: int
    notes: list[str] = field(default_factory=list)  # one decision line per candidate
    note_branches: list[str] = field(default_factory=list)  # theirs, each once, in order


@dataclass(frozen=True)
class _Page:
    """The candidates of one log page and, when none depends on bytes outside it, what
    they add to a scan, worked out once: a full log holds over a hundred entries, and
    going through them one by one for every crash state made a long workload's
    recoveries cost more than a short one's."""
    items: tuple[Candidate | tuple[int, LogEntryHeader], ...]
    whole: bool = False
    notes: tuple[str, ...] = ()
    branches: tuple[str, ...] = ()
    valid: tuple[Candidate, ...] = ()

    @classmethod
    def of(cls, items: tuple, log_length: int) -> "_Page":
        if not all(type(c) is Candidate for c in items):
            return cls(items)
        noted = [c.note(log_length) for c in items]
        return cls(items, True, tuple(line for line, _ in noted),
                   tuple(dict.fromkeys(b for _, b in noted if b)),
                   tuple(c for c in items if c.valid))


# -- scanning ---------------------------------------------------------------------------
def check_log_in_file(io: BlockIO | BlockDevice, header: Header) -> None:
    end = header.log_offset + header.log_length
    if end > io.size_bytes:
        raise VhdxCorrupt(f"log region [{header.log_offset:#x}, {end:#x}) extends beyond the "
                          f"end of the file ({io.size_bytes} bytes)", header.log_offset,
                          "log-beyond-eof")


def read_entry_bytes(io: BlockIO | BlockDevice, header: Header, pos: int,
                     length: int) -> bytes:
    """``length`` log bytes from log-relative ``pos``, wrapping at the end of the log
    (an entry that wraps is read in its logical order)."""
    first = min(length, header.log_length - pos)
    blob = io.read(header.log_offset + pos, first)
    if first < length:
        blob += io.read(header.log_offset, length - first)
    return blob


def scan_log(io: BlockIO | BlockDevice, header: Header,
             policy: ReplayPolicy = ReplayPolicy()) -> LogScan:
    """Every candidate entry, the sequences, and the active one (no writes)."""
    check_log_in_file(io, header)
    memo = header.log_length <= MEMO_LOG_BYTES  # a larger log (a hostile header) is not kept
    return _scan_pages(io, header, policy, memo)


class _Memo:
    """A small LRU map. Crash states of one workload share nearly all their log pages, and
    a page's candidates are a pure function of its bytes, the header's log fields and the
    policy: checking every entry anew for every state made replay cost grow with the
    number of entries in the log, so a long workload cost more per state than a short one.
    (Whole scans recur too rarely to be worth keeping: a torn entry makes each new.)"""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._map: OrderedDict = OrderedDict()

    def get(self, key):
        value = self._map.get(key)
        if value is not None:
            self._map.move_to_end(key)
        return value

    def put(self, key, value):
        self._map[key] = value
        if len(self._map) > self.max_entries:
            self._map.popitem(last=False)
        return value

    def clear(self) -> None:
        self._map.clear()


_PAGES = _Memo(64)  # keys hold the pages, 64 KiB each; hits are nearly all recent ones
_PLACES: dict[tuple, int] = {}  # a log's fields and policy -> its number in page keys
_PLACE_NUMBERS = itertools.count()  # never reused: a cleared number stays unmatched
MAX_PLACES = 4096  # one per log GUID and policy; hostile headers could make many
MEMO_LOG_BYTES = 16 << 20


def _log_pages(io: BlockIO | BlockDevice, header: Header, policy: ReplayPolicy,
               place: int | None) -> Iterator[_Page]:
    """The log, page by page, as the candidates each page holds. The scan uses a page's
    bytes only through them (an entry running past the page is read again, plainly),
    so the page is read as a summary: crash states whose torn log sectors fail the same
    checks the same way can share one judging (``readset.py``)."""
    key = None if place is None else ("vhdx-log-page", place)  # names the function
    for start in range(0, header.log_length, SCAN_CHUNK_BYTES):
        summarise = functools.partial(_page_of, start=start, header=header, policy=policy,
                                      place=place)
        yield read_summary(io, header.log_offset + start,
                           min(SCAN_CHUNK_BYTES, header.log_length - start), summarise, key)


def _page_of(blob: bytes, start: int, header: Header, policy: ReplayPolicy,
             place: int | None) -> _Page:
    return _page_items(blob if type(blob) is bytes else bytes(blob), start, header, policy,
                       place)


def _scan_pages(io: BlockIO | BlockDevice, header: Header, policy: ReplayPolicy,
                memo: bool = True) -> LogScan:
    cands: list[Candidate] = []
    notes: list[str] = []
    branches: list[str] = []
    valid: list[Candidate] = []
    place = _place(header, policy) if memo else None
    for page in _log_pages(io, header, policy, place):
        if page.whole:
            cands += page.items
            notes += page.notes
            branches += page.branches
            valid += page.valid
            continue
        for item in page.items:
            if type(item) is not Candidate:  # an entry that runs past this page
                item = _check_candidate(io, item[0], item[1], header, policy)
            cands.append(item)
            line, branch = item.note(header.log_length)
            notes.append(line)
            if branch:
                branches.append(branch)
            if item.valid:
                valid.append(item)
    empty = -(-header.log_length // LOG_SECTOR) - len(cands)
    runs = _build_runs(valid, header.log_length, policy)
    return LogScan(header, cands, runs, _choose(runs, policy), empty, notes,
                   list(dict.fromkeys(branches)))


def _place(header: Header, policy: ReplayPolicy) -> int:
    """The number of a log's fields and a policy in page keys. A key holding the fields
    themselves hashed a UUID and a dataclass in Python at every page of every scan."""
    key = (header.log_offset, header.log_length, header.log_guid, policy)
    number = _PLACES.get(key)
    if number is None:
        if len(_PLACES) >= MAX_PLACES:
            _PLACES.clear()
        number = _PLACES[key] = next(_PLACE_NUMBERS)
    return number


def _page_items(blob: bytes, start: int, header: Header, policy: ReplayPolicy,
                place: int | None = None) -> _Page:
    """The candidates whose bytes lie in this page, in log order, memoised under
    ``place`` (``_place`` of the header and policy; None: not memoised). An entry that
    runs past the page's end (and any after it) is left as (position, header) for the
    caller to check, since its validity depends on bytes outside the page."""
    key = (blob, start, place)
    items = _PAGES.get(key) if place is not None else None
    if items is not None:
        return items
    found: list[Candidate | tuple[int, LogEntryHeader]] = []
    crossed = False  # after an entry that runs past the page, the caller checks each
    for rel, head in _signed_heads(blob):  # in log order, as a failing check must be
        pos = start + rel
        try:
            h = parse_log_entry_header(head, pos)
        except VhdxCorrupt:
            continue
        rejected = _rejection(head, h, header.log_length, header.log_guid, pos)
        if rejected is not None:
            found.append(rejected)
        elif crossed or rel + h.entry_length > len(blob):
            found.append((pos, h))
            crossed = True
        else:
            found.append(_entry_candidate(blob[rel:rel + h.entry_length], pos, h,
                                          header.log_offset, policy))
    page = _Page.of(tuple(found), header.log_length)
    return _PAGES.put(key, page) if place is not None else page


SCAN_CHUNK_BYTES = 64 << 10  # one sealed page: read without joining or copying
_ENTRY_SIGNATURE = b"loge"


def _signed_heads(blob: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, first 64 bytes) of every 4 KiB sector of a log page that starts with the
    entry signature. A strided slice holds the first byte of every sector, so only
    sectors starting with "l" are looked at (searching the whole page for the signature
    would cost more than the scan)."""
    firsts = blob[::LOG_SECTOR]
    i = firsts.find(_ENTRY_SIGNATURE[:1])
    while i >= 0:
        rel = i * LOG_SECTOR
        if blob[rel:rel + 4] == _ENTRY_SIGNATURE:
            yield rel, blob[rel:rel + 64]
        i = firsts.find(_ENTRY_SIGNATURE[:1], i + 1)


def _check_candidate(io: BlockIO | BlockDevice, pos: int, h: LogEntryHeader,
                     header: Header, policy: ReplayPolicy) -> Candidate:
    rejected = _header_rejection(h, header.log_length, header.log_guid, pos)
    if rejected is not None:
        return rejected
    blob = read_entry_bytes(io, header, pos, h.entry_length)
    return _entry_candidate(blob, pos, h, header.log_offset, policy)


# A log holds dozens of entries and every crash state's recovery scans them all; nearly
# all are the same bytes as in the state before. Both checks are pure functions of their
# arguments, so their results are shared (Candidates are never changed once made).
@parse_cache(maxsize=4096)
def _header_rejection(h: LogEntryHeader, log_length: int, log_guid, pos: int
                      ) -> Candidate | None:
    try:
        check_entry_header(h, log_length=log_length, log_guid=log_guid, offset=pos)
    except VhdxCorrupt as exc:
        return Candidate(pos, h, reason=exc.reason, code=exc.code)
    return None


def _rejection(head: bytes, h: LogEntryHeader, log_length: int, log_guid, pos: int
               ) -> Candidate | None:
    """``_header_rejection``, with stale entries shared between log sessions."""
    if log_guid.int and h.log_guid.int != log_guid.int:
        return _stale_rejection(head, pos, log_length)
    return _header_rejection(h, log_length, log_guid, pos)


class _NotTheEntrys:
    """A header LogGuid that no entry's GUID equals (and that is not zero)."""


@parse_cache(maxsize=4096)
def _stale_rejection(head: bytes, pos: int, log_length: int) -> Candidate:
    """Why an entry whose log GUID is not the header's is not valid: the same under
    every header GUID but its own. Every guest write of a VHDX workload starts a new log
    session, after which each entry of a full log was checked again and described anew
    (two thirds of how the cost per crash point grew from 40 to 320 writes)."""
    h = parse_log_entry_header(head, pos)
    return _header_rejection.__wrapped__(h, log_length, _NotTheEntrys(), pos)


@parse_cache(maxsize=4096)
def _entry_candidate(blob: bytes, pos: int, h: LogEntryHeader, log_offset: int,
                     policy: ReplayPolicy) -> Candidate:
    cand = Candidate(pos, h)
    try:
        descs = parse_descriptors(blob, h, pos)
    except VhdxCorrupt as exc:
        if policy.qemu_quirks:
            raise VhdxCorrupt(f"log entry at log+{pos:#x} (seq {h.sequence_number}) has a "
                              f"valid header but {exc.reason}: QEMU fails the whole open",
                              log_offset + (exc.offset or pos), "descriptor") from None
        cand.reason, cand.code = exc.reason, exc.code
        return cand
    try:
        _check_body(blob, h, descs, pos, policy)
    except VhdxCorrupt as exc:
        cand.reason, cand.code = exc.reason, exc.code
        return cand
    start = h.descriptor_sectors * LOG_SECTOR
    datas = [blob[p:p + LOG_SECTOR] for p in range(start, h.entry_length, LOG_SECTOR)]
    cand.entry = LogEntry(h, descs, datas)
    return cand


def _check_body(blob: bytes, h: LogEntryHeader, descs, pos: int,
                policy: ReplayPolicy) -> None:
    check_layout(h, descs, pos)
    if policy.verify_data_sequence and not policy.qemu_quirks:
        start = h.descriptor_sectors * LOG_SECTOR
        for i, p in enumerate(range(start, h.entry_length, LOG_SECTOR)):
            check_data_sector(blob[p:p + LOG_SECTOR], h.sequence_number, i, pos + p)
    if policy.verify_checksum and not entry_checksum_ok(blob, h):
        raise VhdxCorrupt(f"checksum mismatch (stored {h.checksum:#010x})", pos + 4,
                          "checksum")


def _build_runs(valid: list[Candidate], length: int, policy: ReplayPolicy) -> list[Run]:
    by_pos = {c.position: c for c in valid}
    runs = []
    for start in valid:
        entries, seen = [start], {start.position}
        while True:
            cur = entries[-1]
            nxt = by_pos.get((cur.position + cur.header.entry_length) % length)
            if nxt is None or nxt.position in seen:
                break
            second = len(entries) == 1 and policy.qemu_quirks  # QEMU: curr_seq still 0
            if not second and nxt.header.sequence_number != cur.header.sequence_number + 1:
                break
            entries.append(nxt)
            seen.add(nxt.position)
        runs.append(Run(entries, _tail_index(entries, policy)))
    return runs


def _tail_index(entries: list[Candidate], policy: ReplayPolicy) -> int | None:
    if policy.qemu_quirks:
        return 0  # QEMU never reads the Tail: the whole run is replayed
    tail = entries[-1].header.tail
    return next((i for i, c in enumerate(entries) if c.position == tail), None)


def _choose(runs: list[Run], policy: ReplayPolicy) -> Run | None:
    formed = [r for r in runs if r.replay_from is not None]
    if not formed:
        return None
    if not policy.pick_highest_sequence:
        return formed[0]  # the first in log order, whatever its age
    best = formed[0]
    for r in formed[1:]:
        seq, best_seq = r.head.header.sequence_number, best.head.header.sequence_number
        longer = not policy.qemu_quirks and seq == best_seq and \
            len(r.to_replay) > len(best.to_replay)
        if seq > best_seq or longer:
            best = r
    return best


# -- decisions --------------------------------------------------------------------------
def describe_scan(scan: LogScan, res: ReplayResult) -> None:
    """One decision line per candidate entry and per sequence."""
    res.decisions += scan.notes
    for branch in scan.note_branches:
        res.branch(branch)
    for r in scan.runs:
        if r.replay_from is None:
            res.decisions.append(f"{r.describe()}: head's Tail {r.head.header.tail:#x} is "
                                 f"not an entry of the run: not a well-formed sequence")
            res.branch("sequence-not-well-formed")
        elif r is not scan.active and scan.active is not None and \
                r.head.header.sequence_number < scan.active.head.header.sequence_number:
            res.decisions.append(f"{r.describe()}: older than the active sequence: ignored")
            res.branch("older-sequence-ignored")


# -- replay -----------------------------------------------------------------------------
def replay(dev: BlockDevice | BlockIO, *, policy: ReplayPolicy = ReplayPolicy(),
           headers: HeaderSession | None = None, rng: random.Random | None = None) -> IOGen:
    """Replay the log of the image on ``dev`` in place; returns a ReplayResult."""
    io = as_io(dev)
    if headers is None:
        headers = HeaderSession.load(io, rng)
    res = ReplayResult()
    res.decisions.extend(headers.notes)
    header = headers.current
    slot_offset = HEADER_SLOTS[headers.slot]
    res.decisions.append(f"current header: slot {headers.slot + 1}, seq "
                         f"{header.sequence_number}, LogGuid {guid_text(header.log_guid)}")
    check_log_geometry(header, slot_offset)
    if header.log_guid == ZERO_GUID or header.log_length == 0:
        why = "LogGuid is zero" if header.log_guid == ZERO_GUID else "LogLength is 0"
        res.decisions.append(f"{why}: nothing to replay")
        res.branch("clean" if header.log_guid == ZERO_GUID else "no-log")
        return res
    scan = scan_log(io, header, policy)
    describe_scan(scan, res)
    if scan.active is None:
        yield from _no_active_sequence(io, headers, policy, res, slot_offset)
        return res
    yield from _replay_run(io, headers, scan, policy, res)
    return res


def _no_active_sequence(io: BlockIO, headers: HeaderSession, policy: ReplayPolicy,
                        res: ReplayResult, slot_offset: int) -> IOGen:
    guid = headers.current.log_guid
    res.branch("no-active-sequence")
    if policy.reset_guid_without_sequence:
        res.decisions.append(f"LogGuid {guid} is set but no active sequence exists: "
                             f"clearing LogGuid")
        yield from headers.update_both(io, log_guid=ZERO_GUID)
        res.log_guid_cleared = True
        res.branch("guid-reset")
    elif policy.qemu_quirks:
        res.decisions.append(f"LogGuid {guid} is set but no active sequence exists: "
                             f"treated as empty, LogGuid left set (QEMU)")
        res.branch("guid-left-set")
    else:
        raise VhdxCorrupt(f"LogGuid {guid} is set but the log holds no active sequence "
                          f"(MS-VHDX 2.3.3)", slot_offset + 48, "no-active-sequence")


def _replay_run(io: BlockIO, headers: HeaderSession, scan: LogScan, policy: ReplayPolicy,
                res: ReplayResult) -> IOGen:
    run = scan.active
    todo = run.to_replay
    _check_zero_budget(todo, scan.header)
    head = run.head.header
    res.decisions.append(f"active {run.describe()}: replaying {len(todo)} entries from "
                         f"log+{todo[0].position:#x}")
    if len(todo) > 1:
        res.branch("multi-entry-sequence")
    if any(c.position + c.header.entry_length > scan.header.log_length for c in todo):
        res.branch("wrapped-entry")
    if not policy.qemu_quirks:
        _check_truncation(io, head, scan.header, run.head.position, res)
    yield from headers.user_visible_write(io)
    for c in todo:
        if policy.qemu_quirks:
            _qemu_entry_checks(io, c, scan.header, res)
        yield from apply_entry(io, c.entry)
        res.replayed_entries += 1
        if policy.qemu_quirks:
            _qemu_extend(io, c.header, res)
    if not policy.qemu_quirks:
        _extend(io, head, res)
    yield from io.flush()
    yield from headers.update_both(io, log_guid=ZERO_GUID)
    res.log_guid_cleared = True
    res.next_sequence = head.sequence_number + 1
    res.decisions.append(f"replayed {res.replayed_entries} entries; LogGuid cleared")
    res.branch("replayed")


def _check_zero_budget(todo: list[Candidate], header: Header) -> None:
    zeros = sum(d.length for c in todo for d in c.entry.descriptors if d.kind == "zero")
    if zeros > MAX_REPLAY_ZERO_BYTES:
        raise VhdxCorrupt(f"the active sequence zeroes {zeros:#x} bytes in place, more than "
                          f"crashsim replays ({MAX_REPLAY_ZERO_BYTES:#x})",
                          header.log_offset + todo[0].position, "zero-run-too-large")


def _check_truncation(io: BlockIO, h: LogEntryHeader, header: Header, pos: int,
                      res: ReplayResult) -> None:
    if io.size_bytes < h.flushed_file_offset:
        res.branch("truncated")
        raise VhdxCorrupt(f"file is {io.size_bytes} bytes but log entry seq "
                          f"{h.sequence_number} says {h.flushed_file_offset} were flushed: "
                          f"truncated", header.log_offset + pos + 48, "truncated")


def _qemu_entry_checks(io: BlockIO, c: Candidate, header: Header,
                       res: ReplayResult) -> None:
    _check_truncation(io, c.header, header, c.position, res)
    for i, sector in enumerate(c.entry.data_sectors):
        try:
            check_data_sector(sector, c.header.sequence_number, i, 0, check_signature=False)
        except VhdxCorrupt as exc:
            raise VhdxCorrupt(f"log entry at log+{c.position:#x}: {exc.reason}",
                              header.log_offset + c.position, exc.code) from None


def _extend(io: BlockIO, h: LogEntryHeader, res: ReplayResult) -> None:
    if io.size_bytes < h.last_file_offset:
        io.resize(round_up(h.last_file_offset, MiB))
        res.decisions.append(f"file extended to {io.size_bytes:#x} (LastFileOffset "
                             f"{h.last_file_offset:#x})")
        res.branch("extended")


def _qemu_extend(io: BlockIO, h: LogEntryHeader, res: ReplayResult) -> None:
    if io.size_bytes >= h.last_file_offset:
        return
    if h.last_file_offset % MiB:
        io.resize(round_up(h.last_file_offset, MiB))
        res.decisions.append(f"file extended to {io.size_bytes:#x}")
        res.branch("extended")
    else:
        res.decisions.append(f"file ({io.size_bytes:#x}) is shorter than the aligned "
                             f"LastFileOffset {h.last_file_offset:#x}: not extended (QEMU)")
        res.branch("extend-skipped-aligned")


# -- in-memory replay over a file -------------------------------------------------------
class OverlayDevice:
    """A read-only file with an in-memory copy-on-write layer on top.

    Replay's writes and resizes land in the overlay; reads fall through to the file for
    sectors the overlay does not hold. Nothing is loaded up front, so a large image costs
    only what replay touches.
    """

    sector_bytes = 512

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._f = open(self.path, "rb")
        self._file_size = os.fstat(self._f.fileno()).st_size
        self.overlay = SparseImage(self._file_size)
        self._cut = self._file_size  # file bytes at or past this were truncated away

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "OverlayDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size_bytes(self) -> int:
        return self.overlay.size_bytes

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        size = self.size_bytes
        self._f.seek(offset)
        buf = bytearray(self._f.read(max(0, min(length, min(self._cut, size) - offset))))
        buf.extend(bytes(length - len(buf)))
        sectors = self.overlay.sectors
        if sectors:
            for idx in range(offset // 512, (offset + length - 1) // 512 + 1):
                data = sectors.get(idx)
                if data is not None:
                    lo, hi = max(offset, idx * 512), min(offset + length, idx * 512 + 512)
                    buf[lo - offset:hi - offset] = data[lo - idx * 512:hi - idx * 512]
        if offset + length > size:
            keep = max(0, size - offset)
            buf[keep:] = bytes(length - keep)
        return bytes(buf)

    def write(self, offset: int, data: bytes, fua: bool = False) -> IOGen:
        if offset % 512 or len(data) % 512:
            old = bytearray(self.read(offset - offset % 512,
                                      round_up(offset + len(data), 512) - offset + offset % 512))
            old[offset % 512:offset % 512 + len(data)] = data
            offset, data = offset - offset % 512, bytes(old)
        self.overlay.write(offset, bytes(data))
        return
        yield

    def flush(self) -> IOGen:
        return
        yield

    def resize(self, size_bytes: int) -> None:
        if size_bytes < self._cut:
            self._cut = size_bytes
        self.overlay.resize(size_bytes)
