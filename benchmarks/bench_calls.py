"""Function calls per crash point, counted by cProfile, split between crashsim's own
code and the writer's (``crashsim/writers/``), for the bench workload at a budget of 8
states per step. Counts do not depend on the machine's speed, so this shows in seconds
what wall-clock figures on a busy host blur: which side's work per step grows with the
length of the workload.

    python benchmarks/bench_calls.py [WRITES ...]     (default: 10 40 160 320)

Each length is counted in a fresh interpreter with a fixed hash seed: in one process a
later length found the parse caches warm from an earlier one. crashsim's count is then
the same run after run; the writer's moves by under 1% (which earlier state a verdict
memo finds first can follow object addresses). Calls into the standard library and
builtins are charged to the side that made them.
"""
import cProfile
import os
import pstats
import subprocess
import sys
from collections import Counter

BUDGET = 8
SIDES = ("crashsim", "writer")


def side_of(filename: str) -> str | None:
    if "/crashsim/writers/" in filename:
        return "writer"
    if "/crashsim/" in filename:
        return "crashsim"
    return None


def calls_per_point(writes: int) -> tuple[int, Counter]:
    """Crash points and calls by side, counted in this process."""
    from crashsim.bench import bench_scenario
    from crashsim.explore import build_context, explore_all
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


def counted_apart(writes: int) -> tuple[int, dict[str, int]]:
    """``calls_per_point`` in a fresh interpreter with PYTHONHASHSEED=0."""
    proc = subprocess.run([sys.executable, __file__, "--one", str(writes)],
                          env={**os.environ, "PYTHONHASHSEED": "0"},
                          capture_output=True, text=True, check=True)
    points, *counts = (int(x) for x in proc.stdout.split())
    return points, dict(zip(SIDES, counts))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        points, calls = calls_per_point(int(argv[1]))
        print(points, *(calls[side] for side in SIDES))
        return 0
    first = None
    for writes in [int(a) for a in argv] or [10, 40, 160, 320]:
        points, calls = counted_apart(writes)
        per = {side: calls[side] / points for side in SIDES}
        first = first or per
        print(f"{writes} writes: {points} crash points, calls per point: "
              f"crashsim {per['crashsim']:.1f} (x{per['crashsim'] / first['crashsim']:.3f}), "
              f"writer {per['writer']:.1f} (x{per['writer'] / first['writer']:.3f})",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
