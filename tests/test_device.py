"""The SimPy device against the rules of design.md §2, checked through crash states."""
from __future__ import annotations

import pytest
import simpy
from hypothesis import given, settings, strategies as st

from crashsim import crashstates as cs
from crashsim.device import DeviceConfig, DeviceError, SimDevice, run_simulation, simulate
from crashsim.image import SparseImage
from crashsim.trace import Trace

OLD = 0x11
SLOW_DESTAGE = 1e6  # destage so slow that nothing reaches media unless forced


class FnWriter:
    """A writer whose workload is a plain generator function body(dev, tx)."""

    def __init__(self, body, size_bytes: int = 1 << 16, fill: int = 0):
        self.body, self.size_bytes, self.fill = body, size_bytes, fill

    def format_image(self) -> SparseImage:
        img = SparseImage(self.size_bytes)
        if self.fill:
            img.write(0, bytes([self.fill]) * self.size_bytes)
        return img

    def run(self, dev, tx):
        return self.body(dev, tx)


def pat(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


def after(trace: Trace, kind: str, io: int) -> int:
    """The crash point just after the given step."""
    return next(i for i, s in enumerate(trace.steps) if s.kind == kind and s.io_id == io) + 1


def time_of(trace: Trace, kind: str, io: int) -> float:
    return trace.steps[after(trace, kind, io) - 1].time_us


def ios_of(trace: Trace) -> list[int]:
    return [s.io_id for s in trace.steps if s.kind == "write_submit"]


# -- FUA, flush, write-through ------------------------------------------------------

def test_fua_is_not_a_barrier():
    def body(dev, tx):
        yield from dev.write(0, pat(0xAA, 512))
        yield from dev.write(4096, pat(0xBB, 512), fua=True)

    trace = simulate(FnWriter(body), DeviceConfig(destage_latency_us=SLOW_DESTAGE))
    a, b = ios_of(trace)
    step = cs.step_at(trace, after(trace, "write_complete", b))
    assert list(step.durable_ids) == [b]
    assert [pw.io_id for pw in step.pending] == [a]
    states = cs.enumerate_states(step, 64)
    b_without_a = [s for s in states if s.image.read(4096, 512) == pat(0xBB, 512)
                   and s.image.read(0, 512) == bytes(512)]
    assert b_without_a, "B durable with A absent must be a legal crash state"
    assert all(s.image.read(4096, 512) == pat(0xBB, 512) for s in states)


def test_flush_does_not_cover_a_write_in_flight():
    def body(dev, tx):
        w = dev.env.process(dev.write(0, pat(0xAA, 512)))
        yield dev.env.timeout(10)
        yield from dev.flush()  # submitted while the write is in flight
        yield w
        yield from dev.flush()

    trace = simulate(FnWriter(body), DeviceConfig(write_latency_us=100,
                                                  flush_latency_us=2000))
    kinds = [(s.kind, s.io_id) for s in trace.steps]
    assert kinds[:4] == [("write_submit", 0), ("flush_submit", 1),
                         ("write_complete", 0), ("flush_complete", 1)]
    first = cs.step_at(trace, 4)
    assert [pw.io_id for pw in first.pending] == [0] and list(first.durable_ids) == []
    none = cs.build_state(trace, "p4:none")
    assert none.image.read(0, 512) == bytes(512)
    last = cs.step_at(trace, trace.n_steps)
    assert list(last.durable_ids) == [0] and last.pending == []


def test_flush_covers_every_write_completed_before_it():
    def body(dev, tx):
        yield from dev.write(0, pat(1, 1024))
        yield from dev.write(8192, pat(2, 512))
        yield from dev.flush()

    trace = simulate(FnWriter(body), DeviceConfig(destage_latency_us=50))
    flush_io = trace.steps[-1].io_id
    before = cs.step_at(trace, after(trace, "flush_complete", flush_io) - 1)
    assert len(before.pending) == 2
    done = cs.step_at(trace, trace.n_steps)
    assert sorted(done.durable_ids) == [0, 1] and done.legal_count == 1
    # The flush really waited for media: every unit was destaged before it completed.
    assert len(trace.destages) == 3
    assert all(at < trace.n_steps for at, _, _ in trace.destages)


def test_writethrough_never_leaves_a_completed_write_pending():
    def body(dev, tx):
        procs = [dev.env.process(dev.write(512 * i, pat(i + 1, 1024))) for i in range(4)]
        yield from dev.write(0, pat(9, 2048))
        for p in procs:
            yield p

    trace = simulate(FnWriter(body), DeviceConfig(mode="writethrough"))
    assert trace.writethrough
    seen_pending = 0
    for step in cs.iter_steps(trace):
        for pw in step.pending:
            seen_pending += 1
            assert pw.complete_step is None, f"completed write {pw.io_id} pending at {step.p}"
    assert seen_pending > 0
    assert len(cs.step_at(trace, trace.n_steps).durable_ids) == 5


def test_fua_writing_back_an_older_version_while_a_newer_one_covers_it():
    # FUA io 0 spans units 0 and 1; unit 0 holds cached io 1, which it writes back first.
    # While that is on its way to media, io 2 arrives and covers io 1 in the cache: io 1
    # must still land (it is being written), with io 2 queued after it, not dropped.
    def body(dev, tx):
        def cached():
            yield from dev.write(512, pat(0xBB, 6 * 512))  # io 1: sectors 1-6
            yield from dev.write(0, pat(0xCC, 7 * 512))  # io 2: sectors 0-6
        dev.env.process(cached())
        yield from dev.write(7 * 512, pat(0xAA, 5 * 512), fua=True)  # io 0: sectors 7-11

    trace, dev = run_simulation(FnWriter(body), DeviceConfig(
        atomic_write_bytes=4096, write_latency_us=0, destage_latency_us=1000))
    dev.close()
    assert trace.failed is None
    assert [(io, rel) for _, io, rel in trace.destages] == [(1, 0), (2, 0), (0, 0), (0, 1)]
    assert dev.media.read(0, 12 * 512) == pat(0xCC, 7 * 512) + pat(0xAA, 5 * 512)
    assert dev.cached_bytes == 0


# -- atomic units -------------------------------------------------------------------

@pytest.mark.parametrize("atomic, units", [(4096, 1), (512, 8)])
def test_aligned_4k_write_tears_only_below_4k_atomic(atomic, units):
    def body(dev, tx):
        yield from dev.write(4096, pat(0xCC, 4096))

    trace = simulate(FnWriter(body), DeviceConfig(atomic_write_bytes=atomic,
                                                  destage_latency_us=SLOW_DESTAGE))
    step = cs.step_at(trace, trace.n_steps)
    (pw,) = step.pending
    assert pw.n_units == units and step.legal_count == 2 ** units
    states = cs.enumerate_states(step, 1000, seed=1, garbage=True)
    torn = [s for s in states if s.torn]
    if units == 1:
        assert torn == [] and len(states) == 2
        assert {s.state_id for s in states} == {f"p{step.p}:none", f"p{step.p}:w0"}
    else:
        tier_torn = [s for s in states if s.tier == "torn"]
        assert len([s for s in tier_torn if not s.garbage_units]) == 2 * (units - 1)
        assert f"p{step.p}:w0[0-2]" in {s.state_id for s in torn}
        assert len(states) == len({s.content_key for s in states})


def test_unaligned_write_tears_at_4k_atomic():
    def body(dev, tx):
        yield from dev.write(2048, pat(0xCC, 4096))

    trace = simulate(FnWriter(body), DeviceConfig(atomic_write_bytes=4096,
                                                  destage_latency_us=SLOW_DESTAGE))
    (pw,) = cs.step_at(trace, trace.n_steps).pending
    assert pw.n_units == 2 and pw.piece(0) == (2048, pat(0xCC, 2048))


def test_device_rejects_unaligned_writes():
    def body(dev, tx):
        yield from dev.write(100, b"x" * 512)

    trace = simulate(FnWriter(body), DeviceConfig())
    assert trace.failed is not None and trace.failed.startswith("DeviceError: write at "
                                                                "offset 0x64")
    assert trace.steps == []


def test_workload_error_is_recorded():
    def body(dev, tx):
        yield from dev.write(0, pat(1, 512))
        raise KeyError("boom")

    trace = simulate(FnWriter(body), DeviceConfig())
    assert trace.failed == "KeyError: 'boom'" and len(trace.steps) == 2


def test_bad_config_is_one_clear_error():
    with pytest.raises(DeviceError, match="atomic_write_bytes=1024: use 512 or 4096"):
        DeviceConfig(atomic_write_bytes=1024)
    with pytest.raises(DeviceError, match="unknown faults"):
        DeviceConfig(faults=frozenset({"bitrot"}))


# -- cache and destage --------------------------------------------------------------

def test_full_cache_blocks_a_write_until_destage_makes_room():
    def body(dev, tx):
        yield from dev.write(0, pat(1, 4096))
        yield from dev.write(8192, pat(2, 4096))
        yield from dev.write(65536 - 16384, pat(3, 16384))  # larger than the whole cache

    cfg = DeviceConfig(capacity_bytes=4096, write_latency_us=100, destage_latency_us=1000)
    trace = simulate(FnWriter(body), cfg)
    assert trace.failed is None
    assert time_of(trace, "write_complete", 0) == 100
    # The second write is ready at 200 but must wait for all 8 units of the first.
    assert time_of(trace, "write_submit", 1) == 100
    assert time_of(trace, "write_complete", 1) == 100 + 8 * 1000
    w1_done = after(trace, "write_complete", 1)
    assert [u for at, io, u in trace.destages if io == 0 and at < w1_done] == list(range(8))
    # The oversized write is admitted once the cache is empty, and completes.
    assert time_of(trace, "write_complete", 2) == 100 + 16 * 1000


@pytest.mark.parametrize("policy, expected", [("fifo", [0, 1, 2]),
                                              ("elevator", [1, 2, 0])])
def test_destage_policy_order(policy, expected):
    trace = simulate(FnWriter(_three_parallel_writes),
                     DeviceConfig(destage=policy, write_latency_us=10,
                                  destage_latency_us=100))
    assert ios_of(trace) == [0, 1, 2]  # at sectors 16, 0, 8
    assert [io for _, io, _ in trace.destages] == expected


def _three_parallel_writes(dev, tx):
    procs = [dev.env.process(dev.write(512 * s, pat(s + 1, 512))) for s in (16, 0, 8)]
    for p in procs:
        yield p
    yield from dev.flush()


def test_elevator_sweeps_upward_and_wraps():
    def body(dev, tx):
        first = dev.env.process(dev.write(8 * 512, pat(1, 512)))
        yield dev.env.timeout(40)  # the first unit is being destaged now
        low = dev.env.process(dev.write(0, pat(2, 512)))
        high = dev.env.process(dev.write(16 * 512, pat(3, 512)))
        for p in (first, low, high):
            yield p
        yield from dev.flush()

    for policy, expected in (("elevator", [0, 2, 1]), ("fifo", [0, 1, 2])):
        trace = simulate(FnWriter(body), DeviceConfig(destage=policy, write_latency_us=10,
                                                      destage_latency_us=100))
        assert [io for _, io, _ in trace.destages] == expected, policy


def test_random_destage_is_seeded():
    def order(seed):
        trace = simulate(FnWriter(_many_writes), DeviceConfig(destage="random", seed=seed,
                                                              destage_latency_us=100))
        return [(io, u) for _, io, u in trace.destages]

    assert order(7) == order(7)
    orders = {tuple(order(seed)) for seed in range(6)}
    assert len(orders) > 1
    assert all(sorted(o) == sorted(order(0)) for o in orders)


def _many_writes(dev, tx):
    for i in range(6):
        yield from dev.write(512 * 3 * i, pat(i + 1, 1024))
    yield from dev.flush()


def test_replaced_cache_version_passes_its_flush_to_the_new_one():
    def body(dev, tx):
        yield from dev.write(8 * 512, pat(1, 512))  # io 0: keeps the destager busy
        yield from dev.write(0, pat(2, 512))  # io 1, cached
        flush = dev.env.process(dev.flush())  # io 3 (its body starts after io 2's submit)
        yield from dev.write(0, pat(3, 512))  # io 2 replaces io 1 in the cache
        yield flush

    trace = simulate(FnWriter(body), DeviceConfig(write_latency_us=100,
                                                  destage_latency_us=1000))
    assert [(s.kind, s.io_id) for s in trace.steps][4:6] == [("write_submit", 2),
                                                             ("flush_submit", 3)]
    assert [io for _, io, _ in trace.destages] == [0, 2]  # io 1 never reaches media
    done = after(trace, "flush_complete", 3)
    assert time_of(trace, "flush_complete", 3) == 100 + 1000 + 1000 + 2000
    step = cs.step_at(trace, done)
    assert sorted(step.durable_ids) == [0, 1] and [pw.io_id for pw in step.pending] == [2]
    assert cs.enumerate_states(step, 1)[0].state_id == f"p{done}:w2"


def test_deadlocked_workload_is_reported():
    def body(dev, tx):
        yield from dev.write(0, pat(1, 512))
        yield dev.env.event()  # never triggered

    trace = simulate(FnWriter(body), DeviceConfig())
    assert trace.failed is not None and trace.failed.startswith("Deadlock")


def test_reads_see_cache_over_media():
    seen = {}

    def body(dev, tx):
        yield from dev.write(0, pat(0xAA, 1024))
        seen["read"] = dev.read(256, 1024)
        seen["media"] = dev.media.read(0, 1024)

    simulate(FnWriter(body, fill=OLD), DeviceConfig(destage_latency_us=SLOW_DESTAGE))
    assert seen["read"] == pat(0xAA, 768) + pat(OLD, 256)
    assert seen["media"] == pat(OLD, 1024)


def test_simulation_is_deterministic_and_records_times():
    def body(dev, tx):
        tx.start(0)
        yield from dev.write(0, pat(1, 2048))
        yield from dev.flush()
        tx.ack(0)

    cfg = DeviceConfig(destage="random", seed=5)
    t1, t2 = simulate(FnWriter(body), cfg), simulate(FnWriter(body), cfg)
    assert t1.steps == t2.steps and t1.destages == t2.destages
    assert [s.time_us for s in t1.steps] == [0, 100, 100, 100 + 4 * 20 + 2000]
    assert t1.tx_times == [("start", 0, 0.0), ("ack", 0, 2180.0)]
    assert [(m.kind, m.at_step) for m in t1.tx_marks] == [("start", 0), ("ack", 4)]


def test_resize_is_recorded_and_applied():
    def body(dev, tx):
        dev.resize(1 << 17)
        yield from dev.write((1 << 17) - 512, pat(5, 512), fua=True)

    trace, dev = run_simulation(FnWriter(body), DeviceConfig())
    assert trace.resizes == [(0, 1 << 17)] and dev.size_bytes == 1 << 17
    (state,) = cs.enumerate_states(cs.step_at(trace, trace.n_steps), 4)
    assert state.image.size_bytes == 1 << 17
    assert state.image.read((1 << 17) - 512, 512) == pat(5, 512)


# -- faults -------------------------------------------------------------------------

def test_lying_flush_makes_nothing_durable():
    def body(dev, tx):
        yield from dev.write(0, pat(0xAA, 512))
        yield from dev.flush()
        yield from dev.write(512, pat(0xBB, 512), fua=True)

    cfg = DeviceConfig(faults=frozenset({"lying_flush"}), destage_latency_us=SLOW_DESTAGE)
    trace = simulate(FnWriter(body), cfg)
    assert trace.lying_flush
    flush_io = trace.steps[2].io_id
    # Acknowledged after its latency although nothing could reach media.
    assert time_of(trace, "flush_complete", flush_io) == 100 + 2000
    step = cs.step_at(trace, trace.n_steps)
    assert list(step.durable_ids) == [2]  # only the FUA write (ios: w0, flush 1, w2)
    assert [pw.io_id for pw in step.pending] == [0]
    assert cs.build_state(trace, f"p{step.p}:none").image.read(0, 512) == bytes(512)


def test_garbage_units_differ_from_old_and_new():
    def body(dev, tx):
        yield from dev.write(0, pat(0x22, 2048))

    trace = simulate(FnWriter(body, fill=OLD), DeviceConfig(destage_latency_us=SLOW_DESTAGE))
    step = cs.step_at(trace, trace.n_steps)
    states = cs.enumerate_states(step, 500, garbage=True)
    with_garbage = [s for s in states if s.garbage_units]
    assert len(with_garbage) == 2 * 3  # prefix and suffix at each of 3 boundaries
    for s in with_garbage:
        for io, unit in s.garbage_units:
            got = s.image.read(512 * unit, 512)
            assert got not in (pat(OLD, 512), pat(0x22, 512))
            assert (io, unit) in s.torn
        again = cs.build_state(trace, s.state_id)
        assert again.image.read(0, 2048) == s.image.read(0, 2048)
    assert not any(s.garbage_units for s in cs.enumerate_states(step, 500))


# -- the device's own state agrees with the crash model ----------------------------

_op = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 11), st.integers(1, 4), st.booleans(),
              st.booleans()),
    st.tuples(st.just("f"), st.booleans()),
    st.tuples(st.just("d"), st.integers(1, 300)),
)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(_op, min_size=1, max_size=12),
       policy=st.sampled_from(["fifo", "random", "elevator"]),
       lying=st.booleans(), capacity=st.sampled_from([1024, 4096, 1 << 20]),
       atomic=st.sampled_from([512, 4096]))
def test_device_state_is_the_simulated_media_at_every_step(ops, policy, lying, capacity,
                                                           atomic):
    """Exact whenever each write covers whole units (always at 512; aligned at 4096)."""
    snapshots: list[bytes] = []
    scale = atomic // 512  # at 4096, writes are whole 4 KiB units
    size = 16 * 512 * scale

    def body(dev, tx):
        procs = []
        for n, op in enumerate(ops):
            if op[0] == "w":
                _, sector, count, fua, parallel = op
                gen = dev.write(512 * scale * sector, pat(n + 1, 512 * scale * count),
                                fua=fua)
            elif op[0] == "f":
                gen, parallel = dev.flush(), op[1]
            else:
                yield dev.env.timeout(op[1])
                continue
            if parallel:
                procs.append(dev.env.process(gen))
            else:
                yield from gen
        for p in procs:
            yield p

    faults = frozenset({"lying_flush"}) if lying else frozenset()
    cfg = DeviceConfig(atomic_write_bytes=atomic, destage=policy,
                       capacity_bytes=capacity * scale, faults=faults, seed=3,
                       write_latency_us=30, flush_latency_us=50, destage_latency_us=40)
    writer = FnWriter(body, size_bytes=size, fill=OLD)
    base = writer.format_image()
    trace = Trace(base=base)
    real_add = trace.add_step

    def add_step(kind, io, time_us=0.0):
        snapshots.append(dev.media.read(0, size))  # media at the crash point len(steps)
        real_add(kind, io, time_us)

    trace.add_step = add_step  # type: ignore[method-assign]
    env = simpy.Environment()
    dev = SimDevice(env, base.fork(), cfg, trace)
    env.run(until=env.process(writer.run(dev, _NoTx())))
    snapshots.append(dev.media.read(0, size))
    for step in cs.iter_steps(trace):
        (device_state,) = cs.enumerate_states(step, 1)
        assert device_state.tier == "device"
        assert device_state.image.read(0, size) == snapshots[step.p], device_state.state_id


class _NoTx:
    def start(self, tx):
        pass

    def ack(self, tx):
        pass


def test_a_finished_simulation_leaves_no_device_for_the_garbage_collector():
    """The device is freed as soon as it is dropped, not at the next full collection:
    an exploration that froze it with the live objects kept its media to the end."""
    import gc
    import weakref

    def body(dev, tx):
        yield from dev.write(0, pat(1, 512))

    gc.collect()
    gc.disable()  # only reference counting may free it here
    try:
        trace, dev = run_simulation(FnWriter(body), DeviceConfig())
        gone = weakref.ref(dev)
        dev.close()
        del dev
        assert gone() is None and trace.n_steps > 0
        simulate(FnWriter(body), DeviceConfig())
        assert not [o for o in gc.get_objects() if isinstance(o, SimDevice)]
    finally:
        gc.enable()
