"""End-to-end exploration with the WAL writer: defects are caught, the clean protocol passes."""
from __future__ import annotations

import pytest

from crashsim.explore import build_any, build_context
from crashsim.results import dumps
from crashsim.runner import run_one, summary_line
from crashsim.scenario import load_scenario
from crashsim.writers.wal import WalWriter

SCENARIO = """\
name: {name}
device:
  atomic_write_bytes: 512
  cache: {{mode: writeback, capacity_bytes: 256KiB, destage: {destage}}}
writer: {{kind: wal, defects: [{defects}]}}
workload:
  image: {{virtual_size: 4MiB, log_size: 1MiB}}
  ops:
    - log_write: {{offset: 0, length: 4KiB, pattern: 0xa1}}
    - log_write: {{offset: 2KiB, length: 8KiB, pattern: 0xb2}}
    - log_write: {{offset: 1MiB, length: 2KiB, pattern: 0xc3}}
explore: {{seed: 3, max_states_per_step: 128, recovery_crash: {rc}}}
expect: {expect}
"""

EXPECTED = {
    "commit-before-data-flush": "mixed",
    "fua-commit-as-barrier": "mixed",
    "ack-before-commit-flush": "lost",
    "checkpoint-before-home-flush": "lost",
    "replay-ignores-commit": "mixed",
    "home-before-commit": "mixed",
}


def _scenario(tmp_path, name="wal", defects="", destage="fifo", rc="false",
              expect="pass"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(SCENARIO.format(name=name, defects=defects, destage=destage, rc=rc,
                                    expect=expect))
    return load_scenario(path), path


def test_every_wal_defect_switch_has_an_expected_class():
    assert set(EXPECTED) == set(WalWriter.defects_available)


def test_clean_wal_passes_every_state_with_recovery_crash(tmp_path):
    sc, path = _scenario(tmp_path, destage="random", rc="true")
    res = run_one(sc, str(path))
    assert res["verdict"] == "pass", res["violations"][:1]
    assert res["violation_counts"] == {c: 0 for c in res["violation_counts"]}
    assert res["totals"]["explored"] > 100
    assert res["totals"]["outcomes"]["new"] > 0 and res["totals"]["outcomes"]["old"] > 0
    assert len(res["per_step"]) == res["totals"]["steps"] + 1
    # Recovery crash adds the states cut during recovery's own I/O.
    plain, plain_path = _scenario(tmp_path, name="plain", destage="random")
    assert res["totals"]["recovery_explored"] > 0
    assert f"and {res['totals']['recovery_explored']} cut during their recovery" in \
        summary_line(res, 1.0)  # outcomes count them too: the line must say so
    plain_res = run_one(plain, str(plain_path))
    assert plain_res["totals"]["recovery_explored"] == 0
    assert "during their recovery" not in summary_line(plain_res, 1.0)


@pytest.mark.parametrize("defect", sorted(EXPECTED))
def test_wal_defect_is_caught_with_a_shrunk_reproducible_state(tmp_path, defect):
    sc, path = _scenario(tmp_path, name=f"wal-{defect}", defects=defect)
    res = run_one(sc, str(path))
    wanted = EXPECTED[defect]
    assert res["violation_counts"][wanted] > 0, res["violation_counts"]
    v = next(v for v in res["violations"] if v["class"] == wanted)
    # The minimal state is no bigger than the one first found, and replays to the class.
    assert len(v["minimal_survivors"]) <= len(v["survivors"])
    ctx = build_context(sc)
    state = build_any(ctx, v["minimal_state_id"])
    verdict = ctx.judge.judge(state.image, ctx.trace.acked(state.p),
                              ctx.trace.started(state.p))
    assert verdict.outcome == wanted
    assert v["replay_command"].startswith("crashsim replay ")


def test_results_are_byte_identical_across_runs_and_worker_counts(tmp_path):
    sc, path = _scenario(tmp_path, defects="commit-before-data-flush", destage="random")
    one = dumps(run_one(sc, str(path), workers=1))
    again = dumps(run_one(sc, str(path), workers=1))
    two = dumps(run_one(sc, str(path), workers=2))
    assert one == again
    assert one == two
