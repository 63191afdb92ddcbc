"""The VHDX view read incrementally (``writers/vhdx/view.py``) is the full view.

Each recovered state is viewed twice: by a writer that has viewed every state before
it, which reads again only ranges whose BAT entries or data sectors changed, and by a
fresh writer, which reads every range. Parts and the sectors noted as read must agree:
a reused part that changed would be a wrong verdict, and a read left unnoted would let
the read-set memo share a verdict it must not.
"""
from crashsim import crashstates
from crashsim.bench import bench_scenario
from crashsim.blockdev import run_sync
from crashsim.explore import build_context, make_writer
from crashsim.readset import ReadLogDevice, merged_reads


def _recovered(writer, image):
    work = image.fork()
    run_sync(writer.recover(ReadLogDevice(work, [])))
    return work


def _view(writer, image, ranges):
    reads: list[tuple[int, int]] = []
    parts = writer.view(ReadLogDevice(image, reads), ranges)
    return parts, merged_reads(reads)


def test_incremental_views_equal_full_views_with_the_same_reads():
    sc = bench_scenario(12, 6)
    ctx = build_context(sc)
    warm, ranges = ctx.writer, ctx.model.ranges
    viewed = 0
    for st in crashstates.iter_steps(ctx.trace):
        for cs in crashstates.enumerate_states(st, 6, seed=1):
            try:
                work = _recovered(make_writer(sc), cs.image)
            except Exception:
                continue  # recovery refused: the oracle never views such a state
            (parts, reads), (want, want_reads) = \
                _view(warm, work, ranges), _view(make_writer(sc), work, ranges)
            wrong = [i for i, (a, b) in enumerate(zip(parts, want)) if a != b]
            assert not wrong and len(parts) == len(want), (cs.state_id, wrong)
            assert reads == want_reads, cs.state_id
            viewed += 1
    views = warm._views
    assert viewed > 200
    assert views.ranges_reused > 5 * views.ranges_read  # the incremental path ran
    assert views.layouts_reused > 0  # and a view flipped back to a recent file layout


def test_a_changed_data_sector_is_read_again():
    sc = bench_scenario(4, 4)
    ctx = build_context(sc)
    writer, ranges = ctx.writer, ctx.model.ranges
    final = list(crashstates.iter_steps(ctx.trace))[-1].durable
    before, _ = _view(writer, final.fork(), ranges)
    drv = writer._attached(ReadLogDevice(final, []))
    where = drv.extent_source(next(drv.extents(*ranges[2])))
    changed = final.fork()
    changed.write(where + 512, b"\xee" * 512)
    after, _ = _view(writer, changed, ranges)
    assert after[2][512:1024] == b"\xee" * 512 and after[2] != before[2]
    assert [a is b for a, b in zip(after, before)] == [True, True, False, True]
