"""Trace scenarios: crash states of recorded I/O (dm-log-writes / QEMU blklogwrites logs),
recovered by real tools or by crashsim's own VHDX replay (design.md §5, §7)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crashsim import crashstates
from crashsim.explore import build_context
from crashsim.oracle import Judge, classify
from crashsim.runner import run_one
from crashsim.scenario import ScenarioError, check_writer, load_scenario

from dmlog_logs import LINUX_OPS, linux_log

REPO = Path(__file__).resolve().parents[1]


def _model_yaml(ops) -> str:
    lines = ["model:", "  ops:"]
    for off, pattern in ops:
        lines.append(f"    - guest_write: {{offset: {off}, length: 512, "
                     f"pattern: {pattern:#x}}}")
    return "\n".join(lines) + "\n"


def _linux_scenario(tmp_path: Path, name: str, extra: str, expect: str,
                    recovery: str = '{command: ["true"]}', ops=LINUX_OPS) -> Path:
    linux_log(tmp_path / "linux.log")
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\n"
                    f"trace: {{log: linux.log, format: dm-log-writes, image_format: raw, "
                    f"final_size: 64KiB}}\n"
                    f"recovery: {recovery}\n"
                    f"{extra}"
                    f"{_model_yaml(ops)}"
                    f"explore: {{max_states_per_step: 64, shrink: true}}\n"
                    f"expect: {expect}\n")
    return path


def _load(path: Path):
    sc = load_scenario(path)
    check_writer(path, sc)
    return sc


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # through main() as the console script does (``-m crashsim.cli`` would make a second
    # copy of the module, whose InputError the package's code never raises)
    code = "import sys; from crashsim.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)


def _refused(path: Path, out: Path, env: dict | None = None) -> str:
    """``crashsim run`` of a scenario that must be refused: exit 2, one line, returned."""
    proc = _cli("run", str(path), "--out", str(out), "--workers", "1", env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -- (b) a Linux log with FUA and MARK entries --------------------------------------------
def test_linux_log_fua_is_durable_but_not_a_barrier(tmp_path):
    path = _linux_scenario(tmp_path, "linux-fua", "probe: builtin\n",
                           "{violations: [mixed]}")
    sc = _load(path)
    ctx = build_context(sc)
    assert ctx.trace.marks == [(4, "after-fua")]
    results = run_one(sc, str(path))
    steps = {s["step"]: s for s in results["per_step"]}
    # op1 (FUA) has completed: it is on media in every state; op0, unflushed and
    # submitted before it, may be absent, which no number of transactions explains
    assert set(steps[4]["outcomes"]) == {"new", "mixed"}
    assert (steps[4]["pending"], steps[4]["durable"], steps[4]["acked"]) == (1, 1, 0)
    # op2, submitted after the FUA write, may be missing while op1 is present (k = 2)
    assert set(steps[6]["outcomes"]) == {"new", "mixed"}
    # the flush makes ops 0..2 durable and acknowledged; op3 is pending
    assert (steps[8]["acked"], steps[8]["outcomes"]) == (3, {"old": 1})
    assert set(steps[10]["outcomes"]) == {"old", "new"}
    assert results["verdict"] == "pass"
    assert results["recovery_paths"]["true-exit-0"] == results["totals"]["explored"]
    minimal = {v["minimal_state_id"] for v in results["violations"]}
    assert "p4:none" in minimal  # the durable content alone: op1 without op0


def test_fua_write_is_never_lost_once_complete(tmp_path):
    sc = _load(_linux_scenario(tmp_path, "linux-fua2", "probe: none\n",
                               "{violations: [mixed]}"))
    ctx = build_context(sc)
    b_off, b_pattern = LINUX_OPS[1]
    for st in crashstates.iter_steps(ctx.trace):
        if st.p < 4:
            continue
        for cs in crashstates.enumerate_states(st, 64, 1):
            assert cs.image.read(b_off, 512) == bytes([b_pattern]) * 512, cs.state_id


def test_model_that_does_not_match_the_log_is_an_input_error(tmp_path):
    path = _linux_scenario(tmp_path, "linux-wrong-model", "probe: none\n", "pass",
                           ops=LINUX_OPS + [(16384, 0xEE)])
    refused = _refused(path, tmp_path / "out")
    # the line of the op that matches nothing: the model's fifth
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1)
                if "0xee" in text.lower() or "238" in text)
    assert refused == (
        f"crashsim: error: {path}:{line}: model.ops.4 (512 bytes of 0xee at guest offset "
        f"0x4000) matches no write in the log after op 3's; list the guest writes the "
        f"recorded program made, in the order it made them")


# -- (c) a missing QEMU tool ----------------------------------------------------------------
def test_missing_qemu_tool_is_exit_2_with_install_hint(tmp_path):
    path = _linux_scenario(tmp_path, "needs-qemu", "view: qemu-img\nprobe: none\n",
                           "pass", recovery="{builtin: none}")
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    proc = _cli("run", str(path), "--out", str(tmp_path / "out"), "--workers", "1",
                env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"crashsim: error: {path}: qemu-img: not found on PATH; install it: "
        "apt-get install -y qemu-utils"]
    assert not (tmp_path / "out" / "needs-qemu").exists()


# -- (d) an external recovery that hangs ----------------------------------------------------
def test_hanging_recovery_is_a_recorded_timeout(tmp_path):
    path = _linux_scenario(tmp_path, "hangs", "probe: none\n",
                           "{violations: [recovery-error]}",
                           recovery='{command: [sleep, "30"], timeout_s: 0.3}')
    text = path.read_text().replace("shrink: true", "shrink: false")
    path.write_text(text.replace("max_states_per_step: 64", "max_states_per_step: 2"))
    results = run_one(_load(path), str(path))
    totals = results["totals"]
    assert totals["outcomes"]["recovery-error"] == totals["explored"] > 0
    assert results["verdict"] == "pass"
    details = {v["detail"] for v in results["violations"]}
    assert details == {"refused: sleep timed out after 0.3 s"}


# -- (e) a truncated log --------------------------------------------------------------------
def test_truncated_log_is_exit_2_naming_entry_and_offset(tmp_path):
    path = _linux_scenario(tmp_path, "cut", "probe: none\n", "pass")
    log = tmp_path / "linux.log"
    log.write_bytes(log.read_bytes()[:0x900])  # entry 1: header 0x600, data 0x800..0xa00
    refused = _refused(path, tmp_path / "out")
    assert f"{log}: entry 1 at offset 0x600: entry data truncated" in refused
    assert "Traceback" not in refused


# -- scenario validation ----------------------------------------------------------------------
@pytest.mark.parametrize("extra,needle", [
    ("writer: {kind: wal}\n", "writer: a trace scenario replays the recorded I/O"),
    ("workload: {ops: []}\n", "workload: a trace scenario replays the recorded I/O"),
    ("explore: {recovery_crash: true}\n", "explore.recovery_crash: an external recovery"),
])
def test_trace_scenario_shape_errors(tmp_path, extra, needle):
    path = _linux_scenario(tmp_path, "shape", "", "pass")
    text = path.read_text()
    if extra.startswith("explore"):
        text = text.replace("explore: {max_states_per_step: 64, shrink: true}\n", extra)
    else:
        text += extra
    path.write_text(text)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert any(needle in line and line.startswith(f"{path}:") for line in err.value.lines)


def test_trace_scenario_needs_model_and_recovery_and_plain_one_refuses_them(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntrace: {log: x.log, final_size: 64KiB}\n")
    with pytest.raises(ScenarioError) as err:
        load_scenario(bad)
    assert [ln.split(": ", 1)[1] for ln in err.value.lines] == [
        "model: required key is missing (a trace scenario needs trace, model and "
        "recovery)",
        "recovery: required key is missing (a trace scenario needs trace, model and "
        "recovery)"]
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: p\nwriter: {kind: wal}\nrecovery: {builtin: vhdx}\n")
    with pytest.raises(ScenarioError, match=r"plain.yaml:3: recovery: only a trace "):
        load_scenario(plain)


@pytest.mark.parametrize("key, text", [
    ("trace", "trace:\n"), ("model", "model:\n"), ("recovery", "recovery: null\n")])
def test_a_trace_key_left_empty_is_refused_at_its_line(tmp_path, key, text):
    # an empty trace was a plugin error naming crashsim's own file, an empty recovery
    # an AttributeError (exit 3), and an empty model a run that passed judging nothing
    path = _linux_scenario(tmp_path, "empty", "probe: none\n", "pass")
    lines = path.read_text().splitlines(keepends=True)
    at = next(i for i, ln in enumerate(lines) if ln.startswith(key + ":"))
    end = at + 1
    while end < len(lines) and lines[end].startswith(" "):
        end += 1
    path.write_text("".join(lines[:at] + [text] + lines[end:]))
    proc = _cli("run", str(path), "--out", str(tmp_path / "out"), "--workers", "1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"crashsim: error: {path}:{at + 1}: {key}: expected a mapping "
                           f"of keys: {{key: value}}, or key: value lines indented below "
                           f"(got None)\n")


@pytest.mark.parametrize("name, needle", [
    ("~no-such-user-here/linux.log", "cannot expand ~ in '~no-such-user-here/linux.log': "
                                     "no such user"),
    ("x" * 300 + ".log", "File name too long")])
def test_a_trace_path_that_cannot_be_looked_up_is_refused_at_its_line(tmp_path, name,
                                                                       needle):
    # Path.is_file raised: RuntimeError for an unknown ~user, OSError for ENAMETOOLONG
    path = _linux_scenario(tmp_path, "odd", "probe: none\n", "pass")
    path.write_text(path.read_text().replace("log: linux.log", f"log: '{name}'"))
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    [line] = err.value.lines
    assert line.startswith(f"{path}:2: trace.log: ") and needle in line


def test_trace_paths_resolve_against_the_scenario_folder(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    path = _linux_scenario(sub, "rel", "probe: none\n", "{violations: [mixed]}")
    sc = load_scenario(path)
    assert sc.resolve_path(sc.trace.log) == sub / "linux.log"
    assert [op.pattern for op in sc.ops()] == [p for _, p in LINUX_OPS]
    (sub / "linux.log").unlink()
    with pytest.raises(ScenarioError, match=r"rel.yaml:2: trace.log: file not found"):
        load_scenario(path)


def _blklogwrites_scenario(tmp_path: Path, trace: str) -> Path:
    linux_log(tmp_path / "rec.log")  # the format is the same; only the semantics differ
    (tmp_path / "base.img").write_bytes(bytes(64 * 1024))
    path = tmp_path / "q.yaml"
    path.write_text(f"name: q\n"
                    f"trace: {trace}\n"
                    f"recovery: {{builtin: none}}\n"
                    f"probe: none\n"
                    f"{_model_yaml(LINUX_OPS)}")
    return path


def test_blklogwrites_log_without_final_size_is_exit_2(tmp_path):
    # blklogwrites never logs the file's growth: without final_size crashsim would have
    # to guess the file's length, and a wrong guess made every state a recovery-error
    path = _blklogwrites_scenario(tmp_path, "{log: rec.log, base_image: base.img, "
                                  "image_format: raw}")
    assert _refused(path, tmp_path / "out") == (
        f"crashsim: error: {path}:2: trace.final_size: required with a blklogwrites "
        f"log, which does not record the image file's growth; add final_size: the size "
        f"in bytes of the image file after the recording (e.g. stat -c %s image.vhdx)")
    path.write_text(path.read_text().replace("image_format: raw", "image_format: raw, "
                                             "final_size: 64KiB"))
    assert _load(path).trace.final_size == 64 * 1024
    # no base image: final_size alone is enough (a blank file of that size)
    path.write_text(path.read_text().replace("base_image: base.img, ", ""))
    assert _load(path).trace.base_image is None


def test_dm_log_writes_log_needs_base_image_or_final_size(tmp_path):
    path = _blklogwrites_scenario(tmp_path, "{log: rec.log, format: dm-log-writes, "
                                  "image_format: raw}")
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert err.value.lines[0].startswith(
        f"{path}:2: trace: with a dm-log-writes log, give base_image (the device as it "
        f"was before the recording) or final_size")
    # a block device does not grow: its size is the base image's
    path.write_text(path.read_text().replace("image_format: raw", "image_format: raw, "
                                             "base_image: base.img"))
    assert _load(path).trace.final_size is None


def _vhdx_base_scenario(tmp_path: Path, trace: str) -> Path:
    linux_log(tmp_path / "rec.log")
    path = tmp_path / "b.yaml"
    path.write_text(f"name: b\n"
                    f"trace: {trace}\n"
                    f"recovery: {{builtin: vhdx}}\n"
                    f"{_model_yaml(LINUX_OPS)}")
    return path


def _good_vhdx() -> bytes:
    import random
    from crashsim.writers.vhdx.create import create_image
    with __import__("tempfile").TemporaryDirectory() as tmp:
        out = Path(tmp) / "good.vhdx"
        create_image(8 << 20, rng=random.Random(1)).to_file(out)
        return out.read_bytes()


def _headers_damaged(blob: bytes) -> bytes:
    out = bytearray(blob)
    for slot in (0x10000, 0x20000):
        out[slot:slot + 4] = b"HEAD"
    return bytes(out)


@pytest.mark.parametrize("case,content,needle", [
    ("random", lambda: os.urandom(4 << 20), "not a VHDX file: signature"),
    ("zeros", lambda: bytes(4 << 20), "not a VHDX file: signature b'\\x00"),
    ("both-headers-damaged", lambda: _headers_damaged(_good_vhdx()),
     "no valid VHDX header: header 1: header signature is b'HEAD'"),
])
def test_base_image_that_does_not_open_is_exit_2(tmp_path, case, content, needle):
    # every crash state starts from the base image: one that does not open was a
    # traceback (probe: its size) or a recovery-error in every state (exit 1)
    base = tmp_path / "base.vhdx"
    base.write_bytes(content())
    for probe in ("builtin", "none"):
        path = _vhdx_base_scenario(tmp_path, "{log: rec.log, format: dm-log-writes, "
                                   "base_image: base.vhdx}")
        path.write_text(path.read_text() + f"probe: {probe}\n")
        refused = _refused(path, tmp_path / "out")
        assert refused.startswith(f"crashsim: error: {path}:2: {base}: trace.base_image "
                                  f"is not a VHDX crashsim can open: {needle}"), refused
        assert refused.endswith("give the image file as it was before the recording "
                                 "(or image_format: raw for a raw image)")
        assert not (tmp_path / "out" / "b").exists()


def test_a_base_image_that_opens_is_accepted(tmp_path):
    (tmp_path / "base.vhdx").write_bytes(_good_vhdx())
    path = _vhdx_base_scenario(tmp_path, "{log: rec.log, format: dm-log-writes, "
                               "base_image: base.vhdx}")
    ctx = build_context(_load(path))
    assert ctx.trace.base.size_bytes == (tmp_path / "base.vhdx").stat().st_size


def test_final_size_that_cuts_the_base_image_or_blank_vhdx_is_exit_2(tmp_path):
    (tmp_path / "base.vhdx").write_bytes(_good_vhdx())
    path = _vhdx_base_scenario(tmp_path, "{log: rec.log, format: dm-log-writes, "
                               "base_image: base.vhdx, final_size: 1MiB}")
    assert _refused(path, tmp_path / "out").startswith(
        f"crashsim: error: {path}:2: trace.final_size: the image before the recording, "
        "made 1048576 bytes long, no longer opens as a VHDX: ")
    path = _vhdx_base_scenario(tmp_path, "{log: rec.log, format: dm-log-writes, "
                               "final_size: 1MiB}")
    assert _refused(path, tmp_path / "out") == (
        f"crashsim: error: {path}:2: trace: without base_image the image before the "
        "recording is all zeros, which is not a VHDX; give base_image: the image file as "
        "it was before the recording (or image_format: raw for a raw image)")


def test_created_image_that_is_not_a_vhdx_is_exit_2(tmp_path):
    path = _vhdx_base_scenario(tmp_path, '{create: [truncate, -s, 1M, "{image}"], '
                               'record: ["true", "{log}"]}')
    assert _refused(path, tmp_path / "out").startswith(
        f"crashsim: error: {path}:2: the image trace.create made is not a VHDX crashsim "
        "can open: not a VHDX file")


# -- (a) crashsim's replay against QEMU's, on one real recording ---------------------------
QEMU_WRITES = [(0, 0xA1), (64 * 1024, 0xA2), (1 << 20, 0xA3)]  # the 2nd needs no allocation


def _vhdx_scenario(tmp_path: Path, name: str, recovery: str, view: str) -> Path:
    commands = "".join(f'           -c, "write -P {p:#x} {off} 64k",\n'
                       for off, p in QEMU_WRITES)
    ops = "".join(f"    - guest_write: {{offset: {off}, length: 64KiB, pattern: {p:#x}}}\n"
                  for off, p in QEMU_WRITES)
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        f"trace:\n"
        f'  create: [qemu-img, create, -q, -f, vhdx, -o, "block_size=1M,log_size=1M", '
        f'"{{image}}", 64M]\n'
        f"  record: [qemu-io, --image-opts,\n"
        f'           "driver=vhdx,file.driver=blklogwrites,file.file.filename={{image}},'
        f'file.log.filename={{log}}",\n'
        f"{commands}"
        f"           ]\n"
        f"recovery: {recovery}\n"
        f"view: {view}\n"
        f"probe: qemu-io\n"
        f"model:\n  ops:\n{ops}")
    return path


def _data_verdict(judge: Judge, cs, acked: int, started: int) -> str:
    """old/new/mixed/lost/recovery-error from the view alone (no structure, no probe)."""
    ex = judge.examine(cs.image, key=cs.content_key)
    return classify(dataclasses.replace(ex, structure=[], probe_error=None), acked,
                    started).outcome


def test_builtin_and_qemu_recovery_agree_on_every_state(require_qemu, tmp_path):
    qemu = _load(_vhdx_scenario(tmp_path, "by-qemu",
                                '{command: [qemu-img, check, -r, all, "{image}"]}',
                                "qemu-img"))
    ours = _load(_vhdx_scenario(tmp_path, "by-crashsim", "{builtin: vhdx}", "builtin"))
    ctx_q = build_context(qemu)
    ctx_b = build_context(ours, trace=ctx_q.trace)  # the very same recorded I/O
    judges = [Judge(c.writer, c.model, probe=False) for c in (ctx_q, ctx_b)]
    verdicts: list[dict[str, str]] = [{}, {}]
    for st in crashstates.iter_steps(ctx_q.trace):
        acked, started = ctx_q.trace.acked(st.p), ctx_q.trace.started(st.p)
        for cs in crashstates.enumerate_states(st, 6, 1):
            for judge, out in zip(judges, verdicts):
                out[cs.state_id] = _data_verdict(judge, cs, acked, started)
    assert verdicts[0].keys() == verdicts[1].keys()
    both_ok = [sid for sid in verdicts[0]
               if "recovery-error" not in (verdicts[0][sid], verdicts[1][sid])]
    differ = {sid: (verdicts[0][sid], verdicts[1][sid]) for sid in both_ok
              if verdicts[0][sid] != verdicts[1][sid]}
    assert differ == {}
    seen = {verdicts[0][sid] for sid in both_ok}
    # mixed: the rewrite of an allocated block goes straight to the data, unflushed, so a
    # torn 64 KiB write shows through, the same way under either recovery
    assert seen == {"old", "new", "mixed"} and len(both_ok) > 100


def test_qemu_leaves_a_published_log_guid_stuck_and_crashsim_resets_it(require_qemu,
                                                                       tmp_path):
    qemu = _load(_vhdx_scenario(tmp_path, "q", '{command: [qemu-img, check, -r, all, '
                                '"{image}"]}', "qemu-img"))
    ours = _load(_vhdx_scenario(tmp_path, "b", "{builtin: vhdx}", "builtin"))
    ctx_q = build_context(qemu)
    ctx_b = build_context(ours, trace=ctx_q.trace)
    trace = ctx_q.trace
    # the first header write that publishes a LogGuid: the 4th write of the log (§8),
    # after two DataWriteGuid updates and the guest data; cut once its flush completed
    header_io = [s.io_id for s in trace.steps if s.kind == "write_submit"][3]
    assert trace.writes[header_io].offset == 64 * 1024
    done = next(i for i, s in enumerate(trace.steps)
                if s.kind == "write_complete" and s.io_id == header_io)
    assert [s.kind for s in trace.steps[done + 1:done + 3]] == ["flush_submit",
                                                                 "flush_complete"]
    p = done + 3
    cs = crashstates.build_state(trace, f"p{p}:none")
    acked, started = trace.acked(p), trace.started(p)
    by_qemu = ctx_q.judge.judge(cs.image, acked, started)
    assert by_qemu.outcome == "stuck"
    assert "write failed: Operation not supported" in by_qemu.detail
    assert "No errors were found on the image." in by_qemu.examined.recovery.decisions
    by_us = ctx_b.judge.judge(cs.image, acked, started)
    assert by_us.outcome == "old"
    assert "guid-reset" in by_us.examined.recovery.branches


def test_shipped_qemu_scenario_finds_stuck_states_with_real_qemu(require_qemu):
    """scenarios/qemu-vhdx-blklogwrites.yaml as shipped: real qemu-io, qemu-img check,
    convert and qemu-io liveness on every explored state; QEMU 7.2 leaves stuck images."""
    from crashsim.runner import run_one
    from crashsim.scenario import load_scenario
    path = Path(__file__).resolve().parents[1] / "scenarios" / "qemu-vhdx-blklogwrites.yaml"
    res = run_one(load_scenario(path), str(path), workers=2)
    assert res["verdict"] == "pass"  # its expect names stuck
    assert res["violation_counts"]["stuck"] > 0
    assert all(s["explored"] >= 1 for s in res["per_step"])  # every step explored
    stuck = next(v for v in res["violations"] if v["class"] == "stuck")
    assert "Operation not supported" in stuck["detail"]
