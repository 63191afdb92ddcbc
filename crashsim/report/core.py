"""The shared report core: safe paths, atomic writes, colours and summary helpers.

One module per output format (``plots``, ``html``, ``junit``) sits on top of this one,
as in coverage.py. Every file goes through ``FileSet`` so that an error part-way through
a report removes what that report already wrote instead of leaving a half-written folder.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import InputError
from ..scenario import OUTCOME_CLASSES, VIOLATION_CLASSES  # noqa: F401 (html and tests import it from here)

PASS_CLASSES = ("old", "new")

# Passing outcomes are greens; each violation class has its own warm colour, distinct
# enough to tell apart in a legend. "pass" merges old and new where a figure has no room.
OUTCOME_COLOURS = {
    "pass": "#4daf4a",
    "old": "#1b7837",
    "new": "#7fbf7b",
    "mixed": "#f0b400",
    "lost": "#e66101",
    "recovery-error": "#b2182b",
    "stuck": "#e7298a",
    "structure": "#7f3b08",
    "worker-crash": "#40004b",
}
UNKNOWN_COLOUR = "#888888"
FAILED_COLOUR = "#d7301f"

# Later is worse: a crash point or heat-map cell shows the worst outcome among its states.
SEVERITY = ("pass",) + tuple(VIOLATION_CLASSES) + ("worker-crash",)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_DIRNAME_CHARS = 100


class ReportError(InputError):
    """A report could not be written; the message names the path and the problem.

    An InputError (exit 2): the cause is the --out folder the user gave or what is in it.
    """


def colour(outcome: str) -> str:
    return OUTCOME_COLOURS.get(outcome, UNKNOWN_COLOUR)


def is_violation(outcome: str) -> bool:
    return outcome not in PASS_CLASSES and outcome != "pass"


def worst(outcomes: Iterable[str]) -> str | None:
    """The most severe outcome, with old/new folded into "pass"; None when empty."""
    best_rank, found = -1, None
    for o in outcomes:
        name = "pass" if o in PASS_CLASSES else o
        rank = SEVERITY.index(name) if name in SEVERITY else len(SEVERITY)
        if rank > best_rank:
            best_rank, found = rank, name
    return found


# -- paths ----------------------------------------------------------------------------

def safe_dirname(name: str) -> str:
    """One safe path component for a scenario name (which may contain anything).

    Keeps [A-Za-z0-9._-], replaces the rest, never starts with a dot and never holds
    "..". When the name had to change, a short hash of the original keeps two different
    names (say "a/b" and "a_b") from sharing a folder.
    """
    safe = _UNSAFE.sub("_", name).replace("..", "__")
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe == name and 0 < len(safe) <= MAX_DIRNAME_CHARS:
        return safe
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{safe[:MAX_DIRNAME_CHARS] or 'scenario'}-{digest}"


def ensure_inside(out_dir: Path | str, path: Path | str, *, file: bool = False) -> Path:
    """``path`` resolved; raises ReportError if it is not inside ``out_dir``.

    With ``file=True`` the path names a file ``atomic_write`` will replace by rename, so a
    symlink left there is replaced, never followed: only its folder is resolved.
    """
    root = Path(out_dir).resolve()
    path = Path(path)
    target = path.parent.resolve() / path.name if file else path.resolve()
    if target != root and not target.is_relative_to(root):
        raise ReportError(f"{path}: refusing to write outside the report folder {root}")
    return target


def prepare_out_dir(out_dir: Path | str) -> Path:
    """Create the report folder (and its parents); one ReportError if it cannot be.

    A symlink given as --out is followed (the user chose it); a file, a dangling symlink
    or a folder that cannot be created or written is refused before anything runs.
    """
    out = Path(out_dir)
    if out.is_symlink() and not out.exists():
        raise ReportError(f"--out {out}: a symlink to {os.readlink(out)}, which does not "
                          f"exist; create that folder or give another --out")
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: is a file, not a folder; give a folder for the "
                          f"report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"--out {out}: cannot create the report folder: "
                          f"{exc.strerror}; give a writable folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ReportError(f"--out {out}: the report folder is not writable; give a "
                          f"writable folder")
    return out


def scenario_dir(out_dir: Path | str, name: str) -> Path:
    """The folder of one scenario's report: ``out_dir/<safe name>``."""
    path = Path(out_dir) / safe_dirname(name)
    ensure_inside(out_dir, path)
    return path


def atomic_write(path: Path | str, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, rename.

    Readers never see a half-written file; the temp file is removed on any error.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes 0600; reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class FileSet:
    """Files (and folders) written by one report call; removed again if it fails.

    Use as a context manager: on an exception every file written through it and every
    folder it created (if left empty) is removed, then the exception propagates.
    """

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.dirs: list[Path] = []

    def write(self, path: Path | str, data: bytes | str) -> Path:
        path = Path(path)
        missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
        atomic_write(path, data)
        self.dirs.extend(reversed(missing))
        self.paths.append(path)
        return path

    def adopt(self, other: "FileSet") -> None:
        self.paths.extend(other.paths)
        self.dirs.extend(other.dirs)

    def remove(self) -> None:
        for p in reversed(self.paths):
            p.unlink(missing_ok=True)
        for d in reversed(self.dirs):
            try:
                d.rmdir()
            except OSError:
                pass   # not empty: something else (results.json) lives there
        self.paths, self.dirs = [], []

    def __enter__(self) -> "FileSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.remove()


# -- summaries shared by the formats --------------------------------------------------

def scenario_name(result: dict[str, Any]) -> str:
    return str(result["scenario"]["name"])


def expect_text(result: dict[str, Any]) -> str:
    expect = result["scenario"].get("expect", "pass")
    if expect == "pass":
        return "pass (no violations)"
    wanted = expect.get("violations", []) if isinstance(expect, dict) else []
    return "violations: " + (", ".join(map(str, wanted)) or "none listed")


def found_classes(result: dict[str, Any]) -> list[str]:
    counts = violation_counts(result)
    return [c for c, n in counts.items() if n]


def violation_counts(result: dict[str, Any]) -> dict[str, int]:
    counts = result.get("violation_counts")
    if counts is None:
        outcomes = result.get("totals", {}).get("outcomes", {})
        counts = {c: n for c, n in outcomes.items() if is_violation(c)}
    return {str(c): int(n) for c, n in counts.items()}


def counts_text(counts: dict[str, int]) -> str:
    text = ", ".join(f"{c} {n}" for c, n in counts.items() if n)
    return text or "none"


def legal_text(exact: int | None, log10: float) -> str:
    """An exact count when known, otherwise "~10^x" from its log10."""
    if exact is not None:
        return f"{exact:,}"
    if not math.isfinite(log10):
        return "unknown"
    return f"~10^{log10:.1f}"


def skipped_reasons_text(result: dict[str, Any]) -> str:
    """Why legal states were not explored, for people; empty when none were skipped."""
    texts = []
    for reason in result.get("skipped_reasons") or []:
        if reason == "memory_cap":
            cap = (result["scenario"].get("explore") or {}).get("max_memory_mib", "?")
            n = result.get("memory_capped_crash_points", 0)
            texts.append(f"the memory cap of {cap} MiB was reached: {n} crash points "
                         f"were not judged")
        elif reason == "max_states_per_step":
            texts.append("the per-step budget (explore.max_states_per_step)")
        else:
            texts.append(str(reason))
    return "; ".join(texts)


NOT_RUN_REASON = "not run: the run was interrupted before this scenario started"


def failure_reason(result: dict[str, Any]) -> str:
    """Why a scenario did not meet its expectation, in one line (empty when it did)."""
    if result.get("verdict") == "pass":
        return ""
    if not result.get("complete", True):
        missing = result.get("unexplored_crash_points")
        finish = f"(finish it with crashsim run --resume); expected {expect_text(result)}"
        if missing:
            return (f"incomplete run: interrupted with {missing} crash points not "
                    f"judged {finish}")
        if missing == 0:
            return f"incomplete run: interrupted before its violations were shrunk {finish}"
        return (f"incomplete run: {result.get('skipped_states', 0)} states skipped; "
                f"expected {expect_text(result)}")
    found = found_classes(result)
    expect = result["scenario"].get("expect", "pass")
    capped = result.get("memory_capped_crash_points")
    if capped and expect == "pass" and not found:
        cap = result["scenario"].get("explore", {}).get("max_memory_mib")
        return (f"not judged in full: the memory cap of {cap} MiB left {capped} crash "
                f"points unjudged, so a pass cannot be claimed (raise "
                f"explore.max_memory_mib or --max-memory-mib)")
    if expect == "pass" or not found:
        head = (f"expected {expect_text(result)}, found "
                f"{counts_text(violation_counts(result))}")
    else:
        wanted = set(expect.get("violations", []))
        head = (f"expected {expect_text(result)}; missing "
                f"{', '.join(sorted(wanted - set(found))) or 'none'}")
    violations = result.get("violations") or []
    if violations:
        v = violations[0]
        # The state the replay command judges, so the two IDs on the line agree.
        head += (f"; first violation {v['class']}, minimal state "
                 f"{v['minimal_state_id']}; replay: {v['replay_command']}")
    return head


# -- orchestration --------------------------------------------------------------------

def write_reports(out_dir: Path | str,
                  results_with_timing: list[tuple[dict[str, Any], float]],
                  not_run: Sequence[str] = ()) -> list[Path]:
    """Every scenario page, the index and junit.xml; all or nothing.

    ``not_run`` names the scenarios an interrupted run never started: without them the
    index and junit.xml would report only what ran, and call an unfinished run all green.

    Returns the paths written. On any error the files this call wrote are removed
    (results.json, written by the caller, is left alone) and the error propagates.
    """
    from . import html, junit
    out_dir = Path(out_dir)
    with FileSet() as files:
        for result, elapsed_s in results_with_timing:
            html.write_scenario_page(out_dir, result, elapsed_s, files=files)
        html.write_index(out_dir, results_with_timing, files=files, not_run=not_run)
        junit.write_junit(out_dir / "junit.xml", results_with_timing, files=files,
                          not_run=not_run)
    return files.paths
