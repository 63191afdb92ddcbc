"""Function calls per crash point, counted by cProfile, split between crashsim's own
code and the writer's (``crashsim/writers/``), for the bench workload at a budget of 8
states per step. Counts do not depend on the machine's speed, so this shows in seconds
what wall-clock figures on a busy host blur: which side's work per step grows with the
length of the workload.

    python benchmarks/bench_calls.py [WRITES ...]     (default: 10 40 160 320)

Calls into the standard library and builtins are charged to the side that made them.
"""
import cProfile
import pstats
import sys
from collections import Counter

from crashsim.bench import bench_scenario
from crashsim.explore import build_context, explore_all

BUDGET = 8


def side_of(filename: str) -> str | None:
    if "/crashsim/writers/" in filename:
        return "writer"
    if "/crashsim/" in filename:
        return "crashsim"
    return None


def calls_per_point(writes: int) -> tuple[int, Counter]:
    ctx = build_context(bench_scenario(writes, BUDGET))
    prof = cProfile.Profile()
    prof.enable()
    points = len(explore_all(ctx, 1))
    prof.disable()
    calls: Counter = Counter()
    for (filename, _, _), (_, ncalls, _, _, callers) in pstats.Stats(prof).stats.items():
        side = side_of(filename)
        if side is not None:
            calls[side] += ncalls
            continue
        for (caller_file, _, _), (caller_calls, *_) in callers.items():
            calls[side_of(caller_file) or "other"] += caller_calls
    return points, calls


def main(argv: list[str]) -> int:
    first = None
    for writes in [int(a) for a in argv] or [10, 40, 160, 320]:
        points, calls = calls_per_point(writes)
        per = {side: calls[side] / points for side in ("crashsim", "writer")}
        first = first or per
        print(f"{writes} writes: {points} crash points, calls per point: "
              f"crashsim {per['crashsim']:.1f} (x{per['crashsim'] / first['crashsim']:.3f}), "
              f"writer {per['writer']:.1f} (x{per['writer'] / first['writer']:.3f})",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
