"""Lanes: how the workers of a process pool share out the crash points, among
themselves, without asking the parent.

The crash points to judge are split into one contiguous lane per worker. A worker
takes the points of its lane one at a time, walking on through the trace with warm
caches. A worker whose lane is empty takes the upper half of the largest lane left,
whose owner keeps the lower half. The bounds live in shared memory under one lock, so
a worker never waits for the parent between two crash points: handing chunks out from
the parent cost 2 to 4 ms of idle per chunk, and the last chunks left one worker idle
while the other finished.

A steal costs the thief a walk: forward from its last point to the first point it
takes, or from step 0 when that point lies behind it (a walker cannot step back). A
thief takes points only when judging them is worth more than the walk, as the worker
has measured the two so far; otherwise it waits and the owner finishes. Taking the
last few points of the lane below, after a walk back over half the trace, had made
the thief the last to finish.

Which worker judges which point never changes a result; only the order of the work
does. The parent merges results by crash point.
"""
from __future__ import annotations

import multiprocessing
import time
from bisect import bisect_left
from contextlib import AbstractContextManager, nullcontext
from typing import MutableSequence

SPLIT_REACH = 8  # a split moves to a quiet point an eighth of the range away at most
# Until a worker has measured its own: judging a crash point costs about as much as
# walking this many steps (bench workload: 0.6 to 1.7 ms per point, 36 us per step).
WALK_STEPS_PER_POINT = 16
IDLE_POLL_S = 0.002  # how often a worker with nothing worth taking looks again


class Lanes:
    """Lane bounds ``[lo, hi)`` as indices into ``points``, two numbers per lane; then
    the number of lanes given out; then each lane's last point claimed (-1: none)."""

    def __init__(self, points: list[int], workers: int, quiet: list[int] | None = None,
                 bounds: MutableSequence[int] | None = None,
                 lock: AbstractContextManager | None = None):
        self.points = list(points)
        self.quiet = sorted(set(quiet or [])) or None
        workers = max(1, workers)
        self._bounds = bounds if bounds is not None else [0] * _slots(workers)
        self._lock = lock if lock is not None else nullcontext()
        self._n_lanes = workers
        n = len(self.points)
        reach = n // (SPLIT_REACH * workers)
        edges = [0] + [self._split(n * i // workers, 0, n, reach)
                       for i in range(1, workers)] + [n]
        for lane in range(workers):
            self._bounds[2 * lane] = edges[lane]
            self._bounds[2 * lane + 1] = max(edges[lane], edges[lane + 1])
            self._bounds[2 * workers + 1 + lane] = -1

    @classmethod
    def shared(cls, points: list[int], workers: int, quiet: list[int] | None = None,
               mp=multiprocessing) -> "Lanes":
        """Lanes whose bounds every forked or spawned worker of ``mp`` sees."""
        return cls(points, workers, quiet, mp.RawArray("q", _slots(workers)),
                   mp.Lock())

    def join(self) -> int:
        """A lane for the calling worker: lanes are given out in turn."""
        with self._lock:
            k = self._bounds[2 * self._n_lanes]
            self._bounds[2 * self._n_lanes] = k + 1
            return k % self._n_lanes

    def claim(self, lane: int, wait_s: float | None = None,
              steps_per_point: float = WALK_STEPS_PER_POINT) -> int | None:
        """The next crash point for the worker of ``lane``; None once every point is
        claimed. A worker with no point worth taking yet waits for the others to claim
        theirs, polling every ``wait_s``: it must not return early, or the pool would
        stop handing out tasks the owners still need. With ``wait_s`` None (one process
        claiming for every lane) it returns None at once instead. ``steps_per_point``:
        how many steps walked cost as much as judging one point."""
        while True:
            with self._lock:
                point = self._claim_locked(lane, steps_per_point)
                if point is not None or wait_s is None or self._left_locked() == 0:
                    return point
            time.sleep(wait_s)

    def _claim_locked(self, lane: int, steps_per_point: float) -> int | None:
        b = self._bounds
        lo, hi = b[2 * lane], b[2 * lane + 1]
        if lo >= hi:
            lo, hi = self._steal(lane, steps_per_point)
            if lo >= hi:
                return None
        b[2 * lane], b[2 * lane + 1] = lo + 1, hi
        b[2 * self._n_lanes + 1 + lane] = self.points[lo]
        return self.points[lo]

    def left(self) -> int:
        """Crash points not claimed yet."""
        with self._lock:
            return self._left_locked()

    def _left_locked(self) -> int:
        return sum(max(0, self._bounds[2 * i + 1] - self._bounds[2 * i])
                   for i in range(self._n_lanes))

    def _steal(self, lane: int, steps_per_point: float) -> tuple[int, int]:
        """The upper half of the largest lane whose points are worth the walk to them."""
        b = self._bounds
        sizes = [b[2 * i + 1] - b[2 * i] for i in range(self._n_lanes)]
        for victim in sorted(range(self._n_lanes), key=lambda i: (-sizes[i], i)):
            if sizes[victim] <= 0:
                break
            vlo, vhi = b[2 * victim], b[2 * victim + 1]
            # The owner is judging the point just before vlo: with one point left, the
            # thief, idle otherwise, takes it.
            size = vhi - vlo
            mid = vlo if size == 1 else self._split(vlo + size // 2, vlo, vhi,
                                                    size // SPLIT_REACH)
            if (vhi - mid) * steps_per_point > self._walk(lane, self.points[mid]):
                b[2 * victim + 1] = mid
                return mid, vhi
        return 0, 0

    def _walk(self, lane: int, point: int) -> int:
        """Steps the worker of ``lane`` walks to reach ``point``."""
        last = self._bounds[2 * self._n_lanes + 1 + lane]
        return point - last if 0 <= last <= point else point

    def _split(self, i: int, lo: int, hi: int, reach: int) -> int:
        """Index ``i``, or that of the nearest quiet point ``reach`` away at most,
        inside ``(lo, hi)``. The steps between two quiet points mostly share their
        pending writes, and so their crash states: a split among them makes two workers
        judge the same torn states."""
        if not self.quiet or not lo < i < hi:
            return i
        near = [j for j in range(max(lo + 1, i - reach), min(hi, i + reach + 1))
                if self._is_quiet(self.points[j])]
        return min(near, key=lambda j: (abs(j - i), j)) if near else i

    def _is_quiet(self, point: int) -> bool:
        k = bisect_left(self.quiet, point)
        return k < len(self.quiet) and self.quiet[k] == point


def _slots(workers: int) -> int:
    return 3 * max(1, workers) + 1
