"""Protocols whose crash consistency is known by reasoning, and the verdict crashsim must
give each: a correct one flagged is a state no contract-abiding device produces; a broken
one passing is a legal state never generated. The writer is known_writers.ShadowTable."""
from __future__ import annotations

import pytest

from crashsim.explore import build_any, build_context, crash_point
from crashsim.runner import run_one
from crashsim.scenario import load_scenario

from known_writers import scenario

CORRECT = [
    # data, FLUSH, table, FLUSH, ack; the one-sector table is atomic on either device
    ("flush-flush-512", [], dict(atomic=512, destage="fifo")),
    ("flush-flush-4096", [], dict(atomic=4096, destage="elevator")),
    # the table with FUA after the data FLUSH
    ("fua-table-512", ["fua-table"], dict(atomic=512)),
    ("fua-table-4096", ["fua-table"], dict(atomic=4096, destage="fifo")),
    # a 4 KiB table trusted without a checksum is atomic on a 4096-atomic device
    ("table4k-4096", ["table4k"], dict(atomic=4096, ops="cross")),
    # on a 512-atomic one it needs a checksum and a second copy
    ("table4k-crc-512", ["table4k", "crc", "pingpong"], dict(atomic=512, ops="cross")),
    # data and table in any order: recovery checks both CRCs
    ("unordered-512", ["unordered", "crc", "pingpong"], dict(atomic=512)),
    ("unordered-garbage", ["unordered", "crc", "pingpong"],
     dict(atomic=512, faults=["garbage"], destage="elevator")),
    # the same data written twice, concurrently, then flushed
    ("dup-data", ["dup-data"], dict(atomic=512)),
    # write-through: completion is durability, so no FLUSH is needed
    ("writethrough-no-flush", ["no-data-flush"], dict(mode="writethrough")),
    # FUA alone does not depend on FLUSH, so a lying FLUSH cannot hurt it
    ("fua-only-lying", ["fua-only"], dict(faults=["lying_flush"])),
]

BROKEN = [
    ("no-data-flush", ["no-data-flush"], dict(atomic=512), "mixed"),
    ("no-data-flush-4096", ["no-data-flush"], dict(atomic=4096, destage="fifo"), "mixed"),
    ("fua-as-barrier", ["fua-barrier"], dict(atomic=512), "mixed"),
    ("ack-before-flush", ["ack-before-flush"], dict(), "lost"),
    ("ack-during-flush", ["ack-during-flush"], dict(atomic=4096), "lost"),
    ("flush-before-complete", ["flush-before-complete"], dict(), "mixed"),
    ("table4k-512-no-crc", ["table4k"], dict(atomic=512, ops="cross"), "recovery-error"),
    ("unordered-no-data-check", ["unordered", "crc", "pingpong", "no-data-check"],
     dict(), "mixed"),
    ("lying-flush", [], dict(faults=["lying_flush"]), "lost"),
]


def _run(path):
    return run_one(load_scenario(path), str(path))


@pytest.mark.parametrize("name,switches,device", CORRECT, ids=[c[0] for c in CORRECT])
def test_a_correct_protocol_passes(tmp_path, name, switches, device):
    res = _run(scenario(tmp_path, name, switches, **device))
    assert res["verdict"] == "pass", res["violations"][:1]
    assert res["totals"]["explored"] > 0 and not res.get("workload_error")


@pytest.mark.parametrize("name,switches,device,found", BROKEN, ids=[c[0] for c in BROKEN])
def test_a_broken_protocol_is_caught(tmp_path, name, switches, device, found):
    path = scenario(tmp_path, name, switches, **device,
                    expect=f"{{violations: [{found}]}}")
    res = _run(path)
    assert res["verdict"] == "pass", res["violation_counts"]
    # The minimal state it reports rebuilds to the same verdict on its own.
    v = next(v for v in res["violations"] if v["class"] == found)
    ctx = build_context(load_scenario(path), source=str(path))
    point = crash_point(ctx, v["state_id"])
    verdict = ctx.judge.judge(build_any(ctx, v["state_id"]).image,
                              ctx.trace.acked(point), ctx.trace.started(point))
    assert verdict.outcome == found
