"""``crashsim run`` and ``crashsim replay``: scenarios in, results and reports out."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

from .cli import EXIT_FAIL, EXIT_INPUT, EXIT_OK, InputError
from .explore import build_any, build_context, explore_all
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
                  executor: str = "process", scheduler: str | None = None) -> int:
    from .report.core import atomic_write, scenario_dir, write_reports
    scenarios = load_all(paths, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    done: list[tuple[dict[str, Any], float]] = []
    with _Progress() as progress:
        for path, sc in scenarios:
            t0 = time.monotonic()
            results = run_one(sc, str(path), workers, executor, scheduler,
                              progress.callback(sc.name))
            elapsed = time.monotonic() - t0
            atomic_write(scenario_dir(out_dir, sc.name) / "results.json", dumps(results))
            done.append((results, elapsed))
            progress.line(summary_line(results, elapsed))
    write_reports(out_dir, done)
    print(f"crashsim: report at {out_dir / 'index.html'}", file=sys.stderr)
    return EXIT_OK if all(r["verdict"] == "pass" for r, _ in done) else EXIT_FAIL


def run_one(sc: Scenario, path: str, workers: int = 1, executor: str = "process",
            scheduler: str | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    ctx = build_context(sc)
    steps = explore_all(ctx, workers, progress, executor, scheduler)
    return build_results(ctx, steps, path)


def summary_line(results: dict[str, Any], elapsed_s: float) -> str:
    t = results["totals"]
    found = ", ".join(f"{c}={n}" for c, n in results["violation_counts"].items() if n)
    verdict = "PASS" if results["verdict"] == "pass" else "FAIL"
    expect = results["scenario"]["expect"]
    expect_text = "pass" if expect == "pass" else "violations " + ",".join(
        expect["violations"])
    return (f"{verdict} {results['scenario']['name']}: {t['steps']} steps, "
            f"{t['explored']} states explored ({t['distinct']} distinct), "
            f"violations: {found or 'none'}; expected {expect_text}; {elapsed_s:.1f}s")


def replay_state(state_id: str, scenario_path: Path, write_image: Path | None) -> int:
    from .diff import view_diff
    try:
        sc = load_scenario(scenario_path)
        check_writer(scenario_path, sc)
    except ScenarioError as exc:
        raise InputError(exc.lines[0]) from None
    ctx = build_context(sc)
    try:
        state = build_any(ctx, state_id)
    except ValueError as exc:
        raise InputError(f"state {state_id!r}: {exc}") from None
    if write_image is not None:
        state.image.to_file(write_image)
        print(f"crashed image written to {write_image} (unrecovered)")
    acked, started = ctx.trace.acked(state.p), ctx.trace.started(state.p)
    verdict = ctx.judge.judge(state.image, acked, started)
    print(f"state {state_id} (step {state.p}, tier {state.tier}): {verdict.outcome}")
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
