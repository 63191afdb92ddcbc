"""results.json: the deterministic record of one scenario's exploration.

Nothing here depends on wall-clock time, worker count or executor: the same scenario and
seed give byte-identical output. Timing lives beside it, in the report only.
"""
from __future__ import annotations

import json
import math
import shlex
from collections import Counter
from typing import Any

from . import __version__
from .diff import view_diff
from .explore import Context, Failure, StepResult, build_any, shrink_failure
from .pool import WORKER_CRASH
from .scenario import OUTCOME_CLASSES, VIOLATION_CLASSES, Scenario

SHRINK_PER_CLASS = 3
EXACT_LIMIT = 10**18
# A worker process that died judging a state is a finding about the writer, like
# recovery-error; it exists only in results (a scenario cannot expect it).
RESULT_CLASSES = OUTCOME_CLASSES + (WORKER_CRASH,)
RESULT_VIOLATIONS = VIOLATION_CLASSES + (WORKER_CRASH,)
SKIP_BUDGET, SKIP_MEMORY = "max_states_per_step", "memory_cap"


def build_results(ctx: Context, steps: list[StepResult], scenario_path: str,
                  complete: bool = True, shrink: bool | None = None) -> dict[str, Any]:
    """The results of the crash points in ``steps``; any crash point missing from it
    (an interrupted run) makes them incomplete, and an incomplete run is not shrunk."""
    sc = ctx.scenario
    unexplored = _missing(ctx.trace.n_steps + 1, steps)
    complete = complete and not unexplored
    shrink = sc.explore.shrink and complete if shrink is None else shrink
    violations = _violations(ctx, steps, scenario_path, shrink)
    totals = _totals(ctx, steps)
    found = {c for c, n in totals["outcomes"].items() if n and c in RESULT_VIOLATIONS}
    skipped, skipped_log10 = _legal([s.skipped for s in steps])
    capped = any(s.capped for s in steps)
    return {
        "crashsim_version": __version__,
        "scenario": _scenario_block(sc, scenario_path),
        # A workload that stopped on its own error never passes: its later
        # transactions, and their crash states, were never tried. Nor does a run whose
        # memory cap left crash points unjudged claim a pass it could not check
        # (violations it expected and found were found all the same).
        "verdict": "pass" if expect_met(sc, found) and complete and not ctx.trace.failed
                   and not (capped and not sc.expected_violations) else "fail",
        "complete": complete,
        # Crash points an interrupted run did not reach (ranges of steps, inclusive).
        "unexplored_crash_points": len(unexplored),
        "unexplored_steps": _ranges(unexplored),
        # Legal states not explored: exact, or null when beyond 10^18 (see
        # skipped_states_log10), and why. A run never claims coverage it did not have.
        "skipped_states": skipped,
        "skipped_states_log10": skipped_log10,
        "skipped_reasons": _skip_reasons(steps),
        "memory_capped_crash_points": sum(1 for s in steps if s.capped),
        "workload_error": ctx.trace.failed,
        "totals": totals,
        "per_step": [_step_block(ctx, s) for s in steps],
        "recovery_paths": dict(sorted(sum((s.paths for s in steps), Counter()).items())),
        "timeline": timeline(ctx.trace),
        "heatmap": {"cells": _heat(steps)},
        "violations": violations,
        "violation_counts": {c: totals["outcomes"][c] for c in RESULT_VIOLATIONS},
        "violation_classes_found": sorted(found),
    }


def expect_met(sc: Scenario, found: set[str]) -> bool:
    wanted = set(sc.expected_violations)
    if not wanted:
        return not found
    return wanted <= found


def dumps(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=1, sort_keys=False, allow_nan=False) + "\n"


def _scenario_block(sc: Scenario, path: str) -> dict[str, Any]:
    return {"name": sc.name, "description": sc.description, "path": path,
            "hash": sc.digest(), "seed": sc.explore.seed, "writer": sc.writer.kind,
            "defects": list(sc.writer.defects), "device": sc.device.model_dump(mode="json"),
            "explore": sc.explore.model_dump(mode="json"),
            "transactions": len(sc.ops()),
            "expect": sc.expect if sc.expect == "pass" else sc.expect.model_dump()}


def _legal(values: list[int]) -> tuple[int | None, float]:
    total = sum(values)
    log10 = round(math.log10(total), 6) if total > 0 else 0.0
    return (total if total < EXACT_LIMIT else None), log10


def _missing(n_points: int, steps: list[StepResult]) -> list[int]:
    have = {s.step for s in steps}
    return [p for p in range(n_points) if p not in have]


def _ranges(points: list[int]) -> list[list[int]]:
    """[1, 2, 3, 7] -> [[1, 3], [7, 7]]"""
    out: list[list[int]] = []
    for p in points:
        if out and out[-1][1] == p - 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return out


def _skip_reasons(steps: list[StepResult]) -> list[str]:
    reasons = []
    if any(s.skipped and not s.capped for s in steps):
        reasons.append(SKIP_BUDGET)
    if any(s.capped for s in steps):
        reasons.append(SKIP_MEMORY)
    return reasons


def _totals(ctx: Context, steps: list[StepResult]) -> dict[str, Any]:
    legal, log10 = _legal([s.legal for s in steps])
    outcomes = Counter()
    seen: set[str] = set()
    for s in steps:
        outcomes.update(s.outcomes)
        seen.update(s.keys)
    return {"steps": ctx.trace.n_steps, "crash_points": ctx.trace.n_steps + 1,
            "legal_states": legal, "legal_states_log10": log10,
            "explored": sum(s.explored for s in steps), "distinct": len(seen),
            "recovery_explored": sum(s.recovery_explored for s in steps),
            "outcomes": {c: outcomes.get(c, 0) for c in RESULT_CLASSES}}


def _step_block(ctx: Context, s: StepResult) -> dict[str, Any]:
    if s.step == 0:
        kind, io_id, time_us = "start", None, 0.0
    else:
        st = ctx.trace.steps[s.step - 1]
        kind, io_id, time_us = st.kind, st.io_id, st.time_us
    legal, log10 = _legal([s.legal])
    block = {"step": s.step, "kind": kind, "io_id": io_id, "time_us": time_us,
             "pending": s.pending, "durable": s.durable, "acked": s.acked,
             "started": s.started, "legal_states": legal, "legal_states_log10": log10,
             "explored": s.explored, "distinct": len(set(s.keys)),
             "recovery_explored": s.recovery_explored,
             "outcomes": {c: s.outcomes[c] for c in RESULT_CLASSES if s.outcomes[c]}}
    if s.capped:
        block["memory_capped"] = True
    return block


def _heat(steps: list[StepResult]) -> list[dict[str, Any]]:
    return [{"step": s.step, "torn_units": torn, "survivors": surv, "outcome": outcome,
             "count": n}
            for s in steps for (torn, surv, outcome), n in sorted(s.heat.items())]


def timeline(trace) -> dict[str, Any]:
    ios: dict[int, dict[str, Any]] = {}
    for i, st in enumerate(trace.steps, start=1):
        kind, phase = st.kind.split("_")
        rec = ios.setdefault(st.io_id, {"io_id": st.io_id, "kind": kind, "offset": None,
                                        "length": None, "fua": False, "submit_us": None,
                                        "complete_us": None, "submit_step": None,
                                        "complete_step": None})
        rec[f"{phase}_us"] = st.time_us
        rec[f"{phase}_step"] = i
        w = trace.writes.get(st.io_id)
        if w is not None:
            rec.update(offset=w.offset, length=len(w.data), fua=w.fua)
    times = [0.0] + [st.time_us for st in trace.steps]
    tx: dict[int, dict[str, Any]] = {}
    for m in trace.tx_marks:
        rec = tx.setdefault(m.tx, {"tx": m.tx, "start_us": None, "ack_us": None})
        rec[f"{m.kind}_us"] = times[min(m.at_step, len(times) - 1)]
    return {"ios": sorted(ios.values(), key=lambda r: r["submit_step"] or 0),
            "tx": [tx[k] for k in sorted(tx)]}


# -- violations -----------------------------------------------------------------------

def _violations(ctx: Context, steps: list[StepResult], path: str,
                shrink: bool) -> list[dict[str, Any]]:
    by_class: dict[str, list[tuple[Failure, StepResult]]] = {}
    for s in steps:
        for f in s.failures:
            by_class.setdefault(f.outcome, []).append((f, s))
    out: list[dict[str, Any]] = []
    for cls in RESULT_VIOLATIONS:
        seen_minimal: set[str] = set()
        for failure, step in by_class.get(cls, [])[:SHRINK_PER_CLASS]:
            record = _worker_crash(ctx, failure, step, path) if cls == WORKER_CRASH \
                else _violation(ctx, failure, path, shrink)
            if record["minimal_state_id"] in seen_minimal:
                continue
            seen_minimal.add(record["minimal_state_id"])
            out.append(record)
    return out


def _violation(ctx: Context, f: Failure, path: str, shrink: bool) -> dict[str, Any]:
    minimal = shrink_failure(ctx, f) if shrink else build_any(ctx, f.state_id)
    acked, started = ctx.trace.acked(f.step), ctx.trace.started(f.step)
    verdict = ctx.judge.judge(minimal.image, acked, started)
    actual = ctx.judge.view_of(minimal.image)
    expected = closest_expected(ctx, actual, acked, started)
    block = ctx.scenario.workload.image.block_size
    return {
        "class": f.outcome, "state_id": f.state_id,
        "minimal_state_id": minimal.state_id, "step": f.step, "tier": f.tier,
        "survivors": f.survivors, "torn": [list(t) for t in f.torn],
        "minimal_survivors": sorted(minimal.survivors),
        "minimal_torn": [list(t) for t in sorted(minimal.torn)],
        "allowed_k": [acked, started], "matched_k": verdict.matched_k,
        "detail": verdict.detail,
        "diff": view_diff(ctx.model, expected, actual, block),
        "recovery_log": list(verdict.examined.recovery.decisions),
        "replay_command": replay_command(minimal.state_id, path,
                                         ctx.scenario.explore.seed),
    }


def _worker_crash(ctx: Context, f: Failure, step: StepResult, path: str
                  ) -> dict[str, Any]:
    """A state whose judging killed the worker: never judged again here (it would kill
    this process), so it is its own minimal state and has no diff."""
    return {
        "class": f.outcome, "state_id": f.state_id, "minimal_state_id": f.state_id,
        "step": f.step, "tier": f.tier, "survivors": f.survivors,
        "torn": [list(t) for t in f.torn], "minimal_survivors": f.survivors,
        "minimal_torn": [list(t) for t in f.torn],
        "allowed_k": [ctx.trace.acked(f.step), ctx.trace.started(f.step)],
        "matched_k": [],
        "detail": step.notes.get(WORKER_CRASH, "the worker process died judging it"),
        "diff": "", "recovery_log": [],
        "replay_command": replay_command(f.state_id, path,
                                         ctx.scenario.explore.seed),
    }


def closest_expected(ctx: Context, actual: bytes | None, acked: int,
                      started: int) -> bytes:
    """The allowed model view nearest to what recovery produced, to diff against."""
    top = min(started, len(ctx.model.ops))
    views = [ctx.model.view_after(k) for k in range(min(acked, top), top + 1)]
    if actual is None or len(views) == 1:
        return views[0]
    return min(views, key=lambda v: sum(a != b for a, b in zip(v[::64], actual[::64])))


def replay_command(state_id: str, scenario_path: str, seed: int) -> str:
    """The seed is named even when it is the scenario's own: ``run --seed`` may have
    overridden it, and it decides the simulated run (destage order, the writer's
    GUIDs) that every state ID is read against."""
    return shlex.join(["crashsim", "replay", state_id, "--scenario", scenario_path,
                       "--seed", str(seed)])
