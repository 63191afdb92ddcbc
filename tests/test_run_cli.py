"""`crashsim run`, `crashsim replay` and `pytest scenarios/` as a user runs them."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from crashsim.results import dumps
from crashsim.runner import run_one
from crashsim.scenario import load_scenario

REPO = Path(__file__).resolve().parents[1]
GOLD = Path(__file__).parent / "gold"
PNG = b"\x89PNG\r\n\x1a\n"

SMALL = """\
name: {name}
description: a small WAL run for the CLI tests
writer: {{kind: wal, defects: [{defects}]}}
workload:
  image: {{virtual_size: 1MiB, log_size: 1MiB}}
  ops:
    - log_write: {{offset: 0, length: 2KiB, pattern: 0xa1}}
    - log_write: {{offset: 1KiB, length: 2KiB, pattern: 0xb2}}
explore: {{seed: 5, max_states_per_step: 32}}
expect: {expect}
"""


def _write(tmp_path: Path, name: str, defects: str = "", expect: str = "pass") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SMALL.format(name=name, defects=defects, expect=expect))
    return path


def _crashsim(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crashsim", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_run_writes_index_pages_figures_json_and_junit(tmp_path):
    good = _write(tmp_path, "small-clean")
    bad = _write(tmp_path, "small-defect", "commit-before-data-flush",
                 "{violations: [mixed]}")
    out = tmp_path / "reports"
    proc = _crashsim("run", str(good), str(bad), "--out", str(out), "--workers", "2",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("PASS ") == 2  # one line per scenario off a terminal
    assert (out / "index.html").read_text().count("small-") >= 2
    for name in ("small-clean", "small-defect"):
        page = out / name
        assert (page / "index.html").exists()
        pngs = sorted(page.glob("*.png"))
        assert len(pngs) >= 4
        assert all(p.read_bytes().startswith(PNG) for p in pngs)
        json.loads((page / "results.json").read_text())
    cases = ET.parse(out / "junit.xml").getroot().iter("testcase")
    assert sorted(c.get("name") for c in cases) == ["small-clean", "small-defect"]


def test_unmet_expectation_exits_1_and_junit_names_the_state(tmp_path):
    bad = _write(tmp_path, "surprise", "commit-before-data-flush")
    out = tmp_path / "reports"
    proc = _crashsim("run", str(bad), "--out", str(out), "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 1
    failure = ET.parse(out / "junit.xml").getroot().find(".//failure")
    assert failure is not None and "crashsim replay" in failure.get("message", "") + \
        (failure.text or "")
    # the terminal names the first violation's command, and it reproduces the failure
    line = next(x for x in proc.stdout.splitlines() if "first violation" in x)
    command = shlex.split(line.split(": ", 1)[1])
    assert command[:2] == ["crashsim", "replay"] and str(bad) in command
    assert _crashsim(*command[1:], cwd=tmp_path).returncode == 1


def test_replay_rebuilds_the_minimal_state_and_writes_the_image(tmp_path):
    bad = _write(tmp_path, "replay-me", "commit-before-data-flush",
                 "{violations: [mixed]}")
    res = run_one(load_scenario(bad), str(bad))
    v = next(v for v in res["violations"] if v["class"] == "mixed")
    image = tmp_path / "crashed.img"
    proc = _crashsim("replay", v["minimal_state_id"], "--scenario", str(bad),
                     "--write-image", str(image), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"state {v['minimal_state_id']}" in proc.stdout and ": mixed" in proc.stdout
    assert "expected 0x" in proc.stdout  # the diff
    assert image.stat().st_size > 0


def test_replay_of_a_malformed_state_id_is_an_input_error(tmp_path):
    sc = _write(tmp_path, "ids")
    for state_id in ("p9999:w1", "p0:w99", "garbage"):
        proc = _crashsim("replay", state_id, "--scenario", str(sc), cwd=tmp_path)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
        assert proc.stderr.count(state_id) == 1, proc.stderr


def test_replay_into_a_missing_folder_is_an_input_error(tmp_path):
    sc = _write(tmp_path, "nowhere", "commit-before-data-flush")
    for target in (tmp_path / "no" / "such" / "x.img", tmp_path):  # and a folder
        proc = _crashsim("replay", "p0:none", "--scenario", str(sc), "--write-image",
                         str(target), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
        assert f"--write-image {target}: " in proc.stderr


def test_an_image_that_fails_to_write_leaves_no_file(tmp_path, monkeypatch):
    from crashsim.image import SparseImage
    image = SparseImage(1 << 20)
    image.put_sector(3, b"\x01" * 512)

    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SparseImage, "changed_sectors", full)
    target = tmp_path / "state.img"
    with pytest.raises(OSError):
        image.to_file(target)
    assert not target.exists()


def test_executor_options_that_cannot_work_are_input_errors(tmp_path, monkeypatch):
    sc = _write(tmp_path, "exec")
    proc = _crashsim("run", str(sc), "--scheduler", "tcp://127.0.0.1:8786", cwd=tmp_path)
    assert proc.returncode == 2 and "add --executor dask" in proc.stderr
    assert not (tmp_path / "reports").exists()  # refused before any work
    import importlib.util
    from crashsim import dask_executor
    from crashsim.errors import InputError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "distributed" else real(name, *a))
    with pytest.raises(InputError, match=r"pip install 'crashsim\[dask\]'"):
        dask_executor.require_dask()


@pytest.mark.parametrize("args, needle", [
    (["run", "x.yaml", "--workers", "x"], "argument --workers: invalid int value: 'x'"),
    (["run", "x.yaml", "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (["replay", "p0:none", "--scenario", "x.yaml", "--seed", "z"], "argument --seed"),
    (["vhdx", "write", "x.vhdx", "0", "1", "--seed", "q"], "argument --seed"),
    (["vhdx", "replay", "--policy", "foo", "x.vhdx"], "invalid choice: 'foo'"),
    (["run"], "required: scenarios"),
    (["vhdx"], "the following arguments are required: COMMAND"),
    (["vhdx", "frob"], "argument COMMAND: invalid choice: 'frob' (choose from 'info'"),
])
def test_option_values_argparse_refuses_are_one_line(capsys, args, needle):
    # argparse printed its usage block above the error: three lines for one mistake
    from crashsim.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("crashsim: error: "), err
    assert needle in err and f"(see 'crashsim {args[0]}" in err


def test_the_vhdx_module_run_alone_has_the_same_one_line_errors():
    # python -m crashsim.vhdx_cli printed argparse's usage block, as its own parser
    proc = subprocess.run([sys.executable, "-m", "crashsim.vhdx_cli", "vhdx", "info"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == ("crashsim: error: the following arguments are required: "
                           "image (see 'crashsim vhdx info --help')\n")


@pytest.mark.parametrize("workers", ["0", "-1", "1025", "1000000000000"])
def test_workers_out_of_range_is_an_input_error(tmp_path, capsys, workers):
    # a huge count died allocating the pool's shared lanes (exit 3), before any fork
    from crashsim.cli import main
    sc = _write(tmp_path, "workers")
    assert main(["run", str(sc), "--out", str(tmp_path / "out"), "--workers", workers]) == 2
    assert capsys.readouterr().err == (f"crashsim: error: --workers must be from 1 to "
                                       f"1024, got {workers}\n")
    assert not (tmp_path / "out").exists()


def test_pytest_plugin_runs_scenarios_and_reports_a_violation(tmp_path):
    folder = tmp_path / "scenarios"
    folder.mkdir()
    _write(folder, "fine")
    _write(folder, "broken", "ack-before-commit-flush")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", str(folder), "-q",
                           "-p", "no:cacheprovider"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 passed" in proc.stdout
    assert "first violation: lost at state p" in proc.stdout
    assert "crashsim replay" in proc.stdout


def test_pytest_plugin_leaves_other_tools_yaml_in_a_scenarios_folder_alone(tmp_path):
    # The plugin is on wherever crashsim is installed: a project's own scenarios/ YAML
    # (fixtures, manifests) must not become failing crashsim tests.
    folder = tmp_path / "tests" / "scenarios"
    folder.mkdir(parents=True)
    (folder / "pod.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    (folder / "login.yml").write_text("- step: login\n  user: bob\n")
    (tmp_path / "tests" / "test_a.py").write_text("def test_ok():\n    pass\n")
    _write(folder, "fine")
    (folder / "typo.yaml").write_text("name: typo\nwriter: {kind: wal\nexpect: pass\n")
    (folder / "flow.yaml").write_text(  # a scenario on one line is still one
        "{name: flow, writer: {kind: wal}, workload: {ops: [{log_write: {offset: 0, "
        "length: 512}}]}}\n")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "-q",
                           "-p", "no:cacheprovider"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "1 failed, 3 passed" in proc.stdout, proc.stdout
    # A scenario with a YAML error is still collected, and its error names the line.
    assert "typo.yaml:3: YAML:" in proc.stdout


def test_pytest_plugin_says_why_a_run_with_no_violation_failed(tmp_path):
    # a workload that fails on its own (see the overflow test below), then a memory cap
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "overflow.yaml").write_text(SMALL.format(
        name="overflow", defects="", expect="pass").replace(
        "offset: 1KiB, length: 2KiB", "offset: 0, length: 1MiB"))
    (folder / "capped.yaml").write_text(SMALL.format(
        name="capped", defects="", expect="pass").replace(
        "explore: {", "explore: {max_memory_mib: 1, "))
    proc = subprocess.run([sys.executable, "-m", "pytest", str(folder), "-q",
                           "-p", "no:cacheprovider"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert "2 failed" in proc.stdout, proc.stdout
    assert "the workload failed on its own: ValueError: a 1048576-byte record" \
        in proc.stdout
    assert "not judged in full: " in proc.stdout
    assert "crash points over the memory cap" in proc.stdout


@pytest.mark.parametrize("workers", ["0", "-1", "1025"])
def test_pytest_plugin_workers_out_of_range_is_a_usage_error(tmp_path, workers):
    # as for `crashsim run --workers`; 1025 and up used to start that many processes
    folder = tmp_path / "scenarios"
    folder.mkdir()
    _write(folder, "fine")
    proc = subprocess.run([sys.executable, "-m", "pytest", str(folder), "-q",
                           "-p", "no:cacheprovider", f"--crashsim-workers={workers}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert f"--crashsim-workers must be from 1 to 1024, got {workers}" in proc.stderr


def _scrub(text: str) -> dict:
    data = json.loads(text)
    data["crashsim_version"] = "X"
    data["scenario"]["path"] = "X"
    for v in data["violations"]:
        v["replay_command"] = v["replay_command"].split(" --scenario ")[0]
    return data


def test_results_json_matches_the_gold_file(tmp_path):
    path = _write(tmp_path, "gold-small", "commit-before-data-flush",
                  "{violations: [mixed]}")
    got = _scrub(dumps(run_one(load_scenario(path), str(path))))
    gold_file = GOLD / "gold-small.results.json"
    if os.environ.get("CRASHSIM_UPDATE_GOLD"):
        gold_file.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(gold_file.read_text())


def test_a_workload_that_stops_on_its_own_error_never_passes(tmp_path):
    """The WAL's log holds 1 MiB; one 1 MiB record plus its headers does not fit, so the
    workload itself fails. Its crash states all pass, yet the run must not."""
    path = tmp_path / "overflow.yaml"
    path.write_text(SMALL.format(name="overflow", defects="", expect="pass").replace(
        "offset: 1KiB, length: 2KiB, pattern: 0xb2", "offset: 0, length: 1MiB, pattern: 0xb2"))
    out = tmp_path / "reports"
    proc = _crashsim("run", str(path), "--out", str(out), "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL overflow: WORKLOAD FAILED (" in proc.stdout
    results = json.loads((out / "overflow" / "results.json").read_text())
    assert results["verdict"] == "fail" and results["workload_error"]
    assert results["violation_classes_found"] == []  # no crash state failed
