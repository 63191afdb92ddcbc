"""Interrupted and failing runs: Ctrl-C/SIGTERM keep a partial report, --resume finishes
it byte-identically, and a worker process that dies is a recorded outcome."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crashsim.checkpoint import Checkpoint, run_key, step_from_json, step_to_json
from crashsim.explore import ExploreInterrupted, build_context, chunks, explore_all
from crashsim.pool import MAX_CRASHES, MAX_CRASHES_PER_STEP, CrashLog
from crashsim.report.core import scenario_dir
from crashsim.results import dumps
from crashsim.runner import run_one, run_scenarios
from crashsim.scenario import load_scenario

# Writer plugins for the subprocess runs, importable by worker processes (PYTHONPATH).
PLUGINS = '''
import multiprocessing
import os
import signal
import time
from pathlib import Path

from crashsim.writers.base import RecoveryError
from crashsim.writers.wal import WalWriter, _SB


class SlowWal(WalWriter):
    """A correct WAL whose recovery takes a while, so a run can be interrupted; far
    longer once the folder named by CRASHSIM_TEST_GATE holds a saved chunk, so there is
    time to signal the run however its crash points are chunked."""

    def recover(self, dev):
        gate = os.environ.get("CRASHSIM_TEST_GATE")
        slow = gate is not None and any(Path(gate).glob("steps-*.json"))
        time.sleep(0.05 if slow else 0.003)
        return (yield from super().recover(dev))


def _doomed(wal, dev):
    """One content of the two-write workload: checkpoint 1, home torn a certain way."""
    _, lsn, _, _ = _SB.unpack(dev.read(0, _SB.size))
    home = dev.read(wal.data_offset, 3072)
    return lsn == 1 and home[1024] == 0xB2 and home[2047] == 0xA1


class ExitWal(WalWriter):
    def recover(self, dev):
        if _doomed(self, dev):
            os._exit(9)
        return (yield from super().recover(dev))


class KillWal(WalWriter):
    def recover(self, dev):
        if _doomed(self, dev):
            os.kill(os.getpid(), signal.SIGKILL)
        return (yield from super().recover(dev))


class StartupDeathWal(WalWriter):
    """Kills every process it is built in except the main one. Pool workers forked
    from the main process inherit its writer instead of building one, so there it dies
    at its first recovery; the fresh processes that judge lost work again build it."""

    def __init__(self, **kwargs):
        if multiprocessing.parent_process() is not None:
            os._exit(3)
        super().__init__(**kwargs)

    def recover(self, dev):
        if multiprocessing.parent_process() is not None:
            os._exit(3)
        return (yield from super().recover(dev))


class RaiseWal(WalWriter):
    """The same content refused in-process: what the dying writers must match."""

    def recover(self, dev):
        if _doomed(self, dev):
            raise RecoveryError("doomed content", 0)
        return (yield from super().recover(dev))
'''

SLOW = """\
name: slow-wal
writer: {kind: "crashsim_test_plugins:SlowWal"}
workload:
  image: {virtual_size: 1MiB, log_size: 1MiB}
  random: {count: 12, seed: 3, kind: log_write, max_length: 8KiB}
explore: {seed: 2, max_states_per_step: 16}
expect: pass
"""

SMALL = """\
name: {name}
writer: {{kind: "{kind}", defects: [{defects}]}}
workload:
  image: {{virtual_size: 1MiB, log_size: 1MiB}}
  ops:
    - log_write: {{offset: 0, length: 2KiB, pattern: 0xa1}}
    - log_write: {{offset: 1KiB, length: 2KiB, pattern: 0xb2}}
explore: {{seed: 5, max_states_per_step: 32}}
expect: {expect}
"""


def _small(folder: Path, name: str, kind: str = "wal", defects: str = "",
           expect: str = "pass") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(SMALL.format(name=name, kind=kind, defects=defects, expect=expect))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Scenario files and the plugin module, with paths the same for every run."""
    folder = tmp_path_factory.mktemp("interrupt")
    (folder / "crashsim_test_plugins.py").write_text(PLUGINS)
    (folder / "slow-wal.yaml").write_text(SLOW)
    _small(folder, "quick-defect", defects="commit-before-data-flush",
           expect="{violations: [mixed]}")
    return folder


def _env(work: Path) -> dict[str, str]:
    path = os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1")


def _run(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crashsim", "run", *args], cwd=work,
                          env=_env(work), capture_output=True, text=True, timeout=300)


RUN_ARGS = ("quick-defect.yaml", "slow-wal.yaml", "--workers", "2")


@pytest.fixture(scope="module")
def uninterrupted(work) -> Path:
    proc = _run(work, *RUN_ARGS, "--out", "reference")
    assert proc.returncode == 0, proc.stderr
    return work / "reference"


def _sigint_as_on_a_terminal() -> None:
    """A shell starts background jobs with SIGINT ignored, and an ignored SIGINT stays
    ignored across exec (Python then installs no handler): a test suite started that way
    must not pass that on to the run it interrupts with Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(work: Path, args: tuple[str, ...], out: str,
               how: str) -> subprocess.CompletedProcess:
    """Start the run, wait until the slow scenario saved a chunk, then signal it."""
    partial = work / out / "slow-wal" / ".partial"
    env = dict(_env(work), CRASHSIM_TEST_GATE=str(partial))
    proc = subprocess.Popen([sys.executable, "-m", "crashsim", "run", *args,
                             "--out", out], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=_sigint_as_on_a_terminal)
    try:
        deadline = time.monotonic() + 120  # a guard against hanging, not a measurement
        while not list(partial.glob("steps-*.json")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no chunk was saved"
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if how == "SIGINT":  # Ctrl-C on a terminal: the whole process group
            os.killpg(proc.pid, signal.SIGINT)
        else:                # a CI runner or `kill`: the crashsim process only
            os.kill(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("how, names", [("SIGINT", ("quick-defect", "slow-wal")),
                                        ("SIGTERM", ("slow-wal",))])
def test_interrupt_then_resume_matches_an_uninterrupted_run(work, uninterrupted, how,
                                                            names):
    out = f"out-{how}"
    args = (*[f"{n}.yaml" for n in names], "--workers", "2")
    stopped = _interrupt(work, args, out, how)
    assert stopped.returncode == 130, stopped.stderr
    folder = work / out
    if "quick-defect" in names:  # finished before the signal: keeps its full results
        first = json.loads((folder / "quick-defect" / "results.json").read_text())
        assert first["complete"] is True
        assert not (folder / "quick-defect" / ".partial").exists()
    # The interrupted one: partial results, marked so, its chunks kept for --resume.
    partial = json.loads((folder / "slow-wal" / "results.json").read_text())
    assert partial["complete"] is False and partial["verdict"] == "fail"
    assert 0 < partial["unexplored_crash_points"] < partial["totals"]["crash_points"]
    assert partial["unexplored_crash_points"] == sum(
        b - a + 1 for a, b in partial["unexplored_steps"])
    assert len(partial["per_step"]) + partial["unexplored_crash_points"] == \
        partial["totals"]["crash_points"]
    assert list((folder / "slow-wal" / ".partial").glob("steps-*.json"))
    page = (folder / "slow-wal" / "index.html").read_text()
    assert "INCOMPLETE run" in page and "--resume" in page
    judged = partial["totals"]["crash_points"] - partial["unexplored_crash_points"]
    assert f"below cover the\n  {judged} crash points judged" in page
    assert f"{judged} of {partial['totals']['crash_points']}\n          crash points " \
           f"judged" in (folder / "index.html").read_text()
    junit = (folder / "junit.xml").read_text()
    assert 'name="complete" value="false"' in junit and "incomplete run" in junit
    assert "INCOMPLETE (interrupted" in stopped.stdout
    assert "crashsim: interrupted: slow-wal" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert not [p for p in folder.rglob("*.tmp")], "half-written files left behind"

    resumed = _run(work, *args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    if "quick-defect" in names:
        assert "resume: quick-defect: finished earlier; not run again" in resumed.stderr
    assert "resume: slow-wal: " in resumed.stderr and "crash points saved" in \
        resumed.stderr
    for name in names:
        got = (folder / name / "results.json").read_bytes()
        assert got == (uninterrupted / name / "results.json").read_bytes(), name
    assert not (folder / "slow-wal" / ".partial").exists()
    assert "INCOMPLETE" not in (folder / "slow-wal" / "index.html").read_text()
    assert not [p for p in folder.rglob("*.tmp")]


def test_resume_with_nothing_saved_runs_normally_and_says_so(work, uninterrupted,
                                                              capsys, monkeypatch):
    monkeypatch.chdir(work)  # the scenario path, as the reference run gave it
    code = run_scenarios([Path("quick-defect.yaml")], out_dir=work / "fresh", workers=1,
                         seed=None, resume=True)
    assert code == 0
    assert "resume: quick-defect: nothing saved to resume; running it from the start" \
        in capsys.readouterr().err
    assert (work / "fresh" / "quick-defect" / "results.json").read_bytes() == \
        (uninterrupted / "quick-defect" / "results.json").read_bytes()


# -- resume, in-process --------------------------------------------------------------------

def test_resume_from_any_saved_subset_is_byte_identical(tmp_path):
    """Whatever set of crash points was saved (chunks finish in any order), resuming
    gives exactly the results.json of one uninterrupted run, shrunk violations included."""
    path = _small(tmp_path, "subsets", defects="commit-before-data-flush",
                  expect="{violations: [mixed]}")
    sc = load_scenario(path)
    full = run_scenarios([path], out_dir=tmp_path / "full", workers=1, seed=None)
    assert full == 0
    want = (tmp_path / "full" / "subsets" / "results.json").read_bytes()
    ctx = build_context(sc)
    steps = explore_all(ctx)
    rng = random.Random(4)
    for trial, workers in enumerate([1, 2]):
        out = tmp_path / f"resumed-{trial}"
        keep = [s for s in steps if rng.random() < 0.5]
        Checkpoint(scenario_dir(out, sc.name), run_key(ctx)).save(keep)
        code = run_scenarios([path], out_dir=out, workers=workers, seed=None, resume=True)
        assert code == 0
        assert (out / "subsets" / "results.json").read_bytes() == want, trial
        assert not (out / "subsets" / ".partial").exists()


def _run_time_s(page: Path) -> float:
    text = page.read_text()
    return float(text.split("<dt>Run time</dt><dd>")[1].split(" s ")[0])


def test_a_resumed_run_reports_the_time_of_every_run_it_took(tmp_path, capsys):
    """The run time on the page and in junit is the scenario's, not only its last part's:
    the saved chunks carry the time before the interrupt, and a finished run keeps its
    total for a --resume that does not run it again."""
    path = _small(tmp_path, "timed")
    sc = load_scenario(path)
    ctx = build_context(sc)
    out = tmp_path / "out"
    Checkpoint(scenario_dir(out, sc.name), run_key(ctx)).save(explore_all(ctx)[:9],
                                                              seconds=100.0)
    for runs in range(2):  # resumed, then finished earlier and not run again
        assert run_scenarios([path], out_dir=out, workers=1, seed=None, resume=True) == 0
        err = capsys.readouterr().err
        assert ("9 of 33 crash points saved (100.0s of run time)" in err) == (runs == 0)
        assert ("finished earlier; not run again" in err) == (runs == 1)
        assert 100.0 < _run_time_s(out / "timed" / "index.html") < 160.0, runs
        junit = (out / "junit.xml").read_text()
        assert 100.0 < float(junit.split('time="')[2].split('"')[0]) < 160.0, runs
    assert run_scenarios([path], out_dir=out, workers=1, seed=None) == 0  # not resumed
    assert _run_time_s(out / "timed" / "index.html") < 60.0


def test_saved_results_with_a_corrupt_run_time_are_not_used(tmp_path):
    path = _small(tmp_path, "badtime")
    ctx = build_context(load_scenario(path))
    ckpt = Checkpoint(tmp_path / "folder", run_key(ctx))
    steps = explore_all(ctx)
    ckpt.save(steps[:3], seconds=5.0)
    ckpt.save(steps[3:6], seconds=7.5)
    assert [s.step for s in ckpt.load()] == list(range(6)) and ckpt.seconds == 7.5
    bad = sorted(ckpt.folder.glob("steps-3-*.json"))[0]
    bad.write_text(bad.read_text().replace('"seconds":7.5', '"seconds":"soon"'))
    assert [s.step for s in ckpt.load()] == [0, 1, 2] and ckpt.seconds == 5.0
    assert ckpt.stale_files == 1


def test_interrupted_while_shrinking_then_resumed(tmp_path, monkeypatch):
    """Every crash point judged, Ctrl-C while violations are shrunk: the results are
    incomplete (not shrunk), and --resume judges nothing again yet matches a full run."""
    from crashsim import runner
    path = _small(tmp_path, "late", defects="commit-before-data-flush",
                  expect="{violations: [mixed]}")
    assert run_scenarios([path], out_dir=tmp_path / "full", workers=1, seed=None) == 0
    real_build = runner._build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_build", interrupted)
    out = tmp_path / "out"
    assert run_scenarios([path], out_dir=out, workers=1, seed=None) == 130
    partial = json.loads((out / "late" / "results.json").read_text())
    assert partial["complete"] is False and partial["unexplored_crash_points"] == 0
    assert all(v["minimal_state_id"] == v["state_id"] for v in partial["violations"])
    assert "before its violations were shrunk" in \
        (out / "late" / "index.html").read_text()
    all_saved = []

    def spy(ctx, *args, **kwargs):
        all_saved.append(len(kwargs["saved"]) == ctx.trace.n_steps + 1)
        return explore_all(ctx, *args, **kwargs)

    monkeypatch.setattr(runner, "_build", real_build)
    monkeypatch.setattr(runner, "explore_all", spy)
    assert run_scenarios([path], out_dir=out, workers=1, seed=None, resume=True) == 0
    assert all_saved == [True]
    assert (out / "late" / "results.json").read_bytes() == \
        (tmp_path / "full" / "late" / "results.json").read_bytes()


def test_resume_ignores_results_saved_for_another_seed(tmp_path, capsys):
    path = _small(tmp_path, "stale")
    sc = load_scenario(path)
    ctx = build_context(sc)
    steps = explore_all(ctx)
    out = tmp_path / "out"
    # Saved under seed 5; resumed with --seed 6: a different run, nothing reused.
    Checkpoint(scenario_dir(out, sc.name), run_key(ctx)).save(steps[:10])
    assert run_scenarios([path], out_dir=out, workers=1, seed=6, resume=True) == 0
    assert "saved results are for another version of the scenario, seed or crashsim" \
        in capsys.readouterr().err
    assert run_scenarios([path], out_dir=tmp_path / "ref", workers=1, seed=6) == 0
    assert (out / "stale" / "results.json").read_bytes() == \
        (tmp_path / "ref" / "stale" / "results.json").read_bytes()


def test_resume_ignores_results_saved_for_another_recording_of_the_trace(tmp_path):
    """A trace recorded at run time is recorded again by the resumed run, and QEMU's
    bytes differ each time (fresh GUIDs) under the same scenario hash: crash points
    judged on the old recording must not be mixed with ones judged on the new."""
    import dataclasses
    from crashsim.trace import Write
    sc = load_scenario(_small(tmp_path, "rerecorded"))
    ctx = build_context(sc)
    folder = tmp_path / "out" / "rerecorded"
    Checkpoint(folder, run_key(ctx)).save(explore_all(ctx)[:10])
    io, w = next(iter(ctx.trace.writes.items()))
    changed = bytes([w.data[0] ^ 0xFF]) + w.data[1:]  # the same I/O, one byte apart
    again = dataclasses.replace(ctx.trace, writes={**ctx.trace.writes,
                                                   io: Write(io, w.offset, changed, w.fua)})
    fresh = Checkpoint(folder, run_key(build_context(sc, again)))
    assert fresh.load() == [] and fresh.stale_files == 1
    assert len(Checkpoint(folder, run_key(build_context(sc, ctx.trace))).load()) == 10


def test_a_run_without_resume_discards_old_saved_results(tmp_path):
    path = _small(tmp_path, "discard")
    sc = load_scenario(path)
    ctx = build_context(sc)
    partial = scenario_dir(tmp_path / "out", sc.name) / ".partial"
    Checkpoint(partial.parent, run_key(ctx)).save(explore_all(ctx)[:5])
    assert list(partial.glob("steps-*.json"))
    assert run_scenarios([path], out_dir=tmp_path / "out", workers=1, seed=None) == 0
    assert not partial.exists()


def test_interrupted_exploration_keeps_every_judged_chunk(tmp_path):
    """Serial path: Ctrl-C after two chunks; both are saved and handed back."""
    sc = load_scenario(_small(tmp_path, "serial-stop"))
    ctx = build_context(sc)
    ckpt = Checkpoint(tmp_path, run_key(ctx))
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(ExploreInterrupted) as stop:
        explore_all(ctx, 1, progress, on_chunk=ckpt.save)
    parts = chunks(ctx.trace.n_steps + 1, 1)
    assert [s.step for s in stop.value.done] == parts[0] + parts[1]
    assert [s.step for s in ckpt.load()] == parts[0] + parts[1]
    assert len(parts) > 2


def test_step_results_round_trip_through_the_checkpoint_format(tmp_path):
    path = _small(tmp_path, "roundtrip", defects="commit-before-data-flush",
                  expect="{violations: [mixed]}")
    ctx = build_context(load_scenario(path))
    steps = explore_all(ctx)
    assert any(s.failures for s in steps) and any(s.heat for s in steps)
    back = [step_from_json(json.loads(json.dumps(step_to_json(s)))) for s in steps]
    assert back == steps
    assert all(isinstance(t, tuple) for s in back for f in s.failures for t in f.torn)
    assert all(isinstance(k, tuple) for s in back for k in s.heat)


def test_chunks_of_the_remaining_points_stay_sorted_and_cover_them():
    todo = [3, 4, 5, 9, 10, 40, 41, 42, 43]
    parts = chunks(50, 2, todo)
    assert [p for part in parts for p in part] == todo
    assert chunks(40, 1) == [list(range(i, i + 5)) for i in range(0, 40, 5)]  # 8 each


# -- a worker process that dies --------------------------------------------------------

def test_a_dying_worker_is_a_recorded_outcome(work):
    """The writer kills the process judging one content (os._exit, or SIGKILL). The run
    completes; those states are worker-crash, exactly the states that an in-process twin
    refuses as recovery-error, and the detail says how the worker died."""
    dying = {"ExitWal": "exit code 9", "KillWal": "killed by signal SIGKILL"}
    for kind in dying:
        _small(work, f"dies-{kind}", kind=f"crashsim_test_plugins:{kind}")
    _small(work, "twin", kind="crashsim_test_plugins:RaiseWal")
    proc = _run(work, "dies-ExitWal.yaml", "dies-KillWal.yaml", "twin.yaml",
                "--workers", "2", "--out", "dead")
    assert proc.returncode == 1, proc.stderr  # violations found; each expected pass
    assert "Traceback" not in proc.stderr
    twin = json.loads((work / "dead" / "twin" / "results.json").read_text())
    n = twin["totals"]["outcomes"]["recovery-error"]
    assert n > 0
    refused = {v["state_id"] for v in twin["violations"]}
    for kind, how in dying.items():
        folder = work / "dead" / f"dies-{kind}"
        dead = json.loads((folder / "results.json").read_text())
        assert dead["complete"] is True
        assert dead["totals"]["outcomes"]["worker-crash"] == n
        assert dead["totals"]["outcomes"]["recovery-error"] == 0
        assert dead["totals"]["explored"] == twin["totals"]["explored"]
        for d, t in zip(dead["per_step"], twin["per_step"], strict=True):
            renamed = {("worker-crash" if c == "recovery-error" else c): k
                       for c, k in t["outcomes"].items()}
            assert d["outcomes"] == renamed, d["step"]
        crashes = [v for v in dead["violations"] if v["class"] == "worker-crash"]
        assert crashes and {v["state_id"] for v in crashes} <= refused
        assert all(v["detail"] == f"the worker process died ({how}) while judging this "
                   f"state" for v in crashes), kind
        assert f"FAIL dies-{kind}: " in proc.stdout and f"worker-crash={n}" in proc.stdout
        page = (folder / "index.html").read_text()
        assert "worker-crash" in page and how in page
        assert not (folder / ".partial").exists()


def test_a_dying_dask_worker_is_a_recorded_outcome(work, monkeypatch):
    """On Dask, a task whose worker died (KilledWorker) is judged again locally with the
    same isolation, giving the same counts as the in-process twin."""
    pytest.importorskip("dask.distributed")
    dies = _small(work, "dask-dies", kind="crashsim_test_plugins:ExitWal")
    twin_path = _small(work, "dask-twin", kind="crashsim_test_plugins:RaiseWal")
    env = dict(_env(work), DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    proc = subprocess.run([sys.executable, "-m", "crashsim", "run", dies.name,
                           "--workers", "2", "--executor", "dask", "--out", "dask"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    dead = json.loads((work / "dask" / "dask-dies" / "results.json").read_text())
    monkeypatch.syspath_prepend(str(work))  # the twin only refuses: safe in this process
    twin = run_one(load_scenario(twin_path), str(twin_path))
    n = twin["totals"]["outcomes"]["recovery-error"]
    assert n > 0 and dead["totals"]["outcomes"]["worker-crash"] == n
    assert dead["totals"]["explored"] == twin["totals"]["explored"]
    assert {v["state_id"] for v in dead["violations"]} <= \
        {v["state_id"] for v in twin["violations"]}
    assert all("exit code 9" in v["detail"] for v in dead["violations"])


def test_a_plugin_that_kills_every_worker_still_ends_as_recorded_outcomes(work):
    """Workers die before judging anything: each lost chunk is tried twice, then its
    states are recorded as worker-crash without being judged (the parent never runs the
    plugin's recovery), and shrinking falls back to the unshrunk states."""
    _small(work, "startup-death", kind="crashsim_test_plugins:StartupDeathWal")
    _small(work, "plain")
    proc = _run(work, "startup-death.yaml", "plain.yaml", "--workers", "2",
                "--out", "startup")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    dead = json.loads((work / "startup" / "startup-death" / "results.json").read_text())
    plain = json.loads((work / "startup" / "plain" / "results.json").read_text())
    assert dead["complete"] is True
    assert dead["totals"]["explored"] == plain["totals"]["explored"] > 0
    assert dead["totals"]["outcomes"]["worker-crash"] == dead["totals"]["explored"]
    assert dead["violations"] and all(
        v["detail"] == "not judged: the worker process died (exit code 3) outside any "
                       "judge call, twice" for v in dead["violations"])


def test_crash_log_bounds_keep_isolation_finite():
    log = CrashLog()
    for call in range(MAX_CRASHES_PER_STEP):
        log.record(7, call * 2, f"died {call}")
    assert log.detail(7, 2) == "died 1" and log.detail(7, 3) is None
    log.record(7, 40, "died again")  # one too many for this crash point
    assert log.detail(7, 39) is None
    assert log.detail(7, 41).startswith("not judged: 8 other states of this crash point")
    assert not log.judges_nothing([7])
    log.give_up_on([8, 9], "not judged: gave up")
    assert log.judges_nothing([8, 9]) and log.detail(9, 0) == "not judged: gave up"
    while log.everything is None:
        log.record(1, log.deaths, "died")
    assert log.deaths == MAX_CRASHES and log.judges_nothing([1, 2, 3])
    assert log.detail(3, 0).startswith(f"not judged: worker processes died {MAX_CRASHES}")


def test_run_one_results_do_not_depend_on_the_new_orchestration(tmp_path):
    """Serial and pool runs still agree (the pool now collects chunks as they finish)."""
    path = _small(tmp_path, "agree", defects="commit-before-data-flush",
                  expect="{violations: [mixed]}")
    sc = load_scenario(path)
    assert dumps(run_one(sc, str(path), workers=1)) == \
        dumps(run_one(sc, str(path), workers=2))


def test_a_pool_broken_before_its_tasks_are_all_submitted_loses_no_crash_point(
        monkeypatch, tmp_path):
    """A worker that dies at once breaks the pool while tasks are still being given
    out: submitting raises. The crash points are then judged again, none is lost, and
    the results are those of a serial run."""
    import crashsim.explore as explore
    from concurrent.futures.process import BrokenProcessPool

    class BrokenAtOnce:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, *args):
            raise BrokenProcessPool("a child process terminated abruptly")

        def shutdown(self, *args, **kwargs):
            pass

    path = tmp_path / "small.yaml"
    path.write_text(SMALL.format(name="small", kind="wal", defects="", expect="pass"))
    sc = load_scenario(path)
    serial = explore_all(build_context(sc), 1)
    monkeypatch.setattr(explore, "ProcessPoolExecutor", BrokenAtOnce)
    again = explore_all(build_context(sc), 2)
    assert [r.step for r in again] == [r.step for r in serial]
    assert [r.outcomes for r in again] == [r.outcomes for r in serial]


def test_a_worker_stopped_while_starting_ends_by_the_signal_not_the_parents_handler():
    """Workers fork with SIGINT and SIGTERM blocked and take them once their own handlers
    are set: a SIGTERM that reaches a starting worker ends it, where the handler
    inherited from the parent raised KeyboardInterrupt in it and printed a traceback."""
    import multiprocessing
    from crashsim.interrupt import sigterm_as_interrupt, stop_signals_blocked
    mp = multiprocessing.get_context("fork")
    with sigterm_as_interrupt(), stop_signals_blocked():
        child = mp.Process(target=_stopped_while_starting)
        child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGTERM


def _stopped_while_starting() -> None:
    from crashsim.interrupt import quiet_worker_signals
    os.kill(os.getpid(), signal.SIGTERM)  # the pool stops it before its handlers are set
    quiet_worker_signals()
    os._exit(3)  # not reached: the held SIGTERM ends the process first


def test_held_notes_stop_signals_but_leaves_an_ignored_one_ignored():
    from crashsim.interrupt import held
    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with held() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs at the next bytecode: give it one
        assert signals.noted == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's, or nohup's
        with held() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert signals.noted == []
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
