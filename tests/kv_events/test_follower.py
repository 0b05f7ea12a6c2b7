"""KVEventsFollower over the proxy's real PrefixIndex: exact sets, fallback, re-seeding, in-flight blocks."""
from __future__ import annotations

from proxy.index.kv_events import KVEventSource, KVEventsFollower
from proxy.index.prefix_index import PrefixIndex

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


def exact_router():
    """A Router whose backend A is event-fed and in sync (events are applied by hand, no socket)."""
    import random

    from proxy.config import ProxyConfig
    from proxy.routing.router import Router

    urls = [A, B, "http://c"]
    r = Router(ProxyConfig(backends=urls).routing())
    for url in urls:
        r.add_backend(url)
    r.kv_events.follow(A, KVEventSource("tcp://127.0.0.1:1"))
    r.kv_events.resynced(A)
    rng = random.Random(3)
    doc = " ".join(rng.choice(["alpha", "beta", "gamma", "kv", "cache,", "12", "the"]) for _ in range(1500))
    return r, doc


def test_a_lazy_prompt_in_flight_on_an_exact_backend_is_matched_in_full_before_its_events():
    """The second request for a new document, sent before the backend's BlockStored for the first,
    must see the whole document on the first's backend (as approximate mode does), not just the one
    block the lazy walk hashed; else it is spread and the document prefilled twice (benchmarks/kv_hit_rate)."""
    from proxy.routing.policies import Decision

    r, doc = exact_router()
    first = r.text_context(doc + " question: one", 8)
    assert first.tail is not None and len(first.hashes) <= 2  # read one small chunk deep
    rec = r.begin(first, Decision(r.registry.get(A), 0))
    second = r.text_context(doc + " question: two", 8)
    doc_blocks = len(r.hashes(r.tokenize(doc))) - 1  # the doc's last block may hold the question's first token
    assert second.matches.get(A, 0) >= doc_blocks
    assert r.index.num_blocks(A) >= doc_blocks  # the first's unread rest is counted while in flight
    r.end(rec)  # the backend never reported the blocks: nothing of the first request stays
    assert r.index.num_blocks(A) == 0 and r.text_context(doc + " question: three", 8).matches == {}


def test_a_finished_lazy_prompt_on_an_exact_backend_still_marks_where_it_ended():
    """A chat's next turn continues the previous prompt: kv_aware keeps the session home only if the
    index knows that prompt ended there, which for a lazy prompt is learnt by resolving its tail."""
    from proxy.routing.policies import Decision

    r, doc = exact_router()
    first = r.text_context(doc, 8)
    assert first.tail is not None
    rec = r.begin(first, Decision(r.registry.get(A), 0))
    full = r.hashes(r.tokenize(doc))
    r.kv_events.stored(A, full, None, [], 16)  # the backend reports the prompt's blocks when it schedules it
    r.end(rec)
    assert not r.index.is_prompt_end(full[-1])
    nxt = r.text_context(doc + " answer: fine. user: and then?", 8)
    assert nxt.matches == {A: len(full)} and r.index.is_prompt_end(full[-1])
    assert r.index.num_blocks(A) == len(full)  # resolving the ended request's tail adds nothing


def test_in_flight_blocks_on_top_of_a_full_cache_do_not_push_a_request_off_its_prefix():
    """An exact backend's in-flight prompt blocks are indexed before the events of the evictions they
    cause. Counted on top of its full cache, kv_aware charged that backend for evicting them again
    and sent requests away from the blocks they matched there (benchmarks/kv_hit_rate: exact lost to
    approximate). Two equally loaded, full backends; only A holds the prompt's first 4 blocks."""
    from proxy.config import ProxyConfig
    from proxy.routing.policies import Decision
    from proxy.routing.router import Router

    r = Router(ProxyConfig(backends=[A, B]).routing())
    for url in (A, B):
        r.add_backend(url)
        r.index.set_capacity(url, 200)
        r.kv_events.follow(url, KVEventSource("tcp://127.0.0.1:1"))
        r.kv_events.resynced(url)
    f = r.kv_events

    def ids(start: int, blocks: int) -> list[int]:
        return list(range(start, start + 16 * blocks))

    doc = ids(0, 4)
    f.stored(A, r.hashes(doc) + r.hashes(ids(10_000, 196)), None, [], 16)
    filler_b = r.hashes(ids(20_000, 200))
    f.stored(B, filler_b, None, [], 16)
    x = r.context(ids(30_000, 100))
    r.begin(x, Decision(r.registry.get(A), 0))  # scheduled on A; its events are not in yet
    y = r.context(ids(40_000, 100))
    r.begin(y, Decision(r.registry.get(B), 0))
    f.removed(B, filler_b[100:])  # B's events for the same are in: it evicted 100 blocks for them
    f.stored(B, y.hashes, None, [], 16)
    q = r.context(doc + ids(50_000, 1)[:8])
    assert q.matches == {A: 4}
    assert r.decide(q).backend.url == A
    assert r.index.num_blocks(A) == r.index.num_blocks(B) == 200  # a cache holds at most its capacity
