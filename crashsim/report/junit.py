"""junit.xml: one testsuite "crashsim", one testcase per scenario, for CI dashboards.

A scenario that did not meet its expectation gets a ``<failure>`` whose message names the
first violation's state ID and the command that replays it. Built with xml.etree, so
every name is escaped; characters XML 1.0 cannot carry at all become U+FFFD.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

from .core import NOT_RUN_REASON, FileSet, failure_reason, scenario_name

CLASSNAME = "crashsim.scenarios"
SUITE = "crashsim"
# Control characters (other than tab/newline/CR), lone surrogates and U+FFFE/FFFF are not
# allowed anywhere in an XML 1.0 document, escaped or not.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(value: Any) -> str:
    return _NOT_XML.sub("\ufffd", str(value))


def build_junit(results_with_timing: list[tuple[dict[str, Any], float]],
                not_run: Sequence[str] = ()) -> ET.Element:
    failures = sum(1 for r, _ in results_with_timing if r.get("verdict") != "pass")
    suite = ET.Element("testsuite", {
        "name": SUITE, "tests": str(len(results_with_timing) + len(not_run)),
        "failures": str(failures), "errors": "0", "skipped": str(len(not_run)),
        "time": f"{sum(t for _, t in results_with_timing):.3f}"})
    for result, elapsed_s in results_with_timing:
        suite.append(_testcase(result, elapsed_s))
    for name in not_run:
        case = ET.SubElement(suite, "testcase", {"classname": CLASSNAME,
                                                 "name": xml_text(name), "time": "0.000"})
        ET.SubElement(case, "skipped", {"message": NOT_RUN_REASON})
    return suite


def _testcase(result: dict[str, Any], elapsed_s: float) -> ET.Element:
    case = ET.Element("testcase", {"classname": CLASSNAME,
                                   "name": xml_text(scenario_name(result)),
                                   "time": f"{elapsed_s:.3f}"})
    props = ET.SubElement(case, "properties")
    sc = result["scenario"]
    for key in ("hash", "seed", "path"):
        if key in sc:
            ET.SubElement(props, "property", {"name": key, "value": xml_text(sc[key])})
    ET.SubElement(props, "property", {"name": "complete",
                                      "value": str(result.get("complete", True)).lower()})
    if result.get("skipped_reasons"):
        ET.SubElement(props, "property", {"name": "skipped_reasons", "value": xml_text(
            ",".join(result["skipped_reasons"]))})
    if result.get("verdict") != "pass":
        failure = ET.SubElement(case, "failure", {
            "message": xml_text(failure_reason(result)), "type": "ExpectationNotMet"})
        failure.text = xml_text(_failure_body(result))
    return case


def _failure_body(result: dict[str, Any]) -> str:
    lines = [failure_reason(result)]
    for v in result.get("violations") or []:
        lines += ["", f"{v['class']} at step {v['step']}: state {v['state_id']} "
                      f"(minimal {v['minimal_state_id']})",
                  f"  replay: {v['replay_command']}"]
        if v.get("detail"):
            lines.append(f"  {v['detail']}")
    return "\n".join(lines)


def write_junit(path: Path | str, results_with_timing: list[tuple[dict[str, Any], float]],
                files: FileSet | None = None, not_run: Sequence[str] = ()) -> Path:
    """Write junit.xml at ``path``; with ``files`` the caller owns clean-up on error."""
    root = build_junit(results_with_timing, not_run)
    ET.indent(root)
    data = ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
    if files is not None:
        return files.write(path, data)
    with FileSet() as own:
        return own.write(path, data)
