"""The reference model's matching: range-by-range parts give exactly what the joined
view gives, for every k and for views that match no k."""
from hypothesis import given, settings, strategies as st

from crashsim.model import Op, RangeModel, digest
from crashsim.parts import CHUNK_ITEMS, Parts


def _ops(draw_ops):
    return [Op("guest_write", off * 512, n * 512, pat) for off, n, pat in draw_ops]


OPS = st.lists(st.tuples(st.integers(0, 64), st.integers(1, 16), st.integers(1, 3)),
               min_size=1, max_size=8)


def _parts(model: RangeModel, view: bytes) -> list[bytes]:
    parts, pos = [], 0
    for _, n in model.ranges:
        parts.append(view[pos:pos + n])
        pos += n
    return parts


@settings(max_examples=150, deadline=None, database=None)
@given(OPS, st.data())
def test_parts_match_like_the_joined_view(raw, data):
    model = RangeModel(_ops(raw))
    k = data.draw(st.integers(0, len(raw)))
    view = model.view_after(k)
    assert model.matching(_parts(model, view)) == model.matching(view)
    assert k in model.matching(_parts(model, view))
    flip = data.draw(st.integers(0, len(view) - 1))
    broken = view[:flip] + bytes([view[flip] ^ 0xFF]) + view[flip + 1:]
    assert model.matching(_parts(model, broken)) == model.matching(broken)


def test_the_same_part_object_is_matched_again_without_confusion():
    model = RangeModel([Op("guest_write", 0, 512, 1), Op("guest_write", 4096, 512, 2)])
    zero, one = bytes(512), bytes([1]) * 512
    two = bytes([2]) * 512
    assert model.matching([zero, zero]) == [0]
    assert model.matching([one, zero]) == [1]
    assert model.matching([one, two]) == [2]
    assert model.matching([one, two]) == [2]  # now by identity
    assert model.matching([zero, two]) == []


def test_a_huge_model_indexes_digests_and_still_matches_part_by_part():
    big = RangeModel.RANGE_INDEX_BYTES // 4
    ops = [Op("guest_write", 0, big, p) for p in (1, 2, 3, 4, 5)]
    ops.append(Op("guest_write", big + 4096, 512, 6))
    model = RangeModel(ops)
    assert model._content_key is digest
    assert model.matching([bytes([3]) * big, bytes(512)]) == [3]
    assert model.matching([bytes([5]) * big, bytes([6]) * 512]) == [6]
    assert model.matching([bytes([5]) * (big - 1) + b"\x04", bytes(512)]) == []
    assert model._crc_by_k == []  # never the whole view
    assert model.matching(model.view_after(3)) == [3]


@settings(max_examples=60, deadline=None, database=None)
@given(OPS, st.data())
def test_an_index_of_digests_matches_like_one_of_contents(raw, data):
    exact = RangeModel(_ops(raw))
    hashed = RangeModel(_ops(raw))
    hashed.RANGE_INDEX_BYTES = 0
    hashed._index = hashed._range_index()
    assert exact._content_key is None and hashed._content_key is digest
    view = exact.view_after(data.draw(st.integers(0, len(raw))))
    if data.draw(st.booleans()):
        flip = data.draw(st.integers(0, len(view) - 1))
        view = view[:flip] + bytes([view[flip] ^ 0xFF]) + view[flip + 1:]
    assert hashed.matching(_parts(hashed, view)) == exact.matching(_parts(exact, view))


def test_a_view_too_large_to_cache_is_confirmed_by_digest():
    size = RangeModel.VIEW_CACHE_BYTES // 4 + 512
    model = RangeModel([Op("guest_write", 0, size, 1), Op("guest_write", 0, 512, 2)])
    assert model._by_digest and model._by_k == []  # summed on first need only
    assert model.matching(model.view_after(1)) == [1]
    assert len(model._by_k) == 3
    assert model.matching(bytes([3]) * size) == []


def test_matching_by_parts_never_sums_whole_views():
    model = RangeModel([Op("guest_write", 0, 512, 1), Op("guest_write", 4096, 512, 2)])
    assert model.matching([bytes([1]) * 512, bytes([2]) * 512]) == [2]
    assert model._crc_by_k == []


@settings(max_examples=60, deadline=None, database=None)
@given(OPS, st.data())
def test_matching_after_another_view_is_matching_afresh(raw, data):
    """Successive views share part objects; only the chunks of parts that are not the
    previous view's are looked up again, and the answer is the one a fresh model gives,
    whether the view comes as a list or as Parts."""
    model = RangeModel(_ops(raw))
    views = []
    for _ in range(data.draw(st.integers(2, 6))):
        k = data.draw(st.integers(0, len(raw)))
        parts = list(views[-1]) if views else _parts(model, model.view_after(k))
        for i in data.draw(st.lists(st.integers(0, len(parts) - 1), max_size=3)):
            parts[i] = _parts(model, model.view_after(data.draw(
                st.integers(0, len(raw)))))[i]
            if data.draw(st.booleans()):
                parts[i] = bytes([parts[i][0] ^ 0xFF]) + parts[i][1:]
        views.append(parts)
        as_parts = Parts.of(parts) if data.draw(st.booleans()) else parts
        assert model.matching(as_parts) == RangeModel(_ops(raw)).matching(b"".join(parts))


LONG = [Op("guest_write", i * 4096, 512, 1 + i % 3) for i in range(2 * CHUNK_ITEMS + 7)]


@settings(max_examples=40, deadline=None, database=None)
@given(st.data())
def test_a_long_view_is_matched_chunk_by_chunk_like_afresh(data):
    """More ranges than one chunk holds: views made with Parts.replaced share chunks,
    and only the new chunks are looked up again."""
    model = RangeModel(LONG)
    ks = st.integers(0, len(LONG))
    parts = Parts.of(_parts(model, model.view_after(data.draw(ks))))
    for _ in range(data.draw(st.integers(1, 5))):
        changes = {}
        for i in data.draw(st.lists(st.integers(0, len(LONG) - 1), max_size=4)):
            changes[i] = _parts(model, model.view_after(data.draw(ks)))[i]
            if data.draw(st.booleans()):
                changes[i] = bytes([changes[i][0] ^ 0xFF]) + changes[i][1:]
        parts = parts.replaced(changes)
        assert model.matching(parts) == RangeModel(LONG).matching(b"".join(parts))
