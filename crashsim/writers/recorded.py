"""RecordedWriter: the crash states of a real program's recorded I/O (trace scenarios).

A trace scenario has no simulated writer. Its I/O comes from a dm-log-writes or QEMU
``blklogwrites`` log (``crashsim.dmlog``), either a file or recorded at run time; its
truth is the ``model`` of guest writes the program made; and recovery, the view and the
liveness probe are either crashsim's own VHDX code or real tools (``qemu-img``,
``qemu-io``) run on the crash state materialised as a file. This module owns that
plumbing and the mapping of model transactions onto the log.

Transactions in a log (the oracle needs A acknowledged and I started at every step):

- op ``i``'s *data write* is the first write after op ``i-1``'s whose payload is all the
  op's pattern byte, or contains the op's bytes. No such write: ``TraceError``.
- op ``i`` starts at the step its data write is submitted (op 0 at step 0), so the I/O
  before it (QEMU's header updates) belongs to the op before it, or to op 0.
- op ``i`` is acknowledged once the next op starts (or the log ends) **and** every write
  it made is durable: FUA and completed, or covered by a completed flush. Acks are
  prefix-closed. A program that never flushes never has an op acknowledged, which is
  the device contract of design.md §2: an unflushed write promises nothing.

External recovery (``recovery: {command: [...]}``): the crash state is written to a
sparse file in a private temp dir, the command runs on it (``{image}`` substituted,
killed after ``timeout_s``), the file is read back, and every sector that changed is
written into the device, so recovery is seen as writes. The command *refuses* the image
when it exits with a code not in ``ok_exit_codes``. The default is ``[0]``, and
``[0, 3]`` for ``qemu-img check``, whose codes are: 0 no errors (also after a successful
``-r`` repair), 1 the check could not complete (the image did not open: a refusal), 2
the image is still corrupt after the check/repair (a refusal), 3 only leaked clusters
remain (space is wasted, no data is at risk: recovered), 63 the format has no checks (a
refusal: this command cannot recover such an image). ``qemu-img check`` without ``-r``
after recovery counts 1 and 2 as structure problems, for the same reasons.

Built-in recovery (``{builtin: vhdx}``) opens the image as crashsim's fixed VHDX driver
does (replay with ``FIXED_POLICY``, then region table, metadata and BAT checks), on the
device itself, so its writes are steps ``recovery_crash`` can cut power in.
``{builtin: none}`` does nothing (a raw image of a program with no recovery of its own).

View, structure and liveness:

- ``view: qemu-img``: ``qemu-img convert -O raw`` of the recovered image, then the model's
  ranges of that file; structure is ``qemu-img check`` (no ``-r``). ``view: builtin``:
  crashsim's VHDX driver reads the guest disk (opened on a throwaway layer, so a log an
  external recovery left behind is replayed there and never written into the state);
  structure is crashsim's VHDX ``validate``. A raw image is read as is and has no
  structure to check.
- ``probe: qemu-io`` writes 64 KiB of 0x5a with ``qemu-io`` at the last block no model
  op touches; a non-zero exit or "failed" in its output is ``ProbeFailed`` with QEMU's
  message. ``probe: builtin`` does the same write with crashsim's fixed driver (which
  clears a LogGuid left set without entries on open, so it never sees QEMU's -ENOTSUP);
  on a raw image it writes the device directly. ``probe: none`` skips liveness.
- Every tool call is killed after ``recovery.timeout_s``.

Every file lives in a private temp dir that is removed when the call returns; messages
name the image ``image.vhdx`` rather than its temp path, so results stay reproducible.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..blockdev import BlockDevice, ImageDevice, IOGen
from ..dmlog import read_log, to_trace
from ..external import (CommandResult, ToolMissing, install_hint, private_tempdir,
                        run_checked, run_command)
from ..image import SECTOR_BYTES, SparseImage
from ..model import Op, merge_ranges
from ..trace import Trace, TxMark
from .base import ProbeFailed, Recovery, RecoveryError

if TYPE_CHECKING:
    from ..scenario import Scenario

PROBE_PATTERN = 0x5A
PROBE_BYTES = 64 * 1024
RAW_PROBE_BLOCK = 4096
QEMU_CHECK_OK = (0, 3)
_SEMANTICS = {"blklogwrites": "qemu", "dm-log-writes": "linux"}
_MAX_DECISIONS = 12


class TraceError(Exception):
    """The trace's inputs cannot be used (the model does not describe the recorded I/O,
    the image before the recording does not open); one line naming the culprit and fix.
    ``loc`` is the scenario key at fault, when it is not ``trace``."""

    def __init__(self, message: str, loc: tuple = ()):
        super().__init__(message)
        self.loc = loc


@dataclass(frozen=True)
class Geometry:
    """The guest disk a probe may write: its size and allocation unit."""

    virtual_size: int
    block_size: int


class RecordedWriter:
    """A Writer whose I/O was recorded from a real program (see the module docstring)."""

    kind: ClassVar[str] = "recorded"
    defects_available: ClassVar[dict[str, str]] = {}
    op_kinds: ClassVar[frozenset[str]] = frozenset({"guest_write"})

    def __init__(self, *, ops: list[Op], image: dict[str, Any] | None = None,
                 defects: list[str] | None = None, seed: int = 1,
                 scenario: "Scenario") -> None:
        if defects:
            raise ValueError("a recorded trace has no defect switches")
        if scenario.trace is None or scenario.recovery is None:
            raise ValueError(f"scenario {scenario.name!r} is not a trace scenario")
        self.ops = ops
        self.scenario = scenario
        self.trace_cfg = scenario.trace
        self.recovery_cfg = scenario.recovery
        self.image_format = scenario.trace.image_format
        self._geometry: Geometry | None = None

    # -- what the explorer calls first ---------------------------------------------------
    def preflight(self) -> None:
        """Every program the scenario will run is installed (ToolMissing otherwise)."""
        for tool in self.tools():
            if os.sep in tool:
                if not os.access(tool, os.X_OK):
                    raise ToolMissing(tool, install_hint(tool), reason="not executable")
            elif shutil.which(tool) is None:
                raise ToolMissing(tool, install_hint(tool))

    def tools(self) -> list[str]:
        t, r = self.trace_cfg, self.recovery_cfg
        tools = [argv[0] for argv in (t.record, t.create, r.command) if argv]
        if self.scenario.view == "qemu-img":
            tools.append("qemu-img")  # convert, and check for structure
        if self.scenario.probe == "qemu-io":
            tools.append("qemu-io")
        return list(dict.fromkeys(tools))

    def load_trace(self) -> Trace:
        """The log as a Trace with the model's transactions marked on it."""
        self.preflight()
        t = self.trace_cfg
        if t.log is not None:
            log = read_log(self.scenario.resolve_path(t.log))
            base = (SparseImage.from_file(self.scenario.resolve_path(t.base_image))
                    if t.base_image is not None else SparseImage(t.final_size))
            self._check_base(base)
            final_size = t.final_size
        else:
            log, base, final_size = self._record()
        trace = to_trace(log, base, _SEMANTICS[t.format], final_size,
                         self.scenario.device.atomic_write_bytes)
        if trace.base.size_bytes != base.size_bytes:
            self._check_base(trace.base, resized=True)
        trace.writethrough = self.scenario.device.cache.mode == "writethrough"
        trace.lying_flush = "lying_flush" in self.scenario.device.faults
        mark_transactions(trace, self.ops)
        if self.scenario.probe != "none":  # a model with no room for the probe: say so now
            try:
                self._probe_range(ImageDevice(trace.base.fork()))
            except RecoveryError as exc:  # opened above, so only a stricter parse gets here
                raise TraceError(f"the image before the recording: {exc}; the liveness "
                                 f"probe needs the guest disk's size (or set probe: "
                                 f"none)") from None
        return trace

    def _record(self):
        t = self.trace_cfg
        with private_tempdir("crashsim-record-") as tmp:
            image, log_path = tmp / f"image.{self._ext}", tmp / "trace.log"
            if t.create is not None:
                run_checked(t.create, placeholders=self._places(image), timeout_s=t.timeout_s,
                            cwd=tmp)
            else:
                shutil.copyfile(self.scenario.resolve_path(t.base_image), image)
            base = SparseImage.from_file(image)
            self._check_base(base)
            log_path.write_bytes(b"")  # blklogwrites opens the log, it never creates it
            run_checked(t.record, placeholders={**self._places(image), "log": str(log_path)},
                        timeout_s=t.timeout_s, cwd=tmp)
            log = read_log(log_path)
            log.image_size_bytes = image.stat().st_size
        return log, base, t.final_size or log.image_size_bytes

    def _check_base(self, base: SparseImage, resized: bool = False) -> None:
        """The image before the recording opens: every crash state starts from it, so one
        that does not would make every state a recovery-error, which is bad input, not a
        finding."""
        if self.image_format != "vhdx":
            return  # a raw image has no structure that could fail to open
        try:
            open_vhdx(ImageDevice(base))
        except RecoveryError as exc:
            raise TraceError(self._base_problem(exc, resized)) from None

    def _base_problem(self, exc: RecoveryError, resized: bool) -> str:
        t = self.trace_cfg
        if resized:
            return (f"trace.final_size: the image before the recording, made "
                    f"{t.final_size} bytes long, no longer opens as a VHDX: {exc}; "
                    f"final_size must be the image file's size after the recording "
                    f"(e.g. stat -c %s image.vhdx)")
        if t.base_image is not None:
            return (f"{self.scenario.resolve_path(t.base_image)}: trace.base_image is not "
                    f"a VHDX crashsim can open: {exc}; give the image file as it was "
                    f"before the recording (or image_format: raw for a raw image)")
        if t.create is not None:
            return (f"the image trace.create made is not a VHDX crashsim can open: {exc}; "
                    f"create must make the VHDX image the recording starts from")
        return ("trace: without base_image the image before the recording is all zeros, "
                "which is not a VHDX; give base_image: the image file as it was before "
                "the recording (or image_format: raw for a raw image)")

    # -- the Writer protocol -------------------------------------------------------------
    def format_image(self) -> SparseImage:
        raise NotImplementedError("a recorded trace brings its own image: use load_trace()")

    def run(self, dev: BlockDevice, tx) -> IOGen:
        raise NotImplementedError("a recorded trace is replayed from its log, not run: "
                                  "use load_trace()")

    def recover(self, dev: BlockDevice) -> IOGen:
        r = self.recovery_cfg
        if r.builtin == "none":
            return Recovery(decisions=["no recovery configured"], branches=["none"])
        if r.builtin == "vhdx":
            return (yield from self._builtin_recover(dev))
        return (yield from self._external_recover(dev))

    def view(self, dev: BlockDevice, ranges: list[tuple[int, int]]) -> bytes:
        if self.scenario.view == "qemu-img":
            return self._qemu_view(dev, ranges)
        if self.image_format == "raw":
            return b"".join(dev.read(off, n) for off, n in ranges)
        drv = open_vhdx(dev)
        end = max((off + n for off, n in ranges), default=0)
        if end > drv.virtual_size:  # the metadata shrank the disk: corrupt, not a crash
            raise RecoveryError(f"the guest disk is {drv.virtual_size} bytes, the model "
                                f"reaches {end}")
        return b"".join(drv.read(off, n) for off, n in ranges)

    def check_structure(self, dev: BlockDevice) -> list[str]:
        if self.image_format == "raw":
            return []  # a raw image has no structure of its own to validate
        if self.scenario.view == "qemu-img":
            return self._qemu_check(dev)
        return self._builtin_check(dev)

    def probe(self, dev: BlockDevice) -> IOGen:
        if self.scenario.probe == "none":
            return
        offset, length = self._probe_range(dev)
        if self.scenario.probe == "qemu-io":
            self._qemu_probe(dev, offset, length)
            return
        try:
            yield from self._builtin_probe(dev, offset, length)
        except ValueError as exc:  # the recovered disk no longer holds the probe's range
            raise ProbeFailed(f"guest write of {length} bytes at {offset:#x} failed: "
                              f"{exc}") from None

    # -- external recovery ---------------------------------------------------------------
    def _external_recover(self, dev: BlockDevice) -> IOGen:
        r = self.recovery_cfg
        prog = os.path.basename(r.command[0])
        before = _image_of(dev)
        with private_tempdir("crashsim-recover-") as tmp:
            path = tmp / f"image.{self._ext}"
            before.to_file(path)
            res = run_command(r.command, placeholders=self._places(path),
                              timeout_s=r.timeout_s, cwd=tmp)
            if res.timed_out:
                raise RecoveryError(f"{prog} timed out after {r.timeout_s:g} s")
            ok = r.ok_exit_codes if r.ok_exit_codes is not None else \
                _default_ok_codes(r.command)
            if res.returncode not in ok:
                raise RecoveryError(f"{prog} exited with status {res.returncode}: "
                                    f"{_first_line(res, path)}")
            after = SparseImage.from_file(path)
        changed = yield from _write_back(dev, before, after)
        rec = Recovery(decisions=_output_lines(res, path), branches=[
            f"{prog}-exit-{res.returncode}", "changed" if changed else "unchanged"])
        rec.decisions.append(f"{prog} changed {changed} sector(s)")
        return rec

    # -- views, checks and probes through QEMU --------------------------------------------
    def _qemu_view(self, dev: BlockDevice, ranges: list[tuple[int, int]]) -> bytes:
        with private_tempdir("crashsim-view-") as tmp:
            path, raw = tmp / f"image.{self._ext}", tmp / "disk.raw"
            _image_of(dev).to_file(path)
            res = run_command(["qemu-img", "convert", "-f", self.image_format, "-O", "raw",
                               str(path), str(raw)], timeout_s=self.recovery_cfg.timeout_s,
                              cwd=tmp)
            if not res.ok:
                raise RecoveryError(f"qemu-img convert {_outcome(res)}: "
                                    f"{_first_line(res, path)}")
            size = raw.stat().st_size
            end = max((off + n for off, n in ranges), default=0)
            if end > size:
                raise RecoveryError(f"the guest disk is {size} bytes, the model reaches "
                                    f"{end}")
            with open(raw, "rb") as f:
                return b"".join(_pread(f, off, n) for off, n in ranges)

    def _qemu_check(self, dev: BlockDevice) -> list[str]:
        with private_tempdir("crashsim-check-") as tmp:
            path = tmp / f"image.{self._ext}"
            _image_of(dev).to_file(path)
            res = run_command(["qemu-img", "check", "-f", self.image_format, str(path)],
                              timeout_s=self.recovery_cfg.timeout_s, cwd=tmp)
        if res.ok or res.returncode == 3:  # 3: leaked clusters only, see the docstring
            return []
        return [f"qemu-img check {_outcome(res)}: {_first_line(res, path)}"]

    def _qemu_probe(self, dev: BlockDevice, offset: int, length: int) -> None:
        with private_tempdir("crashsim-probe-") as tmp:
            path = tmp / f"image.{self._ext}"
            _image_of(dev).to_file(path)
            res = run_command(["qemu-io", "-f", self.image_format, "-c",
                               f"write -P {PROBE_PATTERN:#x} {offset} {length}", str(path)],
                              timeout_s=self.recovery_cfg.timeout_s, cwd=tmp)
        text = res.stdout + res.stderr
        if not res.ok or "failed" in text:
            lines = [ln for ln in _lines(text, path) if "failed" in ln] or \
                [_first_line(res, path)]
            raise ProbeFailed(f"qemu-io write of {length} bytes at guest offset "
                              f"{offset:#x} {_outcome(res)}: {lines[0]}")

    # -- crashsim's own VHDX code ----------------------------------------------------------
    def _builtin_recover(self, dev: BlockDevice) -> IOGen:
        """Open as the fixed driver does: replay (FIXED_POLICY), regions, metadata, BAT."""
        from .vhdx.driver import VhdxDriver
        from .vhdx.replay import FIXED_POLICY
        res = yield from VhdxDriver().open(dev, policy=FIXED_POLICY)
        return Recovery(decisions=list(res.decisions), branches=list(res.branches))

    def _builtin_check(self, dev: BlockDevice) -> list[str]:
        from .vhdx.driver import validate
        return list(validate(dev))

    def _builtin_probe(self, dev: BlockDevice, offset: int, length: int) -> IOGen:
        data = bytes([PROBE_PATTERN]) * length
        if self.image_format == "raw":
            yield from dev.write(offset, data)
            yield from dev.flush()
            got = dev.read(offset, length)
        else:
            from .vhdx.driver import VhdxDriver
            drv = VhdxDriver()
            yield from drv.open(dev)
            yield from drv.write(offset, data)
            yield from drv.flush()
            got = open_vhdx(dev).read(offset, length)  # as a fresh open sees it
        if got != data:
            raise ProbeFailed(f"guest write of {length} bytes at {offset:#x} did not read "
                              f"back")

    # -- helpers -----------------------------------------------------------------------------
    @property
    def _ext(self) -> str:
        return "vhdx" if self.image_format == "vhdx" else "img"

    def _places(self, image: Path) -> dict[str, str]:
        base = self.scenario.resolve_path(".")
        return {"image": str(image), "scenario_dir": str(base)}

    def _probe_range(self, dev: BlockDevice) -> tuple[int, int]:
        geo = self.geometry(dev)
        return probe_range(geo, [(op.offset, op.length) for op in self.ops])

    def geometry(self, dev: BlockDevice) -> Geometry:
        """Virtual size and block size of the guest disk (read once, then cached)."""
        if self._geometry is None:
            if self.image_format == "raw":
                self._geometry = Geometry(dev.size_bytes, RAW_PROBE_BLOCK)
            else:
                self._geometry = vhdx_geometry(dev)
        return self._geometry


def vhdx_geometry(dev: BlockDevice) -> Geometry:
    """Virtual size and block size from either region table's metadata region."""
    from .vhdx import format as vf
    problem: RecoveryError | None = None
    for offset in vf.REGION_TABLE_OFFSETS:
        try:
            table = vf.parse_region_table(dev.read(offset, vf.REGION_TABLE_BYTES), offset)
            region = vf.known_regions(table, offset).metadata
            md = vf.parse_metadata(dev.read(region.file_offset, region.length), region)
            return Geometry(md.virtual_size, md.block_size)
        except vf.VhdxCorrupt as exc:
            problem = exc
    raise RecoveryError(f"cannot find the guest disk's size: {problem}")


# -- transactions -------------------------------------------------------------------------
def mark_transactions(trace: Trace, ops: list[Op]) -> None:
    """Mark each model op's start and acknowledgement on the trace (module docstring)."""
    submits = [(i, s.io_id) for i, s in enumerate(trace.steps) if s.kind == "write_submit"]
    bounds, pos = [], 0
    for n, op in enumerate(ops):
        found = next((k for k in range(pos, len(submits))
                      if _carries(trace.writes[submits[k][1]].data, op)), None)
        if found is None:
            raise TraceError(
                f"model.ops.{n} ({op.length} bytes of {op.pattern:#04x} at guest offset "
                f"{op.offset:#x}) matches no write in the log after op {n - 1}'s; list the "
                f"guest writes the recorded program made, in the order it made them",
                loc=("model", "ops", n))
        bounds.append(submits[found][0])
        pos = found + 1
    bounds = [0] + bounds[1:] + [len(trace.steps)]
    durable = durable_points(trace)
    marks, ack = [], 0
    for i in range(len(ops)):
        marks.append(TxMark(bounds[i], "start", i))
        ios = [io for k, io in submits if bounds[i] <= k < bounds[i + 1]]
        points = [durable.get(io) for io in ios]
        if ack is None or None in points:
            ack = None
            continue
        ack = max([ack, bounds[i + 1], *points])
        marks.append(TxMark(ack, "ack", i))
    trace.tx_marks = sorted(marks, key=lambda m: (m.at_step, m.kind != "ack", m.tx))


def durable_points(trace: Trace) -> dict[int, int]:
    """io id -> the crash point from which that write is durable (absent: never)."""
    done: dict[int, int] = {}
    completed: set[int] = set()
    covered: dict[int, set[int]] = {}
    for i, step in enumerate(trace.steps):
        if step.kind == "write_complete":
            w = trace.writes[step.io_id]
            if trace.writethrough or w.fua:
                done.setdefault(step.io_id, i + 1)
            else:
                completed.add(step.io_id)
        elif step.kind == "flush_submit":
            covered[step.io_id] = set(completed)
        elif step.kind == "flush_complete" and not trace.lying_flush:
            for io in covered.pop(step.io_id, set()):
                done.setdefault(io, i + 1)
            completed -= set(done)
    return done


def _carries(data: bytes, op: Op) -> bool:
    if data and data.count(op.pattern) == len(data):
        return True
    return op.length <= len(data) and op.data() in data


def probe_range(geo: Geometry, ranges: list[tuple[int, int]]) -> tuple[int, int]:
    """The last block of the guest disk that no model op touches, and a length in it."""
    length = min(PROBE_BYTES, geo.block_size, geo.virtual_size)
    touched = merge_ranges(ranges)
    start = (geo.virtual_size - length) // geo.block_size * geo.block_size
    for off in range(start, -1, -geo.block_size):
        end = min(off + geo.block_size, geo.virtual_size)
        if all(o + n <= off or o >= end for o, n in touched):
            return off, length
    raise TraceError("the model touches every block of the guest disk, so no block is "
                     "left for the liveness probe; set probe: none")


# -- files and devices --------------------------------------------------------------------
def _image_of(dev: BlockDevice) -> SparseImage:
    image = getattr(dev, "image", None)
    if isinstance(image, SparseImage):
        return image
    out = SparseImage(dev.size_bytes)  # any other device: read it whole
    step = 1 << 20
    for off in range(0, dev.size_bytes, step):
        chunk = dev.read(off, min(step, dev.size_bytes - off))
        if chunk.count(0) != len(chunk):
            out.write(off, chunk)
    return out


def _write_back(dev: BlockDevice, before: SparseImage, after: SparseImage) -> IOGen:
    """Write every sector ``after`` changed relative to ``before`` into ``dev``."""
    if after.size_bytes != before.size_bytes:
        dev.resize(after.size_bytes)
    indexes = set(before.changed_sectors()) | set(after.sectors)
    limit = (after.size_bytes + SECTOR_BYTES - 1) // SECTOR_BYTES
    changed = sorted(i for i in indexes if i < limit and after.sector(i) != before.sector(i))
    for first, last in _runs(changed):
        data = b"".join(after.sector(i) for i in range(first, last + 1))
        yield from dev.write(first * SECTOR_BYTES, data)
    if changed:
        yield from dev.flush()
    return len(changed)


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for i in indexes:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [(a, b) for a, b in runs]


def open_vhdx(dev: BlockDevice):
    """crashsim's VHDX driver opened on a throwaway layer over ``dev``'s image, so that a
    replay done by the open (a log an external recovery left) never changes ``dev``."""
    from ..blockdev import run_sync
    from .vhdx.driver import VhdxDriver
    drv = VhdxDriver()
    run_sync(drv.open(ImageDevice(_image_of(dev).fork())))
    return drv


def _pread(f, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def _default_ok_codes(argv: list[str]) -> tuple[int, ...]:
    if os.path.basename(argv[0]) == "qemu-img" and "check" in argv[1:]:
        return QEMU_CHECK_OK
    return (0,)


def _outcome(res: CommandResult) -> str:
    return "timed out" if res.timed_out else f"exited with status {res.returncode}"


def _lines(text: str, path: Path) -> list[str]:
    text = text.replace(str(path), path.name).replace(str(path.parent) + os.sep, "")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _first_line(res: CommandResult, path: Path) -> str:
    lines = _lines(res.stderr, path) or _lines(res.stdout, path)
    return lines[0] if lines else "no output"


def _output_lines(res: CommandResult, path: Path) -> list[str]:
    return _lines(res.stdout + "\n" + res.stderr, path)[:_MAX_DECISIONS]
