"""Running external programs (qemu-img, qemu-io, user recovery commands) safely.

This module owns every subprocess crashsim starts. The rules it enforces:

- argument lists only, never a shell: metacharacters in arguments (``;``, ``$()``,
  backquotes, ``|``, globs) reach the program literally;
- placeholders such as ``{image}`` are replaced inside argument strings in one pass over
  the known keys, so a substituted value is never scanned again and an unknown ``{...}``
  is left alone (no ``str.format``: a scenario cannot reach attributes or indexes);
- a timeout kills the whole process group (the program and anything it forked) and is
  reported as ``timed_out=True``, never raised;
- a missing program is one clear ``ToolMissing`` error that says how to install it.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

# Grace period to collect output after the group was killed; a descendant that left the
# group could otherwise keep the pipes open for ever.
_DRAIN_AFTER_KILL_S = 5.0

_INSTALL_HINTS = {"qemu-": "apt-get install -y qemu-utils"}


class ToolMissing(Exception):
    """The program to run is not installed (or not executable)."""

    def __init__(self, tool: str, hint: str, reason: str = "not found on PATH"):
        super().__init__(f"{tool}: {reason}; install it: {hint}")
        self.tool = tool
        self.hint = hint


class CommandFailed(Exception):
    """A command that had to succeed exited non-zero or timed out."""

    def __init__(self, argv: Sequence[str], result: "CommandResult"):
        what = (f"timed out after {result.elapsed_s:.1f} s" if result.timed_out
                else f"exited with status {result.returncode}")
        detail = _last_line(result.stderr) or _last_line(result.stdout)
        msg = f"{argv[0]} {what}" + (f": {detail}" if detail else "")
        super().__init__(msg + "; run the command by hand to see its full output")
        self.argv = list(argv)
        self.result = result


@dataclass(frozen=True)
class CommandResult:
    returncode: int | None  # negative: killed by that signal (as subprocess reports it)
    stdout: str
    stderr: str
    timed_out: bool
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def install_hint(tool: str) -> str:
    name = os.path.basename(tool)
    for prefix, hint in _INSTALL_HINTS.items():
        if name.startswith(prefix):
            return hint
    return f"install {name} or put it on PATH"


def substitute(arg: str, placeholders: Mapping[str, str]) -> str:
    """Replace each ``{key}`` of ``placeholders`` in ``arg``, in a single pass."""
    if not placeholders:
        return arg
    pattern = re.compile("|".join(re.escape("{" + key + "}") for key in placeholders))
    return pattern.sub(lambda m: placeholders[m.group(0)[1:-1]], arg)


def build_argv(argv: Sequence[str | os.PathLike],
               placeholders: Mapping[str, str] | None = None) -> list[str]:
    if not argv:
        raise ValueError("empty command: give the program and its arguments as a list")
    if isinstance(argv, (str, bytes)):
        raise ValueError(f"command must be a list of arguments, not the string {argv!r}")
    values = {str(k): os.fspath(v) for k, v in (placeholders or {}).items()}
    out = [substitute(os.fspath(a), values) for a in argv]
    for a in out:
        if "\0" in a:
            raise ValueError(f"argument {a!r} contains a NUL byte, which no program "
                             "can receive")
    return out


def run_command(argv: Sequence[str | os.PathLike], *,
                placeholders: Mapping[str, str] | None = None,
                timeout_s: float,
                cwd: str | os.PathLike | None = None,
                env: Mapping[str, str] | None = None) -> CommandResult:
    """Run ``argv`` (after placeholder substitution) without a shell and wait for it."""
    args = build_argv(argv, placeholders)
    if cwd is not None and not os.path.isdir(cwd):
        raise NotADirectoryError(f"{cwd}: working directory for {args[0]} does not exist")
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            args, cwd=cwd, env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)  # its own process group, so a timeout kills it all
    except FileNotFoundError:
        raise ToolMissing(args[0], install_hint(args[0])) from None
    except PermissionError:
        raise ToolMissing(args[0], f"chmod +x {args[0]}, or {install_hint(args[0])}",
                          reason="not executable") from None
    out, err, timed_out = _wait(proc, timeout_s)
    return CommandResult(proc.returncode, out, err, timed_out, time.monotonic() - start)


def run_checked(argv: Sequence[str | os.PathLike], **kwargs) -> CommandResult:
    """``run_command`` that raises ``CommandFailed`` unless the command succeeded."""
    result = run_command(argv, **kwargs)
    if not result.ok:
        raise CommandFailed(build_argv(argv, kwargs.get("placeholders")), result)
    return result


def _wait(proc: subprocess.Popen, timeout_s: float) -> tuple[str, str, bool]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return _text(out), _text(err), False
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
    try:
        out, err = proc.communicate(timeout=_DRAIN_AFTER_KILL_S)
    except subprocess.TimeoutExpired:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait()
        out, err = b"", b""
    return _text(out), _text(err), True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def private_tempdir(prefix: str = "crashsim-") -> Iterator[Path]:
    """A fresh directory only this process can use; removed afterwards, even on error."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
