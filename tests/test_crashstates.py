"""Crash states of hand-written traces: counts, tiers, IDs, exclusion, shrinking, and a
property test against a brute-force reading of the §2 rules."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from crashsim import crashstates as cs
from crashsim.blockdev import ImageDevice, run_sync
from crashsim.image import SparseImage
from crashsim.trace import Trace, Write

S = 512


def pat(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


class TB:
    """Builds a trace step by step; each write's data is its io id + 1, repeated."""

    def __init__(self, sectors: int = 16, atomic: int = 512, fill: int = 0, **flags):
        base = SparseImage(sectors * S)
        if fill:
            base.write(0, pat(fill, sectors * S))
        self.trace = Trace(base=base, atomic_write_bytes=atomic, **flags)

    def submit(self, io: int, sector: int, count: int = 1, fua: bool = False,
               data: bytes | None = None, offset: int | None = None) -> "TB":
        off = sector * S if offset is None else offset
        self.trace.writes[io] = Write(io, off, data or pat(io + 1, count * S), fua)
        return self._step("write_submit", io)

    def complete(self, io: int) -> "TB":
        return self._step("write_complete", io)

    def write(self, io: int, sector: int, count: int = 1, fua: bool = False) -> "TB":
        return self.submit(io, sector, count, fua).complete(io)

    def flush(self, io: int) -> "TB":
        return self._step("flush_submit", io)._step("flush_complete", io)

    def _step(self, kind: str, io: int) -> "TB":
        self.trace.add_step(kind, io)  # type: ignore[arg-type]
        return self

    def last(self) -> cs.StepStates:
        return cs.step_at(self.trace, self.trace.n_steps)


def whole(trace: Trace, image: SparseImage) -> bytes:
    return image.read(0, trace.base.size_bytes)


# -- counting -----------------------------------------------------------------------

def test_legal_count_of_overlapping_pending_writes():
    # unit 0: {durable, w0}; unit 1: {durable, w0, w1}; unit 2: {durable, w1}
    step = TB().write(0, 0, 2).write(1, 1, 2).last()
    assert step.legal_count == 2 * 3 * 2
    assert step.legal_log10 == pytest.approx(math.log10(12))
    assert len(cs.enumerate_states(step, 1000)) == 12  # all distinct contents


def test_legal_count_counts_units_not_sectors():
    step = TB(atomic=4096, sectors=32).write(0, 0, 24).last()  # 3 aligned 4 KiB units
    assert [pw.n_units for pw in step.pending] == [3] and step.legal_count == 8


def test_legal_count_is_exact_when_huge():
    tb = TB(sectors=2048)
    for io in range(3):
        tb.write(io, 0, 2000)
    step = tb.last()
    assert step.legal_count == 4 ** 2000
    assert step.legal_log10 == pytest.approx(2000 * math.log10(4))


def test_durable_by_flush_fua_and_writethrough():
    tb = TB().write(0, 0).submit(1, 1).flush(2).complete(1)
    step = tb.last()
    assert list(step.durable_ids) == [0] and [pw.io_id for pw in step.pending] == [1]
    step = TB().write(0, 0).write(1, 1, fua=True).last()
    assert list(step.durable_ids) == [1]
    step = TB(writethrough=True).write(0, 0).submit(1, 1).last()
    assert list(step.durable_ids) == [0] and [pw.io_id for pw in step.pending] == [1]


def test_lying_flush_trace_makes_nothing_durable():
    step = TB(lying_flush=True).write(0, 0).flush(1).write(2, 1, fua=True).last()
    assert list(step.durable_ids) == [2] and [pw.io_id for pw in step.pending] == [0]


# -- supersession -------------------------------------------------------------------

def test_older_pending_write_cannot_cover_newer_fua_data():
    # w0 completes; then w1 (FUA) is submitted over sector 1 and completes: durable.
    tb = TB().write(0, 0, 2).write(1, 1, fua=True)
    step = tb.last()
    (pw,) = step.pending
    assert pw.io_id == 0 and pw.illegal == frozenset({1})
    assert step.legal_count == 2
    states = cs.enumerate_states(step, 100)
    assert {s.state_id for s in states} == {"p4:none", "p4:w0[0]"}
    with_garbage = cs.enumerate_states(step, 100, garbage=True)
    assert {s.state_id for s in with_garbage} - {s.state_id for s in states} == {"p4:w0[]!g0"}
    assert all(s.image.read(S, S) == pat(2, S) for s in with_garbage)
    with pytest.raises(ValueError, match="unit 1 of write 0 is not legal at p4"):
        cs.build_state(tb.trace, "p4:w0")


def test_older_pending_write_cannot_cover_newer_fua_data_shown_under_a_concurrent_one():
    # w0 completes before FUA w2 is submitted, so w0 lands before w2. FUA w1, concurrent
    # with both, completes last and supplies the durable content; w2 still bars w0.
    tb = TB(sectors=1).submit(0, 0).submit(1, 0, fua=True).complete(0)
    tb.submit(2, 0, fua=True).complete(2).complete(1)
    step = tb.last()
    assert step.p == 6 and list(step.durable_ids) == [2, 1]
    (pw,) = step.pending
    assert pw.io_id == 0 and pw.illegal == frozenset({0})
    assert step.legal_count == 1
    states = cs.enumerate_states(step, 100, garbage=True)
    assert [s.state_id for s in states] == ["p6:none"]
    assert states[0].image.read(0, S) == pat(2, S)  # w1's data
    with pytest.raises(ValueError, match="unit 0 of write 0 is not legal at p6"):
        cs.build_state(tb.trace, "p6:w0")

def test_write_in_flight_with_newer_durable_data_stays_legal():
    # w0 is still in flight when w1 (FUA) lands over it: their order is undefined.
    step = TB().submit(0, 0).write(1, 0, fua=True).complete(0).last()
    (pw,) = step.pending
    assert pw.illegal == frozenset() and step.legal_count == 2


def test_fua_overtaking_an_earlier_write_keeps_completion_order():
    # w0 completes first but becomes durable (by flush) after FUA w1 completed.
    tb = TB().submit(0, 0).submit(1, 0, fua=True).complete(0)
    tb._step("flush_submit", 2).complete(1)._step("flush_complete", 2)
    step = tb.last()
    assert list(step.durable_ids) == [1, 0]
    assert step.durable.read(0, S) == pat(2, S)  # w1 completed last: its data is durable


def test_out_of_order_durable_partial_sectors():
    tb = TB(fill=0x11)
    tb.submit(0, 0, data=pat(0xA0, 100), offset=0)
    tb.submit(1, 0, data=pat(0xB0, 150), offset=50, fua=True)
    tb.complete(0)._step("flush_submit", 2).complete(1)._step("flush_complete", 2)
    sector = tb.last().durable.read(0, S)
    assert sector == pat(0xA0, 50) + pat(0xB0, 150) + pat(0x11, S - 200)


def test_a_write_made_durable_late_lands_under_the_later_partial_writes_of_its_sector():
    """Each partial write joins the sector's history: one made durable out of order is
    slotted in, and the sector is rebuilt from all of them."""
    tb = TB(fill=0x11)
    tb.submit(1, 0, data=pat(0xB0, 100), offset=100).complete(1)  # waits for the flush
    tb.submit(0, 0, data=pat(0xA0, 100), offset=0, fua=True).complete(0)
    tb.submit(2, 0, data=pat(0xC0, 100), offset=200, fua=True).complete(2)
    tb._step("flush_submit", 3)._step("flush_complete", 3)
    sector = tb.last().durable.read(0, S)
    assert sector == pat(0xA0, 100) + pat(0xB0, 100) + pat(0xC0, 100) + pat(0x11, S - 300)


# -- enumeration --------------------------------------------------------------------

def _busy_trace() -> Trace:
    tb = TB(fill=0x11).write(0, 0, 4).write(1, 2, 4).flush(2).write(3, 8, 3).submit(4, 1, 2)
    return tb.write(5, 4, 4).trace


def test_tiers_come_in_order_and_all_appear():
    trace = _busy_trace()
    states = cs.enumerate_states(cs.step_at(trace, trace.n_steps), 200, seed=3)
    tiers = [s.tier for s in states]
    assert tiers == sorted(tiers, key=cs.TIERS.index)
    assert set(tiers) == {"device", "subset", "torn", "random"}
    assert tiers[0] == "device" and states[0].state_id == f"p{trace.n_steps}:none"


def test_states_are_distinct_by_content_and_within_budget():
    trace = _busy_trace()
    step = cs.step_at(trace, trace.n_steps)
    for budget in (1, 3, 7, 50, 400):
        states = cs.enumerate_states(step, budget, seed=1, garbage=True)
        assert len(states) == min(budget, len(states)) <= budget
        assert len({s.content_key for s in states}) == len(states)
        assert len({s.image.content_key() for s in states}) == len(states)
    assert len(cs.enumerate_states(step, 400, seed=1)) > 50


def test_identical_versions_are_deduplicated():
    tb = TB()
    tb.submit(0, 0, data=pat(7, S)).complete(0).submit(1, 0, data=pat(7, S)).complete(1)
    step = tb.last()
    assert step.legal_count == 3
    states = cs.enumerate_states(step, 100)
    assert [s.state_id for s in states] == ["p4:none", "p4:w0"]


def test_subset_tier_covers_every_subset_and_later_write_wins():
    tb = TB().write(0, 0, 2).write(1, 1, 2).write(2, 5)
    step = tb.last()
    subset = [s for s in cs.enumerate_states(step, 1000) if s.tier in ("device", "subset")]
    assert len(subset) == 8
    both = next(s for s in subset if set(s.survivors) == {0, 1})
    assert both.state_id == "p6:w0[0]+w1"
    assert both.torn == [(0, 1)]


def test_random_tier_is_seeded_and_legal():
    trace = _busy_trace()
    step = cs.step_at(trace, trace.n_steps)
    a = [s.state_id for s in cs.enumerate_states(step, 120, seed=9)]
    b = [s.state_id for s in cs.enumerate_states(step, 120, seed=9)]
    c = [s.state_id for s in cs.enumerate_states(step, 120, seed=10)]
    assert a == b and a != c


def test_small_space_is_explored_exhaustively():
    step = TB().write(0, 0, 3).write(1, 2, 2).last()
    assert step.legal_count == 2 * 2 * 3 * 2
    states = cs.enumerate_states(step, 1000)
    assert len(states) == 24


def test_earlier_steps_stay_valid_after_iterating_on():
    trace = _busy_trace()
    live = [[(s.state_id, s.content_key) for s in cs.enumerate_states(st, 40, seed=2)]
            for st in cs.iter_steps(trace)]
    kept = list(cs.iter_steps(trace))
    later = [[(s.state_id, s.content_key) for s in cs.enumerate_states(st, 40, seed=2)]
             for st in kept]
    assert live == later


def test_state_images_share_the_durable_overlay():
    trace = _busy_trace()
    step = cs.step_at(trace, trace.n_steps)
    for s in cs.enumerate_states(step, 30):
        assert s.image.parent is step.durable
        assert len(s.image.sectors) <= sum(pw.n_units for pw in step.pending)


# -- state IDs ----------------------------------------------------------------------

def test_ids_round_trip_to_identical_images():
    trace = _busy_trace()
    for step in cs.iter_steps(trace):
        for s in cs.enumerate_states(step, 60, seed=4, garbage=True):
            choice = cs.parse_state_id(trace, s.state_id)
            assert cs.format_state_id(choice.p, choice.picks) == s.state_id
            again = cs.build_state(trace, s.state_id)
            assert again.state_id == s.state_id
            assert whole(trace, again.image) == whole(trace, s.image)
            assert again.content_key == s.content_key


def test_id_syntax():
    picks = [cs.Pick(5, 8, frozenset({0, 1, 2, 3}), frozenset({4})),
             cs.Pick(3, 2, frozenset({0, 1}))]
    assert cs.format_state_id(7, picks) == "p7:w3+w5[0-3]!g4"
    assert cs.format_state_id(7, []) == "p7:none"
    assert cs.format_state_id(1, [cs.Pick(2, 3, frozenset({0, 2}), frozenset({1}))]) == \
        "p1:w2!g1"
    assert cs.format_units({0, 1, 2, 3, 5, 7, 8}) == "0-3,5,7-8"


@pytest.mark.parametrize("bad, message", [
    ("12:w1", "malformed"),
    ("p5:w1[0-x]", "pick 'w1\\[0-x\\]' is malformed"),
    ("p5:w1[-3]", "bad unit range '-3'"),
    ("p5:w1[3-1]", "runs backwards"),
    ("p5:q1", "pick 'q1' is malformed"),
    ("p99:none", "outside the trace"),
    ("p5:w2", "write 2 is not pending at p5 \\(pending: 0, 1, 3\\)"),
    ("p5:w0[4]", "write 0 has units 0-3; unit 4 is out of range"),
    # refused at once, not after building a set of a trillion units (MemoryError)
    ("p5:w0[0-999999999999]", "write 0 has units 0-3; unit 4 is out of range"),
    ("p5:w0[0]!g1-999999999999", "write 0 has units 0-3; unit 4 is out of range"),
    ("p5:w0[999999999999]", "write 0 has units 0-3; unit 999999999999 is out of range"),
    ("p5:w0[0-1]!g1", "units 1 are both clean and garbage"),
    ("p5:w0+w1", "are the same device unit"),
])
def test_bad_ids_are_one_clear_error(bad, message):
    tb = TB().write(0, 0, 4).write(1, 2, 2).flush(2)._step("write_submit", 3)
    tb.trace.writes[3] = Write(3, 0, pat(9, S))
    assert tb.trace.n_steps == 7
    trace = Trace(base=tb.trace.base, writes=tb.trace.writes, steps=tb.trace.steps[:4] +
                  [tb.trace.steps[6]])
    with pytest.raises(ValueError, match=message):
        cs.build_state(trace, bad)


def test_garbage_is_reproducible_from_the_id_alone():
    trace = TB(fill=0x11).write(0, 0, 4).trace
    s = cs.build_state(trace, "p2:w0[0-1]!g2")
    assert s.garbage_units == [(0, 2)] and s.torn == [(0, 2), (0, 3)]
    assert s.image.read(2 * S, S) == cs.garbage_bytes(2, 0, 2, S)
    assert s.image.read(3 * S, S) == pat(0x11, S)


def test_recovery_trace_on_a_crash_state_base():
    outer = TB(fill=0x11).write(0, 0, 2).trace
    crashed = cs.build_state(outer, "p2:w0[0]").image
    rtrace = Trace(base=crashed)
    dev = ImageDevice(crashed.fork(), trace=rtrace)

    def recovery():
        yield from dev.write(S, pat(0x55, S))
        yield from dev.flush()
        yield from dev.write(0, pat(0x66, 2 * S))

    run_sync(recovery())
    steps = list(cs.iter_steps(rtrace))
    assert [len(st.pending) for st in steps] == [0, 1, 1, 1, 0, 1, 1]
    last = cs.build_state(rtrace, "p6:none").image
    assert last.read(0, 2 * S) == pat(1, S) + pat(0x55, S)


def test_resize_sets_the_state_size():
    tb = TB(sectors=8).write(0, 0)
    tb.trace.resizes.append((2, 16 * S))
    tb.submit(1, 12)
    step = tb.last()
    states = cs.enumerate_states(step, 10)
    assert all(s.image.size_bytes == 16 * S for s in states)
    assert cs.step_at(tb.trace, 1).durable.size_bytes == 8 * S


# -- shrinking ----------------------------------------------------------------------

def test_shrink_finds_the_single_needed_write():
    tb = TB().write(0, 0, 2).write(1, 4, 4).write(2, 10, 3)
    trace = tb.trace
    big = cs.build_state(trace, "p6:w0+w1[0-1,3]+w2")
    calls = []

    def fails(state):
        calls.append(state.state_id)
        return state.image.read(5 * S, S) == pat(2, S)  # w1's unit 1 landed

    small = cs.shrink(trace, big, fails)
    assert small.state_id == "p6:w1" and small.torn == []
    assert fails(small) and len(calls) <= 200


def test_shrink_keeps_a_needed_tear_and_prefers_a_prefix():
    trace = TB().write(0, 0, 2).write(1, 4, 4).trace
    start = cs.build_state(trace, "p4:w0+w1[0,2]")

    def fails(state):  # w1 torn: its first unit landed but not its last
        img = state.image
        return img.read(4 * S, S) == pat(2, S) and img.read(7 * S, S) != pat(2, S)

    small = cs.shrink(trace, start, fails)
    assert small.state_id == "p4:w1[0-2]"
    assert small.survivors == [1] and small.torn == [(1, 3)]


def test_shrink_is_deterministic_and_bounded():
    trace = _busy_trace()
    step = cs.step_at(trace, trace.n_steps)
    start = max(cs.enumerate_states(step, 200, seed=5), key=lambda s: len(s.survivors))
    calls = []

    def fails(state):
        calls.append(1)
        return len(state.survivors) >= 2

    a = cs.shrink(trace, start, fails, max_tries=20)
    assert len(calls) <= 20
    b = cs.shrink(trace, start, fails, max_tries=20)
    assert a.state_id == b.state_id and len(a.survivors) == 2


# -- the rules, brute force ---------------------------------------------------------

def _naive(trace: Trace, p: int):
    """The §2 rules read literally, with no incremental state."""
    sub, comp, fsub, fdone = {}, {}, {}, set()
    for i, s in enumerate(trace.steps[:p]):
        {"write_submit": sub, "write_complete": comp, "flush_submit": fsub}.get(
            s.kind, {})[s.io_id] = i
        if s.kind == "flush_complete":
            fdone.add(s.io_id)

    def durable(io):
        if io not in comp:
            return False
        if trace.writes[io].fua or trace.writethrough:
            return True
        return not trace.lying_flush and any(fsub[f] > comp[io] for f in fdone)

    dur = sorted((io for io in sub if durable(io)), key=comp.get)
    img = bytearray(trace.base.read(0, trace.base.size_bytes))
    supplier = {}
    for io in dur:
        w = trace.writes[io]
        img[w.offset:w.end] = w.data
        for x in range(w.offset // S, w.end // S):
            supplier[x] = io
    pending = [io for io in sub if not durable(io)]
    ub = trace.atomic_write_bytes

    def legal(io, unit):
        w = trace.writes[io]
        lo, hi = max(w.offset, unit * ub), min(w.end, (unit + 1) * ub)
        if lo >= hi:
            return False
        if io not in comp:
            return True
        return all(sub[supplier[x]] < comp[io] for x in range(lo // S, hi // S)
                   if x in supplier)

    return bytes(img), pending, dur, legal


def _unit_options(trace, durable_img, pending, legal, unit):
    ub = trace.atomic_write_bytes
    opts = {durable_img[unit * ub:(unit + 1) * ub]}
    for io in pending:
        if legal(io, unit):
            w = trace.writes[io]
            u = bytearray(durable_img[unit * ub:(unit + 1) * ub])
            lo, hi = max(w.offset, unit * ub), min(w.end, (unit + 1) * ub)
            u[lo - unit * ub:hi - unit * ub] = w.data[lo - w.offset:hi - w.offset]
            opts.add(bytes(u))
    return opts


@st.composite
def traces(draw):
    atomic = draw(st.sampled_from([512, 4096]))
    sectors = 16
    tb = TB(sectors=sectors, atomic=atomic, fill=draw(st.sampled_from([0, 0x11])),
            writethrough=draw(st.booleans()), lying_flush=draw(st.booleans()))
    in_flight, flushing, io = [], [], 0
    for _ in range(draw(st.integers(1, 16))):
        actions = ["w", "f"] + (["c"] if in_flight else []) + (["fc"] if flushing else [])
        act = draw(st.sampled_from(actions))
        if act == "w":
            sector = draw(st.integers(0, sectors - 1))
            count = draw(st.integers(1, min(9, sectors - sector)))
            tb.submit(io, sector, count, fua=draw(st.booleans()))
            in_flight.append(io)
        elif act == "c":
            tb.complete(in_flight.pop(draw(st.integers(0, len(in_flight) - 1))))
        elif act == "f":
            tb._step("flush_submit", io)
            flushing.append(io)
        else:
            tb._step("flush_complete", flushing.pop(draw(st.integers(0, len(flushing) - 1))))
        io += 1
    return tb.trace


@settings(max_examples=150, deadline=None)
@given(trace=traces(), seed=st.integers(0, 3), garbage=st.booleans())
def test_every_state_unit_is_durable_or_a_legal_pending_version(trace, seed, garbage):
    ub = trace.atomic_write_bytes
    n_units = trace.base.size_bytes // ub
    for step in cs.iter_steps(trace):
        durable_img, pending, dur, legal = _naive(trace, step.p)
        assert sorted(pw.io_id for pw in step.pending) == sorted(pending)
        assert sorted(step.durable_ids) == sorted(dur)
        assert step.durable.read(0, trace.base.size_bytes) == durable_img
        options = [_unit_options(trace, durable_img, pending, legal, u)
                   for u in range(n_units)]
        expected = math.prod(1 + sum(legal(io, u) for io in pending) for u in range(n_units))
        assert step.legal_count == expected
        for s in cs.enumerate_states(step, 48, seed=seed, garbage=garbage):
            assert set(s.survivors) <= set(pending)
            garbage_units = {step.by_io[io].first_unit + r for io, r in s.garbage_units}
            for u in range(n_units):
                got = s.image.read(u * ub, ub)
                if u in garbage_units:
                    assert got not in options[u]
                else:
                    assert got in options[u], (s.state_id, u)


def test_durable_page_caches_stay_true_across_layer_merges():
    """Each step's durable layer starts with the page cache of the step before, also
    when the layers under it were merged; a stale page would show here as a read that
    differs from the same layer read without any cache."""
    pages, page_bytes = 8, 64 * 1024
    tb = TB(sectors=pages * page_bytes // S, fill=0x11)
    rng = __import__("random").Random(7)
    io = 0
    for _ in range(40):
        sector = rng.randrange(pages * page_bytes // S - 4)
        tb.write(io, sector, rng.randint(1, 4)).flush(io + 1)
        io += 2
    size = tb.trace.base.size_bytes
    merged = 0
    for step in cs.iter_steps(tb.trace):
        cached = step.durable.read(0, size)  # fills and then uses the inherited pages
        merged += step.durable.parent is not None and len(step.durable.parent.sectors) > 4
        assert cached == step.durable.flattened().read(0, size), step.p
        assert step.durable.read(0, size) == cached
    assert merged > 0  # the layers under the durable one were merged at some steps


def test_changes_between_siblings_and_across_merges_cover_every_difference():
    """``changes_between`` names every sector where two images may differ: layers over
    a shared ancestor, or over a merged twin of one. A sector left out would let the
    VHDX view reuse bytes that changed."""
    from crashsim.image import SparseImage
    rng = __import__("random").Random(11)
    base = SparseImage(1 << 20)
    for _ in range(200):
        base.write(rng.randrange(2048) * S, bytes([rng.randint(1, 255)]) * S)
    base.seal()
    lower = base.fork()
    lower.write(5 * S, b"\x07" * S)
    lower.seal()
    upper = lower.fork()
    upper.write(9 * S, b"\x08" * (3 * S))
    merged = upper.merged_with_parent().seal()  # the twin of ``upper``
    for a_parent, b_parent in [(upper, upper), (upper, merged), (merged, lower),
                               (lower, upper), (base, merged)]:
        a, b = a_parent.fork(), b_parent.fork()
        for img in (a, b):
            for _ in range(rng.randint(0, 6)):
                img.write(rng.randrange(2048) * S, bytes([rng.randint(0, 255)]) * S)
        changed = a.changes_between(b)
        assert changed is not None
        named = {x for sectors in changed.values() for x in sectors}
        for x in range(2048):
            if a.sector(x) != b.sector(x):
                assert x in named, x
    assert SparseImage(4096).changes_between(SparseImage(4096)) is None  # unrelated


def test_a_frozen_image_keeps_its_content_when_the_image_is_written_on():
    from crashsim.image import SparseImage
    base = SparseImage(8 * S)
    base.write(0, b"\x01" * S)
    base.seal()
    state = base.fork()
    state.write(S, b"\x02" * S)
    work = state.fork()
    work.write(2 * S, b"\x03" * S)
    frozen = work.frozen()
    assert frozen.parent is base and frozen.read(0, 8 * S) == work.read(0, 8 * S)
    work.write(2 * S, b"\x04" * S)
    assert frozen.read(2 * S, S) == b"\x03" * S
    assert work.frozen(max_sectors=1) is None  # too much above the sealed layer
    assert base.frozen() is base


@settings(max_examples=80, deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "grow", "shrink"]),
                          st.integers(0, 300), st.integers(1, 40)), min_size=1, max_size=25))
def test_an_image_that_grows_and_shrinks_reads_like_a_flat_copy(ops):
    """The page index of a layer survives growth (no sector goes) and is rebuilt after
    a shrink; either way every read answers as a plain byte array would."""
    base = SparseImage(64 * 512)
    base.write(0, bytes(range(256)) * 64)  # more sectors than a small layer: indexed
    base.seal()
    img = base.fork()
    flat = bytearray(base.read(0, base.size_bytes))
    for op, at, n in ops:
        if op == "write":
            data = bytes([at % 251 + 1]) * (n * 512)
            img.write(at * 512, data)  # past the end, a write grows the image
            flat.extend(bytes(max(0, at * 512 - len(flat))))
            flat[at * 512:at * 512 + len(data)] = data
        elif op == "grow":
            img.resize(img.size_bytes + n * 512)
            flat.extend(bytes(n * 512))
        else:
            size = max(0, img.size_bytes - n * 512)
            img.resize(size)
            del flat[size:]
        assert img.size_bytes == len(flat)
        assert img.read(0, len(flat)) == bytes(flat)


def test_a_durable_layer_reads_alike_through_its_lent_flat_map_and_its_layers():
    """The walker lends each step's durable layer the durable content as one map, and
    the step its sector hashes. Every sector read and hash through them must equal one
    through the layers: at the step, and at every earlier step after the walker has
    moved on and changed them (taken back by then), across partial-sector writes, layer
    merges and a shrink that cuts written sectors."""
    sectors = 64
    tb = TB(sectors=sectors, fill=0x11)
    rng = __import__("random").Random(3)
    for io in range(0, 120, 2):
        if io == 60:
            tb.trace.resizes.append((tb.trace.n_steps, 40 * S))  # cuts sectors 40..63
        sector = rng.randrange(sectors - 4)
        offset = sector * S + rng.choice([0, 0, 100])  # some writes cover part sectors
        tb.submit(io, sector, rng.randint(1, 4), fua=rng.random() < 0.3, offset=offset)
        tb.complete(io).flush(io + 1)
    lent = 0
    steps = []
    for step in cs.iter_steps(tb.trace):
        lent += step.durable._flat is not None and step.lent_hashes is not None
        flat = step.durable.flattened()
        assert [step.durable.sector(x) for x in range(sectors)] == \
            [flat.sector(x) for x in range(sectors)], step.p
        assert [step.durable_sector_hash(x) for x in range(sectors)] == \
            [cs.sector_hash(x, flat.sector(x)) for x in range(sectors)], step.p
        assert step.durable_hash == cs.image_hash(flat), step.p
        steps.append((step, flat))
    assert lent == len(steps)  # each step read through the map and hashes
    # only the last durable layer (which the last steps share) holds it now
    assert len({id(st.durable) for st, _ in steps if st.durable._flat is not None}) == 1
    assert all(st.lent_hashes is None for st, _ in steps[:-3])
    for step, flat in steps:
        assert step.durable.read(0, sectors * S) == flat.read(0, sectors * S), step.p
        assert [step.durable.sector(x) for x in range(sectors)] == \
            [flat.sector(x) for x in range(sectors)], step.p
        assert [step.durable_sector_hash(x) for x in range(sectors)] == \
            [cs.sector_hash(x, flat.sector(x)) for x in range(sectors)], step.p
