"""Lazy prompts: routing reads a prompt only as far as a backend can match it, and loses nothing by it."""
from __future__ import annotations

import random

import pytest

from kvblocks import get_tokenizer
from proxy.config import ProxyConfig
from proxy.routing.policies import Decision
from proxy.routing.router import Router

TOK = get_tokenizer()
BACKENDS = ["http://a:1", "http://b:1", "http://c:1"]
WORDS = ["alpha", "beta", "gamma", "Ωmega", "kv", "12", "cache,", "x\n\ny", "the", "of", "naïve", "(note)"]


def router(capacity: int = 1_000_000) -> Router:
    r = Router(ProxyConfig(backends=BACKENDS).routing())
    for url in BACKENDS:
        r.add_backend(url)
        r.index.set_capacity(url, capacity)
    return r


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def route(r: Router, ctx, url: str) -> None:
    r.end(r.begin(ctx, Decision(r.registry.get(url), ctx.matched(r.registry.get(url)))))


@pytest.mark.parametrize("seed", range(4))
def test_lazy_matches_equal_eager_matches_on_shared_prefix_traffic(seed):
    """Docs shared by many prompts, prompts repeated, chats growing turn by turn: the lazy router sees
    exactly the matches of a router that tokenizes everything, and completes to the same hashes."""
    rng = random.Random(seed)
    lazy, eager = router(), router()
    docs = [words(rng, rng.randrange(50, 1500)) for _ in range(4)]
    seen: list[str] = []
    lazily_stopped = 0
    for _ in range(60):
        kind = rng.random()
        if kind < 0.4:
            text = rng.choice(docs) + " question: " + words(rng, rng.randrange(1, 80))
        elif kind < 0.6 and seen:
            text = rng.choice(seen)  # a repeat
        elif kind < 0.8 and seen:
            text = rng.choice(seen) + " answer " + words(rng, rng.randrange(5, 200))  # the next chat turn
        else:
            text = words(rng, rng.randrange(1, 900))  # unique
        seen.append(text)
        lc = lazy.text_context(text, 8)
        ec = eager.text_context(text, 8, lazy=False)
        assert lc.matches == ec.matches
        assert lc.hashes == ec.hashes[: len(lc.hashes)]
        lazily_stopped += lc.tail is not None
        url = rng.choice(BACKENDS)
        route(lazy, lc, url)
        route(eager, ec, url)
        lazy.complete(lc)
        assert lc.hashes == ec.hashes and lc.num_tokens == ec.num_tokens == len(TOK.encode(text))
    assert lazily_stopped > 10


def test_an_unshared_prompt_costs_one_small_chunk():
    r = router()
    rng = random.Random(5)
    text = words(rng, 2000)
    ctx = r.text_context(text, 8)
    assert ctx.tail is not None and ctx.tail.pos <= 2 * r.chunked.first_chunk_chars
    assert len(ctx.hashes) <= 8 and ctx.matches == {}
    true = len(TOK.encode(text))
    assert 0.8 * true <= ctx.num_tokens <= 1.25 * true  # estimated from the chunk's chars per token
    # Routed, the backend is charged its estimated size at once, and the tail stays untokenized.
    route(r, ctx, BACKENDS[0])
    assert abs(r.index.num_blocks(BACKENDS[0]) - true // 16) <= 0.25 * true // 16
    assert not ctx.tail.done


def test_a_pending_tail_is_tokenized_when_a_later_prompt_reaches_it():
    r = router()
    rng = random.Random(6)
    doc = words(rng, 1200)
    first = r.text_context(doc + " first question", 8)
    route(r, first, BACKENDS[1])
    assert first.tail is not None and not first.tail.done
    second = r.text_context(doc + " second question", 8)
    doc_blocks = len(TOK.encode(doc)) // 16
    assert first.tail.done  # resolved on the way
    assert doc_blocks - 1 <= second.matches[BACKENDS[1]] <= doc_blocks + 1
    assert set(second.matches) == {BACKENDS[1]}


def test_a_tail_diverging_at_its_cut_is_left_untokenized():
    r = router()
    rng = random.Random(7)
    head = words(rng, 60)
    first = r.text_context(head + " " + words(rng, 800), 8)
    route(r, first, BACKENDS[0])
    st = first.tail
    assert st is not None
    # Same text up to the first one's cut, then something else right at it.
    other = st.text[: st.pos] + "\n" + words(rng, 300)
    r.text_context(other, 8)
    assert not st.done


def test_pending_tails_count_against_capacity_and_go_before_their_anchor():
    r = router(capacity=200)
    rng = random.Random(8)
    a = BACKENDS[0]
    ctxs = []
    for _ in range(6):  # each ~60 blocks, mostly a pending tail
        ctx = r.text_context(words(rng, 1000), 8)
        ctxs.append(ctx)
        route(r, ctx, a)
        assert r.index.num_blocks(a) <= 200
    # The oldest prompts were evicted whole: their anchors and their tails.
    assert r.index.owners(ctxs[0].hashes[0]) == 0
    assert r.index.pending_at(ctxs[0].hashes[-1]) is None
    assert r.index.owners(ctxs[-1].hashes[0]) != 0
    r.index.clear(a)
    assert r.index.num_blocks(a) == 0 and r.index.pending_at(ctxs[-1].hashes[-1]) is None


def test_other_policies_get_the_whole_prompt():
    r = router()
    rng = random.Random(9)
    text = words(rng, 1500)
    ctx = r.text_context(text, 8)
    assert ctx.tail is not None
    r.decide(ctx, "sglang")
    assert ctx.tail is None and ctx.hashes == r.hashes(TOK.encode(text))
