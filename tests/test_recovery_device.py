"""Recovery runs on the device the workload ran on. Cutting power during recovery must
use that device's atomic unit, cache mode and faults: otherwise crashsim tears writes
the device keeps whole or loses writes it made durable (false violations), or honours
flushes a lying device drops (missed ones). The writer is in known_writers.py."""
from __future__ import annotations

from crashsim.explore import build_context
from crashsim.runner import run_one
from crashsim.scenario import load_scenario

from known_writers import scenario

RC = ", recovery_crash: true, recovery_states_per_step: 64"


def _run(path):
    return run_one(load_scenario(path), str(path))


def test_recovery_trace_keeps_the_device_semantics(tmp_path):
    path = scenario(tmp_path, "sem", ["repair"], atomic=4096, mode="writethrough",
                    faults=["lying_flush"])
    ctx = build_context(load_scenario(path), source=str(path))
    rtrace = ctx.judge.examine(ctx.trace.base.fork(), record=True).recovery_trace
    assert rtrace is not None
    assert (rtrace.atomic_write_bytes, rtrace.writethrough, rtrace.lying_flush) == \
        (4096, True, True)


def test_a_4k_record_recovery_writes_is_not_torn_on_a_4k_atomic_device(tmp_path):
    # Recovery rewrites a 4 KiB table without a checksum: atomic on this device.
    res = _run(scenario(tmp_path, "rec4k", ["repair", "table4k"], atomic=4096,
                        ops="cross", explore=RC))
    assert res["verdict"] == "pass", res["violations"][:1]
    assert res["totals"]["recovery_explored"] > 0


def test_recovery_writes_are_durable_on_a_write_through_device(tmp_path):
    # No flush between recovery's data copy and its table: fine when writes are
    # durable on completion.
    res = _run(scenario(tmp_path, "wt", ["repair-no-flush"], mode="writethrough",
                        explore=RC))
    assert res["verdict"] == "pass", res["violations"][:1]
    assert res["totals"]["recovery_explored"] > 0


def test_the_same_recovery_fails_on_a_write_back_device(tmp_path):
    res = _run(scenario(tmp_path, "wb", ["repair-no-flush"], explore=RC,
                        expect="{violations: [mixed]}"))
    assert res["verdict"] == "pass" and res["violation_counts"]["mixed"]


def test_a_lying_flush_lies_to_recovery_too(tmp_path):
    # The workload uses FUA only, so it is correct on this device; recovery trusts
    # its flushes, which this device drops.
    clean = _run(scenario(tmp_path, "fua", ["fua-only"], faults=["lying_flush"]))
    assert clean["verdict"] == "pass", clean["violations"][:1]
    res = _run(scenario(tmp_path, "fua-rec", ["fua-only", "repair"],
                        faults=["lying_flush"], explore=RC))
    assert res["violation_counts"]["mixed"], res["violation_counts"]
    assert all("/r" in v["state_id"] for v in res["violations"])


def test_a_tear_during_recovery_can_read_as_garbage(tmp_path):
    # The note recovery writes spans two units; only a garbage tear of it leaves a
    # sector that is neither zero nor the note, which the next recovery refuses.
    clean = _run(scenario(tmp_path, "note", ["note"], explore=RC))
    assert clean["verdict"] == "pass", clean["violations"][:1]
    res = _run(scenario(tmp_path, "note-g", ["note"], faults=["garbage"], explore=RC))
    assert res["violation_counts"]["recovery-error"], res["violation_counts"]
    assert all("/r" in v["state_id"] and "!g" in v["state_id"]
               for v in res["violations"])
