"""crashsim.external: no shell, exact placeholders, group-killing timeouts, clear errors."""
from __future__ import annotations

import ast
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from crashsim.external import (CommandFailed, ToolMissing, private_tempdir, run_checked,
                               run_command, substitute)

PRINT_ARGS = [sys.executable, "-c", "import sys; print(repr(sys.argv[1:]))"]


def _args(result) -> list[str]:
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip())


def test_placeholders_are_replaced_inside_arguments(tmp_path):
    result = run_command(PRINT_ARGS + ["{image}", "file={image},log={log}", "{unknown}",
                                       "{image!r}", "{0}"],
                         placeholders={"image": "/a/d.vhdx", "log": "/a/w.log"},
                         timeout_s=30, cwd=tmp_path)
    assert _args(result) == ["/a/d.vhdx", "file=/a/d.vhdx,log=/a/w.log", "{unknown}",
                             "{image!r}", "{0}"]
    assert not result.timed_out


def test_substituted_value_is_never_expanded_again():
    # A path that itself looks like a placeholder must come out literally.
    assert substitute("{image} {log}", {"image": "/x/{log}", "log": "L"}) == "/x/{log} L"
    assert substitute("{image.__class__}", {"image": "v"}) == "{image.__class__}"


def test_shell_metacharacters_are_passed_literally(tmp_path):
    marker = tmp_path / "pwned"
    nasty = [f"; touch {marker}", f"$(touch {marker})", f"`touch {marker}`",
             f"| touch {marker}", "*", "&& echo hi", "'quoted' \"double\"", "{image}"]
    result = run_command(PRINT_ARGS + nasty, placeholders={"image": f"x; touch {marker}"},
                         timeout_s=30, cwd=tmp_path)
    assert _args(result) == nasty[:-1] + [f"x; touch {marker}"]
    assert not marker.exists()


def test_output_and_status_of_a_failing_command(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('out'); print('bad thing', "
           "file=sys.stderr); sys.exit(3)"]
    result = run_command(cmd, timeout_s=30, cwd=tmp_path)
    assert (result.returncode, result.stdout.strip(), result.stderr.strip()) == \
        (3, "out", "bad thing")
    assert not result.ok
    with pytest.raises(CommandFailed) as err:
        run_checked(cmd, timeout_s=30, cwd=tmp_path)
    assert "exited with status 3: bad thing" in str(err.value)
    assert "\n" not in str(err.value)


def _gone(pid: int) -> bool:
    """True once the process no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_timeout_kills_the_whole_process_group(tmp_path):
    script = "echo $$ > sh.pid; sleep 60 & echo $! > child.pid; wait"
    result = run_command(["sh", "-c", script], timeout_s=0.5, cwd=tmp_path)
    assert result.timed_out
    assert result.returncode == -signal.SIGKILL
    pids = [int((tmp_path / name).read_text()) for name in ("sh.pid", "child.pid")]
    deadline = time.monotonic() + 10  # the orphaned child is reaped by init, eventually
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids)


def test_timeout_on_plain_sleep_is_reported_not_raised(tmp_path):
    result = run_command(["sleep", "10"], timeout_s=0.5, cwd=tmp_path)
    assert result.timed_out and not result.ok
    with pytest.raises(CommandFailed, match="sleep timed out"):
        run_checked(["sleep", "10"], timeout_s=0.2, cwd=tmp_path)


def test_missing_qemu_tool_says_how_to_install(tmp_path):
    with pytest.raises(ToolMissing) as err:
        run_command(["qemu-img-no-such-tool", "info"], timeout_s=5, cwd=tmp_path)
    assert err.value.tool == "qemu-img-no-such-tool"
    assert err.value.hint == "apt-get install -y qemu-utils"
    assert str(err.value) == ("qemu-img-no-such-tool: not found on PATH; install it: "
                              "apt-get install -y qemu-utils")


def test_missing_other_tool_has_generic_hint(tmp_path):
    with pytest.raises(ToolMissing, match="install no-such-tool-xyz or put it on PATH"):
        run_command(["no-such-tool-xyz"], timeout_s=5, cwd=tmp_path)


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="list of arguments"):
        run_command("echo hi; rm -rf /", timeout_s=5, cwd=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(NotADirectoryError, match="does not exist"):
        run_command(["true"], timeout_s=5, cwd=tmp_path / "missing")


def test_private_tempdir_is_removed_afterwards():
    with private_tempdir("crashsim-test-") as d:
        (d / "f").write_bytes(b"x")
        assert d.is_dir() and d.name.startswith("crashsim-test-")
        assert oct(os.stat(d).st_mode & 0o777) == "0o700"
    assert not d.exists()


def test_private_tempdir_is_removed_on_error():
    with pytest.raises(RuntimeError):
        with private_tempdir() as d:
            (d / "sub").mkdir()
            raise RuntimeError("boom")
    assert not d.exists()
