"""Parts behave as the list of their items, and share every chunk a change leaves alone."""
import pytest
from hypothesis import given, settings, strategies as st

from crashsim.parts import CHUNK_ITEMS, Parts

ITEMS = st.lists(st.integers(0, 9), min_size=0, max_size=3 * CHUNK_ITEMS + 5)


@settings(max_examples=200, deadline=None, database=None)
@given(ITEMS, st.data())
def test_replaced_is_the_list_with_those_items_set(items, data):
    parts = Parts.of(items)
    assert list(parts) == items and len(parts) == len(items) and parts == items
    if not items:
        return
    changes = data.draw(st.dictionaries(st.integers(0, len(items) - 1), st.integers(10, 19),
                                        max_size=4))
    new = parts.replaced(changes)
    want = [changes.get(i, v) for i, v in enumerate(items)]
    assert list(new) == want and [new[i] for i in range(len(want))] == want
    assert list(parts) == items  # the original is untouched
    touched = {i // CHUNK_ITEMS for i in changes}
    for c, (a, b) in enumerate(zip(parts.chunks, new.chunks)):
        assert (a is b) == (c not in touched)


def test_of_like_reuses_the_equal_chunks_of_the_earlier_parts():
    old = Parts.of(range(2 * CHUNK_ITEMS + 1))
    items = list(range(2 * CHUNK_ITEMS + 1))
    items[CHUNK_ITEMS] = -1
    new = Parts.of(items, like=old)
    assert new.chunks[0] is old.chunks[0] and new.chunks[2] is old.chunks[2]
    assert new.chunks[1] is not old.chunks[1] and new[CHUNK_ITEMS] == -1


def test_indexing_follows_list_rules():
    parts = Parts.of("abc")
    assert parts[-1] == "c" and parts[0:2] == ["a", "b"]
    with pytest.raises(IndexError):
        parts[3]
    with pytest.raises(IndexError):
        parts.replaced({3: "d"})
    assert parts.replaced({}) is parts
