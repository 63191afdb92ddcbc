"""A shadow-paging writer whose crash consistency is known by reasoning, one switch per
protocol choice, for tests/test_known_verdicts.py.

Layout: a page table at 0 (and a second copy at 4 KiB with ``pingpong``), data blocks
from 8 KiB on, each 512 B and written once (copy on write). The table maps each 512 B
region of the file to the block holding it (0: never written), and ends in a trailer:
u64 generation, u32 CRC of the last transaction's data, u32 CRC of the table. A
transaction writes its data to fresh blocks, then a table pointing at them.

Correct protocols: data, FLUSH, table, FLUSH, ack (default); the table with FUA after
the data FLUSH (``fua-table``); ``unordered``: data and table issued together, one FLUSH,
ack, with recovery checking both CRCs and falling back to the other copy
(``pingpong``); ``dup-data``: the data written twice, concurrently, before the FLUSH.
The table is trusted without its CRC unless ``crc`` is on, so a table bigger than the
device's atomic unit needs ``crc`` and ``pingpong``. ``repair``, ``repair-no-flush`` and
``note`` give recovery writes of its own, for cutting power during recovery. Each
switch's text in SWITCHES says when it is correct; the ones after "broken on purpose"
never are.
"""
from __future__ import annotations

import struct
import zlib

from crashsim.image import SparseImage
from crashsim.writers.base import ProbeFailed, Recovery, RecoveryError

SECTOR = 512
DATA_BASE = 8192
NOTE = 6144  # between the second table copy (4 KiB, when it is one sector) and the data
TRAILER = struct.Struct("<QII")

SWITCHES = {
    "table4k": "a 4 KiB page table (else one sector)",
    "crc": "recovery checks the table's CRC",
    "pingpong": "two table copies, the valid one of highest generation wins",
    "fua-table": "the table is written with FUA after the data FLUSH (no FLUSH after)",
    "unordered": "data and table issued together, then one FLUSH; recovery checks the "
                 "data CRC (needs crc and pingpong)",
    "dup-data": "the data is written twice, concurrently, before its FLUSH",
    "repair": "recovery copies the mapped data to fresh blocks, FLUSH, then writes a "
              "new table in one write (atomic only as far as the device's unit is)",
    "repair-no-flush": "as repair, with no FLUSH between: correct on a write-through "
                       "device only",
    "fua-only": "data and table both written with FUA, in turn, and no FLUSH",
    "note": "recovery first writes a 1 KiB note, refusing an image whose note sectors "
            "are neither zero nor the note: wrong on a device whose tears read as garbage",
    "no-data-check": "unordered, but recovery does not check the data CRC",
    # broken on purpose
    "no-data-flush": "the table is written before the data is flushed",
    "fua-barrier": "the table is written with FUA and no FLUSH of the data before it",
    "ack-before-flush": "acknowledged before the table's FLUSH is issued",
    "ack-during-flush": "acknowledged while the table's FLUSH is still in flight",
    "flush-before-complete": "the data FLUSH is issued before the data write completed",
}


class ShadowTable:
    kind = "shadow-table"
    op_kinds = frozenset({"log_write"})
    defects_available = SWITCHES

    def __init__(self, *, ops, image, defects, seed):
        self.ops, self.sw = ops, set(defects)
        self.table_bytes = 4096 if "table4k" in self.sw else SECTOR
        self.entries = (self.table_bytes - TRAILER.size) // 8
        self.size = image["virtual_size"]
        # ops must stay within entries * 512 bytes: the table maps no more

    def format_image(self) -> SparseImage:
        return SparseImage(DATA_BASE + 64 * 4096)

    # -- on disk ------------------------------------------------------------------
    @staticmethod
    def _key(gen: int) -> int:
        # Entries are stored scrambled by the generation, so a table torn between two
        # generations points at nonsense rather than at a mix of valid blocks.
        return (gen * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)

    def _pack(self, table: list[int], gen: int, data_crc: int) -> bytes:
        key = self._key(gen)
        body = struct.pack(f"<{self.entries}Q", *(e ^ key for e in table)) + \
            TRAILER.pack(gen, data_crc, 0)
        return body[:-4] + struct.pack("<I", zlib.crc32(body))

    def _load(self, dev, where: int):
        raw = dev.read(where, self.table_bytes)
        table = list(struct.unpack_from(f"<{self.entries}Q", raw))
        gen, data_crc, crc = TRAILER.unpack_from(raw, self.entries * 8)
        key = self._key(gen)
        table = [e ^ key for e in table]
        ok = crc == zlib.crc32(raw[:-4] + bytes(4)) or raw == bytes(len(raw))
        return table, gen, data_crc, ok

    def _state(self, dev):
        """(table, generation, next free block) that recovery settles on."""
        copies = [self._load(dev, 0)]
        if "pingpong" in self.sw:
            copies.append(self._load(dev, 4096))
        best = None
        for table, gen, data_crc, ok in copies:
            if "crc" in self.sw and not ok:
                continue
            check_data = "unordered" in self.sw and "no-data-check" not in self.sw
            if check_data and gen and data_crc != self._last_crc(dev, table, gen):
                continue
            if best is None or gen > best[1]:
                best = (table, gen)
        if best is None:
            best = ([0] * self.entries, 0)
        table, gen = best
        return table, gen

    def _last_crc(self, dev, table, gen) -> int:
        blocks = sorted(b for b in table if b and self._gen_of(dev, b) == gen)
        return zlib.crc32(b"".join(dev.read(self._addr(b), SECTOR) for b in blocks))

    def _gen_of(self, dev, block: int) -> int:
        # Blocks are allocated per generation: block numbers encode it.
        return block >> 16

    def _addr(self, block: int) -> int:
        gen, idx = block >> 16, block & 0xFFFF
        if not 0 < gen <= 16 or idx >= 32:
            raise ValueError(f"block {block:#x} out of range")
        return DATA_BASE + ((gen - 1) * 32 + idx) * SECTOR

    # -- a transaction ------------------------------------------------------------
    def _tx(self, dev, table, gen, offset, data, ack):
        gen += 1
        first = offset // SECTOR
        n = len(data) // SECTOR
        assert n <= 16 and offset % SECTOR == 0 and len(data) % SECTOR == 0
        blocks = [(gen << 16) | i for i in range(n)]
        table = list(table)
        for i, b in enumerate(blocks):
            table[first + i] = b
        addr = self._addr(blocks[0])
        data_crc = zlib.crc32(data)
        where = (gen % 2) * 4096 if "pingpong" in self.sw else 0
        record = self._pack(table, gen, data_crc)
        env = getattr(dev, "env", None)
        sw = self.sw
        if "unordered" in sw and env is not None:
            a = env.process(dev.write(addr, data))
            b = env.process(dev.write(where, record))
            yield a & b
            yield from dev.flush()
            ack()
            return table, gen
        if "fua-only" in sw:
            yield from dev.write(addr, data, fua=True)
            yield from dev.write(where, record, fua=True)
            ack()
            return table, gen
        if "dup-data" in sw and env is not None:
            a = env.process(dev.write(addr, data))
            b = env.process(dev.write(addr, data))
            yield a & b
        elif "flush-before-complete" in sw and env is not None:
            a = env.process(dev.write(addr, data))
            yield env.timeout(1)
            yield from dev.flush()
            yield a
        else:
            yield from dev.write(addr, data)
        if not ({"no-data-flush", "fua-barrier", "flush-before-complete"} & sw):
            yield from dev.flush()
        if "fua-table" in sw or "fua-barrier" in sw:
            yield from dev.write(where, record, fua=True)
            ack()
            return table, gen
        yield from dev.write(where, record)
        if "ack-before-flush" in sw:
            ack()
            yield from dev.flush()
        elif "ack-during-flush" in sw and env is not None:
            f = env.process(dev.flush())
            yield env.timeout(1)
            ack()
            yield f
        else:
            yield from dev.flush()
            ack()
        return table, gen

    def run(self, dev, tx):
        table, gen = [0] * self.entries, 0
        for i, op in enumerate(self.ops):
            tx.start(i)
            table, gen = yield from self._tx(dev, table, gen, op.offset, op.data(),
                                             lambda i=i: tx.ack(i))

    def recover(self, dev):
        if "note" in self.sw:
            note = dev.read(NOTE, 2 * SECTOR)
            halves = {note[:SECTOR], note[SECTOR:]}
            if halves - {bytes(SECTOR), b"\x77" * SECTOR}:
                raise RecoveryError("the recovery note is corrupt", NOTE)
            if halves != {b"\x77" * SECTOR}:
                yield from dev.write(NOTE, b"\x77" * (2 * SECTOR))
                yield from dev.flush()
        table, gen = self._state(dev)
        if gen and {"repair", "repair-no-flush"} & self.sw:
            gen += 1
            mapped = [x for x, b in enumerate(table) if b]
            data = b"".join(dev.read(self._addr(table[x]), SECTOR) for x in mapped)
            # Blocks 16 and up of the generation: a torn table of the interrupted
            # transaction may carry the same generation and point at blocks 0-15.
            for i, x in enumerate(mapped):
                table[x] = (gen << 16) | (16 + i)
            yield from dev.write(self._addr((gen << 16) | 16), data)
            if "repair-no-flush" not in self.sw:
                yield from dev.flush()
            where = (gen % 2) * 4096 if "pingpong" in self.sw else 0
            yield from dev.write(where, self._pack(table, gen, zlib.crc32(data)))
            if "repair-no-flush" not in self.sw:
                yield from dev.flush()
        return Recovery(decisions=[f"generation {gen}"], branches=[f"gen{min(gen, 3)}"])

    def view(self, dev, ranges):
        table, _ = self._state(dev)
        out = []
        for off, n in ranges:
            buf = bytearray()
            for x in range(off // SECTOR, (off + n + SECTOR - 1) // SECTOR):
                b = table[x]
                buf += dev.read(self._addr(b), SECTOR) if b else bytes(SECTOR)
            start = off % SECTOR
            out.append(bytes(buf[start:start + n]))
        return out

    def check_structure(self, dev):
        return []

    def probe(self, dev):
        table, gen = self._state(dev)
        data = b"\x5a" * SECTOR
        sw, self.sw = self.sw, self.sw - {"unordered", "dup-data", "flush-before-complete",
                                          "ack-during-flush"}
        try:
            yield from self._tx(dev, table, gen, 0, data, lambda: None)
        finally:
            self.sw = sw
        table2, _ = self._state(dev)
        if table2[0] == 0 or dev.read(self._addr(table2[0]), SECTOR) != data:
            raise ProbeFailed("probe write did not read back")


OPS = {
    # within the one-sector table's 31 KiB
    "small": [(0, 1024, 0xa1), (512, 1024, 0xb2), (2048, 512, 0xc3)],
    # across the 4 KiB table's sectors 0 and 1 (regions 63 and 64)
    "cross": [(31 * 1024, 2048, 0xa1), (30 * 1024, 4096, 0xb2), (0, 512, 0xc3)],
}


def scenario(tmp_path, name: str, switches, *, atomic: int = 512, mode: str = "writeback",
             destage: str = "random", faults=(), ops: str = "small", explore: str = "",
             expect: str = "pass"):
    """A scenario file running ShadowTable with these switches on this device."""
    lines = "\n".join(f"    - log_write: {{offset: {o}, length: {n}, pattern: {p:#x}}}"
                      for o, n, p in OPS[ops])
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""\
name: {name}
device:
  atomic_write_bytes: {atomic}
  cache: {{mode: {mode}, capacity_bytes: 256KiB, destage: {destage}}}
  faults: [{", ".join(faults)}]
writer: {{kind: "known_writers:ShadowTable", defects: [{", ".join(switches)}]}}
workload:
  image: {{virtual_size: 1MiB}}
  ops:
{lines}
explore: {{seed: 1, max_states_per_step: 256{explore}}}
expect: {expect}
""")
    return path
