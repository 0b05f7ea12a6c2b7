"""PrefixIndex: matching, LRU capacity mirror with the deepest-first tie rule, exact-mode updates."""
from __future__ import annotations

from proxy.index.prefix_index import PrefixIndex


def test_match_counts_leading_blocks_per_backend():
    idx = PrefixIndex()
    idx.record_routed("a", [1, 2, 3, 4])
    idx.record_routed("b", [1, 2, 9])
    idx.record_routed("c", [7, 2, 3])
    assert idx.match([1, 2, 3, 4, 5]) == {"a": 4, "b": 2}
    assert idx.match([1, 2, 9]) == {"a": 2, "b": 3}
    assert idx.match([5, 2]) == {}  # real hashes are chained: a block never matches out of place
    assert idx.match([]) == {}


def test_a_gap_stops_the_match_even_if_later_blocks_are_cached():
    idx = PrefixIndex()
    idx.record_routed("a", [1, 2, 3])
    idx.removed("a", [2])
    assert idx.match([1, 2, 3]) == {"a": 1}


def test_capacity_evicts_least_recent_and_deepest_first():
    idx = PrefixIndex(default_capacity=4)
    idx.record_routed("a", [1, 2, 3])  # doc X: block 1 is the most recently used of the three
    idx.record_routed("a", [10, 11])  # needs one slot: X's deepest block (3) goes, not its first
    assert idx.num_blocks("a") == 4
    assert idx.match([1, 2, 3]) == {"a": 2}
    assert idx.match([10, 11]) == {"a": 2}
    idx.record_routed("a", [1, 2])  # touching X makes [10, 11] the oldest
    idx.record_routed("a", [20])
    assert idx.match([10, 11]) == {"a": 1}
    assert idx.match([1, 2]) == {"a": 2}


def test_set_capacity_shrinks_and_clear_forgets_one_backend():
    idx = PrefixIndex()
    idx.record_routed("a", list(range(100)))
    idx.record_routed("b", list(range(100)))
    idx.set_capacity("a", 10)
    assert idx.num_blocks("a") == 10
    assert idx.match(list(range(100))) == {"a": 10, "b": 100}
    idx.clear("b")
    assert idx.match(list(range(100))) == {"a": 10}
    assert len(idx) == 10
    idx.clear()
    assert len(idx) == 0 and idx.match([0]) == {}


def test_stored_does_not_evict_and_removed_backend_frees_its_slot():
    idx = PrefixIndex(default_capacity=2)
    idx.stored("a", [1, 2, 3])
    assert idx.match([1, 2, 3]) == {"a": 3}
    idx.remove_backend("a")
    assert idx.match([1]) == {}
    idx.record_routed("z", [1])
    assert idx.match([1, 2]) == {"z": 1}
    assert len(idx) == 1


def test_many_backends_share_one_map():
    idx = PrefixIndex()
    for i in range(64):
        idx.record_routed(f"b{i}", [0, 1000 + i])
    m = idx.match([0, 1005])
    assert m.pop("b5") == 2
    assert set(m.values()) == {1} and len(m) == 63
