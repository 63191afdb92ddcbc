"""Worker processes: stopping a pool at once, and surviving workers that die.

A plugin's recovery may kill the process judging it: ``os._exit``, a segfault in a C
extension, the OOM killer. The pool then breaks and every chunk it was judging is lost.
``rejudge_lost`` judges those chunks again, one at a time, each in a fresh one-process
pool whose judge publishes in shared memory which call of which crash point it is in.
When that process dies too, the call it was in is recorded as a ``worker-crash`` state
(with how the process died) and the chunk runs again from that crash point, with that
call answered without judging. Bounds keep a plugin that always dies from making this
endless: past them, the remaining calls count as ``worker-crash`` unjudged, and say so.
"""
from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable

from .interrupt import quiet_worker_signals, stop_signals_blocked
from .oracle import Examined, Verdict, classify
from .writers.base import Recovery

WORKER_CRASH = "worker-crash"
MAX_CRASHES_PER_STEP = 8     # then the rest of that crash point is not judged
MAX_CRASHES = 64             # then nothing more of the lost chunks is judged
STOP_JOIN_S = 10.0


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started, end the workers now (SIGTERM), and reap them."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(STOP_JOIN_S)


def how_it_died(exitcode: int | None) -> str:
    if exitcode is None:
        return "for an unknown reason"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


# -- which judge calls killed a worker ----------------------------------------------------

@dataclass
class CrashLog:
    """Judge calls known to kill a worker: crash point -> call number -> detail."""

    calls: dict[int, dict[int, str]] = field(default_factory=dict)
    rest: dict[int, tuple[int, str]] = field(default_factory=dict)  # step: (from call, why)
    everything: str | None = None  # judge nothing more: every call answers with this
    deaths: int = 0

    def detail(self, step: int, call: int) -> str | None:
        if self.everything is not None:
            return self.everything
        found = self.calls.get(step, {}).get(call)
        if found is None and step in self.rest and call >= self.rest[step][0]:
            found = self.rest[step][1]
        return found

    def record(self, step: int, call: int, detail: str) -> None:
        self.deaths += 1
        here = self.calls.setdefault(step, {})
        if len(here) < MAX_CRASHES_PER_STEP:
            here[call] = detail
        else:
            self.rest[step] = (call, f"not judged: {len(here)} other states of this crash "
                                     f"point already killed the worker process")
        if self.deaths >= MAX_CRASHES:
            self.everything = (f"not judged: worker processes died {self.deaths} times "
                               f"in this scenario; crashsim stopped judging lost chunks")

    def give_up_on(self, steps: list[int], why: str) -> None:
        for p in steps:
            self.rest[p] = (0, why)

    def judges_nothing(self, steps: list[int]) -> bool:
        """True when every judge call of ``steps`` is answered from this log, so they
        can be run in the parent process: no plugin code is called."""
        return self.everything is not None or all(
            self.rest.get(p, (1,))[0] == 0 for p in steps)


class _Died(Examined):
    """The answer for a call known to kill the process: no recovery ran."""


class GuardedJudge:
    """A Judge that writes (step, call) to shared memory around every real call, and
    answers calls in the CrashLog with ``worker-crash`` without making them."""

    def __init__(self, judge, where, log: CrashLog):
        self._judge, self._where, self._log = judge, where, log
        self._step, self._calls = -1, 0
        self._keys: dict[object, str] = {}
        self.details: dict[int, list[str]] = {}

    def __getattr__(self, name: str):
        return getattr(self._judge, name)

    def begin_step(self, p: int) -> None:
        self._step, self._calls = p, 0

    def judge(self, image, acked: int, started: int, key: object | None = None,
              record: bool = False) -> Verdict:
        ex = self.examine(image, key, record)
        if isinstance(ex, _Died):
            return Verdict(WORKER_CRASH, [], ex.error or "", ex)
        return classify(ex, acked, started)

    def examine(self, image, key: object | None = None, record: bool = False) -> Examined:
        call = self._calls
        self._calls += 1
        why = self._log.detail(self._step, call)
        if why is None and key is not None:
            why = self._keys.get(key)  # content that killed a worker: same again
        if why is not None:
            if key is not None:
                self._keys[key] = why
            self.details.setdefault(self._step, []).append(why)
            return _Died(Recovery(branches=[WORKER_CRASH]), error=why)
        self._where[0], self._where[1] = self._step, call
        try:
            return self._judge.examine(image, key, record)
        finally:
            self._where[0] = -1


# -- the guarded worker -------------------------------------------------------------------

_GUARDED = None


def _init_guarded(scenario, trace, where, log: CrashLog) -> None:
    global _GUARDED
    quiet_worker_signals()
    from .explore import build_context
    _GUARDED = _guard(build_context(scenario, trace), where, log)


def _guard(ctx, where, log: CrashLog):
    import dataclasses
    return dataclasses.replace(ctx, judge=GuardedJudge(ctx.judge, where, log))


def _judge_guarded(ctx, steps: list[int]) -> list:
    from .explore import judge_steps
    results = judge_steps(ctx, steps)
    for res in results:
        why = ctx.judge.details.get(res.step)
        if why:
            res.notes[WORKER_CRASH] = "; ".join(dict.fromkeys(why))
    return results


def _run_guarded_chunk(steps: list[int]) -> list:
    return _judge_guarded(_GUARDED, steps)


class WorkerDied(Exception):
    def __init__(self, step: int, call: int, how: str):
        super().__init__(f"worker died ({how}) at step {step}, call {call}")
        self.step, self.call, self.how = step, call, how


def _in_fresh_process(ctx, steps: list[int], log: CrashLog) -> list:
    mp = multiprocessing.get_context()
    where = mp.RawArray("q", [-1, -1])
    pool = ProcessPoolExecutor(1, mp_context=mp, initializer=_init_guarded,
                               initargs=(ctx.scenario, ctx.trace, where, log))
    try:
        with stop_signals_blocked():  # the worker forks here
            fut = pool.submit(_run_guarded_chunk, steps)
        procs = list((getattr(pool, "_processes", None) or {}).values())
        try:
            return fut.result()
        except BrokenProcessPool:
            pool.shutdown(wait=True)  # the pool reaps its dead worker: exit code known
            code = next((p.exitcode for p in procs if p.exitcode), None)
            raise WorkerDied(where[0], where[1], how_it_died(code)) from None
    finally:
        stop_pool(pool)


def rejudge_lost(ctx, parts: list[list[int]],
                 collect: Callable[[list], None]) -> None:
    """Judge chunks lost with a broken pool, isolating the states that kill workers."""
    log = CrashLog()
    queue = [list(p) for p in sorted(parts)]
    died_outside: set[tuple[int, ...]] = set()
    while queue:
        part = queue.pop(0)
        if log.judges_nothing(part):
            collect(_judge_guarded(_guard(ctx, [-1, -1], log), part))
            continue
        try:
            collect(_in_fresh_process(ctx, part, log))
        except WorkerDied as died:
            if died.step < 0:
                # Not while judging: starting up, or the OOM killer. Once more, then the
                # chunk is recorded unjudged (in this process: no judge call is made).
                if tuple(part) in died_outside:
                    log.give_up_on(part, f"not judged: the worker process died "
                                         f"({died.how}) outside any judge call, twice")
                died_outside.add(tuple(part))
                queue.insert(0, part)
                continue
            log.record(died.step, died.call, f"the worker process died ({died.how}) "
                                             f"while judging this state")
            before = [p for p in part if p < died.step]
            after = [p for p in part if p >= died.step]
            queue[:0] = [x for x in (before, after) if x]



# -- shrinking after a worker died ---------------------------------------------------------

def _build_in_child(scenario, trace, steps: list, path: str, complete: bool) -> dict:
    from .explore import build_context
    from .results import build_results
    return build_results(build_context(scenario, trace), steps, path, complete)


def build_results_guarded(ctx, steps: list, path: str, complete: bool = True) -> dict:
    """``build_results`` in a child process: shrinking judges new states, and this
    scenario has states that kill the process judging them. If the child dies too, the
    results are built here unshrunk, which judges only states that were judged safely."""
    from .results import build_results
    pool = ProcessPoolExecutor(1, initializer=quiet_worker_signals)
    try:
        with stop_signals_blocked():  # the worker forks here
            fut = pool.submit(_build_in_child, ctx.scenario, ctx.trace, steps, path,
                              complete)
        return fut.result()
    except BrokenProcessPool:
        return build_results(ctx, steps, path, complete, shrink=False)
    finally:
        stop_pool(pool)
