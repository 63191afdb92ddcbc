"""Hostile inputs (issue #8): each is refused with exit 2 and one ``crashsim: error:`` line
naming the file (and line), never a traceback, and nothing is written outside ``--out``.

Classes: YAML bombs and oversized files; absurd sizes and budgets; scenario names that
are paths or markup; user text that does reach the report (escaped in HTML and XML);
hostile ``--out`` folders and symlinks planted inside one; shell metacharacters in the
commands of trace scenarios; writer plugins that do not import or are not writers.

Every run happens in a sandbox: the working directory, the system temp dir and a canary
folder all live under ``tmp_path``, whose whole tree is compared before and after.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from crashsim.cli import main
from crashsim.scenario import (MAX_SCENARIO_BYTES, MAX_YAML_NODES, check_writer,
                               load_scenario)

from dmlog_logs import LINUX_OPS, linux_log

REPO = Path(__file__).resolve().parents[1]

# A fast WAL scenario; line numbers below refer to this layout.
WAL = """\
name: {name}
writer: {{kind: wal}}
device: {device}
workload:
  image: {image}
  ops: {ops}
  random: {random}
explore: {explore}
"""
WAL_DEFAULTS = {"name": "hostile", "device": "{}",
                "image": "{virtual_size: 1MiB, log_size: 1MiB}",
                "ops": "[{log_write: {offset: 0, length: 4KiB, pattern: 0xab}}]",
                "random": "{count: 0}", "explore": "{max_states_per_step: 8}"}


def wal_yaml(**fields: str) -> str:
    return WAL.format(**{**WAL_DEFAULTS, **fields})


# -- the sandbox ---------------------------------------------------------------------

@dataclass
class Sandbox:
    root: Path      # tmp_path: every file a run could touch is under it
    cwd: Path       # the working directory of every run
    scen: Path      # where scenario files go
    out: Path       # the --out folder
    canary: Path    # a folder beside --out that nothing may touch
    systmp: Path    # the system temp dir (private temp dirs must be gone afterwards)


@pytest.fixture
def sb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    box = Sandbox(tmp_path, tmp_path / "cwd", tmp_path / "scenarios", tmp_path / "out",
                  tmp_path / "canary", tmp_path / "systmp")
    for d in (box.cwd, box.scen, box.canary, box.systmp):
        d.mkdir()
    (box.canary / "canary.txt").write_text("do not touch\n")
    monkeypatch.chdir(box.cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(box.systmp))
    monkeypatch.setenv("TMPDIR", str(box.systmp))
    return box


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> what it is (file hash, link target or dir)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def changed_outside(before: dict[str, str], after: dict[str, str], root: Path,
                    allowed: Path | None) -> list[str]:
    """Paths added, removed or changed that are not inside ``allowed``."""
    keys = set(before) | set(after)
    changed = sorted(k for k in keys if before.get(k) != after.get(k))
    if allowed is None:
        return changed
    inside = str(allowed.relative_to(root))
    return [k for k in changed if k != inside and not k.startswith(inside + os.sep)]


@dataclass
class Run:
    code: int
    out: str
    err: str
    outside: list[str]   # paths changed outside --out


def assert_no_litter(sb: Sandbox) -> None:
    """Nothing in the working directory, no private temp dir left behind."""
    assert list(sb.cwd.iterdir()) == []
    assert list(sb.systmp.iterdir()) == []


def run_in_process(sb: Sandbox, capsys, *args: str, out: Path | None = None,
                   allowed: Path | None = None) -> Run:
    out = sb.out if out is None else out
    before = tree(sb.root)
    code = main(["run", *args, "--out", str(out), "--workers", "1"])
    captured = capsys.readouterr()
    after = tree(sb.root)
    assert_no_litter(sb)
    keep = allowed if allowed is not None else out
    inside_root = keep.is_relative_to(sb.root) if keep.is_absolute() else False
    return Run(code, captured.out, captured.err,
               changed_outside(before, after, sb.root, keep if inside_root else None))


def run_subprocess(sb: Sandbox, *args: str, env: dict | None = None) -> Run:
    before = tree(sb.root)
    proc = subprocess.run([sys.executable, "-m", "crashsim", "run", *args, "--out",
                           str(sb.out), "--workers", "1"], cwd=sb.cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})
    after = tree(sb.root)
    assert_no_litter(sb)
    return Run(proc.returncode, proc.stdout, proc.stderr,
               changed_outside(before, after, sb.root, sb.out))


def assert_refused(run: Run, where: str, needle: str | re.Pattern) -> str:
    """Exit 2, exactly one error line starting with ``where`` and holding ``needle``."""
    assert run.code == 2, run.err
    assert "Traceback" not in run.err
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    line = lines[0]
    assert line.startswith(f"crashsim: error: {where}"), line
    if isinstance(needle, re.Pattern):
        assert needle.search(line), line
    else:
        assert needle in line, line
    assert run.outside == [], run.outside
    return line


def refuse_text(sb: Sandbox, capsys, text: str, line: int, needle,
                name: str = "hostile.yaml") -> str:
    path = sb.scen / name
    path.write_text(text)
    run = run_in_process(sb, capsys, str(path))
    msg = assert_refused(run, f"{path}:{line}: ", needle)
    assert not sb.out.exists(), "a refused scenario must not create the report folder"
    return msg


# -- 1. YAML bombs, deep nesting, oversized files ------------------------------------

def billion_laughs() -> str:
    lines = ["name: bomb", "writer: {kind: wal}", 'a: &a ["lol", "lol", "lol", "lol", '
             '"lol", "lol", "lol", "lol", "lol"]']
    prev = "a"
    for i in range(1, 10):   # 9 levels of 9 aliases each: 9^10 values when expanded
        lines.append(f"b{i}: &b{i} [" + ", ".join([f"*{prev}"] * 9) + "]")
        prev = f"b{i}"
    return "\n".join(lines) + "\n"


def merge_key_bomb() -> str:
    lines = ["name: merge-bomb", "writer: {kind: wal}", "x0: &x0 {a: 1, b: 2}"]
    for i in range(1, 25):   # each level merges the last and holds it twice: 3^24
        lines.append(f"x{i}: &x{i} {{<<: *x{i - 1}, k{i}: [*x{i - 1}, *x{i - 1}]}}")
    return "\n".join(lines) + "\n"


def small_file_bomb() -> str:
    # only 60 '*' characters, but 2^30 values: a count of '*' alone cannot catch it
    lines = ["name: doubling", "writer: {kind: wal}", "a: &a [x]"]
    prev = "a"
    for i in range(1, 31):
        lines.append(f"b{i}: &b{i} [*{prev}, *{prev}]")
        prev = f"b{i}"
    return "\n".join(lines) + "\n"


HEAD = "name: deep\nwriter: {kind: wal}\n"
BOMBS = [
    ("billion-laughs", billion_laughs(), 8, "alias bomb"),
    ("merge-keys", merge_key_bomb(), 12, "alias bomb"),
    ("doubling", small_file_bomb(), 19, "alias bomb"),
    ("recursive-alias", HEAD + "a: &a [1, *a]\n", 3, "inside its own anchor"),
    ("undefined-alias", HEAD + "a: [*nope]\n", 3, "before it"),
    ("deep-lists", HEAD + "z: " + "[" * 10_000 + "]" * 10_000 + "\n", 3,
     "nested more than 32 levels"),
    ("deep-maps", HEAD + "z: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n", 3,
     "nested more than 32 levels"),
    ("deep-block", HEAD + "".join("  " * i + f"k{i}:\n" for i in range(200)), 35,
     "nested more than 32 levels"),
    ("huge-integer", HEAD + "explore: {seed: 1" + "0" * 5000 + "}\n", 3,
     "a number of 5001 digits"),
    ("python-tag", 'name: !!python/object/apply:os.system ["touch PWNED"]\n'
     "writer: {kind: wal}\n", 1, "name: expected a string"),
]


@pytest.mark.parametrize("case,text,line,needle", BOMBS, ids=[b[0] for b in BOMBS])
def test_yaml_bombs_and_deep_nesting_are_refused(sb, capsys, case, text, line, needle):
    refuse_text(sb, capsys, text, line, needle, name=f"{case}.yaml")
    assert not any(p.name == "PWNED" for p in sb.root.rglob("*"))


def test_alias_budget_counts_expanded_values_not_stars(sb):
    # 300 aliases of one op expand to ~3,000 values: fine, though there are 300 '*'
    ops = "[&op {log_write: {offset: 0, length: 4KiB}}, " + ", ".join(["*op"] * 299) + "]"
    path = sb.scen / "many-aliases.yaml"
    path.write_text(wal_yaml(ops=ops))
    sc = load_scenario(path)
    assert len(sc.ops()) == 300 and {op.length for op in sc.ops()} == {4096}


def test_huge_file_is_refused_by_size_before_parsing(sb, capsys):
    path = sb.scen / "huge.yaml"
    with open(path, "w") as f:   # 50 MB of YAML comments after a valid head
        f.write(wal_yaml())
        chunk = "# padding padding padding padding padding padding padding padding\n"
        f.write(chunk * (50_000_000 // len(chunk)))
    run = run_in_process(sb, capsys, str(path))
    assert_refused(run, f"{path}:0: ", "larger than 1MiB, the limit for a scenario")


def test_endless_device_is_refused_by_size(sb, capsys):
    # /dev/zero never ends: reading stops at the limit instead of filling memory
    run = run_in_process(sb, capsys, "/dev/zero")
    assert_refused(run, "/dev/zero:0: ", "larger than 1MiB")
    assert MAX_SCENARIO_BYTES == 1 << 20


def test_alias_bomb_is_refused_by_the_real_command(sb):
    path = sb.scen / "bomb.yaml"
    path.write_text(billion_laughs())
    run = run_subprocess(sb, str(path))
    assert_refused(run, f"{path}:8: ", f"more than {MAX_YAML_NODES:,} values")


def test_scenario_with_a_few_anchors_and_merge_keys_still_loads(sb, capsys):
    path = sb.scen / "anchors.yaml"
    path.write_text("""\
name: anchors
writer: {kind: wal}
workload:
  image: &img {virtual_size: 1MiB, log_size: 1MiB}
  ops:
    - log_write: &w {offset: 0, length: 4KiB, pattern: 0xa1}
    - log_write: {<<: *w, offset: 8KiB}
    - log_write: {<<: *w, offset: 16KiB, pattern: 0xb2}
    - log_write: *w
explore: &ex {max_states_per_step: 8}
""")
    sc = load_scenario(path)
    check_writer(path, sc)
    assert [(op.offset, op.length, op.pattern) for op in sc.ops()] == [
        (0, 4096, 0xA1), (8192, 4096, 0xA1), (16384, 4096, 0xB2), (0, 4096, 0xA1)]
    run = run_in_process(sb, capsys, str(path))
    assert run.code == 0, run.err
    assert run.outside == []


# -- 2. absurd sizes, budgets and negative numbers -----------------------------------

TRACE = """\
name: hostile-trace
trace: {trace}
recovery: {recovery}
model: {{ops: [{{guest_write: {{offset: 0, length: 512, pattern: 0xa1}}}}]}}
"""
TRACE_OK = "{log: linux.log, format: dm-log-writes, image_format: raw, final_size: 64KiB}"
LOG_OPS = [f"{{log_write: {{offset: {i * 16}MiB, length: 16MiB}}}}" for i in range(5)]

SIZES = [
    ("virtual-1PiB-in-bytes", wal_yaml(image="{virtual_size: 1125899906842624}"), 5,
     "virtual_size must be between 1MiB and 1TiB"),
    ("virtual-999999999999TiB", wal_yaml(image='{virtual_size: "999999999999 TiB"}'), 5,
     "virtual_size must be between 1MiB and 1TiB"),
    ("block-not-power-of-two", wal_yaml(image="{virtual_size: 64MiB, block_size: 3MiB}"),
     5, "block_size must be a power of two from 1MiB to 256MiB"),
    ("block-1TiB", wal_yaml(image="{block_size: 1TiB}"), 5, "block_size must be a power"),
    ("log-not-whole-MiB", wal_yaml(image="{log_size: 1000}"), 5,
     "log_size must be a non-zero multiple of 1MiB, at most 1GiB"),
    ("log-1PiB", wal_yaml(image='{log_size: "1 PiB"}'), 5, "log_size must be"),
    ("log-write-past-image", wal_yaml(ops="[{log_write: {offset: 1TiB, length: 4KiB}}]"),
     6, "past virtual_size 1048576"),
    ("op-of-1GiB", wal_yaml(image="{virtual_size: 4GiB}",
                            ops="[{log_write: {offset: 0, length: 1GiB}}]"), 6,
     "length must be between 1 byte and 16MiB"),
    ("log-write-longer-than-log", wal_yaml(image="{virtual_size: 8MiB, log_size: 1MiB}",
                                           ops="[{log_write: {offset: 0, length: 2MiB}}]"),
     6, "larger than log_size 1048576"),
    ("listed-ops-over-64MiB", wal_yaml(image="{virtual_size: 1GiB, log_size: 32MiB}",
                                       ops="[" + ", ".join(LOG_OPS) + "]"), 4,
     "more than the 64MiB limit"),
    ("random-count-1e9", wal_yaml(random="{count: 1000000000}"), 7,
     "less than or equal to 10000"),
    ("random-max-length-1TiB", wal_yaml(random="{count: 1, max_length: 1TiB}"), 7,
     "max_length must be between 512 bytes and 16MiB"),
    ("random-max-length-100", wal_yaml(random="{count: 1, max_length: 100}"), 7,
     "max_length must be between 512 bytes"),
    ("random-longer-than-image", wal_yaml(random="{count: 1, kind: log_write, "
                                                 "max_length: 4MiB}"), 7,
     "is more than virtual_size"),
    ("random-ops-over-64MiB", wal_yaml(image="{virtual_size: 1TiB, log_size: 1GiB}",
                                       random="{count: 10000, kind: log_write, "
                                              "max_length: 16MiB}"), 4,
     "more than the 64MiB limit"),
    ("recovery-states-1e12", wal_yaml(explore="{recovery_states_per_step: 1000000000000}"),
     8, "less than or equal to 1000000"),
    ("states-as-string", wal_yaml(explore='{max_states_per_step: "10^12"}'), 8,
     "explore.max_states_per_step"),
    ("negative-count", wal_yaml(random="{count: -1}"), 7, "greater than or equal to 0"),
    ("negative-states", wal_yaml(explore="{max_states_per_step: -5}"), 8,
     "greater than or equal to 1"),
    ("negative-latency", wal_yaml(device="{latency_us: {write: -1}}"), 3,
     "greater than or equal to 0"),
    ("infinite-latency", wal_yaml(device="{latency_us: {flush: .inf}}"), 3,
     "less than or equal to 1000000000"),
    ("negative-capacity", wal_yaml(device='{cache: {capacity_bytes: "-1KiB"}}'), 3,
     "must not be negative"),
    ("cache-1PiB", wal_yaml(device="{cache: {capacity_bytes: 1PiB}}"), 3,
     "cache capacity must be between 512 bytes and 16GiB"),
    ("atomic-1PiB", wal_yaml(device="{atomic_write_bytes: 1PiB}"), 3,
     "atomic_write_bytes must be 512 or 4096"),
    ("trace-final-size-1PiB", TRACE.format(trace=TRACE_OK.replace("64KiB", "1PiB"),
                                           recovery='{command: ["true"]}'), 2,
     "final_size must be between 512 bytes and 1TiB"),
    ("trace-timeout-1e12", TRACE.format(trace=TRACE_OK,
                                        recovery='{command: ["true"], timeout_s: 1e12}'),
     3, "less than or equal to 3600"),
]


@pytest.mark.parametrize("case,text,line,needle", SIZES, ids=[s[0] for s in SIZES])
def test_absurd_sizes_are_refused_naming_the_limit(sb, capsys, case, text, line, needle):
    refuse_text(sb, capsys, text, line, needle, name=f"{case}.yaml")


def test_largest_image_allowed_stays_sparse_within_a_memory_cap(sb):
    """1 TiB of virtual disk (the limit) with writes at both ends: the image is sparse,
    so the whole run stays far below the memory the size would suggest."""
    path = sb.scen / "tib.yaml"
    path.write_text(wal_yaml(name="tib", image="{virtual_size: 1TiB, log_size: 1MiB}",
                             ops="[{log_write: {offset: 0, length: 4KiB}}, "
                                 "{log_write: {offset: 1099511623680, length: 4KiB}}]"))
    # measured in a child of a child so that no other test's subprocess counts
    code = ("import resource, subprocess, sys\n"
            "p = subprocess.run([sys.executable, '-m', 'crashsim', 'run', sys.argv[1], "
            "'--out', sys.argv[2], '--workers', '1'], capture_output=True)\n"
            "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(sb.out)],
                          cwd=sb.cwd, capture_output=True, text=True, timeout=120)
    rc, maxrss_kib = map(int, proc.stdout.split())
    assert rc == 0, proc.stderr
    assert maxrss_kib < 600 * 1024   # 1 TiB dense would be 1,073,741,824 KiB
    results = json.loads((sb.out / "tib" / "results.json").read_text())
    assert results["verdict"] == "pass"


# -- 3. names that are paths or markup -----------------------------------------------

NAMES = [
    ("dotdot-path", '"../../etc/x"'), ("slash", '"a/b"'), ("dotdot", '".."'),
    ("dot-hidden", '".hidden"'), ("script", '"<script>alert(1)</script>"'),
    ("nul", '"a\\0b"'), ("newline", '"a\\nb"'), ("trailing-newline", '"abc\\n"'),
    ("empty", '""'), ("space", '"a b"'), ("fullwidth", '"ａｂ"'), ("too-long", "x" * 101),
    ("absolute", '"/tmp/x"'), ("backslash", '"a\\\\b"'),
]


@pytest.mark.parametrize("case,name", NAMES, ids=[n[0] for n in NAMES])
def test_names_that_are_paths_or_markup_are_refused(sb, capsys, case, name):
    msg = refuse_text(sb, capsys, wal_yaml(name=name), 1,
                      "name: use only letters, digits, '.', '_' and '-', 1 to 100")
    assert "it names the report folder" in msg
    assert "\0" not in msg   # the value is shown escaped, on the same line


def test_longest_name_allowed_runs(sb, capsys):
    path = sb.scen / "long.yaml"
    path.write_text(wal_yaml(name="n" * 100))
    run = run_in_process(sb, capsys, str(path))
    assert run.code == 0, run.err
    assert (sb.out / ("n" * 100) / "results.json").is_file()
    assert run.outside == []


# -- 4. user text that does reach the report is escaped ------------------------------

EVIL = ("<script>alert(1)</script> \"'><img src=x onerror=alert(2)> {{ 7*7 }} "
        "{% if true %}JINJA{% endif %} ]]> &amp;")


def assert_escaped_report(out: Path) -> None:
    pages = list(out.rglob("*.html"))
    assert len(pages) >= 2
    for page in pages:
        html = page.read_text()
        assert "<script" not in html.lower(), page
        assert "<img src=x" not in html, page
    junit = out / "junit.xml"
    root = ET.parse(junit).getroot()   # well-formed, or this raises
    assert b"<script>" not in junit.read_bytes()
    assert root.tag == "testsuite"


def test_free_text_is_escaped_in_html_and_junit(sb, capsys):
    base = (REPO / "scenarios" / "wal-home-before-commit.yaml").read_text()
    text = re.sub(r"(?m)^description: .*$", "description: " + json.dumps(EVIL), base)
    assert EVIL in load_scenario_text(sb, text).description
    # the scenario's path reaches the report and the replay command too
    folder = sb.scen / "<script>alert(1)<" / "script>"
    folder.mkdir(parents=True)
    path = folder / "x.yaml"
    path.write_text(text)
    run = run_in_process(sb, capsys, str(path))
    assert run.code == 0, run.err   # it expects (and finds) mixed
    assert run.outside == []
    assert_escaped_report(sb.out)
    page = (sb.out / "wal-home-before-commit" / "index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page               # description
    assert "&#34;&#39;&gt;&lt;img src=x onerror=alert(2)&gt;" in page    # quotes too
    assert "{{ 7*7 }}" in page and "{% if true %}JINJA{% endif %}" in page  # not rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;/x.yaml" in page         # the path
    assert 'class="violation"' in page   # violations with state IDs were rendered
    junit = ET.parse(sb.out / "junit.xml").getroot()
    props = {p.get("name"): p.get("value") for p in junit.iter("property")}
    assert props["path"] == str(path)


def load_scenario_text(sb: Sandbox, text: str):
    path = sb.scen / "probe.yaml"
    path.write_text(text)
    try:
        return load_scenario(path)
    finally:
        path.unlink()


def trace_yaml(name: str, recovery: str, extra: str = "",
               expect: str = "{violations: [mixed]}") -> str:
    ops = ", ".join(f"{{guest_write: {{offset: {o}, length: 512, pattern: {p:#x}}}}}"
                    for o, p in LINUX_OPS)
    return (f"name: {name}\n"
            f"trace: {{log: linux.log, format: dm-log-writes, image_format: raw, "
            f"final_size: 64KiB}}\n"
            f"recovery: {recovery}\n"
            f"probe: builtin\n{extra}"
            f"model: {{ops: [{ops}]}}\n"
            f"explore: {{max_states_per_step: 64, shrink: true}}\n"
            f"expect: {expect}\n")


def test_tool_names_and_output_are_escaped_in_the_report(sb, capsys):
    """A recovery tool whose file name and output are markup (and mathtext for the
    figure's labels): the run succeeds and every page shows them as text."""
    folder = sb.scen / "trace"
    folder.mkdir()
    linux_log(folder / "linux.log")
    tool = folder / "rec<img src=x onerror=alert(3)>$\\bad{$"
    tool.write_text("#!/bin/sh\necho '<script>alert(4)</script>'\nexit 0\n")
    tool.chmod(0o755)
    path = folder / "t.yaml"
    path.write_text(trace_yaml("evil-tool", json.dumps({"command": [str(tool),
                                                                    "{image}"]})))
    run = run_in_process(sb, capsys, str(path))
    assert run.code == 0, run.err
    assert run.outside == []
    assert_escaped_report(sb.out)
    page = (sb.out / "evil-tool" / "index.html").read_text()
    assert "rec&lt;img src=x onerror=alert(3)&gt;$\\bad{$-exit-0" in page  # branch name
    assert "&lt;script&gt;alert(4)&lt;/script&gt;" in page                 # its output
    assert (sb.out / "evil-tool" / "recovery_paths.png").stat().st_size > 0


# -- 5. hostile --out folders and symlinks planted inside one ------------------------

def test_out_is_an_existing_file(sb, capsys):
    path = sb.scen / "ok.yaml"
    path.write_text(wal_yaml())
    target = sb.root / "afile"
    target.write_text("keep\n")
    run = run_in_process(sb, capsys, str(path), out=target, allowed=sb.canary / "none")
    assert_refused(run, f"--out {target}: ", "is a file, not a folder")
    assert target.read_text() == "keep\n"


def test_out_inside_a_file(sb, capsys):
    path = sb.scen / "ok.yaml"
    path.write_text(wal_yaml())
    (sb.root / "afile").write_text("keep\n")
    out = sb.root / "afile" / "sub"
    run = run_in_process(sb, capsys, str(path), out=out, allowed=sb.canary / "none")
    assert_refused(run, f"--out {out}: ", "cannot create the report folder: Not a "
                                          "directory")


def test_out_is_a_dangling_symlink(sb, capsys):
    path = sb.scen / "ok.yaml"
    path.write_text(wal_yaml())
    link = sb.root / "dangling"
    link.symlink_to(sb.root / "missing" / "dir")
    run = run_in_process(sb, capsys, str(path), out=link, allowed=sb.canary / "none")
    assert_refused(run, f"--out {link}: ", "which does not exist")
    assert not (sb.root / "missing").exists()


def test_out_in_a_read_only_folder(sb, capsys):
    path = sb.scen / "ok.yaml"
    path.write_text(wal_yaml())
    ro = sb.root / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        out = ro / "report"
        if os.access(ro, os.W_OK):   # root ignores modes; sysfs and procfs refuse mkdir
            special = Path("/sys") if Path("/sys/kernel").is_dir() else Path("/proc")
            out = special / "crashsim-hostile-test" / "report"
        run = run_in_process(sb, capsys, str(path), out=out, allowed=sb.canary / "none")
    finally:
        ro.chmod(0o755)
    assert_refused(run, f"--out {out}: ", "cannot create the report folder")
    assert not out.exists()


def test_out_symlink_to_a_folder_is_followed(sb, capsys):
    """A symlink the user gives as --out is their choice of folder: the report goes into
    its target, and nowhere else."""
    path = sb.scen / "ok.yaml"
    path.write_text(wal_yaml())
    target = sb.root / "elsewhere"
    target.mkdir()
    link = sb.root / "link"
    link.symlink_to(target)
    run = run_in_process(sb, capsys, str(path), out=link, allowed=target)
    assert run.code == 0, run.err
    assert run.outside == []
    assert (target / "hostile" / "results.json").is_file()
    assert (target / "index.html").is_file() and link.is_symlink()


def test_symlinks_planted_in_the_report_folder_are_replaced_not_followed(sb, capsys):
    path = sb.scen / "ok.yaml"
    path.write_text(wal_yaml())
    canaries = {}
    planted = ["hostile/results.json", "hostile/index.html", "hostile/heatmap.png",
               "index.html", "junit.xml"]
    (sb.out / "hostile").mkdir(parents=True)
    for i, rel in enumerate(planted):
        canary = sb.canary / f"target{i}.txt"
        canary.write_text(f"canary {i}\n")
        canaries[canary] = canary.read_text()
        (sb.out / rel).symlink_to(canary)
    run = run_in_process(sb, capsys, str(path))
    assert run.code == 0, run.err
    assert run.outside == []   # the canary folder is outside --out: unchanged
    for canary, text in canaries.items():
        assert canary.read_text() == text
    for rel in planted:
        assert not (sb.out / rel).is_symlink() and (sb.out / rel).stat().st_size > 0
    json.loads((sb.out / "hostile" / "results.json").read_text())


def test_scenario_folder_planted_as_symlink_is_refused(sb, capsys):
    path = sb.scen / "ok.yaml"
    path.write_text(wal_yaml())
    sb.out.mkdir()
    (sb.out / "hostile").symlink_to(sb.canary)
    run = run_in_process(sb, capsys, str(path))
    assert_refused(run, f"{sb.out / 'hostile'}: ", "refusing to write outside the report "
                                                   "folder")
    assert sorted(p.name for p in sb.canary.iterdir()) == ["canary.txt"]


# -- 6. shell metacharacters in the commands of trace scenarios ----------------------

def metachars(root: Path) -> list[str]:
    pwned = root / "PWNED"
    return [f"; touch {pwned}", f"$(touch {pwned})", f"`touch {pwned}`",
            f"| touch {pwned}", f"&& touch {pwned}", f"> {pwned}", "*", "~", "$HOME"]


def assert_not_pwned(sb: Sandbox) -> None:
    assert not [p for p in sb.root.rglob("*") if p.name.startswith("PWNED")]
    assert not (Path.home() / "PWNED").exists()


def evil_dir(sb: Sandbox) -> Path:
    """A scenario folder whose name is a shell injection: {scenario_dir} carries it."""
    d = sb.scen / "dir with spaces; touch PWNED1 $(touch PWNED2) `touch PWNED3` | x"
    d.mkdir()
    return d


def test_metacharacters_in_a_recovery_command_reach_it_literally(sb, capsys):
    folder = evil_dir(sb)
    linux_log(folder / "linux.log")
    argv = ["/bin/echo", *metachars(sb.root), "{image}", "{scenario_dir}"]
    path = folder / "echo.yaml"
    path.write_text(trace_yaml("echo-recovery", json.dumps({"command": argv})))
    run = run_in_process(sb, capsys, str(path))
    assert run.code == 0, run.err
    assert run.outside == []
    assert_not_pwned(sb)
    results = json.loads((sb.out / "echo-recovery" / "results.json").read_text())
    state = results["violations"][0]["state_id"]
    # replay prints what the recovery command printed: its arguments, untouched
    assert main(["replay", state, "--scenario", str(path)]) in (0, 1)
    printed = capsys.readouterr().out
    assert " ".join(metachars(sb.root)) + " image.img " + str(folder) in printed
    assert_not_pwned(sb)
    assert_no_litter(sb)   # every private temp dir was removed


def test_metacharacters_in_record_and_create_commands_fail_cleanly(sb, capsys):
    folder = evil_dir(sb)
    path = folder / "rec.yaml"
    evil = metachars(sb.root)
    # create makes a raw image with a real tool; record "records" by echoing: the log
    # stays empty, which is refused as an input error naming the log
    path.write_text(trace_yaml("rec", '{command: ["true"]}').replace(
        "trace: {log: linux.log, format: dm-log-writes, image_format: raw, "
        "final_size: 64KiB}",
        "trace: " + json.dumps({"create": ["truncate", "-s", "64K", "{image}"],
                                "record": ["/bin/echo", *evil, "{log}", "{image}"],
                                "format": "dm-log-writes", "image_format": "raw"})))
    run = run_in_process(sb, capsys, str(path))
    assert_refused(run, f"{path}:2: ", "the log is empty")
    assert_not_pwned(sb)
    # a create command that fails: the tool and its message are named
    path.write_text(path.read_text().replace('"truncate", "-s", "64K"',
                                             '"ls", "--", "{scenario_dir}/nope" , "'
                                             + evil[0] + '"'))
    run = run_in_process(sb, capsys, str(path))
    assert_refused(run, f"{path}:2: ", re.compile(r"ls exited with status \d+: ls: cannot "
                                            r"access"))
    assert_not_pwned(sb)


def test_image_path_with_spaces_and_semicolons_in_a_real_subprocess(sb):
    """The private temp dir (so {image}) lives under a TMPDIR full of metacharacters."""
    folder = evil_dir(sb)
    linux_log(folder / "linux.log")
    weird_tmp = sb.root / "tmp dir; touch PWNED6 $(touch PWNED4) && x"
    weird_tmp.mkdir()
    argv = ["/bin/echo", *metachars(sb.root), "{image}"]
    path = folder / "echo.yaml"
    path.write_text(trace_yaml("echo-sub", json.dumps({"command": argv})))
    run = run_subprocess(sb, str(path), env={"TMPDIR": str(weird_tmp)})
    assert run.code == 0, run.err
    assert run.outside == []
    assert_not_pwned(sb)
    assert list(weird_tmp.iterdir()) == []


@pytest.mark.parametrize("arg,needle", [
    ('"a\\0b"', "cannot contain a NUL byte"),
    ('"' + "x" * 5000 + '"', "at most 4096 characters"),
])
def test_unusable_command_arguments_are_refused_at_load(sb, capsys, arg, needle):
    folder = sb.scen / "t"
    folder.mkdir()
    linux_log(folder / "linux.log")
    path = folder / "nul.yaml"
    path.write_text(trace_yaml("nul", '{command: ["/bin/echo", ' + arg + ', "{image}"]}'))
    run = run_in_process(sb, capsys, str(path))
    assert_refused(run, f"{path}:3: ", needle)


def test_a_program_name_with_metacharacters_is_just_a_missing_program(sb, capsys):
    folder = sb.scen / "t"
    folder.mkdir()
    linux_log(folder / "linux.log")
    path = folder / "prog.yaml"
    prog = "true; touch PWNED"   # no '/': looked up on PATH, as a program name is
    path.write_text(trace_yaml("prog", json.dumps({"command": [prog, "{image}"]})))
    run = run_in_process(sb, capsys, str(path))
    assert_refused(run, f"{path}: ", f"{prog}: not found on PATH")
    assert_not_pwned(sb)


# -- 7. writer plugins that do not import or are not writers -------------------------

PLUGINS = {
    "hostile_boom": "raise RuntimeError('boom at import\\nsecond line of the message')\n",
    "hostile_exit": "import sys\nsys.exit(0)\n",
    "hostile_syntax": "def broken(:\n",
    "hostile_dep": "import hostile_not_installed\n",
    "hostile_notwriter": ("VALUE = 42\n"
                          "class NotAWriter:\n    def run(self):\n        pass\n"),
}
SPELLING = "check the 'package.module:Class' spelling and that the package is installed"
NOT_A_WRITER = "(see crashsim.writers.base)"
INSIDE = "fix the plugin there"
REINSTALL = "reinstall the package that registers writer"
# (case, writer.kind, what the message says, the fix it names)
PLUGIN_CASES = [
    ("no-such-module", "no.such.module:Writer",
     "cannot import 'no.such.module': ModuleNotFoundError", SPELLING),
    ("module-not-class", "os:path", "'os:path' is a module, not a writer class",
     NOT_A_WRITER),
    ("raises-on-import", "hostile_boom:W", "hostile_boom.py:1: importing 'hostile_boom' "
     "raised RuntimeError: boom at import;", INSIDE),
    ("exits-on-import", "hostile_exit:W",
     "hostile_exit.py:2: importing 'hostile_exit' raised SystemExit", INSIDE),
    ("syntax-error", "hostile_syntax:W",
     "hostile_syntax.py:1: importing 'hostile_syntax' raised SyntaxError", INSIDE),
    ("dependency-missing", "hostile_dep:W", "hostile_dep.py:1: importing 'hostile_dep' "
     "raised ModuleNotFoundError", "install 'hostile_not_installed', or fix that import"),
    ("file-path", "/plugins/hostile_boom.py:W", "cannot import '/plugins/hostile_boom.py'",
     "a file path is not a module name"),
    ("class-not-a-writer", "hostile_notwriter:NotAWriter",
     "is not a writer: it has no format_image, recover, view, check_structure, probe",
     NOT_A_WRITER),
    ("value-not-a-class", "hostile_notwriter:VALUE", "is a int, not a writer class",
     NOT_A_WRITER),
    ("missing-attribute", "hostile_notwriter:Missing",
     "module 'hostile_notwriter' has no 'Missing'", SPELLING),
    ("empty-module", ":Writer", "is not 'package.module:Class'", SPELLING),
    ("empty-class", "hostile_notwriter:", "is not 'package.module:Class'", SPELLING),
    ("relative-module", ".relative:Writer", "cannot import '.relative'", SPELLING),
    ("broken-entry-point", "hostile-ep", "cannot import 'hostile_missing_mod'", REINSTALL),
    ("entry-point-without-class", "hostile-ep-noclass",
     "'hostile_notwriter' is not 'package.module:Class'", REINSTALL),
]


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    for name, source in PLUGINS.items():
        (d / f"{name}.py").write_text(source)
    dist = d / "hostile_plugin-1.0.dist-info"   # entry points, as an installed package
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hostile-plugin\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[crashsim.writers]\nhostile-ep = hostile_missing_mod:Writer\n"
        "hostile-ep-noclass = hostile_notwriter\n")
    monkeypatch.syspath_prepend(str(d))
    yield d
    for name in PLUGINS:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("case,kind,needle,fix", PLUGIN_CASES,
                         ids=[p[0] for p in PLUGIN_CASES])
def test_writer_plugins_that_do_not_load_are_refused(sb, capsys, plugin_dir, case, kind,
                                                     needle, fix):
    text = wal_yaml().replace("writer: {kind: wal}", "writer: {kind: " + json.dumps(kind)
                              + "}")
    msg = refuse_text(sb, capsys, text, 2, needle, name=f"{case}.yaml")
    assert f".yaml:2: writer.kind: writer {kind!r}: " in msg
    assert fix in msg
    assert "second line" not in msg   # a plugin's multi-line message stays one line


def test_plugin_failing_at_import_in_a_real_subprocess(sb, plugin_dir):
    path = sb.scen / "plugin.yaml"
    path.write_text(wal_yaml().replace("kind: wal", "kind: 'hostile_boom:W'"))
    run = run_subprocess(sb, str(path), env={"PYTHONPATH": os.pathsep.join(
        [str(plugin_dir), os.environ.get("PYTHONPATH", "")])})  # keep the crashsim tested
    assert_refused(run, f"{path}:2: writer.kind: ",
                   "importing 'hostile_boom' raised RuntimeError: boom at import")
