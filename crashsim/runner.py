"""``crashsim run`` and ``crashsim replay``: scenarios in, results and reports out.

``run`` keeps each scenario's judged chunks in ``<out>/<scenario>/.partial/`` while it
runs (see ``checkpoint``), so an interrupted run leaves a partial report and can be
finished with ``--resume``; a finished scenario removes them.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .checkpoint import Checkpoint, run_key, run_seconds, save_run_seconds
from .errors import EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, InputError
from .explore import (RECOVERY_SEP, ExploreInterrupted, StepResult, build_any,
                      build_context, crash_point, explore_all)
from .interrupt import held
from .pool import WORKER_CRASH, build_results_guarded
from .results import build_results, dumps
from .scenario import Scenario, ScenarioError, check_writer, load_scenario


def load_all(paths: list[Path], seed: int | None) -> list[tuple[Path, Scenario]]:
    """Every scenario, validated; all problems of all files reported together."""
    problems: list[str] = []
    loaded: list[tuple[Path, Scenario]] = []
    for path in paths:
        try:
            sc = load_scenario(path)
            check_writer(path, sc)
        except ScenarioError as exc:
            problems += exc.lines
            continue
        if seed is not None:
            sc = sc.model_copy(update={"explore": sc.explore.model_copy(
                update={"seed": seed})})
        loaded.append((path, sc))
    names: dict[str, Path] = {}
    for path, sc in loaded:
        if sc.name in names:
            problems.append(f"{path}:1: name: {sc.name!r} is already used by "
                            f"{names[sc.name]}; names must be unique (they name the "
                            f"report folder)")
        names[sc.name] = path
    if problems:
        raise InputError("\n".join(problems).replace("\n", "\ncrashsim: error: "))
    return loaded


def run_scenarios(paths: list[Path], *, out_dir: Path, workers: int, seed: int | None,
                  executor: str = "process", scheduler: str | None = None,
                  resume: bool = False, max_memory_mib: int | None = None) -> int:
    """Run every scenario, then write the reports. Ctrl-C or SIGTERM stops the run:
    scenarios already done keep their results, the one in progress gets results marked
    incomplete (its judged chunks stay saved for ``resume``), and the exit code is 130."""
    from .report.core import prepare_out_dir, write_reports
    scenarios = [(path, _with_memory_cap(sc, max_memory_mib))
                 for path, sc in load_all(paths, seed)]
    prepare_out_dir(out_dir)  # a file, dangling link or unwritable folder: exit 2
    done: list[tuple[dict[str, Any], float]] = []
    stopped: str | None = None
    opts = _Options(workers, executor, scheduler, resume)
    not_run: list[str] = []
    with _Progress() as progress:
        for i, (path, sc) in enumerate(scenarios):
            clock = _Clock()
            try:
                results = _run_scenario(sc, path, out_dir, opts, progress, clock)
            except _Stopped as stop:
                stopped = stop.message
                if stop.results is not None:
                    done.append((stop.results, clock.seconds()))
                    progress.line(summary_line(stop.results, clock.seconds()))
                else:
                    not_run.append(sc.name)
                not_run += [s.name for _, s in scenarios[i + 1:]]
                break
            except KeyboardInterrupt:
                stopped = f"interrupted before {sc.name} was explored"
                not_run += [s.name for _, s in scenarios[i:]]
                break
            done.append((results, clock.seconds()))
            progress.line(summary_line(results, clock.seconds()))
            if (line := reproducer_line(results)) is not None:
                progress.line(line)
    with held() as signals:
        write_reports(out_dir, done, not_run)
    if not_run:
        stopped += f"; {len(not_run)} scenario{'' if len(not_run) == 1 else 's'} not run"
    if stopped is None and signals.noted:
        stopped = "interrupted while writing the report (it is complete)"
    if stopped is not None:
        print(f"crashsim: {stopped}; report at {out_dir / 'index.html'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"crashsim: report at {out_dir / 'index.html'}", file=sys.stderr)
    return EXIT_OK if all(r["verdict"] == "pass" for r, _ in done) else EXIT_FAIL


def _with_memory_cap(sc: Scenario, max_memory_mib: int | None) -> Scenario:
    if max_memory_mib is None:
        return sc
    return sc.model_copy(update={"explore": sc.explore.model_copy(
        update={"max_memory_mib": max_memory_mib})})


class _Clock:
    """A scenario's run time, with that of the earlier runs a ``--resume`` finishes."""

    def __init__(self) -> None:
        self.start, self.earlier_s = time.monotonic(), 0.0

    def seconds(self) -> float:
        return self.earlier_s + time.monotonic() - self.start


@dataclass
class _Options:
    workers: int
    executor: str
    scheduler: str | None
    resume: bool


class _Stopped(Exception):
    """A scenario was interrupted; ``results`` are what it got (None: nothing)."""

    def __init__(self, message: str, results: dict[str, Any] | None):
        super().__init__(message)
        self.message, self.results = message, results


def _run_scenario(sc: Scenario, path: Path, out_dir: Path, opts: _Options,
                  progress: "_Progress", clock: _Clock) -> dict[str, Any]:
    """One scenario's results.json, explored (or resumed) with its judged chunks saved."""
    from .report.core import atomic_write, scenario_dir
    folder = scenario_dir(out_dir, sc.name)
    if opts.resume:
        finished = _finished_results(folder, sc)
        if finished is not None:
            clock.earlier_s = run_seconds(folder)
            _note(f"resume: {sc.name}: finished earlier; not run again")
            return finished
    ctx = None
    steps: list[StepResult] = []
    try:
        ctx = build_context(sc, source=str(path))
        ckpt = Checkpoint(folder, run_key(ctx))
        steps = _saved_steps(ckpt, ctx) if opts.resume else []
        if not steps:
            ckpt.clear()
        clock.earlier_s = ckpt.seconds if steps else 0.0
        steps = explore_all(ctx, opts.workers, progress.callback(sc.name), opts.executor,
                            opts.scheduler, saved=steps, on_chunk=_saver(ckpt, clock),
                            isolated=True)
        results = _build(ctx, steps, str(path))
    except KeyboardInterrupt as exc:
        if ctx is None:
            raise _Stopped(f"interrupted before {sc.name} was explored", None) from None
        if isinstance(exc, ExploreInterrupted):
            steps = exc.done
        with held():  # a second Ctrl-C must not leave this half done
            results = build_results(ctx, steps, str(path), complete=False)
            atomic_write(folder / "results.json", dumps(results))
        judged = ctx.trace.n_steps + 1 - results["unexplored_crash_points"]
        raise _Stopped(f"interrupted: {sc.name} has {judged} of {ctx.trace.n_steps + 1} "
                       f"crash points judged (saved; run the same command with --resume "
                       f"to finish it)", results) from None
    with held() as signals:
        atomic_write(folder / "results.json", dumps(results))
        save_run_seconds(folder, clock.seconds())
        ckpt.clear()
    if signals.noted:
        raise _Stopped(f"interrupted after {sc.name} finished", results)
    return results


def _saver(ckpt: Checkpoint, clock: _Clock) -> Callable[[list[StepResult]], None]:
    def save(chunk: list[StepResult]) -> None:
        with held() as signals:
            ckpt.save(chunk, clock.seconds())
        if signals.noted:
            raise KeyboardInterrupt
    return save


def _saved_steps(ckpt: Checkpoint, ctx) -> list[StepResult]:
    name, n_points = ctx.scenario.name, ctx.trace.n_steps + 1
    steps = ckpt.load()
    if steps:
        _note(f"resume: {name}: {len(steps)} of {n_points} crash points saved "
              f"({ckpt.seconds:.1f}s of run time); judging the other "
              f"{n_points - len(steps)}")
    elif ckpt.stale_files:
        _note(f"resume: {name}: the saved results are for another version of the "
              f"scenario, seed or crashsim, or another recording of its trace; running "
              f"it from the start")
    else:
        _note(f"resume: {name}: nothing saved to resume; running it from the start")
    return steps


def _finished_results(folder: Path, sc: Scenario) -> dict[str, Any] | None:
    """The scenario's complete results.json, if it is for this very scenario."""
    try:
        results = json.loads((folder / "results.json").read_text())
        block = results["scenario"]
        same = (results.get("complete") is True
                and results.get("crashsim_version") == __version__
                and block.get("hash") == sc.digest()
                and block.get("seed") == sc.explore.seed
                and block.get("explore") == sc.explore.model_dump(mode="json"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return results if same else None


def _build(ctx, steps: list[StepResult], path: str) -> dict[str, Any]:
    if any(s.outcomes.get(WORKER_CRASH) for s in steps):
        return build_results_guarded(ctx, steps, path)
    return build_results(ctx, steps, path)


def _note(text: str) -> None:
    print(f"crashsim: {text}", file=sys.stderr, flush=True)


def run_one(sc: Scenario, path: str, workers: int = 1, executor: str = "process",
            scheduler: str | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    ctx = build_context(sc, source=path)
    steps = explore_all(ctx, workers, progress, executor, scheduler, isolated=True)
    return _build(ctx, steps, path)


def summary_line(results: dict[str, Any], elapsed_s: float) -> str:
    """One line per scenario; an incomplete run or skipped states are said plainly."""
    t = results["totals"]
    found = ", ".join(f"{c}={n}" for c, n in results["violation_counts"].items() if n)
    verdict = "PASS" if results["verdict"] == "pass" else "FAIL"
    expect = results["scenario"]["expect"]
    expect_text = "pass" if expect == "pass" else "violations " + ",".join(
        expect["violations"])
    head = f"{verdict} {results['scenario']['name']}: "
    if not results.get("complete", True):
        missing = results.get("unexplored_crash_points", 0)
        head += (f"INCOMPLETE (interrupted: {missing} of {t['crash_points']} crash points "
                 f"not judged), " if missing else
                 "INCOMPLETE (interrupted before shrinking), ")
    if results.get("workload_error"):
        head += f"WORKLOAD FAILED ({results['workload_error']}), "
    if results.get("memory_capped_crash_points"):
        head += (f"NOT JUDGED IN FULL ({results['memory_capped_crash_points']} of "
                 f"{t['crash_points']} crash points over the memory cap), ")
    during = t.get("recovery_explored", 0)
    during_text = f" and {during} cut during their recovery" if during else ""
    return (f"{head}{t['steps']} steps, {t['explored']} states explored "
            f"({t['distinct']} distinct){during_text}{skipped_text(results)}, "
            f"violations: {found or 'none'}; expected {expect_text}; {elapsed_s:.1f}s")


def reproducer_line(results: dict[str, Any]) -> str | None:
    """For a failed scenario, its first violation's minimal state and the command that
    judges it alone: a failure should be reproducible from the terminal it printed on."""
    if results["verdict"] == "pass" or not results["violations"]:
        return None
    v = results["violations"][0]
    return f"  first violation, {v['class']} (minimal state): {v['replay_command']}"


def skipped_text(results: dict[str, Any]) -> str:
    """", 196 legal states skipped (max_states_per_step)", or "" when none were."""
    reasons = list(results.get("skipped_reasons") or [])
    exact = results.get("skipped_states")
    if exact == 0 or not reasons:
        return ""
    count = f"{exact}" if exact is not None else \
        f"~10^{results.get('skipped_states_log10', 0.0):.1f}"
    if "memory_cap" in reasons:
        cap = results["scenario"].get("explore", {}).get("max_memory_mib")
        reasons[reasons.index("memory_cap")] = (
            f"memory cap of {cap} MiB: {results.get('memory_capped_crash_points', 0)} "
            f"crash points not judged")
    return f", {count} legal states skipped ({'; '.join(reasons)})"


def replay_state(state_id: str, scenario_path: Path, write_image: Path | None,
                 seed: int | None = None) -> int:
    from .diff import view_diff
    [(_, sc)] = load_all([scenario_path], seed)
    ctx = build_context(sc, source=str(scenario_path))
    try:
        state = build_any(ctx, state_id)
    except ValueError as exc:
        msg = str(exc)  # most of these already name the state ID: say it once
        raise InputError(msg if msg.startswith("state ID ") else
                         f"state ID {state_id!r}: {msg}") from None
    if write_image is not None:
        try:
            state.image.to_file(write_image)
        except OSError as exc:
            raise InputError(f"--write-image {write_image}: {exc.strerror}; give a file "
                             f"path in an existing, writable folder") from None
        print(f"crashed image written to {write_image} (unrecovered)")
    point = crash_point(ctx, state_id)
    acked, started = ctx.trace.acked(point), ctx.trace.started(point)
    verdict = ctx.judge.judge(state.image, acked, started)
    during = f", recovery step {state.p}" if RECOVERY_SEP in state_id else ""
    print(f"state {state_id} (step {point}{during}, tier {state.tier}): {verdict.outcome}")
    print(f"  surviving pending writes: {sorted(state.survivors) or 'none'}; "
          f"torn units: {sorted(state.torn) or 'none'}")
    print(f"  acknowledged {acked}, started {started}; view matches k = "
          f"{verdict.matched_k or 'none'}")
    if verdict.detail:
        print(f"  {verdict.detail}")
    for line in verdict.examined.recovery.decisions:
        print(f"  recovery: {line}")
    if verdict.outcome in ("mixed", "lost", "recovery-error"):
        from .results import closest_expected
        actual = ctx.judge.view_of(state.image)
        expected = closest_expected(ctx, actual, acked, started)
        print(view_diff(ctx.model, expected, actual, sc.workload.image.block_size))
    return EXIT_OK if verdict.passed else EXIT_FAIL


class _Progress:
    """A rich progress bar on a terminal; one plain line per scenario elsewhere."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._rich = None
        self._task = None

    def __enter__(self) -> "_Progress":
        if self.tty:
            from rich.progress import Progress
            self._rich = Progress(transient=True)
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def callback(self, name: str) -> Callable[[int, int], None] | None:
        if self._rich is None:
            return None
        if self._task is not None:
            self._rich.remove_task(self._task)
        self._task = self._rich.add_task(name, total=None)
        task = self._task

        def update(done: int, total: int) -> None:
            self._rich.update(task, completed=done, total=total)
        return update

    def line(self, text: str) -> None:
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)
