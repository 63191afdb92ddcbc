"""Scenario files: YAML in, a validated ``Scenario`` out, or errors that point at the line.

Every problem is reported, not just the first, each as one line
``file:line: key: message (got value)``. Unknown and duplicate keys are errors; sizes may
be written as ``64KiB``. Types are strict: true is not 1, "8" in quotes is not 8, and
"off" is not false. Loading never raises anything but ``ScenarioError``.
"""
from __future__ import annotations

import datetime
import difflib
import functools
import hashlib
import json
import re
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr,
                      ValidationError, field_validator, model_validator)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (AliasEvent, CollectionEndEvent, CollectionStartEvent,
                                ScalarEvent)

from .model import Op, random_ops
from .sizes import parse_size

OUTCOME_CLASSES = ("old", "new", "mixed", "lost", "recovery-error", "stuck", "structure")
VIOLATION_CLASSES = OUTCOME_CLASSES[2:]
MAX_IMAGE_BYTES = 1 << 40          # 1 TiB of virtual disk: the image stays sparse
MAX_STATES_PER_STEP = 1_000_000
MAX_OPS = 10_000
MAX_SCENARIO_BYTES = 1 << 20
# Every op's data is held in memory (several copies: trace, cache, crash states), so
# one op and the whole workload are capped; the image itself is sparse.
MAX_OP_BYTES = 16 << 20
MAX_WORKLOAD_BYTES = 64 << 20
# A scenario is a few levels deep and at most ~MAX_OPS * 10 values; more is an alias
# bomb (aliases of aliases of ...) or a deeply nested file, refused before it is built.
MAX_YAML_NODES = 200_000
MAX_YAML_DEPTH = 32
MAX_ARG_CHARS = 4096


class ScenarioError(Exception):
    """One or more problems in a scenario file; ``str`` is one line per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


# What YAML would have read as a number had it not been quoted.
_NUMBER = re.compile(r"\s*[-+]?(0x[0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+|[0-9][0-9_]*(\.[0-9_]*)?"
                     r"([eE][-+]?[0-9]+)?|\.[0-9]+([eE][-+]?[0-9]+)?)\s*")


def _quoted_number(v: Any) -> bool:
    return isinstance(v, str) and _NUMBER.fullmatch(v) is not None


def _size(v: Any) -> int:
    # A size string exists for its unit; "512" in quotes is a number written as text,
    # which strict typing refuses everywhere else too.
    if _quoted_number(v):
        raise ValueError(f"expected a size such as 4096 or 64KiB, not a bare number in "
                         f"quotes: remove the quotes or add a unit (got {v!r})")
    return parse_size(v)


def _pattern(v: Any) -> int:
    if _quoted_number(v):
        raise ValueError(f"expected a byte 0..255 such as 0xab, not text: remove the "
                         f"quotes (got {v!r})")
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255:
        raise ValueError(f"expected a byte 0..255 such as 0xab, got {v!r}")
    return v


Size = Annotated[int, BeforeValidator(_size)]
Pattern = Annotated[int, BeforeValidator(_pattern)]


class _Strict(BaseModel):
    # strict: lax mode reads true as 1 and "off" as false, so a typo runs silently
    # with a value nobody wrote; sizes and bytes take their strings in BeforeValidators
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CacheConfig(_Strict):
    mode: Literal["writeback", "writethrough"] = "writeback"
    capacity_bytes: Size = 1 << 20
    destage: Literal["fifo", "random", "elevator"] = "fifo"

    @field_validator("capacity_bytes")
    @classmethod
    def _capacity(cls, v: int) -> int:
        if not 512 <= v <= 1 << 34:
            raise ValueError("cache capacity must be between 512 bytes and 16GiB")
        return v


class LatencyConfig(_Strict):
    write: float = Field(100.0, ge=0, le=1e9)
    flush: float = Field(2000.0, ge=0, le=1e9)
    destage: float = Field(20.0, ge=0, le=1e9)


class DeviceSection(_Strict):
    atomic_write_bytes: int = 512
    cache: CacheConfig = CacheConfig()
    latency_us: LatencyConfig = LatencyConfig()
    faults: list[Literal["garbage", "lying_flush"]] = []

    @field_validator("atomic_write_bytes", mode="before")
    @classmethod
    def _atomic(cls, v: Any) -> int:
        v = _size(v)
        if v not in (512, 4096):
            raise ValueError("atomic_write_bytes must be 512 or 4096 (a power of two "
                             "the device writes all-or-nothing)")
        return v


class WriterSection(_Strict):
    kind: str
    defects: list[str] = []


class ImageSection(_Strict):
    virtual_size: Size = 64 << 20
    block_size: Size = 1 << 20
    log_size: Size = 1 << 20

    @model_validator(mode="after")
    def _sane(self) -> "ImageSection":
        if not 1 << 20 <= self.virtual_size <= MAX_IMAGE_BYTES:
            raise ValueError("virtual_size must be between 1MiB and 1TiB")
        if self.block_size not in {1 << n for n in range(20, 29)}:
            raise ValueError("block_size must be a power of two from 1MiB to 256MiB")
        if self.log_size == 0 or self.log_size % (1 << 20) or self.log_size > 1 << 30:
            raise ValueError("log_size must be a non-zero multiple of 1MiB, at most 1GiB")
        return self


class WriteOp(_Strict):
    offset: Size
    length: Size
    pattern: Pattern = 0xAB

    @field_validator("length")
    @classmethod
    def _length(cls, v: int) -> int:
        if not 0 < v <= MAX_OP_BYTES:
            raise ValueError("length must be between 1 byte and 16MiB (each op's data is "
                             "held in memory; split a larger write into several ops)")
        return v


class OpItem(_Strict):
    guest_write: WriteOp | None = None
    log_write: WriteOp | None = None

    @model_validator(mode="after")
    def _one(self) -> "OpItem":
        if (self.guest_write is None) == (self.log_write is None):
            raise ValueError("each op must have exactly one of guest_write or log_write")
        return self


class RandomSection(_Strict):
    count: int = Field(0, ge=0, le=MAX_OPS)
    seed: int = 1
    kind: Literal["guest_write", "log_write"] = "guest_write"
    max_length: Size = 256 * 1024

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, v: int) -> int:
        if not 512 <= v <= MAX_OP_BYTES:
            raise ValueError("max_length must be between 512 bytes and 16MiB (random ops "
                             "are whole 512-byte sectors, each held in memory)")
        return v


class WorkloadSection(_Strict):
    image: ImageSection = ImageSection()
    ops: list[OpItem] = Field([], max_length=MAX_OPS)
    random: RandomSection = RandomSection()


class ExploreSection(_Strict):
    seed: int = 1
    max_states_per_step: int = Field(2048, ge=1, le=MAX_STATES_PER_STEP)
    recovery_crash: bool = False
    recovery_states_per_step: int = Field(64, ge=1, le=MAX_STATES_PER_STEP)
    shrink: bool = True
    # Resident memory of each exploring process; past it the rest is skipped and said so.
    max_memory_mib: int = Field(2048, ge=1, le=1 << 24)  # cli.MAX_MEMORY_MIB


class ExpectViolations(_Strict):
    violations: list[Literal["mixed", "lost", "recovery-error", "stuck", "structure"]] = \
        Field(min_length=1)


# -- trace scenarios: a recorded I/O log of a real program instead of a writer ----------

RECORDED_WRITER = "crashsim.writers.recorded:RecordedWriter"
TRACE_ONLY_KEYS = ("recovery", "view", "probe", "model")


def _arg(v: Any) -> str:
    # YAML reads 64 or 1.5 as numbers; a command line only has strings
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(f"command arguments must be strings, got {v!r}")
    v = str(v)
    if "\0" in v:
        raise ValueError("a command argument cannot contain a NUL byte (no program can "
                         "receive one); remove it")
    if len(v) > MAX_ARG_CHARS:
        raise ValueError(f"a command argument is at most {MAX_ARG_CHARS} characters "
                         f"(got {len(v)}); put long input in a file and name the file")
    return v


Arg = Annotated[str, BeforeValidator(_arg)]
Argv = Annotated[list[Arg], Field(min_length=1, max_length=1000)]


class TraceSection(_Strict):
    """Where the I/O comes from: a log file, or a command recorded at run time."""

    log: str | None = None
    record: Argv | None = None
    create: Argv | None = None
    format: Literal["blklogwrites", "dm-log-writes"] = "blklogwrites"
    base_image: str | None = None
    final_size: Size | None = None
    image_format: Literal["vhdx", "raw"] = "vhdx"
    timeout_s: float = Field(120.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_source(self) -> "TraceSection":
        if (self.log is None) == (self.record is None):
            raise ValueError("give exactly one of log (a recorded file) or record (a "
                             "command that records one at run time)")
        if self.log is not None:
            if self.create is not None:
                raise ValueError("create makes the image a record command writes; "
                                 "with log, give base_image instead")
            # blklogwrites needs final_size whatever else is given: _check_trace says why
            if self.format == "dm-log-writes" and self.base_image is None \
                    and self.final_size is None:
                raise ValueError("with a dm-log-writes log, give base_image (the device "
                                 "as it was before the recording) or final_size (the "
                                 "device's size, when it was all zeros before)")
        else:
            if (self.base_image is None) == (self.create is None):
                raise ValueError("with record, give exactly one of base_image (copied "
                                 "fresh for the recording) or create (a command that "
                                 "makes {image})")
            if not any("{log}" in a for a in self.record):
                raise ValueError("record must name the log file as {log} (and the image "
                                 "as {image})")
            if self.create is not None and not any("{image}" in a for a in self.create):
                raise ValueError("create must name the image it makes as {image}")
        if self.final_size is not None and not 512 <= self.final_size <= MAX_IMAGE_BYTES:
            raise ValueError("final_size must be between 512 bytes and 1TiB")
        return self


class RecoverySection(_Strict):
    """How a crashed image is repaired: an external command or a built-in replay."""

    command: Argv | None = None
    builtin: Literal["vhdx", "none"] | None = None
    timeout_s: float = Field(60.0, gt=0, le=3600)
    # exit codes that mean "recovered"; default 0, plus 3 (leaks only) for qemu-img check
    ok_exit_codes: list[int] | None = None

    @model_validator(mode="after")
    def _one(self) -> "RecoverySection":
        if (self.command is None) == (self.builtin is None):
            raise ValueError("give exactly one of command (argv with {image}) or "
                             "builtin (vhdx or none)")
        if self.builtin is not None and self.ok_exit_codes is not None:
            raise ValueError("ok_exit_codes applies to an external command only")
        return self


class ModelSection(_Strict):
    ops: list[OpItem] = Field(min_length=1, max_length=MAX_OPS)


class Scenario(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    description: str = Field("", max_length=1000)
    device: DeviceSection = DeviceSection()
    writer: WriterSection
    workload: WorkloadSection = WorkloadSection()
    explore: ExploreSection = ExploreSection()
    expect: Union[Literal["pass"], ExpectViolations] = "pass"
    # trace scenarios only (load_scenario fills ``writer`` in for them)
    trace: TraceSection | None = None
    recovery: RecoverySection | None = None
    view: Literal["builtin", "qemu-img"] = "builtin"
    probe: Literal["qemu-io", "builtin", "none"] = "builtin"
    model: ModelSection | None = None
    _base_dir: Path | None = PrivateAttr(default=None)

    @property
    def is_trace(self) -> bool:
        return self.trace is not None

    def resolve_path(self, path: str) -> Path:
        """A path from the file, relative to the scenario file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() or self._base_dir is None else self._base_dir / p

    def ops(self) -> list[Op]:
        """The workload's transactions: listed ops, then the seeded random ones."""
        if self.model is not None:  # a trace scenario: the model says what was done
            return _listed_ops(self.model.ops)
        ops = _listed_ops(self.workload.ops)
        r = self.workload.random
        if r.count:
            ops += random_ops(r.kind, r.count, r.seed, self.workload.image.virtual_size,
                              r.max_length)
        return ops

    def digest(self) -> str:
        # The memory cap bounds a run, not what is tested: it stays out of the hash.
        data = self.model_dump(mode="json", exclude={"explore": {"max_memory_mib"}})
        h = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
        for name in self._input_files():  # a changed trace is a changed scenario
            _hash_file(h, self.resolve_path(name))
        return h.hexdigest()[:16]

    def _input_files(self) -> list[str]:
        t = self.trace
        return [] if t is None else [n for n in (t.log, t.base_image) if n is not None]

    @property
    def expected_violations(self) -> list[str]:
        return [] if self.expect == "pass" else list(self.expect.violations)


def _listed_ops(items: list[OpItem]) -> list[Op]:
    ops: list[Op] = []
    for item in items:
        kind = "guest_write" if item.guest_write is not None else "log_write"
        w = item.guest_write or item.log_write
        ops.append(Op(kind, w.offset, w.length, w.pattern))
    return ops


def _hash_file(h, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        h.update(b"missing")


# -- loading --------------------------------------------------------------------------

def load_scenario(path: str | Path) -> Scenario:
    """Parse and validate one scenario file; raise ScenarioError with every problem."""
    path = Path(path)
    data = _read_yaml(path)
    plain = _plain(data)
    if _check_trace_shape(path, data):
        plain["writer"] = {"kind": RECORDED_WRITER}
    try:
        scenario = Scenario.model_validate(plain)
    except ValidationError as exc:
        raise ScenarioError(_format_errors(path, data, exc.errors())) from None
    scenario._base_dir = path.resolve().parent
    if scenario.is_trace:
        _check_trace(path, data, scenario)
    else:
        _check_ops_fit(path, data, scenario)
    return scenario


def _read_yaml(path: Path) -> CommentedMap:
    text = _read_text(path)
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        _check_yaml_shape(path, yaml.parse(text))
        data = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        what = (exc.problem or exc.context or "YAML error").strip()
        raise ScenarioError([f"{path}:{line}: YAML: {what}"]) from None
    except (YAMLError, RecursionError, ValueError, TypeError) as exc:
        # ValueError: a constructor refused a scalar (say, an int of 5000 digits);
        # TypeError: a mapping key holding a list (``{[a]: 1}: x``) is unhashable
        raise ScenarioError([f"{path}:0: YAML: {str(exc).splitlines()[0]}"]) from None
    if data is None:
        raise ScenarioError([f"{path}:1: empty scenario: it needs at least name and "
                             f"writer"])
    if not isinstance(data, CommentedMap):
        line = data.lc.line + 1 if isinstance(data, CommentedSeq) else 1
        raise ScenarioError([f"{path}:{line}: the top level must be a mapping of keys "
                             f"(name: ..., writer: ...), got {_yaml_kind(data)}"])
    return data


def _yaml_kind(value: Any) -> str:
    # in the user's YAML words: ruamel's class names (CommentedSeq) mean nothing to them
    if isinstance(value, list):
        return "a list"
    if isinstance(value, AbstractSet):
        return "a set"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return "a date"
    return "a single value, not keys"


def _read_text(path: Path) -> str:
    """The file as text, read no further than the size limit (it may be /dev/zero)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SCENARIO_BYTES + 1)
    except FileNotFoundError:
        raise ScenarioError([f"{path}:0: file not found (check the path)"]) from None
    except OSError as exc:
        raise ScenarioError([f"{path}:0: cannot read: {exc.strerror}"]) from None
    if len(raw) > MAX_SCENARIO_BYTES:
        raise ScenarioError([f"{path}:0: file is larger than 1MiB, the limit for a "
                             f"scenario (a scenario is a few lines of YAML; generate "
                             f"large workloads with workload.random)"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError([f"{path}:0: not UTF-8 text (byte {exc.start})"]) from None


_LONG_INT = re.compile(r"[-+]?[0-9_]{101,}")


def _check_yaml_shape(path: Path, events: Any) -> None:
    """Refuse alias bombs, deep nesting and giant numbers from the parser's events,
    before anything is built.

    Counts the values the document expands to, an alias counting as every value of
    the node it names (merge keys ``<<: *a`` are aliases too), so nine levels of nine
    aliases each (the "billion laughs") stop at the first alias past the budget.
    """
    sizes: dict[str, int] = {}   # anchor -> values its node expands to
    open_: list[list] = []       # collections being read: [anchor, values so far]
    total = 0
    for ev in events:
        line = ev.start_mark.line + 1 if ev.start_mark is not None else 0
        if isinstance(ev, CollectionStartEvent):
            if len(open_) >= MAX_YAML_DEPTH:
                raise ScenarioError([f"{path}:{line}: YAML: nested more than "
                                     f"{MAX_YAML_DEPTH} levels deep; a scenario is a "
                                     f"few levels deep"])
            open_.append([ev.anchor, 1])
            total += 1
            continue
        if isinstance(ev, CollectionEndEvent):
            anchor, n = open_.pop()
        elif isinstance(ev, ScalarEvent):
            anchor, n = ev.anchor, 1
            if ev.style is None and _LONG_INT.fullmatch(ev.value):
                raise ScenarioError([f"{path}:{line}: YAML: a number of {len(ev.value)} "
                                     f"digits; no setting takes more than 20"])
            total += 1
        elif isinstance(ev, AliasEvent):
            anchor, n = None, sizes.get(ev.anchor)
            if n is None:
                raise ScenarioError([f"{path}:{line}: YAML: alias *{ev.anchor} is used "
                                     f"inside its own anchor or before it; write the "
                                     f"value out"])
            total += n
        else:
            continue
        if anchor is not None:
            sizes[anchor] = n
        if open_:
            open_[-1][1] += n
        if total > MAX_YAML_NODES:
            raise ScenarioError([f"{path}:{line}: YAML: the document expands to more "
                                 f"than {MAX_YAML_NODES:,} values (YAML aliases of "
                                 f"aliases: an alias bomb?); write the values out, or "
                                 f"use workload.random for large workloads"])


def _plain(node: Any) -> Any:
    """ruamel's round-trip types as plain dicts and lists for pydantic."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _line_of(data: Any, loc: tuple) -> int:
    """The 1-based line of the deepest key in ``loc`` that the YAML has."""
    line, node = 1, data
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            line = _mark_line(node.lc.data, part, line)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            line = _mark_line(node.lc.data, part, line)
            node = node[part]
        else:
            break
    return line


def _mark_line(marks: Any, key: Any, default: int) -> int:
    # a key brought in by a merge (<<: *a) has no position of its own
    pos = marks.get(key) if isinstance(marks, dict) else None
    return pos[0] + 1 if pos else default


def _format_errors(path: Path, data: Any, errors: list[dict]) -> list[str]:
    lines = []
    for err in errors:
        # A union reports each branch; the literal branch of ``expect`` is noise when
        # the user clearly wrote the mapping form.
        if err["type"] == "literal_error" and isinstance(err.get("input"), dict) \
                and "literal['pass']" in err["loc"]:
            continue
        # Neither form (expect: fail): one problem, so one line giving both forms.
        if err["loc"][:1] == ("expect",) and len(err["loc"]) == 2 \
                and not isinstance(err.get("input"), dict):
            line = (f"{path}:{_line_of(data, ('expect',))}: expect: must be pass or "
                    f"{{violations: [...]}} naming one or more of "
                    f"{', '.join(VIOLATION_CLASSES)} (got {_short(err.get('input'))})")
        else:
            line = _format_error(path, data, err)
        if line not in lines:
            lines.append(line)
    return lines


def _format_error(path: Path, data: Any, err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in
                                              ("literal['pass']", "ExpectViolations")))
    key = ".".join(str(p) for p in loc) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = _unknown_key_msg(str(loc[-1]) if loc else "")
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] in _TYPE_WORDS:
        msg = _type_msg(err["type"], err.get("input"))
    elif err["type"] == "string_type":
        msg = _string_msg(loc, err.get("input"))
    elif err["type"] in ("model_type", "dict_type"):
        msg = _mapping_msg(loc, err.get("input"))
    elif err["type"] == "list_type":
        msg = _list_msg(err.get("input"))
    elif err["type"] == "string_pattern_mismatch" and loc == ("name",):
        msg = ("use only letters, digits, '.', '_' and '-', 1 to 100 of them, starting "
               "with a letter or digit (it names the report folder)")
    got = "" if err["type"] == "missing" or "got" in msg else \
        f" (got {_short(err.get('input'))})"
    return f"{path}:{_line_of(data, loc)}: {key}: {msg}{got}"


_TYPE_WORDS = {"int_type": "a whole number", "float_type": "a number",
               "bool_type": "true or false"}


def _type_msg(kind: str, value: Any) -> str:
    """A strict type error as what was expected and, for a near miss, how to write it."""
    msg = f"expected {_TYPE_WORDS[kind]}"
    if kind == "bool_type":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return msg + ", not text: remove the quotes"
        if isinstance(value, str) and value.strip().lower() in ("yes", "no", "on", "off",
                                                                "y", "n"):
            return msg + "; YAML 1.2 reads yes, no, on and off as text"
        if isinstance(value, str):
            return msg + ", not text"
        if isinstance(value, (int, float)):
            return msg + ", not a number"
        return msg
    if isinstance(value, bool):
        return msg + ", not true/false"
    if _quoted_number(value):
        return msg + ", not text: remove the quotes"
    if kind == "int_type" and isinstance(value, float):
        return msg + ", written without a decimal point or exponent"
    return msg


def _string_msg(loc: tuple, value: Any) -> str:
    # YAML reads name: 12345 (or true, or a date) as that type, not as the text written
    if value is None or isinstance(value, (dict, list)):
        return "expected a string"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif type(value) is int:
        text = str(value)
    else:   # 0x1f, 1e3, 2024-01-01: the form written is not kept; show none
        return "expected a string; put it in quotes"
    leaf = loc[-1] if loc and isinstance(loc[-1], str) else None
    example = f'{leaf}: "{text}"' if leaf else f'"{text}"'
    return f"expected a string; put it in quotes: {example}"


def _unknown_key_msg(key: str) -> str:
    close = difflib.get_close_matches(key, _known_keys(), n=1, cutoff=0.75)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return "unknown key (check the spelling against the scenario reference)"


@functools.cache
def _known_keys() -> tuple[str, ...]:
    """Every key some section of a scenario takes: a misspelt key is most often one of
    these, whichever section it was put in."""
    return tuple(sorted({name for model in _models(_Strict) for name in model.model_fields}))


def _models(base: type) -> list[type]:
    return [base] + [m for sub in base.__subclasses__() for m in _models(sub)]


def _mapping_msg(loc: tuple, value: Any) -> str:
    # pydantic's own words name crashsim's classes (DeviceSection), not the fix
    if loc == ("writer",) and isinstance(value, str):
        return f'expected a mapping; write writer: {{kind: "{value}"}}'
    return "expected a mapping of keys: {key: value}, or key: value lines indented below"


def _list_msg(value: Any) -> str:
    if isinstance(value, str):
        return f"expected a list; write [{value}]"
    return "expected a list: [a, b], or lines starting with '- ' indented below"


def _short(value: Any) -> str:
    text = repr(_plain(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _check_trace_shape(path: Path, data: CommentedMap) -> bool:
    """Whether this is a trace scenario; one line per key that is wrong for its kind."""
    problems = []
    if "trace" in data:
        for key in ("writer", "workload"):
            if key in data:
                problems.append(f"{path}:{_line_of(data, (key,))}: {key}: a trace "
                                f"scenario replays the recorded I/O, so it has no {key} "
                                f"(remove {key}, or remove trace)")
        for key in ("model", "recovery"):
            if key not in data:
                problems.append(f"{path}:{_line_of(data, ('trace',))}: {key}: required "
                                f"key is missing (a trace scenario needs trace, model and "
                                f"recovery)")
        for key in ("trace", "model", "recovery"):
            # "key:" with nothing under it reads as null, which the model takes as "not
            # given": the run went on without a trace, a truth or a recovery
            if key in data and data[key] is None:
                problems.append(f"{path}:{_line_of(data, (key,))}: {key}: "
                                f"{_mapping_msg((key,), None)} (got None)")
    else:
        for key in TRACE_ONLY_KEYS:
            if key in data:
                problems.append(f"{path}:{_line_of(data, (key,))}: {key}: only a trace "
                                f"scenario takes {key}; add trace (a recorded I/O log) or "
                                f"remove {key}")
    if problems:
        raise ScenarioError(problems)
    return "trace" in data


def _check_trace(path: Path, data: Any, scenario: Scenario) -> None:
    problems = []
    t = scenario.trace
    if t.log is not None and t.format == "blklogwrites" and t.final_size is None:
        # QEMU's image drivers grow the file with bdrv_truncate, which blklogwrites does
        # not log, so neither the log nor the base image says how long the file was; a
        # guessed length yields crash states no real file held (false recovery errors).
        problems.append(f"{path}:{_line_of(data, ('trace', 'log'))}: trace.final_size: "
                        f"required with a blklogwrites log, which does not record the "
                        f"image file's growth; add final_size: the size in bytes of the "
                        f"image file after the recording (e.g. stat -c %s image.vhdx)")
    for key in ("log", "base_image"):
        name = getattr(t, key)
        why = None if name is None else _not_a_file(scenario, name)
        if why is not None:
            problems.append(f"{path}:{_line_of(data, ('trace', key))}: trace.{key}: {why}")
    if scenario.recovery.command is not None and scenario.explore.recovery_crash:
        problems.append(f"{path}:{_line_of(data, ('explore', 'recovery_crash'))}: "
                        f"explore.recovery_crash: an external recovery command's writes "
                        f"are seen only as a whole once it exits, so there is no step "
                        f"inside it to cut power at; set it false, or use recovery: "
                        f"{{builtin: vhdx}}")
    if problems:
        raise ScenarioError(problems)
    _check_total_bytes(path, data, scenario, ("model", "ops"))


def _not_a_file(scenario: Scenario, name: str) -> str | None:
    """Why a trace input names no file, or None when it does."""
    try:
        resolved = scenario.resolve_path(name)
        if resolved.is_file():
            return None
    except RuntimeError:  # ~user, and no such user
        return f"cannot expand ~ in {_short(name)}: no such user; write the path out"
    except OSError as exc:  # a name too long, a folder that may not be searched
        return f"cannot use {_short(name)}: {exc.strerror}"
    return (f"file not found: {resolved} (paths are relative to the scenario file's "
            f"folder)")


def _check_ops_fit(path: Path, data: Any, scenario: Scenario) -> None:
    """Every op lies inside the image and fits the log; the workload fits in memory."""
    img = scenario.workload.image
    problems = []
    for i, item in enumerate(scenario.workload.ops):
        w = item.guest_write or item.log_write
        where = f"{path}:{_line_of(data, ('workload', 'ops', i))}: workload.ops.{i}"
        if w.offset + w.length > img.virtual_size:
            # log_write offsets address the writer's data area, which is virtual_size long
            problems.append(f"{where}: write ends at {w.offset + w.length}, past "
                            f"virtual_size {img.virtual_size}")
        elif item.log_write is not None and w.length > img.log_size:
            problems.append(f"{where}: a log_write of {w.length} bytes is larger than "
                            f"log_size {img.log_size}, so no log can hold it; raise "
                            f"log_size or split the write")
    r = scenario.workload.random
    if r.count and r.max_length > img.virtual_size:
        problems.append(f"{path}:{_line_of(data, ('workload', 'random', 'max_length'))}: "
                        f"workload.random.max_length: {r.max_length} is more than "
                        f"virtual_size {img.virtual_size}")
    elif r.count and r.kind == "log_write" and r.max_length > img.log_size:
        problems.append(f"{path}:{_line_of(data, ('workload', 'random', 'max_length'))}: "
                        f"workload.random.max_length: {r.max_length} is larger than "
                        f"log_size {img.log_size}, so no log can hold such a write")
    if problems:
        raise ScenarioError(problems)
    _check_total_bytes(path, data, scenario, ("workload",))


def _check_total_bytes(path: Path, data: Any, scenario: Scenario, loc: tuple) -> None:
    total = sum(op.length for op in scenario.ops())
    if total > MAX_WORKLOAD_BYTES:
        key = ".".join(loc)
        raise ScenarioError([f"{path}:{_line_of(data, loc)}: {key}: the ops write "
                             f"{total} bytes in all, more than the 64MiB limit (every "
                             f"op's data is held in memory); use fewer or shorter ops"])


def line_of(path: str | Path, loc: tuple) -> int:
    """The line of a key in an already validated scenario file (for later checks)."""
    try:
        return _line_of(_read_yaml(Path(path)), loc)
    except ScenarioError:
        return 0


def check_writer(path: str | Path, scenario: Scenario) -> None:
    """The writer exists, knows the defects named, and accepts the workload's ops."""
    from .writers import WriterNotFound, load_writer_class
    if scenario.is_trace:
        _check_model_ops(path, scenario)
        return
    try:
        cls = load_writer_class(scenario.writer.kind)
    except WriterNotFound as exc:
        raise ScenarioError([f"{path}:{line_of(path, ('writer', 'kind'))}: writer.kind: "
                             f"{exc}"]) from None
    known = getattr(cls, "defects_available", {})
    problems = []
    for i, name in enumerate(scenario.writer.defects):
        if name not in known:
            listing = ", ".join(sorted(known)) or "none"
            problems.append(f"{path}:{line_of(path, ('writer', 'defects', i))}: "
                            f"writer.defects.{i}: unknown defect for writer "
                            f"{scenario.writer.kind!r}; known: {listing} (got {name!r})")
    kinds = getattr(cls, "op_kinds", frozenset())
    for op in {op.kind for op in scenario.ops()} - set(kinds):
        problems.append(f"{path}:{line_of(path, ('workload',))}: workload: writer "
                        f"{scenario.writer.kind!r} does not accept {op} ops "
                        f"(it accepts {', '.join(sorted(kinds))})")
    if problems:
        raise ScenarioError(problems)


def _check_model_ops(path: str | Path, scenario: Scenario) -> None:
    """A trace's model describes guest writes the recorded program made."""
    from .writers.recorded import RecordedWriter
    problems = []
    for i, op in enumerate(scenario.ops()):
        if op.kind not in RecordedWriter.op_kinds:
            problems.append(f"{path}:{line_of(path, ('model', 'ops', i))}: model.ops.{i}: "
                            f"a recorded trace is judged by guest_write ops (got {op.kind})")
    if problems:
        raise ScenarioError(problems)
