"""Serial, process-pool and Dask LocalCluster runs give byte-identical results.json."""
from __future__ import annotations

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


def test_each_worker_walks_on_through_its_range_then_takes_half_of_the_largest_left():
    from crashsim.explore import ChunkPlan
    plan = ChunkPlan(12, 2)  # ranges 0-5 and 6-11
    assert plan.first_chunks() == [0, 6]
    assert [plan.after(0), plan.after(1), plan.after(2)] == [1, 2, 3]
    assert plan.after(6) == 7
    assert [plan.after(3), plan.after(4)] == [4, 5]
    assert plan.after(5) == 10  # range 0-5 is done: the upper half of 8-11, left by 7
    assert plan.after(7) == 8  # the owner keeps the lower half
    assert [plan.after(10), plan.after(8)] == [11, 9]
    assert plan.after(11) is None and plan.after(9) is None
    assert plan.drain() == []


def test_a_plan_gives_out_every_chunk_once_whatever_the_finishing_order():
    import random
    from crashsim.explore import ChunkPlan
    for seed in range(50):
        rng = random.Random(seed)
        n, workers = rng.randint(1, 40), rng.randint(1, 4)
        plan = ChunkPlan(n, workers)
        running, given = plan.first_chunks(), []
        given += running
        while running:
            done = running.pop(rng.randrange(len(running)))
            nxt = plan.after(done)
            if nxt is not None:
                running.append(nxt)
                given.append(nxt)
        assert sorted(given) == list(range(n)), seed


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
