"""Malformed scenarios: each fails with exit 2 and one line per problem naming file:line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from crashsim.scenario import ScenarioError, load_scenario

GOOD = """\
name: ok
writer: {kind: wal}
workload:
  image: {virtual_size: 1MiB, log_size: 1MiB}
  ops:
    - log_write: {offset: 0, length: 4KiB, pattern: 0xab}
explore: {max_states_per_step: 8}
"""

# (case id, file text, expected line, text the error must contain)
BAD = [
    ("yaml-syntax", "name: x\nwriter: {kind: wal\n", 3, "YAML"),
    ("unknown-key", GOOD + "colour: red\n", 8, "colour: unknown key"),
    ("nested-unknown-key", GOOD.replace("max_states_per_step: 8",
                                        "max_states_per_stepp: 8"), 7,
     "explore.max_states_per_stepp: unknown key; did you mean 'max_states_per_step'?"),
    ("wrong-type", GOOD.replace("max_states_per_step: 8", "max_states_per_step: lots"),
     7, "explore.max_states_per_step"),
    ("negative-size", GOOD.replace("offset: 0", "offset: -4096"), 6, "negative"),
    ("absurd-size", GOOD.replace("virtual_size: 1MiB", "virtual_size: 1PiB"), 4,
     "virtual_size must be between"),
    ("absurd-budget", GOOD.replace("max_states_per_step: 8",
                                   "max_states_per_step: 1000000000000"), 7,
     "max_states_per_step"),
    ("atomic-not-power-of-two", GOOD + "device: {atomic_write_bytes: 1000}\n", 8,
     "atomic_write_bytes must be 512 or 4096"),
    ("unknown-writer", GOOD.replace("kind: wal", "kind: nosuch"), 2,
     "unknown writer 'nosuch'"),
    ("plugin-does-not-import", GOOD.replace("kind: wal", "kind: 'no_such_pkg.mod:W'"), 2,
     "cannot import"),
    ("unknown-defect", GOOD.replace("kind: wal}", "kind: wal, defects: [oops]}"), 2,
     "unknown defect"),
    ("duplicate-keys", GOOD + "name: again\n", 8, "duplicate key"),
    ("empty-file", "", 1, "empty scenario"),
    ("not-a-mapping", "- a\n- b\n", 1, "mapping"),
    ("missing-writer", "name: x\n", 1, "writer: required key is missing"),
    ("bad-size-string", GOOD.replace("length: 4KiB", "length: 4 parsecs"), 6,
     "expected a size"),
    ("bad-pattern", GOOD.replace("pattern: 0xab", "pattern: 0x1ff"), 6, "byte 0..255"),
    ("bad-expect", GOOD + "expect: {violations: [explode]}\n", 8, "expect.violations.0"),
    ("bad-name", GOOD.replace("name: ok", "name: ../../etc"), 1, "name: use only"),
    ("op-past-end", GOOD.replace("writer: {kind: wal}", "writer: {kind: vhdx}")
     .replace("log_write", "guest_write").replace("offset: 0", "offset: 1MiB"), 6,
     "past virtual_size"),
    ("bad-destage", GOOD + "device: {cache: {destage: lifo}}\n", 8, "device.cache.destage"),
]


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crashsim", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case,text,line,needle", BAD, ids=[b[0] for b in BAD])
def test_malformed_scenario_fails_with_exit_2_and_file_line(tmp_path, case, text, line,
                                                            needle):
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    proc = _run_cli("run", str(path), "--out", str(out), "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"crashsim: error: {path}:{line}: "), proc.stderr
    assert needle in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_missing_file_fails_with_exit_2(tmp_path):
    proc = _run_cli("run", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{tmp_path / 'nope.yaml'}:0: file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("name: x\nwriter: {kind: wal}\ndevice:\n  atomic_write_bytes: 3\n"
                    "  cache: {mode: wb}\nexplore: {seed: one}\n")
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    lines = err.value.lines
    assert [ln.split(":")[1] for ln in lines] == ["4", "5", "6"]


def test_size_strings_are_accepted(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD.replace("length: 4KiB", "length: 1 MiB")
                    .replace("virtual_size: 1MiB", "virtual_size: 2MiB"))
    sc = load_scenario(path)
    assert sc.ops()[0].length == 1 << 20
    assert sc.workload.image.virtual_size == 2 << 20


def test_yaml_alias_bomb_is_refused(tmp_path):
    lines = ["name: bomb", "writer: {kind: wal}", "a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        prev = "a" if i == 1 else f"b{i - 1}"
        lines.append(f"b{i}: &b{i} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert "aliases" in str(err.value)


def _one_error_line(tmp_path: Path, case: str, text: str) -> tuple[Path, str]:
    """Run the CLI on ``text``: exit 2, no traceback, and exactly one line, returned."""
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    proc = _run_cli("run", str(path), "--out", str(tmp_path / "out"), "--workers", "1",
                    cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return path, lines[0]


# (case id, file text, line, key, words the one line must hold after "key: ")
WRONG_TYPES = [
    ("states-true", GOOD.replace("max_states_per_step: 8", "max_states_per_step: true"),
     7, "explore.max_states_per_step", ["expected a whole number", "not true/false"]),
    ("seed-false", GOOD.replace("max_states_per_step: 8", "max_states_per_step: 8, "
                                "seed: false"),
     7, "explore.seed", ["expected a whole number", "not true/false"]),
    ("states-fraction", GOOD.replace("max_states_per_step: 8", "max_states_per_step: 8.5"),
     7, "explore.max_states_per_step", ["expected a whole number"]),
    ("states-quoted", GOOD.replace("max_states_per_step: 8", 'max_states_per_step: "8"'),
     7, "explore.max_states_per_step", ["expected a whole number", "remove the quotes"]),
    ("recovery-crash-yes", GOOD.replace("max_states_per_step: 8", 'max_states_per_step: 8, '
                                        'recovery_crash: "yes"'),
     7, "explore.recovery_crash", ["expected true or false"]),
    ("shrink-off", GOOD.replace("max_states_per_step: 8", 'max_states_per_step: 8, '
                                'shrink: "off"'),
     7, "explore.shrink", ["expected true or false"]),
    ("shrink-one", GOOD.replace("max_states_per_step: 8", "max_states_per_step: 8, "
                                "shrink: 1"),
     7, "explore.shrink", ["expected true or false", "not a number"]),
    ("atomic-quoted", GOOD + 'device: {atomic_write_bytes: "512"}\n', 8,
     "device.atomic_write_bytes", ["expected a size such as 4096 or 64KiB",
                                   "remove the quotes"]),
    ("length-quoted", GOOD.replace("length: 4KiB", 'length: "4096"'), 6,
     "workload.ops.0.log_write.length", ["remove the quotes"]),
    ("pattern-quoted", GOOD.replace("pattern: 0xab", 'pattern: "0xab"'), 6,
     "workload.ops.0.log_write.pattern", ["expected a byte 0..255 such as 0xab",
                                          "remove the quotes"]),
    ("latency-quoted", GOOD + 'device: {latency_us: {write: "100"}}\n', 8,
     "device.latency_us.write", ["expected a number", "remove the quotes"]),
    ("latency-true", GOOD + "device: {latency_us: {flush: true}}\n", 8,
     "device.latency_us.flush", ["expected a number", "not true/false"]),
    ("writer-string", GOOD.replace("writer: {kind: wal}", "writer: wal"), 2, "writer",
     ['expected a mapping; write writer: {kind: "wal"}']),
    ("explore-number", GOOD.replace("explore: {max_states_per_step: 8}", "explore: 8"), 7,
     "explore", ["expected a mapping of keys"]),
    ("op-bare-kind", GOOD.replace("- log_write: {offset: 0, length: 4KiB, pattern: 0xab}",
                                  "- log_write"), 6, "workload.ops.0",
     ["expected a mapping of keys"]),
    ("faults-string", GOOD + "device: {faults: garbage}\n", 8, "device.faults",
     ["expected a list; write [garbage]"]),
    ("ops-number", GOOD.replace("  ops:\n    - log_write: {offset: 0, length: 4KiB, "
                                "pattern: 0xab}", "  ops: 3"), 5, "workload.ops",
     ["expected a list: [a, b]"]),
    ("random-count-quoted", GOOD.replace("  ops:", '  random: {count: "5"}\n  ops:'), 5,
     "workload.random.count", ["expected a whole number", "remove the quotes"]),
]


@pytest.mark.parametrize("case,text,line,key,words", WRONG_TYPES,
                         ids=[w[0] for w in WRONG_TYPES])
def test_wrong_type_is_one_line_naming_the_expected_type(tmp_path, case, text, line, key,
                                                         words):
    """No lax coercion: true is not 1, "yes" is not true, "512" is not 512."""
    path, err = _one_error_line(tmp_path, case, text)
    assert err.startswith(f"crashsim: error: {path}:{line}: {key}: "), err
    for word in words:
        assert word in err, err


def test_right_types_still_load(tmp_path):
    """Strictness refuses only wrong types: ints for floats, hex bytes and size strings
    (quoted or not, with a unit) are what scenarios are written with."""
    path = tmp_path / "ok.yaml"
    path.write_text(GOOD.replace("max_states_per_step: 8", "max_states_per_step: 8, "
                                 "seed: 0x10, recovery_crash: true, shrink: false")
                    .replace("length: 4KiB", 'length: "8 KiB"')
                    + "device: {atomic_write_bytes: 4KiB, latency_us: {write: 100, "
                      "flush: 2.5e3}, cache: {capacity_bytes: \"256KiB\"}}\n")
    sc = load_scenario(path)
    assert (sc.explore.seed, sc.explore.recovery_crash, sc.explore.shrink) == (16, True,
                                                                               False)
    assert sc.device.atomic_write_bytes == 4096
    assert sc.device.latency_us.write == 100.0 and sc.device.latency_us.flush == 2500.0
    assert sc.device.cache.capacity_bytes == 256 << 10
    assert sc.ops()[0].length == 8 << 10


# (case id, file text, line, key, the quoted form the line must suggest)
UNQUOTED_STRINGS = [
    ("name-digits", GOOD.replace("name: ok", "name: 12345"), 1, "name", 'name: "12345"'),
    ("description-bool", GOOD + "description: true\n", 8, "description",
     'description: "true"'),
    ("writer-kind-number", GOOD.replace("kind: wal", "kind: 42"), 2, "writer.kind",
     'kind: "42"'),
]


@pytest.mark.parametrize("case,text,line,key,quoted", UNQUOTED_STRINGS,
                         ids=[u[0] for u in UNQUOTED_STRINGS])
def test_number_where_text_is_expected_says_to_quote_it(tmp_path, case, text, line, key,
                                                        quoted):
    """YAML reads name: 12345 as a number although the name pattern allows digits."""
    path, err = _one_error_line(tmp_path, case, text)
    assert err.startswith(f"crashsim: error: {path}:{line}: {key}: expected a string; "
                          f"put it in quotes: {quoted}"), err


@pytest.mark.parametrize("value,got", [("fail", "'fail'"), ("[lost]", "['lost']"),
                                       ("true", "True")], ids=["word", "list", "bool"])
def test_bad_expect_is_one_line_listing_the_valid_values(tmp_path, value, got):
    """expect is pass or a mapping; a wrong value is one problem, not one per form."""
    path, err = _one_error_line(tmp_path, "expect", GOOD + f"expect: {value}\n")
    assert err == (f"crashsim: error: {path}:8: expect: must be pass or {{violations: "
                   f"[...]}} naming one or more of mixed, lost, recovery-error, stuck, "
                   f"structure (got {got})"), err


@pytest.mark.parametrize("text,line,got", [
    ("- name: x\n- writer: {kind: wal}\n", 1, "a list"),
    ("# a list after a comment\n\n- a\n", 3, "a list"),
    ("hello\n", 1, "a string"),
    ("42\n", 1, "a number"),
    ("1.5\n", 1, "a number"),
    ("true\n", 1, "true/false"),
], ids=["list", "list-after-comment", "string", "int", "float", "bool"])
def test_top_level_that_is_not_a_mapping_says_what_it_is(tmp_path, text, line, got):
    """The user wrote YAML, not Python: name the YAML kind, never a ruamel class."""
    path, err = _one_error_line(tmp_path, "top", text)
    assert err == (f"crashsim: error: {path}:{line}: the top level must be a mapping of "
                   f"keys (name: ..., writer: ...), got {got}"), err
