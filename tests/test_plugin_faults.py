"""A writer plugin that breaks the protocol, or kills its process, is reported as such:
one line naming the plugin's own line (exit 2), or a ``worker-crash`` state; and every
state a run reports replays to the same verdict. The plugins are in plugin_writers.py."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import simpy

from crashsim.runner import run_one
from crashsim.scenario import load_scenario

HERE = Path(__file__).resolve().parent

SCENARIO = """\
name: {name}
device:
  atomic_write_bytes: 512
  cache: {{mode: writeback, capacity_bytes: 256KiB, destage: random}}
writer: {{kind: "plugin_writers:{cls}"}}
workload:
  image: {{virtual_size: 1MiB}}
  ops:
    - log_write: {{offset: 0, length: 512, pattern: 0xa1}}
    - log_write: {{offset: 512, length: 512, pattern: 0xa2}}
    - log_write: {{offset: 0, length: 512, pattern: 0xa3}}
explore: {{seed: 1, max_states_per_step: 64{extra}}}
expect: pass
"""


def _scenario(tmp_path: Path, cls: str, extra: str = "") -> Path:
    path = tmp_path / f"{cls.lower()}.yaml"
    path.write_text(SCENARIO.format(name=cls.lower(), cls=cls, extra=extra))
    return path


def _crashsim(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "crashsim", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _line_of(text: str) -> int:
    source = (HERE / "plugin_writers.py").read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if text in line)


def test_the_correct_plugin_passes(tmp_path):
    path = _scenario(tmp_path, "InPlace")
    res = run_one(load_scenario(path), str(path))
    assert res["verdict"] == "pass" and res["totals"]["explored"] > 0


def test_a_state_cut_during_recovery_replays_to_the_reported_verdict(tmp_path):
    """Judged against the counts of the crash point recovery started from, not of the
    step within recovery where it was cut."""
    path = _scenario(tmp_path, "ZeroingRecovery",
                     ", recovery_crash: true, recovery_states_per_step: 8")
    res = run_one(load_scenario(path), str(path))
    cut = [v for v in res["violations"] if "/r" in v["state_id"]]
    assert cut and res["verdict"] == "fail"
    for v in cut:
        proc = _crashsim("replay", v["state_id"], "--scenario", str(path), cwd=tmp_path)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        head = proc.stdout.splitlines()[0]
        assert head.endswith(f": {v['class']}") and f"(step {v['step']}, recovery " \
            f"step " in head
        acked, started = v["allowed_k"]
        assert f"acknowledged {acked}, started {started};" in proc.stdout


def test_the_replay_command_names_the_seed_the_run_used(tmp_path):
    path = _scenario(tmp_path, "ZeroingRecovery", ", recovery_crash: true")
    out = tmp_path / "out"
    proc = _crashsim("run", str(path), "--seed", "7", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    res = json.loads((out / "zeroingrecovery" / "results.json").read_text())
    v = res["violations"][0]
    assert v["replay_command"].endswith(" --seed 7")
    again = _crashsim(*shlex.split(v["replay_command"])[1:], cwd=tmp_path)
    assert again.returncode == 1 and again.stdout.splitlines()[0].endswith(v["class"])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_plugin_that_kills_its_process_costs_a_state_not_the_run(tmp_path, workers):
    """With one worker too: judging runs in a worker process, never in this one."""
    path = _scenario(tmp_path, "SegfaultingRecovery")
    res = run_one(load_scenario(path), str(path), workers=workers)
    assert res["violation_counts"]["worker-crash"] > 0
    assert res["totals"]["outcomes"]["old"] + res["totals"]["outcomes"]["new"] > 0
    assert "SIGSEGV" in res["violations"][0]["detail"]


@pytest.mark.parametrize("cls, where, words", [
    ("DoubleAck", "# the second acknowledgement",
     "tx.ack(0): transaction 0 was already acknowledged"),
    ("RaisingFormat", 'raise RuntimeError("no room', "format_image() raised RuntimeError"),
    ("BytesFormat", "# bytes, not the SparseImage",
     "format_image() returned bytes; it must return a crashsim.image.SparseImage"),
    ("PlainRun", "# no yield", "run() returned NoneType; it must return a generator"),
    ("CountingView", "# a count, not the bytes",
     "view() returned int; it must return bytes, a list of bytes"),
    ("NoSeed", "class NoSeed", "NoSeed(ops=..., image=..., defects=..., seed=...) raised "
                               "TypeError"),
])
def test_a_plugin_that_breaks_the_protocol_is_named_at_its_line(tmp_path, cls, where,
                                                                 words):
    path = _scenario(tmp_path, cls)
    proc = _crashsim("run", str(path), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert f"plugin_writers.py:{_line_of(where)}: " in proc.stderr, proc.stderr
    assert words in proc.stderr


@pytest.mark.parametrize("cls, outcome, words", [
    ("CrashingView", "recovery-error", "view crashed: KeyError: "),
    ("CrashingCheck", "recovery-error", "structure check crashed: ZeroDivisionError: "),
    ("CrashingProbe", "stuck",
     "next transaction crashed: AssertionError: the probe's own bug"),
])
def test_a_crash_in_a_writer_method_names_that_method(tmp_path, cls, outcome, words):
    """Not "recovery crashed" whatever method it was: the detail sends the writer's
    author to the method that raised, at its own line."""
    path = _scenario(tmp_path, cls)
    res = run_one(load_scenario(path), str(path))
    first = res["violations"][0]
    assert first["class"] == outcome
    assert first["detail"].startswith(words), first["detail"]
    assert "plugin_writers.py:" in first["detail"]


def test_transactions_out_of_order_are_refused():
    from crashsim.device import TxRecorder
    from crashsim.errors import PluginError
    from crashsim.image import SparseImage
    from crashsim.trace import Trace
    tx = TxRecorder(Trace(base=SparseImage(4096)), simpy.Environment())
    with pytest.raises(PluginError, match=r"tx.start\(1\): the next transaction to "
                                          r"start is 0"):
        tx.start(1)
    tx.start(0)
    with pytest.raises(PluginError, match=r"tx.ack\(1\): the next transaction to "
                                          r"acknowledge is 0"):
        tx.ack(1)
    tx.start(1)
    tx.ack(0)
    tx.ack(1)
    with pytest.raises(PluginError, match=r"tx.ack\(2\): transaction 2 has not started"):
        tx.ack(2)
    assert [(m.kind, m.tx) for m in tx.trace.tx_marks] == [
        ("start", 0), ("start", 1), ("ack", 0), ("ack", 1)]
