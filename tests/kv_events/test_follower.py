"""KVEventsFollower over the proxy's real PrefixIndex: exact sets, fallback, re-seeding, in-flight blocks."""
from __future__ import annotations

from proxy.kv_events import KVEventSource, KVEventsFollower
from proxy.prefix_index import PrefixIndex

A, B = "http://a", "http://b"


def follower() -> tuple[KVEventsFollower, PrefixIndex]:
    index = PrefixIndex(8)
    f = KVEventsFollower(index)
    for url in (A, B):
        index.add_backend(url)
    f.follow(A, KVEventSource("tcp://127.0.0.1:1"))
    return f, index


def test_events_write_through_and_resync_drops_approximate_guesses():
    f, index = follower()
    assert f.mode(A) == "approximate" and f.mode(B) == "approximate"
    index.record_routed(A, [1, 2, 3])  # guesses made before the stream was in sync
    f.stored(A, [10, 11], None, list(range(32)), 16)
    f.resynced(A)
    assert f.is_exact(A) and f.blocks(A) == {10, 11}
    assert index.match([10, 11]) == {A: 2} and index.match([1]) == {}
    f.removed(A, [11])
    assert index.match([10, 11]) == {A: 1}
    f.desync(A, "gap")
    assert f.mode(A) == "approximate"
    index.record_routed(A, [20])
    f.stored(A, [12], 10, list(range(16)), 16)  # events keep flowing into the exact set meanwhile
    f.resynced(A)
    assert index.match([20]) == {} and index.match([10, 12]) == {A: 2} and f.blocks(A) == {10, 12}
    f.clear(A)
    assert f.blocks(A) == set() and index.num_blocks(A) == 0
    f.stored(B, [99], None, list(range(16)), 16)  # not followed: ignored
    assert index.num_blocks(B) == 0


def test_in_flight_prompt_blocks_count_until_the_request_ends():
    f, index = follower()
    f.resynced(A)
    f.routed(1, A, [1, 2, 3])
    assert index.match([1, 2, 3]) == {A: 3}  # before the backend's BlockStored arrives
    f.stored(A, [1, 2], None, list(range(32)), 16)
    f.removed(A, [2])  # evicted while the request is in flight: still counted until it ends
    assert index.match([1, 2, 3]) == {A: 3}
    f.finished(1)
    assert index.match([1, 2, 3]) == {A: 1} and f.blocks(A) == {1}
    f.finished(1)  # idempotent
    f.routed(2, B, [7])  # B is not event-fed: nothing recorded here
    assert index.match([7]) == {}
