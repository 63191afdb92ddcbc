"""A pytest plugin: ``pytest scenarios/`` runs each scenario file as a test.

Registered through the ``pytest11`` entry point, so a project that installs crashsim can
put its scenario YAML in a ``scenarios/`` folder and gate CI on it with no new tooling.
A failure names the first violation's state ID and the command that replays it.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

# A scenario names its writer or its trace at the top level. Other tools keep YAML in
# folders called scenarios too. A file that does not parse is checked on its text, so a
# scenario with a YAML error is still collected (and its error reported), not skipped.
_SCENARIO_KEY = re.compile(r"""^["']?(writer|trace)["']?\s*:""", re.MULTILINE)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("crashsim")
    group.addoption("--crashsim-workers", type=int, default=1,
                    help="worker processes per crashsim scenario (default 1)")


def pytest_configure(config: pytest.Config) -> None:
    # The bounds of `crashsim run --workers`: 0 or less ran with one worker unasked, and
    # a huge count spent minutes starting processes (or died allocating their lanes).
    from .cli import MAX_WORKERS
    workers = config.getoption("--crashsim-workers")
    if not 1 <= workers <= MAX_WORKERS:
        raise pytest.UsageError(f"--crashsim-workers must be from 1 to {MAX_WORKERS}, "
                                f"got {workers}")


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.suffix in (".yaml", ".yml") and file_path.parent.name == "scenarios" \
            and _looks_like_scenario(file_path):
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


def _looks_like_scenario(path: Path) -> bool:
    from .scenario import MAX_SCENARIO_BYTES, ScenarioError, _read_yaml
    try:
        data = _read_yaml(path)  # bounded, and guarded against alias bombs
    except ScenarioError:  # unreadable, no mapping, or a YAML error: the text tells
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_SCENARIO_BYTES).decode("utf-8", "replace")
        except OSError:
            return True  # collected, so that loading it reports why it cannot be read
        return _SCENARIO_KEY.search(text) is not None
    return "writer" in data or "trace" in data


class ScenarioFailed(Exception):
    pass


class ScenarioFile(pytest.File):
    def collect(self):
        yield ScenarioItem.from_parent(self, name=self.path.stem)


class ScenarioItem(pytest.Item):
    def runtest(self) -> None:
        from .runner import run_one
        from .scenario import check_writer, load_scenario
        sc = load_scenario(self.path)
        check_writer(self.path, sc)
        workers = self.config.getoption("--crashsim-workers")
        results = run_one(sc, str(self.path), workers=workers)
        if results["verdict"] != "pass":
            raise ScenarioFailed(failure_message(results))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ScenarioFailed):
            return str(excinfo.value)
        from .scenario import ScenarioError
        if isinstance(excinfo.value, ScenarioError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, 0, f"crashsim scenario {self.name}"


def failure_message(results: dict) -> str:
    sc = results["scenario"]
    found = ", ".join(f"{c}={n}" for c, n in results["violation_counts"].items() if n)
    expect = sc["expect"] if sc["expect"] == "pass" else \
        "violations " + ", ".join(sc["expect"]["violations"])
    lines = [f"scenario {sc['name']}: expected {expect}; found {found or 'no violations'}"]
    if not results["complete"]:
        lines.append("the run is incomplete")
    # Either fails a run that found no violation: without them the message has no reason.
    if results.get("workload_error"):
        lines.append(f"the workload failed on its own: {results['workload_error']}")
    if results.get("memory_capped_crash_points"):
        lines.append(f"not judged in full: {results['memory_capped_crash_points']} of "
                     f"{results['totals']['crash_points']} crash points over the memory cap")
    if results["violations"]:
        v = results["violations"][0]
        lines.append(f"first violation: {v['class']} at state {v['state_id']} "
                     f"(minimal {v['minimal_state_id']}): {v['detail']}")
        lines.append(f"reproduce: {v['replay_command']}")
    return "\n".join(lines)
