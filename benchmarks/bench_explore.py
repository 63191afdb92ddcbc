"""Print the standard benchmark's figures (same as `crashsim bench`); `--quick` for a short run."""
import sys

from crashsim.bench import run_bench

sys.exit(run_bench(as_json="--json" in sys.argv, quick="--quick" in sys.argv))
