"""Exploration: simulate once, then judge the crash states of every I/O step.

The run is simulated one time; its trace is the only input to every crash state.
Steps are split into chunks and judged serially or by a pool of processes; chunk
results are merged in step order, so results are identical whatever the worker count.
Failing states are then shrunk in the parent, one per distinct violation.
"""
from __future__ import annotations

import gc
import inspect
import math
import time
from bisect import bisect_left
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from . import crashstates
from .blockdev import ImageDevice, run_sync
from .collector import Settler
from .device import DeviceConfig, simulate
from .errors import PluginError, plugin_line
from .interrupt import quiet_worker_signals, stop_signals_blocked
from .lanes import IDLE_POLL_S, WALK_STEPS_PER_POINT, Lanes
from .memory import MemoryCap
from .model import RangeModel
from .oracle import Judge, Verdict
from .pool import rejudge_lost, stop_pool
from .scenario import Scenario
from .trace import Trace
from .writers import load_writer_class

MAX_FAILURES_PER_STEP = 8
CHUNKS_PER_WORKER = 8  # chunks: Dask tasks, serial checkpoints, lost points judged again
# A pool worker sends back what it has judged this often: each send costs it about
# 2 ms (pickling, the parent's reading, the next task), about 1% at this period, and an
# interrupted run loses at most this much work a worker.
SLICE_S = 0.25
RECOVERY_SEP = "/r"


@dataclass
class Failure:
    state_id: str
    step: int
    tier: str
    outcome: str
    survivors: list[int]
    torn: list[tuple[int, int]]


@dataclass
class StepResult:
    step: int
    pending: int
    durable: int
    acked: int
    started: int
    legal: int
    legal_log10: float
    explored: int = 0
    recovery_explored: int = 0  # states cut during recovery's own I/O (not in legal)
    skipped: int = 0
    keys: list[str] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    heat: Counter = field(default_factory=Counter)
    paths: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    capped: bool = False  # the memory cap stopped judging: all legal states skipped
    notes: dict[str, str] = field(default_factory=dict)  # outcome -> why (worker-crash)


# -- the per-process context ----------------------------------------------------------

@dataclass
class Context:
    scenario: Scenario
    writer: object
    model: RangeModel
    trace: Trace
    judge: Judge
    walker: crashstates.StepWalker | None = None  # this process's place in the trace

    def steps_from(self, first: int) -> Iterator:
        if self.walker is None:
            self.walker = crashstates.StepWalker(self.trace)
        return self.walker.steps(first)


def make_writer(scenario: Scenario):
    if scenario.is_trace:  # a recorded trace: real tools or crashsim's own recovery
        from .writers.recorded import RecordedWriter
        return RecordedWriter(ops=scenario.ops(), seed=scenario.explore.seed,
                              scenario=scenario)
    cls = load_writer_class(scenario.writer.kind)
    w = scenario.workload
    image = {"virtual_size": w.image.virtual_size, "block_size": w.image.block_size,
             "log_size": w.image.log_size}
    try:
        return cls(ops=scenario.ops(), image=image, defects=list(scenario.writer.defects),
                   seed=scenario.explore.seed)
    except Exception as exc:
        raise PluginError(f"{_raised_at(exc, cls)}: writer {scenario.writer.kind!r}: "
                          f"{cls.__name__}(ops=..., image=..., defects=..., seed=...) "
                          f"raised {type(exc).__name__}: {exc}") from None


def _raised_at(exc: Exception, cls: type) -> str:
    """Where the plugin raised; for a call that never got into it (a constructor that
    does not take the protocol's arguments), where the class is defined."""
    where = plugin_line(exc)
    if not where.startswith(__file__):
        return where
    try:
        return f"{inspect.getsourcefile(cls)}:{inspect.getsourcelines(cls)[1]}"
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"


def device_config(scenario: Scenario) -> DeviceConfig:
    d = scenario.device
    return DeviceConfig(atomic_write_bytes=d.atomic_write_bytes, mode=d.cache.mode,
                        capacity_bytes=d.cache.capacity_bytes, destage=d.cache.destage,
                        write_latency_us=d.latency_us.write,
                        flush_latency_us=d.latency_us.flush,
                        destage_latency_us=d.latency_us.destage,
                        faults=frozenset(d.faults), seed=scenario.explore.seed)


def build_context(scenario: Scenario, trace: Trace | None = None,
                  source: str | None = None) -> Context:
    """``source``, the scenario's file, names where a recorded trace's errors point."""
    writer = make_writer(scenario)
    model = RangeModel(scenario.ops())
    if trace is None and scenario.is_trace:
        # A bad log, a failed recording or a missing tool is an input error (exit 2,
        # one line), never an internal one.
        from .errors import InputError
        from .dmlog import DmLogError
        from .external import CommandFailed, ToolMissing
        from .writers.recorded import TraceError
        try:
            trace = writer.load_trace()
        except (DmLogError, ToolMissing, CommandFailed, TraceError) as exc:
            raise InputError(_at_key(scenario, source, exc, str(exc))) from None
        except OSError as exc:
            raise InputError(_at_key(scenario, source, exc, f"{exc.filename or ''}: "
                                                            f"{exc.strerror}")) from None
    elif trace is None:
        trace = simulate(writer, device_config(scenario))
    return Context(scenario, writer, model, trace, Judge(writer, model, device=trace))


def _at_key(scenario: Scenario, source: str | None, exc: Exception, text: str) -> str:
    """A recorded trace's error at the scenario line it comes from (the ``trace`` key,
    or the model op that matches nothing); by the scenario's name without a file."""
    from .external import ToolMissing
    if source is None:
        return f"{scenario.name}: {text}"
    if isinstance(exc, ToolMissing):  # the fix is an install, not a line
        return f"{source}: {text}"
    from .scenario import line_of
    loc = getattr(exc, "loc", ()) or ("trace",)
    return f"{source}:{line_of(source, loc)}: {text}"


# -- judging the states of a chunk of steps -------------------------------------------

def explore_steps(ctx: Context, steps: Iterable[int]) -> list[StepResult]:
    return list(iter_results(ctx, steps))


def iter_results(ctx: Context, steps: Iterable[int]) -> Iterator[StepResult]:
    """Judge the wanted crash points; the trace is walked once, up to the last of them."""
    wanted = set(steps)
    last = max(wanted, default=-1)
    for st in crashstates.iter_steps(ctx.trace, min(wanted, default=0)):
        if st.p in wanted:
            yield _explore_step(ctx, st)
        if st.p >= last:
            break


def _explore_step(ctx: Context, st) -> StepResult:
    ex = ctx.scenario.explore
    trace = ctx.trace
    acked, started = trace.acked(st.p), trace.started(st.p)
    res = StepResult(st.p, len(st.pending), len(st.durable_ids), acked, started,
                     st.legal_count, st.legal_log10)
    garbage = "garbage" in ctx.scenario.device.faults
    states = crashstates.enumerate_states(st, ex.max_states_per_step, ex.seed,
                                          garbage=garbage)
    # Garbage states are extra to the legal count: counting them as explored would hide
    # clean legal states that the budget never reached.
    clean = sum(1 for cs in states if not cs.garbage_units)
    res.skipped = max(0, st.legal_count - clean)
    for cs in states:
        key = _key(cs)
        verdict = ctx.judge.judge(lambda: cs.image, acked, started, key=key)
        _count(res, cs, verdict, key)
        if ex.recovery_crash:
            _recovery_crash(ctx, res, cs, acked, started)
    return res


def _key(cs) -> str:
    return getattr(cs, "content_key", None) or cs.image.content_key()


def _count(res: StepResult, cs, verdict: Verdict, key: str,
           during_recovery: bool = False) -> None:
    if during_recovery:
        res.recovery_explored += 1
    else:
        res.explored += 1
        res.keys.append(key)
    res.outcomes[verdict.outcome] += 1
    res.heat[(cs.torn_count, len(cs.survivors), verdict.outcome)] += 1
    for branch in verdict.examined.recovery.branches:
        res.paths[branch] += 1
    if not verdict.passed and len(res.failures) < MAX_FAILURES_PER_STEP:
        res.failures.append(Failure(cs.state_id, res.step, cs.tier, verdict.outcome,
                                    sorted(cs.survivors), sorted(cs.torn)))


def _recovery_crash(ctx: Context, res: StepResult, cs, acked: int, started: int) -> None:
    """Cut power at every step of this state's own recovery, then recover again."""
    ex = ctx.judge.examine(cs.image, key=_key(cs), record=True)
    rtrace = ex.recovery_trace
    if rtrace is None or not rtrace.steps:
        return
    budget = ctx.scenario.explore.recovery_states_per_step
    for rst in crashstates.iter_steps(rtrace):
        if rst.p == 0:
            continue  # nothing of recovery has happened yet: that is cs itself
        # Recovery runs on the same device: a tear of its own writes can read as garbage.
        for rcs in crashstates.enumerate_states(rst, budget, ctx.scenario.explore.seed,
                                                garbage="garbage" in
                                                ctx.scenario.device.faults):
            rcs.state_id = cs.state_id + RECOVERY_SEP + rcs.state_id
            rcs.tier = "recovery-" + rcs.tier
            key = _key(rcs)
            verdict = ctx.judge.judge(rcs.image, acked, started, key=key)
            _count(res, rcs, verdict, key, during_recovery=True)


# -- rebuilding any state from its ID -------------------------------------------------

def crash_point(ctx: Context, state_id: str) -> int:
    """The crash point whose acknowledged and started counts judge a state: for one cut
    during recovery, the step of the state recovery started from, not recovery's own."""
    return crashstates.parse_state_id(ctx.trace, state_id.partition(RECOVERY_SEP)[0]).p


def build_any(ctx: Context, state_id: str):
    """The crash state an ID names, including states cut during recovery."""
    outer, sep, inner = state_id.partition(RECOVERY_SEP)
    cs = crashstates.build_state(ctx.trace, outer)
    if not sep:
        return cs
    ex = ctx.judge.examine(cs.image, record=True)
    rcs = crashstates.build_state(ex.recovery_trace, inner)
    rcs.state_id = state_id
    return rcs


# -- orchestration --------------------------------------------------------------------
# Chunks of crash points are judged serially, by a process pool or on Dask; results are
# merged by step, so they do not depend on which. Each finished chunk is handed to
# ``on_chunk`` (the checkpoint) as it arrives. Ctrl-C/SIGTERM stops the pool at once and
# raises ExploreInterrupted with every step judged so far.

_WORKER: Context | None = None


class ExploreInterrupted(KeyboardInterrupt):
    """The run was interrupted; ``done`` holds the steps judged (or saved) so far."""

    def __init__(self, done: list[StepResult]):
        super().__init__(f"interrupted with {len(done)} crash points judged")
        self.done = done


_FORKED_FROM: Context | None = None  # the parent's context while its pool starts
_LANES: Lanes | None = None  # a pool worker's share of the crash points
_LANE: int | None = None
_PACE: "Pace | None" = None
_SETTLER: Settler | None = None  # a pool worker's; never released: the process ends


def _init_worker(scenario: Scenario, trace: Trace, lanes: Lanes | None = None) -> None:
    global _WORKER, _LANES, _LANE, _SETTLER
    quiet_worker_signals()
    _LANES, _LANE, _SETTLER = lanes, None, Settler()
    parent = _FORKED_FROM
    if parent is not None and parent.scenario is scenario and parent.trace is trace:
        _WORKER = parent  # forked: the parent's writer, model and judge are already here
    else:
        _WORKER = build_context(scenario, trace)


def _run_slice(seconds: float) -> tuple[list[StepResult], bool]:
    """The crash points of this worker's lane (or stolen ones) judged in about
    ``seconds``, and whether any are left to claim."""
    global _LANE, _PACE
    assert _WORKER is not None and _LANES is not None
    if _LANE is None:
        _LANE, _PACE = _LANES.join(), Pace()
    lanes, lane, pace = _LANES, _LANE, _PACE
    claimed_all = False

    def claim() -> int | None:
        nonlocal claimed_all
        p = lanes.claim(lane, IDLE_POLL_S, pace.ratio())
        claimed_all = p is None
        if p is not None and _SETTLER is not None:
            _SETTLER.tick()
        return p

    out = judge_claimed(_WORKER, claim, pace=pace, until=time.perf_counter() + seconds)
    return out, not claimed_all


class Pace:
    """What walking a step and judging a crash point have cost this worker so far: a
    thief weighs a steal by them (points judged by an external tool cost thousands of
    steps; the bench's cost a few dozen)."""

    def __init__(self) -> None:
        self.walk_s = self.judge_s = 0.0
        self.steps = self.points = 0

    def ratio(self) -> float:
        if not (self.steps and self.points and self.walk_s > 0):
            return WALK_STEPS_PER_POINT
        return (self.judge_s / self.points) / (self.walk_s / self.steps)


def judge_claimed(ctx: Context, claim: Callable[[], int | None],
                  pace: Pace | None = None, until: float | None = None
                  ) -> list[StepResult]:
    """Judge the crash points ``claim`` gives, in the order given, under the memory
    cap, until it gives None or ``time.perf_counter()`` reaches ``until`` (after one
    point at least)."""
    cap = MemoryCap(ctx.scenario.explore.max_memory_mib, ctx.judge)
    pace = pace or Pace()
    out: list[StepResult] = []
    while until is None or not out or time.perf_counter() < until:
        p = claim()
        if p is None:
            break
        at = ctx.walker.at if ctx.walker is not None else None
        t0 = time.perf_counter()
        st = next(ctx.steps_from(p))
        t1 = time.perf_counter()
        out.append(capped_step(ctx, st) if cap.exceeded() else _explore_step(ctx, st))
        pace.walk_s += t1 - t0
        pace.steps += p - at if at is not None and at <= p else p
        pace.judge_s += time.perf_counter() - t1
        pace.points += 1
    return out


def judge_steps(ctx: Context, steps: Iterable[int]) -> list[StepResult]:
    return list(iter_judged(ctx, steps))


def iter_judged(ctx: Context, steps: Iterable[int]) -> Iterator[StepResult]:
    """``iter_results`` under the memory cap: once this process is over it (after
    dropping its judge cache), the rest of the steps are skipped, marked ``capped``."""
    cap = MemoryCap(ctx.scenario.explore.max_memory_mib, ctx.judge)
    begin = getattr(ctx.judge, "begin_step", None)  # the guarded judge counts its calls
    wanted = set(steps)
    last = max(wanted, default=-1)
    for st in ctx.steps_from(min(wanted, default=0)):
        if st.p in wanted:
            if cap.exceeded():
                yield capped_step(ctx, st)
            else:
                if begin is not None:
                    begin(st.p)
                yield _explore_step(ctx, st)
        if st.p >= last:
            break


def capped_step(ctx: Context, st) -> StepResult:
    """A crash point not judged for the memory cap: every legal state is skipped."""
    return StepResult(st.p, len(st.pending), len(st.durable_ids), ctx.trace.acked(st.p),
                      ctx.trace.started(st.p), st.legal_count, st.legal_log10,
                      skipped=st.legal_count, capped=True)


def chunks(n_points: int, workers: int, todo: list[int] | None = None,
           quiet: list[int] | None = None) -> list[list[int]]:
    """Contiguous chunks of crash points (of ``todo`` when given), CHUNKS_PER_WORKER per
    worker: Dask tasks, or the results a serial run saves as it goes. A worker walks on
    from one chunk to the next when they come in order, so small chunks cost little
    locality and let the load even out at the end. A chunk boundary moves to the
    nearest ``quiet`` point within a quarter chunk, if any.
    """
    points = list(range(n_points)) if todo is None else sorted(todo)
    size = max(1, math.ceil(len(points) / (workers * CHUNKS_PER_WORKER)))
    starts = [_snapped(i, size, points, quiet) for i in range(size, len(points), size)]
    edges = [0] + sorted(set(starts)) + [len(points)]
    return [points[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def _snapped(i: int, size: int, points: list[int], quiet: list[int] | None) -> int:
    """Index ``i`` in ``points``, or that of the nearest quiet point a quarter chunk away
    at most. The steps between two quiet points mostly share their pending writes, and
    so their crash states: a boundary among them made both workers judge the same torn
    states (with three chunks a worker, moving boundaries by two steps took the 2-worker
    run from 0.59-0.65 s to 0.57 s at best)."""
    if not quiet:
        return i
    reach = size // 4
    near = [q for q in quiet if abs(q - points[i]) <= reach]
    if not near:
        return i
    best = min(near, key=lambda q: (abs(q - points[i]), q))
    j = bisect_left(points, best)
    return j if 0 < j < len(points) and points[j] == best else i


def quiet_points(trace: Trace) -> list[int]:
    """Crash points right after a flush completes with no write in flight."""
    in_flight, out = 0, []
    for i, step in enumerate(trace.steps):
        if step.kind == "write_submit":
            in_flight += 1
        elif step.kind == "write_complete":
            in_flight -= 1
        elif step.kind == "flush_complete" and in_flight == 0:
            out.append(i + 1)
    return out


def explore_all(ctx: Context, workers: int = 1,
                progress: Callable[[int, int], None] | None = None,
                executor: str = "process", scheduler: str | None = None, *,
                saved: list[StepResult] | None = None,
                on_chunk: Callable[[list[StepResult]], None] | None = None,
                isolated: bool = False) -> list[StepResult]:
    """Every crash point's result, in step order; those in ``saved`` are not judged.
    ``isolated`` judges in a worker process even with one worker, as a process pool
    does: a plugin that kills the process judging it then costs a state, not the run."""
    n_points = ctx.trace.n_steps + 1
    done = {r.step: r for r in saved or []}
    todo = [p for p in range(n_points) if p not in done]

    def collect(chunk: list[StepResult]) -> None:
        for res in chunk:
            done[res.step] = res
        if on_chunk:
            on_chunk(chunk)
        if progress:
            progress(len(done), n_points)

    try:
        if not todo:
            pass
        elif executor == "dask":
            parts = chunks(n_points, workers, todo, quiet_points(ctx.trace))
            _explore_dask(ctx, parts, workers, scheduler, collect)
        elif workers <= 1 and not isolated:
            _explore_serial(ctx, chunks(n_points, 1, todo), collect)
        else:
            _explore_pool(ctx, todo, max(workers, 1), collect)
    except KeyboardInterrupt:
        raise ExploreInterrupted([done[p] for p in sorted(done)]) from None
    return [done[p] for p in sorted(done)]


def _explore_serial(ctx: Context, parts: list[list[int]],
                    collect: Callable[[list[StepResult]], None]) -> None:
    """One walk over the trace; each chunk is handed on when its last step is done."""
    ends = {part[-1] for part in parts}
    chunk: list[StepResult] = []
    with Settler() as settle:
        for res in iter_judged(ctx, [p for part in parts for p in part]):
            settle.tick()
            chunk.append(res)
            if res.step in ends:
                collect(chunk)
                chunk = []


def _explore_dask(ctx: Context, parts: list[list[int]], workers: int,
                  scheduler: str | None,
                  collect: Callable[[list[StepResult]], None]) -> None:
    """Chunks as Dask tasks; chunks whose worker died are judged again here, as for a
    broken pool (the plugin is importable here: this process built the context)."""
    from .dask_executor import map_chunks
    lost: list[list[int]] = []
    for part, chunk in map_chunks(ctx.scenario, ctx.trace, parts, scheduler, workers):
        if chunk is None:
            lost.append(part)
        else:
            collect(chunk)
    if lost:
        rejudge_lost(ctx, lost, collect)


def _explore_pool(ctx: Context, todo: list[int], workers: int,
                  collect: Callable[[list[StepResult]], None]) -> None:
    """Crash points on a process pool whose workers share them out by lanes; each task
    judges for SLICE_S and more tasks wait in the queue, so a worker never waits for
    the parent. Points lost to a dead worker are judged again afterwards, isolating the
    states that kill the process."""
    global _FORKED_FROM
    _FORKED_FROM = ctx  # a forked worker inherits it; a spawned one builds its own
    lanes = Lanes.shared(todo, workers, quiet_points(ctx.trace))
    pool = ProcessPoolExecutor(workers, initializer=_init_worker,
                               initargs=(ctx.scenario, ctx.trace, lanes))
    judged: set[int] = set()
    pending: set = set()

    def submit() -> bool:
        try:  # a worker that died, even while starting, breaks the pool
            pending.add(pool.submit(_run_slice, SLICE_S))
            return True
        except BrokenProcessPool:
            return False

    # Frozen objects are left out of collections, so a forked worker's collector does
    # not write to every object it inherits (copying each page it touches): a 2-worker
    # run took 2 to 3% less CPU time (median of 16 paired runs of 40 writes).
    gc.freeze()  # workers fork at the first submit
    try:
        with stop_signals_blocked():  # the workers fork here
            broken = not all([submit() for _ in range(2 * workers)])
        while pending:
            finished, still = wait(pending, return_when=FIRST_COMPLETED)
            pending.intersection_update(still)
            for fut in finished:
                try:
                    chunk, more = fut.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                if more and not broken:
                    broken = not submit()
                judged.update(res.step for res in chunk)
                collect(chunk)
        # Waited for (5 to 7 ms): with wait=False the pool's thread could still be
        # closing its wakeup pipe when the interpreter exits, and concurrent.futures'
        # exit hook then writes to the closed pipe (EBADF, printed at exit).
        pool.shutdown()
    except BaseException:
        stop_pool(pool)
        raise
    finally:
        _FORKED_FROM = None
        gc.unfreeze()
    lost = [p for p in todo if p not in judged]
    if lost:
        size = max(1, math.ceil(len(todo) / (workers * CHUNKS_PER_WORKER)))
        rejudge_lost(ctx, [lost[i:i + size] for i in range(0, len(lost), size)], collect)


def shrink_failure(ctx: Context, failure: Failure):
    """A smallest state that fails with the same outcome as ``failure``."""
    outer, sep, inner = failure.state_id.partition(RECOVERY_SEP)
    acked, started = ctx.trace.acked(failure.step), ctx.trace.started(failure.step)

    def fails(cs) -> bool:
        return ctx.judge.judge(cs.image, acked, started, key=_key(cs)).outcome == \
            failure.outcome

    if not sep:
        return crashstates.shrink(ctx.trace, crashstates.build_state(ctx.trace, outer),
                                  fails)
    base = crashstates.build_state(ctx.trace, outer)
    rtrace = ctx.judge.examine(base.image, record=True).recovery_trace
    small = crashstates.shrink(rtrace, crashstates.build_state(rtrace, inner), fails)
    small.state_id = outer + RECOVERY_SEP + small.state_id
    return small


def replay_device(ctx: Context, state) -> ImageDevice:
    """A device holding the recovered image of ``state``, for inspection."""
    dev = ImageDevice(state.image.fork())
    run_sync(ctx.writer.recover(dev))
    return dev
