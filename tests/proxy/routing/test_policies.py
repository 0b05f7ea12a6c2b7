"""Routing policies driven through the plain Router (no HTTP): affinity, spread, no hot spot."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy.config import ProxyConfig
from proxy.routing.policies import POLICIES, policy_names
from proxy.routing.router import Router, UnknownStrategy
from kvblocks import APIError

BACKENDS = [f"http://127.0.0.1:{9000 + i}" for i in range(4)]


def make_router(strategy: str = "kv_aware", n: int = 4) -> Router:
    return Router(ProxyConfig(backends=BACKENDS[:n], strategy=strategy).routing()) if n <= 4 else _big(strategy, n)


def _big(strategy: str, n: int) -> Router:
    return Router(ProxyConfig(backends=[f"http://127.0.0.1:{9000 + i}" for i in range(n)], strategy=strategy).routing())


def setup_router(strategy: str = "kv_aware", n: int = 4) -> Router:
    r = make_router(strategy, n)
    for i in range(n):  # the URLs make_router configured
        r.add_backend(f"http://127.0.0.1:{9000 + i}")
    return r


def doc_tokens(doc: int, n_tokens: int) -> list[int]:
    rng = random.Random(doc)
    return [rng.randrange(100, 50000) for _ in range(n_tokens)]


def question(doc: int, q: int, doc_len: int = 1024) -> list[int]:
    rng = random.Random(10_000 + doc * 100 + q)
    return doc_tokens(doc, doc_len) + [rng.randrange(100, 50000) for _ in range(40)]


def route(r: Router, tokens: list[int], keep: bool = False, strategy: str | None = None, max_tokens: int = 64):
    ctx = r.context(tokens, max_tokens)
    d = r.decide(ctx, strategy)
    rec = r.begin(ctx, d, strategy)
    if not keep:
        r.end(rec)
    return d, rec


def test_registry_has_every_required_strategy():
    assert {"kv_aware", "prefix", "round_robin", "least_loaded", "least_work", "random", "sglang"} <= set(policy_names())
    assert all(cls.name == name for name, cls in POLICIES.items())
    r = setup_router()
    with pytest.raises(UnknownStrategy):
        r.set_strategy("nope")
    with pytest.raises(APIError):
        r.policy(None)


def test_default_spreads_eight_documents_over_all_backends_and_keeps_affinity():
    r = setup_router()
    home = {}
    for doc in range(8):  # low concurrency: one request at a time
        d, _ = route(r, question(doc, 0, doc_len=512 + 128 * doc))
        home[doc] = d.backend.url
    assert set(home.values()) == set(BACKENDS), home
    for q in range(1, 6):
        for doc in range(8):
            d, _ = route(r, question(doc, q, doc_len=512 + 128 * doc))
            assert d.backend.url == home[doc], (doc, q)
            assert d.matched_blocks == (512 + 128 * doc) // 16


def test_sglang_baseline_keeps_documents_where_the_first_landed():
    """The rule we beat: cache_aware pins each document at 30% match, never rebalancing below 64 in flight."""
    r = setup_router("sglang")
    seen = Counter()
    in_flight = []
    for q in range(40):
        d, rec = route(r, question(0, q), keep=True)
        seen[d.backend.url] += 1
        in_flight.append(rec)
    assert len(seen) == 1  # all 40 concurrent requests on one backend
    for rec in in_flight:
        r.end(rec)


def test_shared_first_block_does_not_hot_spot():
    """Mooncake-like: every request shares block 0, the rest differs; pure longest prefix picks one backend."""
    shared = doc_tokens(999, 16)
    for strategy, expect_spread in (("kv_aware", True), ("prefix", False)):
        r = setup_router(strategy)
        used = Counter()
        for i in range(16):
            d, _ = route(r, shared + doc_tokens(i, 700))
            used[d.backend.url] += 1
        assert (len(used) == 4) is expect_spread, (strategy, used)
        if expect_spread:
            assert max(used.values()) <= 6, used


def test_hot_document_spreads_under_load_but_stays_grouped():
    """A hot document's copy gets a second home once its queue costs more than re-prefilling it."""
    r = setup_router()
    recs = []
    used = Counter()
    for q in range(24):
        d, rec = route(r, question(1, q, doc_len=2048), keep=True)
        used[d.backend.url] += 1
        recs.append(rec)
    assert len(used) >= 2, used
    for rec in recs:
        r.end(rec)
    assert r.registry.total_in_flight() == 0


def test_cold_documents_avoid_busy_backend():
    r = setup_router()
    d0, rec = route(r, question(0, 0, doc_len=2048), keep=True)
    others = Counter(route(r, question(doc, 0, doc_len=256))[0].backend.url for doc in range(1, 4))
    assert d0.backend.url not in others
    r.end(rec)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_picks_a_healthy_backend_and_balances_counts(name):
    r = setup_router(name)
    r.registry.set_health(r.registry.get(BACKENDS[0]), False, "down")
    got = Counter()
    recs = []
    for i in range(12):
        d, rec = route(r, doc_tokens(i, 100), keep=True, strategy=name)
        got[d.backend.url] += 1
        recs.append(rec)
    assert BACKENDS[0] not in got
    if name in ("round_robin", "least_loaded", "least_work", "kv_aware"):
        assert set(got.values()) == {4}, got
    for rec in recs:
        r.end(rec)
    assert r.registry.total_in_flight() == 0


def test_no_healthy_backend_is_503():
    r = setup_router()
    for b in r.registry:
        r.registry.set_health(b, False, "down")
    with pytest.raises(APIError) as e:
        r.decide(r.context([1] * 40))
    assert e.value.status == 503


def test_least_work_prefers_short_queue_over_fewer_requests():
    r = setup_router("least_work", n=2)
    a, rec_long = route(r, doc_tokens(1, 4000), keep=True, max_tokens=400)
    b_recs = [route(r, doc_tokens(2 + i, 20), keep=True, max_tokens=2)[1] for i in range(1)]
    assert b_recs[0].backend is not a.backend
    # Backend B holds 1 tiny request, A one huge one: least_work sends the next to B, least_loaded ties.
    d, rec = route(r, doc_tokens(9, 100), keep=True)
    assert d.backend is not a.backend
    for x in [rec_long, rec, *b_recs]:
        r.end(x)


def test_reset_forgets_prefixes():
    r = setup_router()
    route(r, question(0, 0))
    assert any(r.index.num_blocks(u) for u in BACKENDS)
    r.reset()
    assert all(r.index.num_blocks(u) == 0 for u in BACKENDS)


def test_splitmix64_is_the_standard_mix():
    """Replicas in different processes must compute identical weights: pin the function's known output."""
    from proxy.routing.policies.rendezvous import backend_id, splitmix64

    assert splitmix64(0) == 0xE220A8397B1DCDAF  # SplitMix64's first output from seed 0
    assert backend_id(BACKENDS[0]) == backend_id(str(BACKENDS[0]))
    assert len({backend_id(u) for u in BACKENDS}) == 4


def test_ties_are_decided_alike_by_independent_routers_and_spread_by_rendezvous():
    """Two routers in the same state (empty caches, idle) pick the same backend; distinct prompts spread."""
    a, b = setup_router(), setup_router()
    for _ in range(5):  # a extra decisions on `a` only: no hidden per-process state may shift its ties
        a.decide(a.context(doc_tokens(500, 64)))
    picks = Counter()
    for i in range(64):
        toks = doc_tokens(i, 40 + i)
        da, db = a.decide(a.context(toks)), b.decide(b.context(toks))
        assert da.backend.url == db.backend.url
        picks[da.backend.url] += 1
    assert set(picks) == set(BACKENDS) and max(picks.values()) <= 28, picks
    short = [a.decide(a.context(list(range(1, 1 + n)))).backend.url for n in range(1, 16)]  # no full block
    assert short == [b.decide(b.context(list(range(1, 1 + n)))).backend.url for n in range(1, 16)]
    assert len(set(short)) >= 2


def test_chat_turn_stays_with_its_history_unless_home_is_much_busier():
    """A 15-block history is worth more than one extra decoding request at home (weight 1 moved it),
    but not more than a queue of long prefills there."""
    r = setup_router()
    history = doc_tokens(77, 240)
    d0, _ = route(r, history)
    home = d0.backend
    turn = history + doc_tokens(78, 192)
    _, busy = route(r, doc_tokens(79, 200), strategy="round_robin", keep=True)
    while busy.backend is not home:  # put one request on the home, then let it decode
        r.end(busy)
        _, busy = route(r, doc_tokens(79, 200), strategy="round_robin", keep=True)
    r.first_byte(busy)
    d = r.decide(r.context(turn, 64))
    assert d.backend is home and d.matched_blocks == 15
    queue = []
    while len(queue) < 4:  # four long prompts still prefilling at home: moving is cheaper than waiting
        _, rec = route(r, doc_tokens(80 + len(queue), 3000), strategy="round_robin", keep=True)
        (queue.append(rec) if rec.backend is home else r.end(rec))
    assert r.decide(r.context(turn, 64)).backend is not home
    for rec in [busy, *queue]:
        r.end(rec)
    assert r.registry.total_in_flight() == 0


def test_a_chat_session_stays_home_through_a_queue_a_shared_document_spreads_from():
    """The same moderate queue at home: the next turn of a chat stays (moving a session moves all its
    later turns), a new question on a document served before moves to an idle backend."""
    r = setup_router()
    history = doc_tokens(90, 240)
    home = route(r, history)[0].backend
    turn = history + doc_tokens(91, 192)
    queue = []
    while len(queue) < 2:  # two 1,200-token prompts prefilling at home: ~0.37 s of queue
        _, rec = route(r, doc_tokens(92 + len(queue) * 7, 1200), strategy="round_robin", keep=True)
        (queue.append(rec) if rec.backend is home else r.end(rec))
    d = r.decide(r.context(turn, 64))
    assert d.backend is home and d.matched_blocks == 15
    costs = r.policies["kv_aware"].costs(r.context(turn, 64), r.candidates())
    assert min(costs) < costs[r.candidates().index(home)]  # by cost alone it would have moved
    for rec in queue:
        r.end(rec)

    r.reset()
    home = route(r, question(95, 0))[0].backend
    queue = []
    while len(queue) < 2:
        _, rec = route(r, doc_tokens(96 + len(queue) * 7, 1200), strategy="round_robin", keep=True)
        (queue.append(rec) if rec.backend is home else r.end(rec))
    d = r.decide(r.context(question(95, 1), 64))
    assert d.backend is not home and d.matched_blocks == 0
    for rec in queue:
        r.end(rec)
    assert r.registry.total_in_flight() == 0
