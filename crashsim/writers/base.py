"""The writer plugin protocol: what crashsim needs from the code under test.

A writer owns its on-disk format. crashsim owns the device, the crash states and the
verdict. The contract, in the order the explorer uses it:

``format_image()``
    The initial image, as a SparseImage (the "old" state of an empty workload).
``run(dev, tx)``
    A generator (SimPy process body) that performs the workload on ``dev``, calling
    ``tx.start(i)`` before transaction ``i`` and ``tx.ack(i)`` once it is acknowledged.
``recover(dev)``
    A generator that repairs a crashed image in place (for example, log replay) and
    returns a ``Recovery``; it raises ``RecoveryError`` when it refuses the image.
``view(dev, ranges)``
    The bytes the user would see at the model's ``ranges`` (guest disk or file ranges):
    one bytes object for all of them, or a list with one per range (faster to match),
    or a ``Parts`` (``parts.py``) with one per range: a writer that builds each view
    from the last with ``Parts.replaced`` is matched at a cost that grows with what
    changed, not with the number of ranges.
``check_structure(dev)``
    Problems with the image by the format's own rules, as strings; empty when valid.
``probe(dev)``
    A generator that runs one more transaction on a recovered image (liveness);
    raises ``ProbeFailed`` when the image can no longer be used.
``reads_through_device`` (optional class attribute, default False)
    True promises that recover, view, check_structure and probe read the image only
    through the device they get and are deterministic (any randomness seeded). The
    oracle then reuses a verdict for states that differ only in sectors judging never
    read (see ``readset.py``). Never set it for a writer that runs an external tool.
    Bytes such a writer uses only through a pure function of them (a log scan that
    keeps what it parsed from a page) may be read with ``blockdev.read_summary``: states
    whose bytes there differ but give an equal value then share a verdict too.
``views_incrementally`` (optional class attribute, default False)
    True says ``view`` already reuses what it read for the last state (the VHDX view
    does, ``writers/vhdx/view.py``), and notes on the device (``note_reads``) every read
    it answered that way. The oracle then skips its own memo of whole views, which
    would only cost.
``structure_key(dev)`` (optional)
    Every byte that ``check_structure`` and ``probe`` read, as one bytes object, or
    None when unsure. Recovered images with equal keys share those two results, so a
    writer that provides it is judged much faster. A key that leaves out a byte those
    checks depend on would make verdicts wrong: when in doubt, leave the method out.

Expected content never comes from the writer: the reference model in ``model.py`` is
built from the workload's operations alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ..blockdev import BlockDevice, IOGen
from ..image import SparseImage
from ..model import Op
from ..parts import Parts


class RecoveryError(Exception):
    """Recovery refused the image. ``offset`` is where the problem was found, if known."""

    def __init__(self, reason: str, offset: int | None = None):
        super().__init__(reason if offset is None else f"{reason} (at offset {offset:#x})")
        self.reason = reason
        self.offset = offset


class ProbeFailed(Exception):
    """The liveness transaction failed on a recovered image."""


@dataclass
class Recovery:
    """What recovery decided, for the report and for path coverage."""

    decisions: list[str] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)


class TxReporter(Protocol):
    def start(self, tx: int) -> None: ...
    def ack(self, tx: int) -> None: ...


class Writer(Protocol):
    kind: ClassVar[str]
    # defect switch name -> one line saying what mistake it models
    defects_available: ClassVar[dict[str, str]]
    # workload op kinds this writer accepts (e.g. {"guest_write"})
    op_kinds: ClassVar[frozenset[str]]

    def __init__(self, *, ops: list[Op], image: dict[str, Any], defects: list[str],
                 seed: int) -> None: ...
    def format_image(self) -> SparseImage: ...
    def run(self, dev: BlockDevice, tx: TxReporter) -> IOGen: ...
    def recover(self, dev: BlockDevice) -> IOGen: ...
    def view(self, dev: BlockDevice, ranges: list[tuple[int, int]]
             ) -> bytes | list[bytes] | Parts: ...
    def check_structure(self, dev: BlockDevice) -> list[str]: ...
    def probe(self, dev: BlockDevice) -> IOGen: ...
