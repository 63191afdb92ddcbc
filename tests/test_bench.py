"""The benchmark runs and reports every figure design §6 names (values are not asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"

KEYS = {"states_per_second_per_core", "qemu_img_states_per_second", "speedup_vs_qemu_img",
        "parallel_speedup", "peak_rss_mib", "parallel_ceiling", "parallel_efficiency",
        "states_per_second_in_process", "parallel_speedup_over_in_process",
        "parallel_speedup_at_10_writes", "parallel_speedup_by_round",
        "parallel_ceiling_by_round",
        "scaling_growth", "scaling_exponent", "scaling_growth_crashsim",
        "scaling_exponent_crashsim"}


def test_bench_json_has_every_key(require_qemu):
    proc = subprocess.run([sys.executable, "-m", "crashsim", "bench", "--json", "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert KEYS <= set(figures)
    assert figures["states_checked"] > 0
    assert figures["qemu_img_states_per_second"] is not None
    assert 0 < figures["parallel_ceiling"] <= 2.5  # two processes cannot do 2.5x the work
    for key in ("scaling_by_writes", "scaling_by_writes_at_budget_64"):
        row = figures[key]["5"]
        assert row["steps"] > 0 and 0 < row["recoveries"] <= row["states"]
    growth = figures["scaling_by_writes"]["5"]["ms_per_step"] / \
        figures["scaling_by_writes"]["2"]["ms_per_step"]
    assert figures["scaling_growth"] == round(growth, 2)


def test_the_parallel_speedup_is_two_worker_processes_over_one(monkeypatch):
    """As ``crashsim run --workers 1`` and ``--workers 2`` judge: the in-process run is
    reported beside it, not divided by."""
    from crashsim import bench
    seconds = {(1, False): 0.9, (1, True): 1.0, (2, False): 0.5}
    monkeypatch.setattr(bench, "_explore",
                        lambda sc, workers, isolated=False: (7, seconds[workers, isolated]))
    monkeypatch.setattr(bench, "_two_at_once", lambda sc: 1.0)
    par = bench._paired_runs(bench.bench_scenario(1), rounds=3)
    assert (par.states, par.one_worker_s, par.in_process_s) == (7, 1.0, 0.9)
    assert par.speedup == pytest.approx(2.0)
    assert par.speedup_over_in_process == pytest.approx(1.8)
    assert par.ceiling == pytest.approx(1.8)  # two in-process runs at once took 1.0 s
    assert par.speedups == pytest.approx([2.0] * 3) and len(par.ceilings) == 3
    assert bench._long_speedup(bench.bench_scenario(1), rounds=1) == pytest.approx(2.0)


def test_scaling_times_every_length_in_each_round_and_reports_the_runs():
    from crashsim.bench import _scaling_by_writes
    rows = _scaling_by_writes([1, 2], budget=4, rounds=2)
    assert [rows[k]["runs"] for k in ("1", "2")] == [2, 2]
    assert rows["2"]["steps"] > rows["1"]["steps"] > 0
    for row in rows.values():  # the time per step, split between writer and crashsim
        assert 0 < row["writer_ms_per_step"] < row["ms_per_step"]
        assert row["writer_ms_per_step"] + row["crashsim_ms_per_step"] == \
            pytest.approx(row["ms_per_step"], abs=0.002)


class _Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


class _Ticking:
    """A writer whose every call moves a fake clock on by one second, from inside the
    call (a generator's body runs only when recovery is driven)."""

    def __init__(self, writer, clock: _Clock):
        self._writer, self._clock, self.ticks = writer, clock, 0

    def __getattr__(self, name):
        return getattr(self._writer, name)

    def _tick(self) -> None:
        self._clock.t += 1.0
        self.ticks += 1

    def _driven(self, gen):
        self._tick()
        return (yield from gen)

    def recover(self, dev):
        return self._driven(self._writer.recover(dev))

    def probe(self, dev):
        return self._driven(self._writer.probe(dev))

    def view(self, dev, ranges):
        self._tick()
        return self._writer.view(dev, ranges)

    def check_structure(self, dev):
        self._tick()
        return self._writer.check_structure(dev)

    def structure_key(self, dev):
        self._tick()
        return self._writer.structure_key(dev)


@pytest.mark.parametrize("name", ["vhdx-alloc-512", "wal-clean"])  # views: own, shared
def test_judge_counts_the_time_inside_every_writer_call(monkeypatch, name):
    from crashsim.explore import build_context, explore_all
    from crashsim.oracle import Judge
    from crashsim.scenario import load_scenario
    clock = _Clock()
    monkeypatch.setattr("crashsim.oracle.perf_counter", clock)
    sc = load_scenario(SCENARIOS / f"{name}.yaml")
    sc = sc.model_copy(update={"explore": sc.explore.model_copy(
        update={"max_states_per_step": 4, "recovery_crash": False})})
    ctx = build_context(sc)
    writer = _Ticking(ctx.writer, clock)
    ctx.judge = Judge(writer, ctx.model)
    explore_all(ctx, 1)
    assert ctx.judge.recoveries > 0 and writer.ticks > 2 * ctx.judge.recoveries
    assert ctx.judge.writer_s == writer.ticks  # the clock moved only inside the writer


def test_the_scaling_exponent_is_the_slope_of_seconds_over_steps_in_log_log():
    from crashsim.bench import _exponent
    linear = {"1": {"steps": 100, "seconds": 0.5}, "2": {"steps": 400, "seconds": 2.0},
              "3": {"steps": 1600, "seconds": 8.0}}
    assert _exponent(linear) == 1.0
    quadratic = {k: {**row, "seconds": row["steps"] ** 2 / 1e4} for k, row in linear.items()}
    assert _exponent(quadratic) == 2.0
    # One slow length among linear ones moves the fit, but not as far as the end ratio.
    bent = {**linear, "3": {"steps": 1600, "seconds": 9.6}}
    assert 1.0 < _exponent(bent) < 1.07


def test_bench_calls_counts_both_sides_and_counts_alike_every_time():
    """The call counts are what makes bench_calls immune to a busy host: the same
    workload gives the same counts, run after run (the writer's within 1%: which earlier
    state a verdict memo finds first can follow object addresses)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_calls.py"
    spec = importlib.util.spec_from_file_location("bench_calls", path)
    bench_calls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_calls)
    points, calls = bench_calls.counted_apart(2)
    assert points > 0 and calls["crashsim"] > 0 and calls["writer"] > 0
    again_points, again = bench_calls.counted_apart(2)
    assert (again_points, again["crashsim"]) == (points, calls["crashsim"])
    assert again["writer"] == pytest.approx(calls["writer"], rel=0.015)
    assert bench_calls.side_of("/x/crashsim/writers/vhdx/replay.py") == "writer"
    assert bench_calls.side_of("/x/crashsim/readset.py") == "crashsim"
    assert bench_calls.side_of("/usr/lib/python3.11/functools.py") is None
