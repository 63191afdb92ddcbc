"""Saved partial results of one scenario, so an interrupted run can be resumed.

As chunks of crash points are judged (in any order) their ``StepResult`` records are
written, each chunk as one JSON file, to ``<out>/<scenario folder>/.partial/``::

    steps-<first>-<last>-<count>.json   {"key": {...}, "seconds": S,
                                         "steps": [StepResult as JSON]}

Every file is written atomically and carries the key it belongs to: the scenario hash,
seed, memory cap, number of crash points, digest of the trace and crashsim version.
``load`` uses only files whose key matches, so a changed scenario never reuses stale
results. Which worker count or chunking wrote a file does not matter: results are per
crash point. A finished run removes the folder.

``seconds`` is the scenario's run time so far, earlier runs included, so that a resumed
run reports what the whole scenario took and not only its last part. A finished run
keeps its total in ``<scenario folder>/.run-seconds`` for a later ``--resume`` that
does not run it again. Neither is in results.json, which must not depend on timing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from . import __version__
from .explore import Context, Failure, StepResult
from .report.core import atomic_write

PARTIAL_DIR = ".partial"
RUN_SECONDS_FILE = ".run-seconds"
FORMAT = 1


def run_key(ctx: Context) -> dict[str, Any]:
    """What saved results must match to be reused."""
    sc = ctx.scenario
    return {"format": FORMAT, "crashsim_version": __version__,
            "scenario_hash": sc.digest(), "seed": sc.explore.seed,
            "max_memory_mib": sc.explore.max_memory_mib,  # it decides what was skipped
            "crash_points": ctx.trace.n_steps + 1, "trace": trace_digest(ctx.trace)}


def trace_digest(trace) -> str:
    """The I/O the crash points were judged on. The scenario hash does not pin it for a
    trace recorded at run time: QEMU writes fresh GUIDs (and other bytes that vary) each
    time, so a resume re-records a different trace, whose crash points must not be
    mixed with the saved ones."""
    h = hashlib.blake2b(trace.base.content_key().encode(), digest_size=16)
    for step in trace.steps:
        h.update(f"{step.kind}:{step.io_id};".encode())
    for io, w in sorted(trace.writes.items()):
        h.update(f"{io}:{w.offset}:{w.fua}:{len(w.data)};".encode())
        h.update(w.data)
    h.update(repr((trace.tx_marks, trace.destages, trace.resizes)).encode())
    return h.hexdigest()


class Checkpoint:
    """The ``.partial`` folder of one scenario's report folder."""

    def __init__(self, scenario_folder: Path, key: dict[str, Any]):
        self.folder = Path(scenario_folder) / PARTIAL_DIR
        self.key = key
        self.stale_files = 0
        self.seconds = 0.0  # run time of the runs that saved what ``load`` found

    def save(self, steps: list[StepResult], seconds: float = 0.0) -> None:
        if not steps:
            return
        points = [s.step for s in steps]
        name = f"steps-{min(points)}-{max(points)}-{len(points)}.json"
        doc = {"key": self.key, "seconds": round(seconds, 3),
               "steps": [step_to_json(s) for s in steps]}
        atomic_write(self.folder / name, json.dumps(doc, separators=(",", ":")) + "\n")

    def load(self) -> list[StepResult]:
        """Saved results whose key matches, one per crash point, in step order."""
        found: dict[int, StepResult] = {}
        self.stale_files, self.seconds = 0, 0.0
        for path in sorted(self.folder.glob("steps-*.json")):
            try:
                doc = json.loads(path.read_text())
                if doc.get("key") != self.key:
                    raise ValueError("saved for another scenario, seed or version")
                # Each file holds the time to its save, earlier runs included.
                seconds = _seconds(doc.get("seconds", 0.0))
                steps = [step_from_json(item) for item in doc["steps"]]
            except (OSError, ValueError, KeyError, TypeError):
                self.stale_files += 1
                continue
            found.update((step.step, step) for step in steps)
            self.seconds = max(self.seconds, seconds)
        return [found[p] for p in sorted(found)]

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def save_run_seconds(scenario_folder: Path, seconds: float) -> None:
    atomic_write(Path(scenario_folder) / RUN_SECONDS_FILE, f"{seconds:.3f}\n")


def run_seconds(scenario_folder: Path) -> float:
    """What the finished run in ``scenario_folder`` took; 0.0 when it is not known."""
    try:
        return _seconds(float((Path(scenario_folder) / RUN_SECONDS_FILE).read_text()))
    except (OSError, ValueError):
        return 0.0


def _seconds(value: Any) -> float:
    """A saved run time: a finite number of seconds, else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 <= value < float("inf"):
        raise ValueError(f"not a run time: {value!r}")
    return float(value)


# -- StepResult <-> JSON ----------------------------------------------------------------
# Counters keep their items in order, with tuple keys as lists; failures are objects.

def step_to_json(step: StepResult) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(step):
        value = getattr(step, f.name)
        if isinstance(value, Counter):
            value = [[list(k) if isinstance(k, tuple) else k, n] for k, n in value.items()]
        elif f.name == "failures":
            value = [dataclasses.asdict(x) for x in value]
        out[f.name] = value
    return out


def step_from_json(data: dict[str, Any]) -> StepResult:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(StepResult):
        if f.name not in data:
            raise KeyError(f.name)
        value = data[f.name]
        if f.type in ("Counter", Counter):
            value = Counter({tuple(k) if isinstance(k, list) else k: n for k, n in value})
        elif f.name == "failures":
            value = [_failure(x) for x in value]
        kwargs[f.name] = value
    return StepResult(**kwargs)


def _failure(data: dict[str, Any]) -> Failure:
    return Failure(**{**data, "torn": [tuple(t) for t in data["torn"]]})
