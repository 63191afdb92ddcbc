"""HTML reports: one self-contained page per scenario, and an index of all scenarios.

Pages are rendered by jinja2 with autoescaping always on: scenario names, descriptions,
diffs and recovery logs are user-supplied text and must never become markup. Figures are
rendered to memory first, so a failing figure leaves nothing written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jinja2

from .. import __version__
from . import plots
from .core import (NOT_RUN_REASON, OUTCOME_CLASSES, FileSet, colour, counts_text,
                   ensure_inside, expect_text, failure_reason, is_violation, legal_text,
                   safe_dirname, scenario_dir, skipped_reasons_text, violation_counts)

PER_STEP_OPEN_LIMIT = 25   # longer per-step tables start collapsed

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("crashsim.report", "templates"),
    autoescape=True,                       # not select_autoescape: names end in .j2
    undefined=jinja2.StrictUndefined,      # a missing key is a bug, not an empty cell
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_ENV.filters["colour"] = colour
_ENV.filters["legal"] = lambda row: legal_text(row.get("legal_states"),
                                               row.get("legal_states_log10", 0.0))
_ENV.filters["thousands"] = lambda n: f"{n:,}" if isinstance(n, int) else str(n)
_ENV.filters["counts"] = counts_text
_ENV.filters["any_violation"] = lambda outcomes: any(
    n and is_violation(c) for c, n in outcomes.items())


def write_scenario_page(out_dir: Path | str, result: dict[str, Any], elapsed_s: float,
                        files: FileSet | None = None) -> Path:
    """``out_dir/<safe name>/index.html`` and its PNG figures; returns the page path.

    With ``files`` the caller owns clean-up; otherwise a failure removes what was written.
    """
    folder = scenario_dir(out_dir, result["scenario"]["name"])
    figures = plots.render_all(result)
    page = _ENV.get_template("scenario.html.j2").render(
        **_scenario_context(result, elapsed_s, list(figures)))
    with _files(files) as fs:
        for name, png in figures.items():
            fs.write(ensure_inside(out_dir, folder / name, file=True), png)
        return fs.write(ensure_inside(out_dir, folder / "index.html", file=True), page)


def write_index(out_dir: Path | str,
                results_with_timing: list[tuple[dict[str, Any], float]],
                files: FileSet | None = None, not_run: Sequence[str] = ()) -> Path:
    """``out_dir/index.html``: one row per scenario, linked to its page; scenarios in
    ``not_run`` (never started) get an unlinked NOT RUN row."""
    rows = [_index_row(r, t) for r, t in results_with_timing]
    page = _ENV.get_template("index.html.j2").render(
        rows=rows, version=__version__, title="crashsim report",
        total_s=sum(t for _, t in results_with_timing),
        failed=sum(1 for r in rows if r["verdict"] != "pass"),
        not_run=list(not_run), not_run_reason=NOT_RUN_REASON)
    with _files(files) as fs:
        return fs.write(ensure_inside(out_dir, Path(out_dir) / "index.html", file=True),
                        page)


class _files:
    """The caller's FileSet as-is, or a fresh one that cleans up after itself."""

    def __init__(self, files: FileSet | None) -> None:
        self.files = files

    def __enter__(self) -> FileSet:
        if self.files is not None:
            return self.files
        self.own = FileSet()
        return self.own.__enter__()

    def __exit__(self, *exc) -> None:
        if self.files is None:
            self.own.__exit__(*exc)


def _scenario_context(result: dict[str, Any], elapsed_s: float,
                      figures: list[str]) -> dict[str, Any]:
    sc = result["scenario"]
    totals = result.get("totals", {})
    outcomes = totals.get("outcomes", {})
    classes = list(OUTCOME_CLASSES) + [c for c in outcomes if c not in OUTCOME_CLASSES]
    per_step = result.get("per_step") or []
    return {
        "title": f"crashsim: {sc['name']}", "version": __version__, "sc": sc,
        "result": result, "verdict": result.get("verdict", "fail"),
        "expect": expect_text(result), "reason": failure_reason(result),
        "skipped": legal_text(result.get("skipped_states"),
                              result.get("skipped_states_log10", 0.0)),
        "skipped_why": skipped_reasons_text(result),
        "unexplored": result.get("unexplored_crash_points", 0),
        "interrupted": "unexplored_crash_points" in result,
        "elapsed_s": elapsed_s, "totals": totals, "classes": classes,
        "outcomes": {c: outcomes.get(c, 0) for c in classes},
        "device": _flatten(sc.get("device") or {}),
        "explore": _flatten(sc.get("explore") or {}),
        "per_step": per_step, "per_step_open": len(per_step) <= PER_STEP_OPEN_LIMIT,
        "during": bool(totals.get("recovery_explored")),
        "paths": sorted((result.get("recovery_paths") or {}).items(),
                        key=lambda kv: (-kv[1], kv[0])),
        "violations": result.get("violations") or [],
        "figures": [(f, FIGURE_CAPTIONS.get(f, f)) for f in figures],
    }


def _flatten(settings: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested settings as ("cache.mode", "writeback") rows."""
    rows: list[tuple[str, str]] = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, str(value)))
    return rows


def _index_row(result: dict[str, Any], elapsed_s: float) -> dict[str, Any]:
    sc, totals = result["scenario"], result.get("totals", {})
    return {"name": sc["name"], "href": f"{safe_dirname(sc['name'])}/index.html",
            "verdict": result.get("verdict", "fail"), "expect": expect_text(result),
            "complete": result.get("complete", True), "steps": totals.get("steps", 0),
            "unexplored": result.get("unexplored_crash_points", 0),
            "crash_points": totals.get("crash_points", 0),
            "memory_capped": "memory_cap" in (result.get("skipped_reasons") or []),
            "explored": totals.get("explored", 0),
            "recovery_explored": totals.get("recovery_explored", 0),
            "violations": {c: n for c, n in violation_counts(result).items() if n},
            "elapsed_s": elapsed_s, "reason": failure_reason(result)}


FIGURE_CAPTIONS = {
    "states_per_step.png": "Crash states per I/O step: legal (dashed), explored and "
                           "failed, on a log scale.",
    "heatmap.png": "Worst outcome by crash point and by how many pending writes "
                   "survived (and how many units were torn).",
    "timeline.png": "The writer's I/O under the simulated device: writes and flushes "
                    "from submit to completion, acknowledgements, and crash points "
                    "coloured by their worst outcome.",
    "recovery_paths.png": "How many explored crash states took each recovery branch.",
}
