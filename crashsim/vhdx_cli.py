"""``crashsim vhdx``: inspect, replay, read, create and write VHDX images.

Subcommands: ``info``, ``log``, ``replay [--in-place]``, ``read [-o FILE]``, ``create``
and ``write``. Read-only commands never change the image: a dirty log is replayed in
memory (``OverlayDevice``). Bad input prints one line,
``crashsim: error: <file>: <reason> (at offset 0x...)``, and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import random
import shlex
import stat
import sys
from collections import Counter
from typing import BinaryIO, Callable

from .blockdev import FileDevice, run_sync
from .sizes import format_size, parse_size
from .writers.base import RecoveryError
from .writers.vhdx.create import create_image
from .writers.vhdx.driver import READS_AS_ZERO, VhdxDriver, validate
from .writers.vhdx.format import (HEADER_BLOCK, HEADER_SLOTS, STATE_NAMES,
                                  VhdxCorrupt, check_header, parse_file_identifier,
                                  unpack_bat_entry)
from .writers.vhdx.log import HeaderSession
from .writers.vhdx.replay import (FIXED_POLICY, QEMU_POLICY, OverlayDevice, ReplayPolicy,
                                  ReplayResult, scan_log)

EXIT_OK, EXIT_INPUT = 0, 2
POLICIES = {"fixed": FIXED_POLICY, "spec": ReplayPolicy(), "qemu": QEMU_POLICY}
READ_CHUNK_BYTES = 4 << 20


class CliError(Exception):
    """Bad input: printed as one line naming the file (``path``, else the image)."""

    def __init__(self, reason: str, path: str | None = None):
        super().__init__(reason)
        self.path = path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("vhdx", help="inspect, replay, read, create and write VHDX "
                              "images")
    sub = p.add_subparsers(dest="vhdx_command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="file identifier, headers, regions, metadata, BAT")
    info.add_argument("image")
    log = sub.add_parser("log", help="every log entry, valid or not, and why")
    log.add_argument("image")
    rp = sub.add_parser("replay", help="replay the log (in memory unless --in-place)")
    rp.add_argument("image")
    rp.add_argument("--in-place", action="store_true", help="write the replay to the file")
    rp.add_argument("--policy", choices=sorted(POLICIES), default="fixed")
    rd = sub.add_parser("read", help="the virtual disk as raw bytes")
    rd.add_argument("image")
    rd.add_argument("-o", "--output", default=None, help="write to FILE (sparse), not stdout")
    cr = sub.add_parser("create", help="a new dynamic VHDX image")
    cr.add_argument("image")
    cr.add_argument("--size", required=True)
    cr.add_argument("--block-size", default="1MiB")
    cr.add_argument("--log-size", default="1MiB")
    cr.add_argument("--seed", type=int, default=None)
    wr = sub.add_parser("write", help="a guest write through crashsim's driver")
    wr.add_argument("image")
    wr.add_argument("offset")
    wr.add_argument("length")
    wr.add_argument("--pattern", default="0xab")
    wr.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    command: Callable[[argparse.Namespace], int] = _COMMANDS[args.vhdx_command]
    try:
        return command(args)
    except BrokenPipeError:  # the reader (e.g. head) went away: not the image's fault
        return 0
    except (RecoveryError, CliError, ValueError, OSError) as exc:
        path = getattr(exc, "path", None) or args.image
        print(f"crashsim: error: {path}: {_reason(exc)}", file=sys.stderr)
        return EXIT_INPUT


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _size_arg(name: str, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise CliError(f"bad {name}: {exc}") from None


# Images are often shipped compressed (the shared samples are .vhdx.bz2); a signature
# error would tell the user the file is corrupt when it only needs unpacking.
COMPRESSED = ((b"BZh", "bzip2"), (b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"),
              (b"\x28\xb5\x2f\xfd", "zstd"))


def _need_file(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CliError("no such file") from None
    except OSError as exc:  # a symlink loop is not "no such file"
        raise CliError(f"cannot open: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise CliError("is a directory, not an image file")
    if not stat.S_ISREG(mode):
        # a pipe (<(bzcat x.vhdx.bz2)) reads once and has no size; opening a FIFO with
        # no writer would wait forever
        raise CliError("not a regular file (a pipe or a device): an image is read at "
                       "random offsets; save it to a file first")
    _refuse_compressed(path)


def _refuse_compressed(path: str) -> None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return  # the open that follows reports it
    for magic, tool in COMPRESSED:
        if head.startswith(magic):
            plain = os.path.splitext(os.path.basename(path))[0]
            raise CliError(f"{tool}-compressed, not a VHDX image: decompress it first "
                           f"({tool} -dc {shlex.quote(path)} > {shlex.quote(plain)}) "
                           f"(at offset 0x0)")


def _open_in_memory(path: str, policy: ReplayPolicy = FIXED_POLICY
                    ) -> tuple[OverlayDevice, VhdxDriver, ReplayResult]:
    _need_file(path)
    dev = OverlayDevice(path)
    try:
        drv = VhdxDriver(random.Random(0))
        result = run_sync(drv.open(dev, policy=policy))
    except BaseException:
        dev.close()
        raise
    return dev, drv, result


# -- info ---------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    _need_file(args.image)
    with OverlayDevice(args.image) as raw:
        headers = HeaderSession.load(raw)
        print(f"file:     {args.image} ({raw.size_bytes} bytes)")
        print(f"creator:  {_creator(raw)}")
        for line in _header_lines(raw, headers):
            print(line)
    dev, drv, result = _open_in_memory(args.image)
    with dev:
        print(f"log:      {_log_state(result)}")
        for r, name in ((drv.regions.bat, "BAT"), (drv.regions.metadata, "metadata")):
            print(f"region:   {name:8} at {r.file_offset:#x} length {r.length:#x}"
                  f"{' (required)' if r.required else ''}")
        md = drv.metadata
        print(f"virtual size: {md.virtual_size} bytes ({format_size(md.virtual_size)})")
        print(f"block size:   {md.block_size} bytes; sectors: logical "
              f"{md.logical_sector_size}, physical {md.physical_sector_size}; "
              f"chunk ratio {md.chunk_ratio}")
        print(f"flags:        leave_blocks_allocated={md.leave_blocks_allocated} "
              f"has_parent={md.has_parent}; page83 {md.page83}")
        states = Counter(STATE_NAMES[unpack_bat_entry(v)[0]] for v in drv.bat)
        print(f"BAT:          {len(drv.bat)} entries: "
              + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
        for problem in validate(dev):
            print(f"problem:  {problem}")
    return EXIT_OK


def _creator(dev) -> str:
    return parse_file_identifier(dev.read(0, 1024)) or "(empty)"


def _header_lines(dev, headers: HeaderSession) -> list[str]:
    out = []
    for i, off in enumerate(HEADER_SLOTS):
        mark = "current" if headers.slot == i else "other"
        try:
            h = check_header(dev.read(off, HEADER_BLOCK), off)
        except VhdxCorrupt as exc:
            out.append(f"header {i + 1} ({mark}): invalid: {exc}")
            continue
        out.append(f"header {i + 1} ({mark}): seq {h.sequence_number}, FileWriteGuid "
                   f"{h.file_write_guid}, DataWriteGuid {h.data_write_guid}, LogGuid "
                   f"{h.log_guid}, log at {h.log_offset:#x} length {h.log_length:#x}")
    out.extend(f"note:     {n}" for n in headers.notes)
    return out


def _log_state(result: ReplayResult) -> str:
    if "replayed" in result.branches:
        n = result.replayed_entries
        return (f"dirty: {n} entr{'y' if n == 1 else 'ies'} replayed in memory "
                f"(the file is unchanged)")
    if "guid-reset" in result.branches:
        return "LogGuid set without an active sequence (cleared in memory)"
    return "clean"


# -- log ----------------------------------------------------------------------------------
def cmd_log(args: argparse.Namespace) -> int:
    _need_file(args.image)
    with OverlayDevice(args.image) as dev:
        headers = HeaderSession.load(dev)
        h = headers.current
        print(f"log at {h.log_offset:#x} length {h.log_length:#x}; header LogGuid "
              f"{h.log_guid}")
        if h.log_length == 0:
            print("no log (LogLength 0)")
            return EXIT_OK
        scan = scan_log(dev, h)
        for c in scan.candidates:
            e = c.header
            status = "valid" if c.valid else (
                "inactive" if c.code == "guid-mismatch" else "invalid")
            print(f"log+{c.position:#x}: seq {e.sequence_number} length {e.entry_length:#x} "
                  f"descriptors {e.descriptor_count} tail {e.tail:#x} guid {e.log_guid} "
                  f"FlushedFileOffset {e.flushed_file_offset:#x} LastFileOffset "
                  f"{e.last_file_offset:#x}: {status}" + ("" if c.valid else f": {c.reason}"))
        print(f"{scan.empty_sectors} log sectors hold no entry header")
        for r in scan.runs:
            role = "ACTIVE" if r is scan.active else (
                "not well-formed" if r.replay_from is None else "not active")
            print(f"{r.describe()}: {role}")
        if scan.active is None:
            print("no active sequence" + (" (LogGuid is set)" if h.log_guid.int else ""))
    return EXIT_OK


# -- replay -------------------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace) -> int:
    _need_file(args.image)
    policy = POLICIES[args.policy]
    if args.in_place:
        with FileDevice(args.image) as dev:
            drv = VhdxDriver(random.Random())
            result = run_sync(drv.open(dev, policy=policy))
    else:
        dev, drv, result = _open_in_memory(args.image, policy)
        dev.close()
    for line in result.decisions:
        print(line)
    print(f"branches: {', '.join(result.branches)}")
    print("replayed in place" if args.in_place else
          "replayed in memory; the file is unchanged (use --in-place to write it)")
    return EXIT_OK


# -- read ---------------------------------------------------------------------------------
def cmd_read(args: argparse.Namespace) -> int:
    if args.output is None and sys.stdout.isatty():
        # a virtual disk is gigabytes of binary: on a terminal it is only garbage
        raise CliError("refusing to write the raw virtual disk to a terminal: use "
                       "-o FILE, or redirect stdout (> disk.raw)")
    dev, drv, _ = _open_in_memory(args.image)
    with dev:
        if args.output is None:
            _stream(drv, sys.stdout.buffer, sparse=False)
            sys.stdout.buffer.flush()
        else:
            _check_output(args.image, args.output)
            with _Output(args.output) as out:
                _stream(drv, out, sparse=True)
    return EXIT_OK


def _check_output(image: str, output: str) -> None:
    # opening the output truncates it: were it the image, the read would destroy it
    try:
        same = os.path.samefile(image, output)
    except OSError:
        same = False
    if same:
        raise CliError("the output file is the image being read; give another -o file",
                       output)


class _Output:
    """The -o file; an error writing it names it, not the image being read."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.file = open(path, "wb")
        except OSError as exc:
            raise self._error("cannot create the output file", exc) from None

    def _error(self, what: str, exc: OSError) -> CliError:
        return CliError(f"{what}: {exc.strerror or exc}", self.path)

    def _do(self, method: str, *args):
        try:
            return getattr(self.file, method)(*args)
        except OSError as exc:
            raise self._error("cannot write the output file", exc) from None

    def write(self, data: bytes) -> int:
        return self._do("write", data)

    def seek(self, offset: int) -> int:
        return self._do("seek", offset)

    def truncate(self, size: int) -> int:
        return self._do("truncate", size)

    def __enter__(self) -> "_Output":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.file.close()  # flushes: a full disk may only show here
        except OSError as err:
            if exc[0] is None:
                raise self._error("cannot write the output file", err) from None


def _stream(drv: VhdxDriver, out: BinaryIO, *, sparse: bool) -> None:
    """Copy the virtual disk chunk by chunk; with ``sparse``, skip zero chunks (holes)."""
    size = drv.virtual_size
    chunk = min(READ_CHUNK_BYTES, drv.block_size)
    pos = 0
    while pos < size:
        n = min(chunk, size - pos)
        block = pos // drv.block_size
        absent = drv.block_state(block)[0] in READS_AS_ZERO
        data = None if absent else drv.read(pos, n)
        if sparse and (data is None or data.count(0) == n):
            out.seek(pos + n)
        else:
            out.write(data if data is not None else bytes(n))
        pos += n
    if sparse:
        out.truncate(size)


# -- create / write -------------------------------------------------------------------------
def cmd_create(args: argparse.Namespace) -> int:
    size = _size_arg("--size", args.size)
    block = _size_arg("--block-size", args.block_size)
    log = _size_arg("--log-size", args.log_size)
    img = create_image(size, block, log, rng=random.Random(args.seed))
    img.to_file(args.image)
    print(f"created {args.image}: virtual size {format_size(size)}, block size "
          f"{format_size(block)}, log {format_size(log)}")
    return EXIT_OK


def cmd_write(args: argparse.Namespace) -> int:
    offset = _size_arg("OFFSET", args.offset)
    length = _size_arg("LENGTH", args.length)
    pattern = _pattern(args.pattern)
    _need_file(args.image)
    with FileDevice(args.image) as dev:
        drv = VhdxDriver(random.Random(args.seed))
        run_sync(drv.open(dev))
        list(drv.extents(offset, length))  # range check before any write
        step = drv.block_size
        pos = offset
        while pos < offset + length:
            n = min(step - pos % step, offset + length - pos)
            run_sync(drv.write(pos, bytes([pattern]) * n))
            pos += n
        run_sync(drv.flush())
    print(f"wrote {length} bytes of {pattern:#04x} at {offset:#x}")
    return EXIT_OK


def _pattern(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise CliError(f"bad --pattern {text!r}: expected a byte such as 0xab") from None
    if not 0 <= value <= 255:
        raise CliError(f"bad --pattern {text!r}: a byte is 0..255")
    return value


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "info": cmd_info, "log": cmd_log, "replay": cmd_replay, "read": cmd_read,
    "create": cmd_create, "write": cmd_write}


def main(argv: list[str] | None = None) -> int:
    """``crashsim vhdx ...`` (``argv`` starts with "vhdx"), through crashsim's own entry
    point: the same one-line errors and exit codes as the ``crashsim`` command."""
    from .cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    # Through the package, so exception classes are the package's own, not __main__'s.
    from crashsim.cli import main as package_main
    sys.exit(package_main())
