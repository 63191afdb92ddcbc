"""Serial, process-pool and Dask LocalCluster runs give byte-identical results.json."""
from __future__ import annotations

import time

import pytest

from crashsim.results import dumps
from crashsim.runner import run_one
from crashsim.scenario import load_scenario

SCENARIO = """\
name: executors
device: {cache: {destage: random}}
writer: {kind: wal, defects: [commit-before-data-flush]}
workload:
  image: {virtual_size: 1MiB, log_size: 1MiB}
  ops:
    - log_write: {offset: 0, length: 2KiB, pattern: 0xa1}
    - log_write: {offset: 1KiB, length: 2KiB, pattern: 0xb2}
explore: {seed: 9, max_states_per_step: 32}
expect: {violations: [mixed]}
"""


def test_serial_process_and_dask_results_are_identical(tmp_path):
    pytest.importorskip("dask.distributed")
    path = tmp_path / "executors.yaml"
    path.write_text(SCENARIO)
    sc = load_scenario(path)
    serial = dumps(run_one(sc, str(path), workers=1))
    pool = dumps(run_one(sc, str(path), workers=2))
    dask = dumps(run_one(sc, str(path), workers=2, executor="dask"))
    assert serial == pool
    assert serial == dask
    assert '"mixed": 0' not in serial


def test_a_dask_worker_judges_each_run_against_that_run_s_trace(tmp_path):
    """A worker of a shared scheduler outlives a run. A trace recorded at run time
    differs between runs of one scenario (same hash), so the next run's chunks must not
    be judged against the context, and trace, the worker kept from the last one."""
    from crashsim.dask_executor import _explore_chunk
    from crashsim.device import simulate
    from crashsim.explore import build_context, device_config, judge_steps, make_writer
    path = tmp_path / "executors.yaml"
    path.write_text(SCENARIO)
    sc = load_scenario(path)
    other = sc.model_copy(update={"explore": sc.explore.model_copy(update={"seed": 4})})
    first = build_context(sc).trace
    second = simulate(make_writer(other), device_config(other))  # a "re-recording"
    steps = list(range(min(first.n_steps, second.n_steps) + 1))
    _explore_chunk(sc, first, steps)
    again = sc.model_copy()  # what the next run scatters: equal, not the same object
    assert _explore_chunk(again, second, steps) == \
        judge_steps(build_context(again, second), steps)
    assert judge_steps(build_context(sc, first), steps) != \
        judge_steps(build_context(sc, second), steps)  # the traces do judge differently


def test_each_worker_walks_its_lane_then_takes_the_upper_half_of_the_largest_left():
    from crashsim.lanes import Lanes
    lanes = Lanes(list(range(100, 112)), 2)  # lanes 100-105 and 106-111
    assert [lanes.claim(0), lanes.claim(0), lanes.claim(0)] == [100, 101, 102]
    assert lanes.claim(1) == 106
    assert [lanes.claim(0), lanes.claim(0), lanes.claim(0)] == [103, 104, 105]
    assert lanes.claim(0) == 109  # lane 0 is done: the upper half of 107-111
    assert lanes.claim(1) == 107  # the owner keeps the lower half
    assert [lanes.claim(0), lanes.claim(1)] == [110, 108]
    assert lanes.claim(0) == 111
    assert lanes.left() == 0
    assert lanes.claim(1) is None and lanes.claim(0) is None


def test_a_thief_takes_the_last_point_of_a_busy_lane():
    from crashsim.lanes import Lanes
    lanes = Lanes([0, 1, 2, 3], 2)
    assert [lanes.claim(1), lanes.claim(1)] == [2, 3]
    assert lanes.claim(0) == 0
    assert lanes.claim(1) == 1  # lane 0 is judging 0; its last point goes to lane 1
    assert lanes.claim(0) is None


def test_lanes_give_out_every_point_once_whatever_the_order_of_claims():
    import random
    from crashsim.lanes import Lanes
    for seed in range(60):
        rng = random.Random(seed)
        points = sorted(rng.sample(range(500), rng.randint(0, 60)))
        workers = rng.randint(1, 4)
        quiet = rng.sample(range(500), rng.randint(0, 30))
        lanes = Lanes(points, workers, quiet)
        claimed, active = [], list(range(workers))
        while active:
            lane = rng.choice(active)
            p = lanes.claim(lane)
            if p is None:
                active.remove(lane)
            else:
                claimed.append(p)
        assert sorted(claimed) == points, seed


def test_a_thief_takes_points_only_where_judging_them_is_worth_its_walk():
    from crashsim.lanes import Lanes
    lanes = Lanes(list(range(400)), 2)  # lanes 0-199 and 200-399
    assert [lanes.claim(1) for _ in range(200)] == list(range(200, 400))
    assert [lanes.claim(0) for _ in range(190)] == list(range(190))
    # 190-199 left: taking 195-199 means walking back from step 0 to 195; 5 * 16 < 195
    assert lanes.claim(1, steps_per_point=16) is None
    # where judging a point costs as much as walking 100 steps, 5 points are worth it
    assert lanes.claim(1, steps_per_point=100) == 195
    assert [lanes.claim(0) for _ in range(5)] == list(range(190, 195))
    early = Lanes(list(range(400)), 2)
    assert [early.claim(1) for _ in range(200)] == list(range(200, 400))
    assert early.claim(0) == 0
    assert early.claim(1, steps_per_point=16) == 100  # 1-199 left: worth a 100-step walk
    # Forward, the walk is the distance: one point is not worth 999 steps.
    sparse = Lanes([0, 1, 2, 3, 1000, 1001], 2)  # lanes 0-2 and 3, 1000, 1001
    assert [sparse.claim(0) for _ in range(3)] == [0, 1, 2]
    assert sparse.claim(1) == 3
    assert sparse.claim(0, steps_per_point=16) is None
    assert [sparse.claim(1), sparse.claim(1)] == [1000, 1001]


def test_a_worker_measures_what_a_step_walked_and_a_point_judged_cost_it():
    from crashsim.bench import bench_scenario
    from crashsim.explore import Pace, build_context, judge_claimed
    from crashsim.lanes import WALK_STEPS_PER_POINT
    ctx = build_context(bench_scenario(2))
    pace = Pace()
    assert pace.ratio() == WALK_STEPS_PER_POINT  # nothing measured yet
    claims = iter([3, 5, 2, None])
    out = judge_claimed(ctx, lambda: next(claims), pace)
    assert [r.step for r in out] == [3, 5, 2]
    assert (pace.points, pace.steps) == (3, 3 + 2 + 2)  # 2 is behind 5: walked from 0
    assert pace.walk_s > 0 and pace.judge_s > 0
    assert pace.ratio() == (pace.judge_s / 3) / (pace.walk_s / 7)


def test_a_slice_sends_back_what_it_judged_in_its_time_and_says_if_points_are_left(
        monkeypatch):
    from crashsim import explore
    from crashsim.bench import bench_scenario
    from crashsim.lanes import Lanes
    from crashsim.explore import build_context
    ctx = build_context(bench_scenario(2))
    n_points = ctx.trace.n_steps + 1
    monkeypatch.setattr(explore, "_WORKER", ctx)
    monkeypatch.setattr(explore, "_LANES", Lanes(list(range(n_points)), 1))
    monkeypatch.setattr(explore, "_LANE", None)
    first, more = explore._run_slice(0.0)  # out of time at once: one point all the same
    assert [r.step for r in first] == [0] and more
    rest, more = explore._run_slice(60.0)
    assert [r.step for r in rest] == list(range(1, n_points)) and not more
    assert explore._run_slice(60.0) == ([], False)


def test_a_worker_with_nothing_worth_taking_waits_until_every_point_is_claimed():
    """It must not give up early: the pool stops handing out tasks once a slice finds
    every point claimed, and a task the idle worker took and dropped would leave the
    owner without one."""
    import multiprocessing
    from crashsim.lanes import Lanes
    mp = multiprocessing.get_context("fork")
    lanes = Lanes.shared(list(range(400)), 2, mp=mp)
    owner_near_end, out = mp.Event(), mp.Queue()
    thief = mp.Process(target=_claim_after, args=(lanes, owner_near_end, out))
    thief.start()
    mine = [lanes.claim(0) for _ in range(197)]
    owner_near_end.set()
    time.sleep(0.2)  # the thief, done with its lane, looks at 197-199 meanwhile
    mine += [lanes.claim(0) for _ in range(3)]
    claimed, left_when_done = out.get(timeout=60)
    thief.join(60)
    assert mine == list(range(200)) and claimed == list(range(200, 400))
    assert left_when_done == 0


def _claim_after(lanes, go, out) -> None:
    go.wait(60)
    claimed = []
    while (p := lanes.claim(1, wait_s=0.001)) is not None:
        claimed.append(p)
    out.put((claimed, lanes.left()))


def test_lane_splits_move_to_quiet_points_within_an_eighth_of_the_range():
    from crashsim.lanes import Lanes
    lanes = Lanes(list(range(160)), 2, quiet=[74, 90])  # 80 is the even split
    assert lanes.claim(1) == 74  # 74 is 6 points off, within 160 / 16 = 10
    far = Lanes(list(range(160)), 2, quiet=[60])
    assert far.claim(1) == 80
    stolen = Lanes(list(range(64)), 2, quiet=[13, 40])
    assert [stolen.claim(1) for _ in range(32)] == list(range(32, 64))
    assert stolen.claim(1) == 13  # the upper half of 0-31 would start at 16; 13 is near


def test_workers_on_a_pool_share_lanes_in_shared_memory():
    import multiprocessing
    from crashsim.lanes import Lanes
    mp = multiprocessing.get_context("fork")
    lanes = Lanes.shared(list(range(300)), 2, mp=mp)
    out = mp.Queue()
    procs = [mp.Process(target=_claim_all, args=(lanes, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    got = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(60)
    # Not shared, each process would claim all 300 points.
    assert sorted(got[0] + got[1]) == list(range(300))


def _claim_all(lanes, out) -> None:
    lane, claimed = lanes.join(), []
    while (p := lanes.claim(lane)) is not None:
        claimed.append(p)
    out.put(claimed)


def test_chunk_boundaries_move_to_quiet_points_within_a_quarter_chunk(monkeypatch):
    from crashsim import explore
    from crashsim.explore import chunks
    monkeypatch.setattr(explore, "CHUNKS_PER_WORKER", 3)
    plain = chunks(120, 2)  # six chunks of twenty
    assert [p[0] for p in plain] == [0, 20, 40, 60, 80, 100]
    moved = chunks(120, 2, quiet=[18, 44, 70, 99])  # 70 is ten steps off: too far
    assert [p[0] for p in moved] == [0, 18, 44, 60, 80, 99]
    assert [x for p in moved for x in p] == list(range(120))
    resumed = chunks(120, 2, todo=[x for x in range(120) if x % 3], quiet=[20, 41])
    assert sorted(x for p in resumed for x in p) == [x for x in range(120) if x % 3]


def test_quiet_points_follow_flushes_with_nothing_in_flight():
    from crashsim.explore import quiet_points
    from crashsim.image import SparseImage
    from crashsim.trace import Trace
    t = Trace(base=SparseImage(4096), atomic_write_bytes=512)
    for kind, io in [("write_submit", 0), ("write_complete", 0), ("flush_submit", 1),
                     ("flush_complete", 1), ("write_submit", 2), ("flush_submit", 3),
                     ("flush_complete", 3), ("write_complete", 2), ("flush_submit", 4),
                     ("flush_complete", 4)]:
        t.add_step(kind, io)
    assert quiet_points(t) == [4, 10]  # the flush at step 6 completed with io 2 in flight


def test_a_pool_run_leaves_nothing_frozen_out_of_garbage_collection():
    """Objects are frozen while workers fork (so their collectors leave the inherited
    heap alone) and unfrozen after the run."""
    import gc
    from crashsim.bench import bench_scenario
    from crashsim.explore import build_context, explore_all
    ctx = build_context(bench_scenario(2, 4))
    assert gc.get_freeze_count() == 0
    steps = explore_all(ctx, 2)
    assert gc.get_freeze_count() == 0 and len(steps) == ctx.trace.n_steps + 1


def test_a_serial_run_freezes_what_it_built_as_it_goes_and_unfreezes_at_the_end(
        monkeypatch):
    import gc
    from crashsim import collector
    from crashsim.bench import bench_scenario
    from crashsim.explore import build_context, explore_all
    monkeypatch.setattr(collector, "FREEZE_EVERY_POINTS", 5)
    ctx = build_context(bench_scenario(2, 4))
    seen: list[int] = []
    assert gc.get_freeze_count() == 0
    steps = explore_all(ctx, 1, on_chunk=lambda chunk: seen.append(gc.get_freeze_count()))
    assert max(seen) > 0  # frozen while it ran
    assert gc.get_freeze_count() == 0 and len(steps) == ctx.trace.n_steps + 1


def test_an_interrupted_serial_run_unfreezes_too(monkeypatch):
    import gc
    from crashsim import collector
    from crashsim.bench import bench_scenario
    from crashsim.explore import ExploreInterrupted, build_context, explore_all
    monkeypatch.setattr(collector, "FREEZE_EVERY_POINTS", 5)
    ctx = build_context(bench_scenario(2, 4))

    def stop(chunk):
        if chunk[-1].step >= 20:
            raise KeyboardInterrupt

    with pytest.raises(ExploreInterrupted):
        explore_all(ctx, 1, on_chunk=stop)
    assert gc.get_freeze_count() == 0


def test_the_settler_freezes_every_so_many_points_and_releases_only_its_own_freeze():
    import gc
    from crashsim.collector import Settler
    with Settler(every=3) as settle:
        settle.tick()
        settle.tick()
        assert gc.get_freeze_count() == 0
        settle.tick()
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the caller's own freeze: a settler that never froze leaves it
    try:
        with Settler(every=3) as settle:
            settle.tick()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_pool_run_returns_once_its_pool_thread_and_workers_are_gone():
    """The pool is shut down waiting: ended without waiting, its thread could still be
    closing its pipe when the interpreter exited, and concurrent.futures' exit hook then
    wrote to the closed pipe (an EBADF traceback printed at exit)."""
    import multiprocessing
    import threading
    from concurrent.futures import process
    from crashsim.bench import bench_scenario
    from crashsim.explore import build_context, explore_all
    explore_all(build_context(bench_scenario(1, 2)), 2)
    assert not [t for t in threading.enumerate()
                if isinstance(t, process._ExecutorManagerThread)]
    assert multiprocessing.active_children() == []


def test_garbage_the_settler_froze_is_collected_once_it_releases():
    """A dead cycle (an earlier run's context) frozen with the live objects stays until
    the run ends, not for good."""
    import gc
    import weakref
    from crashsim.collector import Settler

    class Node:
        pass

    gc.disable()  # only the explicit collections below may free it
    try:
        node = Node()
        node.me = node
        dead = weakref.ref(node)
        del node
        with Settler(every=1) as settle:
            settle.tick()
            gc.collect()
            assert dead() is not None  # frozen: out of the collector's sight
        gc.collect()
        assert dead() is None
    finally:
        gc.enable()
