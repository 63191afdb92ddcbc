"""Instructions per crash point, counted by Valgrind, for the bench workload at a budget
of 8 states per step: a measure of how the cost per step grows with the workload that
a busy host cannot blur, as it blurs seconds.

    python benchmarks/bench_instructions.py [WRITES ...]     (default: 10 80 160)

Each length runs twice under ``valgrind --tool=cachegrind``: building the context
(simulation and model) alone, and building it then exploring every crash point. The
difference over the number of crash points is printed. Needs valgrind; slow (a minute
or more per length).
"""
import re
import shutil
import subprocess
import sys

BUDGET = 8
CHILD = """
import sys
from crashsim.bench import bench_scenario
from crashsim.explore import build_context, explore_all
ctx = build_context(bench_scenario(int(sys.argv[1]), {budget}))
if sys.argv[2] == "explore":
    explore_all(ctx, 1)
print("points", ctx.trace.n_steps + 1)
"""


def instructions(writes: int, what: str) -> tuple[int, int]:
    proc = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no",
                           "--cachegrind-out-file=/dev/null", sys.executable, "-c",
                           CHILD.format(budget=BUDGET), str(writes), what],
                          capture_output=True, text=True, check=True)
    refs = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    points = re.search(r"points (\d+)", proc.stdout)
    return int(refs.group(1).replace(",", "")), int(points.group(1))


def main(argv: list[str]) -> int:
    if not shutil.which("valgrind"):
        print("bench_instructions: valgrind is not installed (apt-get install valgrind)",
              file=sys.stderr)
        return 2
    for writes in [int(a) for a in argv] or [10, 80, 160]:
        total, points = instructions(writes, "explore")
        base, _ = instructions(writes, "build")
        print(f"{writes} writes: {points} crash points, "
              f"{(total - base) / points / 1e6:.2f} M instructions per crash point",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
