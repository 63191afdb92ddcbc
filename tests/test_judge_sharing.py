"""The Judge's sharing changes speed only, never a verdict.

``structure_key`` lets recovered images that differ only in bytes the structure check
and probe never read share those results; the read-set memo lets crash states that
differ only in sectors judging never read share the whole verdict. If either shared
where it must not, some state would get another state's verdict, and these runs (with
sharing against without) would differ.
"""
from pathlib import Path

import pytest

from crashsim.explore import build_context, explore_all
from crashsim.oracle import Judge
from crashsim.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


def _outcomes(sc, share: bool):
    ctx = build_context(sc)
    ctx.judge = Judge(ctx.writer, ctx.model, share_checks=share, share_reads=share)
    steps = explore_all(ctx, 1)
    return ctx.judge, [(s.step, sorted(s.outcomes.items()), sorted(s.paths.items()),
                        [(f.state_id, f.outcome) for f in s.failures]) for s in steps]


@pytest.mark.parametrize("name", ["vhdx-defect-no-apply", "vhdx-qemu-alloc",
                                  "vhdx-2013-alloc", "vhdx-alloc-512",
                                  "vhdx-defect-bat-before-data", "wal-clean",
                                  "wal-commit-before-data-flush"])
def test_sharing_gives_the_same_verdicts(name):
    sc = load_scenario(SCENARIOS / f"{name}.yaml")
    sc = sc.model_copy(update={"explore": sc.explore.model_copy(
        update={"max_states_per_step": 12, "recovery_crash": False})})
    shared_judge, shared = _outcomes(sc, True)
    _, alone = _outcomes(sc, False)
    assert shared == alone
    outcomes = {o for _, counts, _, _ in shared for o, _ in counts}
    assert outcomes & {"old", "new", "stuck", "structure", "mixed"}
    if name in ("vhdx-alloc-512", "vhdx-qemu-alloc", "wal-clean"):
        assert shared_judge.memo_hits > 0  # the memo was in use
    if name.startswith("vhdx"):
        assert shared_judge._checks._count > 0  # and so was the structure key


def test_memo_never_shares_a_state_whose_read_sectors_differ():
    """A state that differs from a judged one in a sector judging read is judged anew."""
    from crashsim.crashstates import enumerate_states, iter_steps
    sc = load_scenario(SCENARIOS / "vhdx-alloc-512.yaml")
    ctx = build_context(sc)
    judge = ctx.judge
    for st in iter_steps(ctx.trace):
        states = enumerate_states(st, 16, 1)
        if len(states) < 4:
            continue
        for cs in states:
            before = judge.memo_hits
            ex = judge.examine(cs.image)
            if judge.memo_hits > before:  # shared: must equal a fresh judging
                fresh = Judge(ctx.writer, ctx.model, share_reads=False)
                assert fresh.examine(cs.image).matched_k == ex.matched_k
                assert fresh.examine(cs.image).recovery.branches == ex.recovery.branches
        if st.p > 200:
            break
    assert judge.memo_hits > 0


def test_vhdx_key_covers_the_bat_but_not_payload():
    """A changed BAT entry changes the key; changed payload bytes do not."""
    from crashsim.blockdev import ImageDevice
    from crashsim.crashstates import step_at
    from crashsim.writers.vhdx.driver import VhdxDriver
    from crashsim.writers.vhdx.format import FULLY_PRESENT, unpack_bat_entry
    sc = load_scenario(SCENARIOS / "vhdx-alloc-512.yaml")
    ctx = build_context(sc)
    image = step_at(ctx.trace, ctx.trace.n_steps).durable
    key = ctx.writer.structure_key(ImageDevice(image.fork()))
    assert key is not None
    drv = VhdxDriver().attach(ImageDevice(image.fork()))
    index, value = next((i, v) for i, v in enumerate(drv.bat)
                        if unpack_bat_entry(v)[0] == FULLY_PRESENT)
    block_at = unpack_bat_entry(value)[1]
    changed = image.fork()
    changed.write(drv.regions.bat.file_offset + 8 * index, bytes(8))
    assert ctx.writer.structure_key(ImageDevice(changed)) != key
    same = image.fork()
    same.write(block_at + 4096, b"\x77" * 512)
    assert ctx.writer.structure_key(ImageDevice(same)) == key


def test_read_set_memo_across_steps_compares_what_became_durable_in_between():
    """A state judged over an earlier step's durable layer is reused for a later step
    only if the sectors made durable since agree where judging read."""
    from crashsim.image import SparseImage
    from crashsim.readset import ReadSetMemo
    base = SparseImage(64 * 512).seal()
    step1 = base.fork().seal()
    memo = ReadSetMemo(enabled=True, across_steps=True)
    memo.add_over({}, base.size_bytes, step1, [(0, 512)], "read sector 0")
    unread = step1.fork()
    unread.write(5 * 512, b"\x01" * 512)  # made durable, never read
    assert memo.find_over({}, base.size_bytes, unread.seal()).result == "read sector 0"
    read = step1.fork()
    read.write(0, b"\x02" * 512)  # made durable where judging read
    assert memo.find_over({}, base.size_bytes, read.seal()) is None
    same = step1.fork()
    same.write(0, bytes(512))  # rewritten with the bytes it held: still agrees
    assert memo.find_over({}, base.size_bytes, same.seal()) is not None
    within_step_only = ReadSetMemo(enabled=True)
    within_step_only.add_over({}, base.size_bytes, step1, [(0, 512)], "x")
    assert within_step_only.find_over({}, base.size_bytes, unread) is None


def test_a_read_group_counts_as_the_reads_it_holds():
    """A memo entry whose reads came partly as a ReadGroup agrees with exactly the
    states an entry with those reads noted one by one agrees with."""
    import random
    from crashsim.image import SparseImage
    from crashsim.readset import ReadGroup, ReadSetMemo
    rng = random.Random(3)
    durable = SparseImage(1 << 22)
    durable.seal()
    outcomes = set()
    for trial in range(300):
        spans = [(rng.randrange(8192) * 512, rng.choice([512, 4096, 65536]))
                 for _ in range(rng.randint(1, 12))]
        cut = rng.randint(0, len(spans))
        plain, grouped = ReadSetMemo(True), ReadSetMemo(True)
        mine = {rng.randrange(8192): bytes([rng.randint(1, 3)]) * 512 for _ in range(4)}
        plain.add_over(mine, durable.size_bytes, durable, spans, "plain")
        grouped.add_over(mine, durable.size_bytes, durable,
                         spans[:cut] + [ReadGroup(spans[cut:])], "grouped")
        other = {**mine, rng.randrange(8192): bytes([rng.randint(1, 3)]) * 512}
        found = plain.find_over(other, durable.size_bytes, durable)
        found_g = grouped.find_over(other, durable.size_bytes, durable)
        assert (found is None) == (found_g is None), trial
        outcomes.add(found is None)
    assert outcomes == {True, False}  # shared and not shared both came up


def _parity(blob: bytes) -> int:
    return sum(blob) % 2


def _summarised_memo(reads_made):
    """A memo holding one judged state (sector 0 holds 0x01) whose judging made
    ``reads_made(dev)``, and the durable layer under it."""
    from crashsim.image import SparseImage
    from crashsim.readset import ReadLogDevice, ReadSetMemo
    durable = SparseImage(64 * 512).seal()
    judged = durable.fork()
    judged.write(0, b"\x01" + bytes(511))
    reads: list = []
    reads_made(ReadLogDevice(judged.fork(), reads, state=judged))
    memo = ReadSetMemo(enabled=True)
    memo.add(judged, reads, "judged")
    return memo, durable


def _state(durable, *writes):
    state = durable.fork()
    for offset, data in writes:
        state.write(offset, data)
    return state


def test_a_summarised_read_agrees_by_its_summary_not_its_bytes():
    """Bytes read through ``read_summary`` that differ but summarise alike share a
    verdict; a different summary, or a difference where judging read plainly, does not."""
    from crashsim.blockdev import read_summary

    def reads(dev):
        assert read_summary(dev, 0, 1024, _parity, "parity") == 1
        dev.read(4096, 512)
    memo, durable = _summarised_memo(reads)
    odd = b"\x03" + bytes(511)
    assert memo.find(_state(durable, (0, odd))) == "judged"
    assert memo.summary_hits == 1
    assert memo.find(_state(durable, (0, b"\x02" + bytes(511)))) is None  # even
    assert memo.find(_state(durable, (0, odd), (4096, b"\x01" * 512))) is None
    assert memo.find(_state(durable, (0, odd), (8192, b"\x01" * 512))) == "judged"


def test_a_summarised_range_also_read_plainly_must_hold_the_same_bytes():
    from crashsim.blockdev import read_summary

    def reads(dev):
        read_summary(dev, 0, 1024, _parity, "parity")
        dev.read(0, 512)
    memo, durable = _summarised_memo(reads)
    assert memo.find(_state(durable, (0, b"\x03" + bytes(511)))) is None
    same_first = (0, b"\x01" + bytes(511))
    assert memo.find(_state(durable, same_first, (512, b"\x02" * 512))) == "judged"


def test_a_summary_that_fails_on_a_state_s_bytes_does_not_agree():
    from crashsim.blockdev import read_summary

    def picky(blob: bytes) -> int:
        if blob[0] == 3:
            raise ValueError("corrupt")
        return _parity(blob)
    memo, durable = _summarised_memo(lambda dev: read_summary(dev, 0, 512, picky, "picky"))
    assert memo.find(_state(durable, (0, b"\x03" + bytes(511)))) is None
    assert memo.find(_state(durable, (0, b"\x05" + bytes(511)))) == "judged"


def test_a_summarised_read_is_noted_plainly_where_its_bytes_are_not_the_state_s():
    """Over sectors judging wrote first, or when the summary raised, the read is a
    plain one: the value then says nothing of the state's own bytes."""
    from crashsim.blockdev import read_summary
    from crashsim.image import SparseImage
    from crashsim.readset import ReadLogDevice, Summarised
    state = SparseImage(64 * 512).seal().fork()
    work = state.fork()
    reads: list = []
    dev = ReadLogDevice(work, reads, state=state)
    work.write(512, b"\x05" * 512)  # recovery's own write
    read_summary(dev, 0, 1024, _parity, "parity")
    read_summary(dev, 2048, 512, _parity, "parity")
    read_summary(dev, 2048, 512, _parity, None)  # no key: a plain read
    with pytest.raises(ValueError):
        read_summary(dev, 4096, 512, lambda blob: int("x"), "fails")
    assert reads[0] == (0, 1024) and reads[2:] == [(2048, 512), (4096, 512)]
    assert type(reads[1]) is Summarised and reads[1].value == 0
    unknown: list = []
    read_summary(ReadLogDevice(work, unknown), 2048, 512, _parity, "parity")
    assert unknown == [(2048, 512)]  # which layer is the state's is not known


def test_torn_log_entries_share_judging_by_what_the_scan_made_of_them():
    """Every state of a short bench workload, torn log entries and all, judged with
    sharing equals a judging without any: decisions, branches, matches, checks, probe.
    States that differ in log bytes shared a recovery through the scan's summaries."""
    from crashsim.bench import bench_scenario
    from crashsim.crashstates import enumerate_states, iter_steps
    ctx = build_context(bench_scenario(5))
    fresh = Judge(ctx.writer, ctx.model, share_reads=False, share_checks=False,
                  device=ctx.trace)

    def shape(ex):
        return (ex.recovery.decisions, ex.recovery.branches, ex.matched_k, ex.structure,
                ex.probe_error, ex.error)
    judged = 0
    for st in iter_steps(ctx.trace):
        for cs in enumerate_states(st, 64, 1):
            assert shape(ctx.judge.examine(cs.image)) == shape(fresh.examine(cs.image)), \
                cs.state_id
            judged += 1
    assert judged > 1000
    assert ctx.judge._memo.summary_hits > 20
    assert ctx.judge.recoveries < judged // 10
