"""Resource bounds: the state budget and the memory cap are respected, and a run that
skipped states says how many and why; it never claims full coverage."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from crashsim import crashstates, memory, oracle
from crashsim.explore import build_context, explore_all
from crashsim.report.core import write_reports
from crashsim.results import build_results
from crashsim.runner import run_one, summary_line
from crashsim.scenario import ScenarioError, load_scenario

SCENARIO = """\
name: {name}
writer: {{kind: wal}}
workload:
  image: {{virtual_size: 1MiB, log_size: 1MiB}}
  ops:
    - log_write: {{offset: 0, length: 4KiB, pattern: 0xa1}}
    - log_write: {{offset: 2KiB, length: 4KiB, pattern: 0xb2}}
explore: {{seed: 5, max_states_per_step: {budget}{extra}}}
expect: pass
"""


def _write(tmp_path: Path, name: str, budget: int = 4096, extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SCENARIO.format(name=name, budget=budget, extra=extra))
    return path


def test_a_small_state_budget_reports_the_skipped_states(tmp_path):
    path = _write(tmp_path, "budget", budget=2)
    res = run_one(load_scenario(path), str(path))
    legal = res["totals"]["legal_states"]
    assert res["totals"]["explored"] < legal
    assert res["skipped_states"] > 0
    assert res["skipped_states"] == sum(
        s["legal_states"] for s in res["per_step"]) - res["totals"]["explored"]
    assert res["skipped_reasons"] == ["max_states_per_step"]
    assert res["memory_capped_crash_points"] == 0 and res["complete"] is True
    assert all(s["explored"] <= 2 for s in res["per_step"])
    assert f"{res['skipped_states']} legal states skipped (max_states_per_step)" in \
        summary_line(res, 1.0)


def test_a_full_budget_skips_nothing_and_says_nothing(tmp_path):
    path = _write(tmp_path, "whole")
    res = run_one(load_scenario(path), str(path))
    assert res["skipped_states"] == 0 and res["skipped_reasons"] == []
    assert "skipped" not in summary_line(res, 1.0)


GARBAGE_SCENARIO = """\
name: garbage-skips
device: {atomic_write_bytes: 512, faults: [garbage]}
writer: {kind: wal}
workload:
  image: {virtual_size: 1MiB, log_size: 1MiB}
  ops: [{log_write: {offset: 0, length: 1536, pattern: 0xa1}}]
explore: {seed: 5, max_states_per_step: 16, shrink: false}
expect: pass
"""


def test_garbage_states_do_not_count_as_explored_legal_states(tmp_path):
    """Garbage states fill part of the budget but are not legal states: a step whose
    budget they took must still count the clean legal states it never reached."""
    path = tmp_path / "garbage.yaml"
    path.write_text(GARBAGE_SCENARIO)
    ctx = build_context(load_scenario(path))
    steps = explore_all(ctx, workers=1)
    missed = 0
    for res, st in zip(steps, crashstates.iter_steps(ctx.trace)):
        clean = {s.content_key for s in crashstates.enumerate_states(st, 10 ** 6)}
        unexplored = len(clean - set(res.keys))
        assert res.skipped >= unexplored, f"p{res.step}"
        missed += unexplored
    assert missed > 0  # the budget really left clean states out

def test_a_tiny_memory_cap_skips_everything_and_says_so(tmp_path):
    """1 MiB is less than any Python process: nothing is judged, all of it is skipped."""
    path = _write(tmp_path, "capped", extra=", max_memory_mib: 1")
    res = run_one(load_scenario(path), str(path), workers=2)
    assert res["totals"]["explored"] == 0
    assert res["skipped_states"] == res["totals"]["legal_states"] > 0
    assert res["skipped_reasons"] == ["memory_cap"]
    assert res["memory_capped_crash_points"] == res["totals"]["crash_points"]
    assert all(s.get("memory_capped") for s in res["per_step"])
    assert "memory cap of 1 MiB: " in summary_line(res, 1.0)
    # Nothing was judged, so the run cannot pass, and says why first.
    assert res["verdict"] == "fail"
    assert summary_line(res, 1.0).startswith("FAIL capped: NOT JUDGED IN FULL (")
    write_reports(tmp_path / "report", [(res, 1.0)])
    page = (tmp_path / "report" / "capped" / "index.html").read_text()
    assert "Partial coverage:" in page and "the memory cap of 1 MiB was reached" in page
    index = (tmp_path / "report" / "index.html").read_text()
    assert "memory cap: partial coverage" in index


def test_the_cli_memory_cap_overrides_the_scenario_and_keeps_its_hash(tmp_path):
    path = _write(tmp_path, "cli-cap")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "crashsim", "run", str(path), "--out",
                           str(out), "--workers", "1", "--max-memory-mib", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # finished, but a pass it could not check
    assert "0 states explored" in proc.stdout and "memory cap of 1 MiB" in proc.stdout
    assert "NOT JUDGED IN FULL" in proc.stdout
    res = json.loads((out / "cli-cap" / "results.json").read_text())
    assert res["scenario"]["explore"]["max_memory_mib"] == 1
    assert res["scenario"]["hash"] == load_scenario(path).digest()
    assert res["skipped_reasons"] == ["memory_cap"]
    junit = (out / "junit.xml").read_text()
    assert 'name="skipped_reasons" value="memory_cap"' in junit
    assert 'failures="1"' in junit and "a pass cannot be claimed" in junit
    for value in ("0", str((1 << 24) + 1)):  # the range the scenario's key is held to
        bad = subprocess.run([sys.executable, "-m", "crashsim", "run", str(path),
                              "--max-memory-mib", value], capture_output=True, text=True,
                             timeout=60)
        assert bad.returncode == 2, value
        assert f"--max-memory-mib must be from 1 to 16777216 (16 TiB), got {value}" in \
            bad.stderr and "Traceback" not in bad.stderr


def test_the_cap_drops_the_judge_cache_first_then_skips_the_rest(tmp_path, monkeypatch):
    """Over the cap: the cache is dropped; if that brings the process under, judging
    goes on. Once over after dropping, the rest of the crash points are skipped."""
    path = _write(tmp_path, "midway", extra=", max_memory_mib: 100")
    ctx = build_context(load_scenario(path))
    n_points = ctx.trace.n_steps + 1
    state = {"checks": 0, "forgets": 0}
    real_forget = ctx.judge.forget

    def forget() -> None:
        state["forgets"] += 1
        real_forget()

    def fake_rss() -> int:
        # Under, then over once (cured by the dropped cache), then over for good.
        state["checks"] += 1
        over = state["checks"] == 3 or state["checks"] >= 7
        return (200 if over else 50) * memory.MIB

    monkeypatch.setattr(ctx.judge, "forget", forget)
    monkeypatch.setattr(memory, "rss_bytes", fake_rss)
    steps = explore_all(ctx, workers=1)
    judged = [s.step for s in steps if not s.capped]
    assert judged == [0, 1, 2, 3, 4]  # checks: 1, 2, 3+4 (cured), 5, 6, then 7 over
    assert all(s.capped and s.explored == 0 and s.skipped == s.legal
               for s in steps[5:])
    assert len(steps) == n_points and state["forgets"] == 2
    res = build_results(ctx, steps, str(path))
    assert res["complete"] is True and res["verdict"] == "fail"  # pass unchecked
    assert res["memory_capped_crash_points"] == n_points - 5
    assert "memory_cap" in res["skipped_reasons"]
    assert res["totals"]["explored"] == sum(s.explored for s in steps[:5]) > 0


def test_the_judge_cache_is_bounded(tmp_path, monkeypatch):
    """The content cache keeps at most CACHE_ENTRIES recoveries; verdicts are unchanged."""
    path = _write(tmp_path, "bounded")
    sc = load_scenario(path)
    want = [s.outcomes for s in explore_all(build_context(sc))]
    monkeypatch.setattr(oracle, "CACHE_ENTRIES", 5)
    ctx = build_context(sc)
    got = explore_all(ctx)
    assert [s.outcomes for s in got] == want
    assert 0 < len(ctx.judge._cache) <= 5
    assert sum(s.explored for s in got) > 5


def test_max_memory_mib_must_be_positive(tmp_path):
    path = _write(tmp_path, "zero", extra=", max_memory_mib: 0")
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert "explore.max_memory_mib" in str(err.value) and "zero.yaml:8" in str(err.value)


def test_rss_is_measured():
    assert 1 * memory.MIB < memory.rss_bytes() < 64 * 1024 * memory.MIB
