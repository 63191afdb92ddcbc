"""CPython's cyclic garbage collector during an exploration.

An exploration keeps what it builds: the step walker's maps, every crash point's
result, the judge's caches. A full collection walks every object the collector tracks,
and one comes each time the survivors have grown by a quarter, so their share of the run
grew with the trace: five full collections took 0.6 s of a 640-write exploration (19,209
crash points, 8% of it), against none at 10 writes.

Exploring makes almost no cyclic garbage (34 unreachable objects after 160 writes), so
every FREEZE_EVERY_POINTS crash points what is alive is frozen out of the collector's
sight (``gc.freeze``: the young generations are still collected as before), and at the
end of the run it is unfrozen. Garbage already there at a freeze, such as an earlier
run's context kept by its cycles, is frozen with it and collected after the run: a full
collection before each freeze would find it, but the first costs a walk of the whole
heap, which at 40 writes tripled the time spent collecting. So big cycles are broken
where they are made instead: the simulated device, held by its own destage process, kept
the media of a 960-write run (80 MiB) frozen until the end (``SimDevice.close``).
"""
from __future__ import annotations

import gc

FREEZE_EVERY_POINTS = 1024


class Settler:
    """Call ``tick`` once per crash point judged; leaving the ``with`` block (or
    ``release``) unfreezes everything, as ``gc.unfreeze`` does, if it froze anything."""

    def __init__(self, every: int | None = None):
        self.every = every or FREEZE_EVERY_POINTS
        self.points = 0
        self.froze = False

    def tick(self) -> None:
        self.points += 1
        if self.points % self.every == 0:
            gc.freeze()
            self.froze = True

    def release(self) -> None:
        if self.froze:
            gc.unfreeze()
            self.froze = False

    def __enter__(self) -> "Settler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
