"""The report package: PNG figures, HTML pages, junit.xml, safe paths, atomic writes."""
from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from matplotlib.image import imread

from crashsim.report import core, html, junit, plots
from crashsim.report.core import (FileSet, ReportError, atomic_write, ensure_inside,
                                  safe_dirname, write_reports)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("states_per_step.png", "heatmap.png", "timeline.png", "recovery_paths.png")
HOSTILE_NAME = 'wal <script>alert("x")</script> & co'
HOSTILE_DESC = 'Commit before data flush: "torn" <b>payload</b> & <script>evil()</script>'
CLASSES = ("old", "new", "mixed", "lost", "recovery-error", "stuck", "structure")


# -- a realistic synthetic results dict ------------------------------------------------

def _ios(n_tx: int) -> tuple[list[dict], list[tuple[str, int, float]], list[dict]]:
    """A WAL-like run: per transaction, 2 log writes, a commit (FUA on the last), a flush,
    then a home write; events are (kind, io_id, time_us) in step order."""
    ios, events, tx = [], [], []
    t_us, io_id = 0.0, 0
    for k in range(n_tx):
        start = t_us
        batch = []
        for j, (length, fua) in enumerate([(4096, False), (4096, False),
                                           (512, k == n_tx - 1)]):
            io_id += 1
            rec = {"io_id": io_id, "kind": "write", "offset": 1 << 20 | (k * 3 + j) << 12,
                   "length": length, "fua": fua, "submit_us": t_us + j * 5.0}
            batch.append(rec)
        for rec in batch:
            events.append(("write_submit", rec["io_id"], rec["submit_us"]))
        for j, rec in enumerate(batch):
            rec["complete_us"] = rec["submit_us"] + 80.0 + 15.0 * j
            events.append(("write_complete", rec["io_id"], rec["complete_us"]))
        t_us = batch[-1]["complete_us"] + 2.0
        io_id += 1
        flush = {"io_id": io_id, "kind": "flush", "offset": None, "length": None,
                 "fua": False, "submit_us": t_us, "complete_us": t_us + 400.0}
        events += [("flush_submit", io_id, t_us), ("flush_complete", io_id, t_us + 400.0)]
        t_us += 402.0
        tx.append({"tx": k, "start_us": start, "ack_us": t_us})
        ios += batch + [flush]
    for n, e in enumerate(events, start=1):
        rec = next(r for r in ios if r["io_id"] == e[1])
        rec["submit_step" if e[0].endswith("submit") else "complete_step"] = n
    ios.append({"io_id": io_id + 1, "kind": "write", "offset": 0, "length": 4096,
                "fua": False, "submit_us": t_us, "complete_us": None,
                "submit_step": len(events) + 1, "complete_step": None})
    events.append(("write_submit", io_id + 1, t_us))
    return ios, events, tx


def make_result(name: str = HOSTILE_NAME, description: str = HOSTILE_DESC, n_tx: int = 3,
                failing: bool = True, complete: bool = True, seed: int = 7) -> dict:
    rng = random.Random(seed)
    ios, events, tx = _ios(n_tx)
    per_step, cells = [], []
    pending = 0
    for step, event in enumerate([("start", None, 0.0)] + events):
        kind, io_id, time_us = event
        pending = max(0, pending + (1 if kind == "write_submit" else
                                    -pending if kind == "flush_complete" else 0))
        legal = 2 ** pending
        explored = min(legal, 64)
        bad = rng.randint(0, explored // 3) if failing and pending > 1 else 0
        outcomes = {"old": explored - bad - bad // 2, "new": bad // 2}
        if bad:
            outcomes["mixed"] = bad - bad // 3
            if bad // 3:
                outcomes["lost"] = bad // 3
        outcomes = {c: n for c, n in outcomes.items() if n}
        per_step.append({"step": step, "kind": kind, "io_id": io_id, "time_us": time_us,
                         "pending": pending, "durable": step // 4, "acked": step // 5,
                         "started": step // 5 + 1, "legal_states": legal,
                         "legal_states_log10": round(pending * 0.30103, 6),
                         "explored": explored, "distinct": max(1, explored - 3),
                         "outcomes": outcomes})
        for outcome, count in outcomes.items():
            cells.append({"step": step, "torn_units": rng.randint(0, 2) if pending else 0,
                          "survivors": rng.randint(0, pending), "outcome": outcome,
                          "count": count})
    totals = {c: sum(r["outcomes"].get(c, 0) for r in per_step) for c in CLASSES}
    violations = [_violation(name, "mixed", 5, "s5-t1-00ab"),
                  _violation(name, "lost", 9, "s9-t0-1c")] if failing else []
    return {
        "crashsim_version": "0.1.0",
        "scenario": {"name": name, "description": description,
                     "path": f"scenarios/{name}.yaml", "hash": "9f86d081884c7d65",
                     "seed": seed, "writer": "wal", "defects": ["commit-before-data-flush"],
                     "device": {"atomic_write_bytes": 512,
                                "cache": {"mode": "writeback", "capacity_bytes": 262144}},
                     "expect": "pass"},
        "verdict": "fail" if failing or not complete else "pass",
        "complete": complete, "skipped_states": 0 if complete else 1234,
        "totals": {"steps": len(events), "legal_states": sum(r["legal_states"]
                                                             for r in per_step),
                   "legal_states_log10": 2.5,
                   "explored": sum(r["explored"] for r in per_step),
                   "distinct": 400, "outcomes": totals},
        "per_step": per_step,
        "recovery_paths": {"replay": 120, "no-log": 40, "crc-mismatch-stop": 33,
                           "<script>branch</script>": 2},
        "timeline": {"ios": ios, "tx": tx},
        "heatmap": {"cells": cells},
        "violations": violations,
        "violation_counts": {c: totals[c] for c in CLASSES[2:]},
    }


def _violation(name: str, cls: str, step: int, state_id: str) -> dict:
    return {"class": cls, "state_id": state_id, "minimal_state_id": state_id + "-min",
            "step": step, "tier": "exhaustive", "survivors": [2, 3], "torn": [[2, 5]],
            "minimal_survivors": [3], "minimal_torn": [[2, 5]], "allowed_k": [0, 1],
            "matched_k": [], "diff": '--- expected\n+++ actual\n-<script>"a"</script>\n+b',
            "recovery_log": ["log entry 1: <crc ok>", "replay \"sequence\" 4"],
            "detail": "block 3 is neither old nor new",
            "replay_command": (f"crashsim replay {state_id} "
                               f"--scenario 'scenarios/{name}.yaml'")}


@pytest.fixture
def results() -> list[tuple[dict, float]]:
    return [(make_result(), 1.25),
            (make_result(name="wal-clean", description="a correct writer", failing=False),
             0.5)]


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*"))


# -- figures ---------------------------------------------------------------------------

@pytest.mark.parametrize("empty", [False, True])
def test_figures_are_valid_pngs_of_sensible_size(tmp_path, empty):
    result = make_result()
    if empty:
        result.update(per_step=[], recovery_paths={}, timeline={"ios": [], "tx": []},
                      heatmap={"cells": []})
    pngs = plots.render_all(result)
    assert sorted(pngs) == sorted(FIGURES)
    for name, data in pngs.items():
        assert data.startswith(PNG_SIGNATURE), name
        (tmp_path / name).write_bytes(data)
        height, width = imread(tmp_path / name).shape[:2]
        assert 800 <= width <= 1200 and 300 <= height <= 1000, (name, width, height)


def test_figures_are_deterministic():
    assert plots.render_all(make_result()) == plots.render_all(make_result())


def test_huge_legal_counts_and_many_ios_still_render(tmp_path):
    result = make_result(n_tx=40)
    for row in result["per_step"]:
        row["legal_states"], row["legal_states_log10"] = None, 400.0
    for cell in result["heatmap"]["cells"]:
        cell["torn_units"] *= 50_000          # a huge write torn everywhere: binned rows
    pngs = plots.render_all(result)
    (tmp_path / "t.png").write_bytes(pngs["timeline.png"])
    assert imread(tmp_path / "t.png").shape[0] >= 300


# -- paths -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil/x", "..", ".hidden", "a/b\\c", "", "é \x00 ok",
                                  "x" * 500])
def test_safe_dirname_is_one_harmless_component(name):
    safe = safe_dirname(name)
    assert safe and "/" not in safe and "\\" not in safe and ".." not in safe
    assert not safe.startswith(".") and len(safe) <= 120
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in safe)


def test_safe_dirname_keeps_clean_names_and_separates_mangled_ones():
    assert safe_dirname("wal-clean_2.v1") == "wal-clean_2.v1"
    assert safe_dirname("a/b") != safe_dirname("a_b")


def test_ensure_inside_rejects_escapes(tmp_path):
    inside = tmp_path / "a" / "b"
    assert ensure_inside(tmp_path, inside) == inside.resolve()
    with pytest.raises(ReportError, match="outside the report folder"):
        ensure_inside(tmp_path / "out", tmp_path / "out" / ".." / "x")


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write(target, "one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_atomic_write_error_removes_temp(tmp_path, monkeypatch):
    def boom(*_args):
        raise OSError("disk full")
    monkeypatch.setattr(core.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "f.txt", "data")
    assert list(tmp_path.iterdir()) == []


# -- the whole report ------------------------------------------------------------------

def test_write_reports_outputs(tmp_path, results):
    out = tmp_path / "reports"
    written = write_reports(out, results)
    bad_dir = out / safe_dirname(HOSTILE_NAME)
    assert set(written) == ({bad_dir / f for f in FIGURES} | {bad_dir / "index.html"}
                            | {out / "wal-clean" / f for f in FIGURES}
                            | {out / "wal-clean" / "index.html", out / "index.html",
                               out / "junit.xml"})
    assert not [p for p in _all_files(out) if p.name.endswith(".tmp")]


def test_scenario_page_escapes_and_shows_everything(tmp_path, results):
    write_reports(tmp_path, results)
    page = (tmp_path / safe_dirname(HOSTILE_NAME) / "index.html").read_text()
    assert "<script>" not in page and "<b>payload</b>" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert "&lt;b&gt;payload&lt;/b&gt;" in page
    assert '<span class="badge fail">FAIL</span>' in page
    for needle in ("s5-t1-00ab-min", "s9-t0-1c", "commit-before-data-flush",
                   "9f86d081884c7d65", "writeback", "cache.mode", "&lt;crc ok&gt;",
                   "crashsim replay s5-t1-00ab --scenario", "+b"):
        assert needle in page, needle
    for fig in FIGURES:
        assert f'src="{fig}"' in page
    assert "INCOMPLETE" not in page
    clean = (tmp_path / "wal-clean" / "index.html").read_text()
    assert '<span class="badge pass">PASS</span>' in clean
    assert "No violations found." in clean


def test_old_and_new_are_defined_by_acknowledgement(tmp_path, results):
    """After a flush completes and its transaction is acknowledged, a correct recovery
    is "old"; a note saying old is the state *before* the transaction reads as a
    rollback of acknowledged data."""
    write_reports(tmp_path, results)
    page = (tmp_path / "wal-clean" / "index.html").read_text()
    assert "old: recovery gave the view after exactly the acknowledged" in page
    assert "the state before or after" not in page


def test_a_writer_without_injected_defects_is_not_called_correct(tmp_path):
    """vhdx-2013 runs its own protocol, whose defects are built in: no defect was
    injected, which says nothing of whether the writer is correct."""
    result = make_result(name="vhdx-2013", failing=True)
    result["scenario"]["defects"] = []
    write_reports(tmp_path, [(result, 1.0)])
    page = (tmp_path / "vhdx-2013" / "index.html").read_text()
    assert '<dt>Defects</dt><dd><span class="muted">none injected</span>' in page
    assert "correct writer" not in page


def test_diff_and_recovery_log_say_they_are_the_minimal_states(tmp_path, results):
    """They are computed on the minimal state, which can differ from the first failing
    state shown above them (a 28-byte diff for the minimal state, 2076 for the first)."""
    write_reports(tmp_path, results)
    page = (tmp_path / safe_dirname(HOSTILE_NAME) / "index.html").read_text()
    assert "<strong>Expected vs actual</strong> (minimal state <code>s5-t1-00ab-min" \
        "</code>)" in page
    assert "<strong>Recovery decisions</strong> (minimal state)" in page


def test_incomplete_run_has_banner(tmp_path):
    result = make_result(name="partial", failing=False, complete=False)
    write_reports(tmp_path, [(result, 2.0)])
    page = (tmp_path / "partial" / "index.html").read_text()
    assert "INCOMPLETE run" in page and "1,234 crash states were skipped" in page
    assert '<span class="badge fail">FAIL</span>' in page


def test_skipped_beyond_exact_counts_is_rounded_as_in_the_summary(tmp_path):
    result = make_result(name="huge", failing=False)
    result.update({"skipped_states": None, "skipped_states_log10": 39.486082,
                   "skipped_reasons": ["max_states_per_step"]})
    write_reports(tmp_path, [(result, 1.0)])
    page = (tmp_path / "huge" / "index.html").read_text()
    assert '<td class="num">~10^39.5</td>' in page
    assert "39.486082" not in page


def test_states_cut_during_recovery_have_their_own_row(tmp_path):
    """The outcome counts include them, so the page shows them beside Explored."""
    result = make_result(name="rc", failing=False)
    write_reports(tmp_path, [(result, 1.0)])
    assert "Cut during their recovery" not in (tmp_path / "rc" / "index.html").read_text()
    result["totals"]["recovery_explored"] = 16100
    write_reports(tmp_path / "again", [(result, 1.0)])
    page = (tmp_path / "again" / "rc" / "index.html").read_text()
    assert "Cut during their recovery (not in the legal count)</th>" \
           '<td class="num">16,100</td>' in page


def test_failed_states_cut_during_recovery_are_never_above_the_explored_line(tmp_path):
    """Outcomes include the states cut during recovery; the explored count must too,
    in the figure, the per-step table and the index, or failures outnumber tries."""
    result = make_result(name="rc")
    row = result["per_step"][5]
    row["recovery_explored"] = 30
    row["outcomes"]["mixed"] = row["outcomes"].get("mixed", 0) + 30
    result["totals"]["recovery_explored"] = 30
    _, _, explored, failed = plots.step_series(result["per_step"])
    assert explored[5] == row["explored"] + 30
    assert (failed <= explored).all()
    write_reports(tmp_path, [(result, 1.0)])
    page = (tmp_path / "rc" / "index.html").read_text()
    assert '<th class="num">Cut in recovery</th>' in page
    assert "+30 cut in recovery" in (tmp_path / "index.html").read_text()


def test_index_lists_every_scenario(tmp_path, results):
    write_reports(tmp_path, results)
    index = (tmp_path / "index.html").read_text()
    assert "<script>" not in index
    assert f'href="{safe_dirname(HOSTILE_NAME)}/index.html"' in index
    assert 'href="wal-clean/index.html"' in index
    assert index.count('<tr class="fail">') == 1 and index.count('<tr class="pass">') == 1
    assert '<span class="badge fail">1 FAILED</span>' in index
    assert "1.25" in index and "mixed" in index


def test_junit_one_case_per_scenario_with_failure(tmp_path, results):
    write_reports(tmp_path, results)
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert suite.tag == "testsuite" and suite.get("name") == "crashsim"
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [HOSTILE_NAME, "wal-clean"]
    assert {c.get("classname") for c in cases} == {"crashsim.scenarios"}
    assert [c.get("time") for c in cases] == ["1.250", "0.500"]
    failure = cases[0].find("failure")
    assert "minimal state s5-t1-00ab-min;" in failure.get("message")
    assert "crashsim replay s5-t1-00ab" in failure.get("message")
    assert cases[1].find("failure") is None


def test_scenarios_an_interrupt_never_started_are_not_reported_as_passing(tmp_path):
    """Ctrl-C between scenarios: the rest never ran, so neither page may say ALL PASS."""
    done = [(make_result(name="wal-clean", failing=False), 0.5)]
    write_reports(tmp_path, done, not_run=["vhdx-later"])
    index = (tmp_path / "index.html").read_text()
    assert "ALL PASS" not in index and '<span class="badge skip">1 NOT RUN</span>' in index
    assert "2 scenarios" in index and "<td>vhdx-later</td>" in index
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == \
        ("2", "0", "1")
    case = suite.findall("testcase")[1]
    assert case.get("name") == "vhdx-later" and case.find("skipped") is not None
    assert not (tmp_path / "vhdx-later").exists()


def test_junit_survives_characters_xml_cannot_hold(tmp_path):
    result = make_result(name="bad\x00name\x1b[31m")
    junit.write_junit(tmp_path / "junit.xml", [(result, 0.1)])
    case = ET.parse(tmp_path / "junit.xml").getroot().find("testcase")
    assert case.get("name") == "bad\ufffdname\ufffd[31m"


def test_traversal_name_stays_inside(tmp_path):
    out = tmp_path / "out"
    write_reports(out, [(make_result(name="../evil/x"), 0.1)])
    assert not (tmp_path / "evil").exists()
    assert all(p.resolve().is_relative_to(out.resolve()) for p in _all_files(tmp_path))
    pages = list(out.glob("*/index.html"))
    assert len(pages) == 1 and pages[0].parent.name == safe_dirname("../evil/x")


def test_figure_error_leaves_no_files(tmp_path, results, monkeypatch):
    def boom(fig, result):
        raise RuntimeError("plot failed")
    monkeypatch.setitem(plots.FIGURES, "heatmap.png", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="plot failed"):
        write_reports(out, results)
    assert _all_files(out) == []


def test_late_error_removes_earlier_pages_but_not_results_json(tmp_path, results,
                                                               monkeypatch):
    out = tmp_path / "out"
    keep = atomic_write(core.scenario_dir(out, "wal-clean") / "results.json", "{}")

    def boom(*_args, **_kw):
        raise OSError("junit: disk full")
    monkeypatch.setattr(junit.ET, "tostring", boom)
    with pytest.raises(OSError, match="disk full"):
        write_reports(out, results)
    assert _all_files(out) == [out / "wal-clean", keep]


def test_standalone_page_cleans_up_after_itself(tmp_path, monkeypatch):
    real_write = core.atomic_write

    def fail_on_page(path, data):
        if Path(path).name == "index.html":   # after the four PNGs were written
            raise OSError("page: disk full")
        return real_write(path, data)
    monkeypatch.setattr(core, "atomic_write", fail_on_page)
    with pytest.raises(OSError, match="page: disk full"):
        html.write_scenario_page(tmp_path, make_result(), 1.0)
    assert _all_files(tmp_path) == []


def test_fileset_keeps_folders_holding_other_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "other").write_text("x")
    with pytest.raises(KeyError):
        with FileSet() as fs:
            fs.write(tmp_path / "a" / "new.txt", "n")
            fs.write(tmp_path / "b" / "c" / "new.txt", "n")
            raise KeyError("stop")
    assert _all_files(tmp_path) == [tmp_path / "a", tmp_path / "a" / "other"]
