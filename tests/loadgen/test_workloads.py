"""Workloads are reproducible from (config, seed), token counts are exact, and sharing is as designed."""
from collections import Counter

import pytest

from kvblocks import BlockHasher, get_tokenizer
from loadgen.config import WORKLOAD_NAMES, WorkloadConfig
from loadgen.workloads import build_workload, zipf_sampler
from loadgen.text import count_tokens, seeded_words


def _tokens(spec):
    return get_tokenizer().encode(spec.rendered_prompt())


NEEDS = {"multimodel": {"models": ("model-a", "model-b")}}  # settings a workload cannot do without


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_same_seed_same_text_other_seed_other_text(name):
    a = build_workload(WorkloadConfig(name=name, requests=12, seed=3, **NEEDS.get(name, {})))
    b = build_workload(WorkloadConfig(name=name, requests=12, seed=3, **NEEDS.get(name, {})))
    c = build_workload(WorkloadConfig(name=name, requests=12, seed=4, **NEEDS.get(name, {})))
    assert [r.rendered_prompt() for r in a.requests] == [r.rendered_prompt() for r in b.requests]
    assert [r.rendered_prompt() for r in a.requests] != [r.rendered_prompt() for r in c.requests]
    assert len(a.requests) == 12


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_token_counts_exact_and_fit_model_len(name):
    w = build_workload(WorkloadConfig(name=name, requests=12, **NEEDS.get(name, {})))
    for r in w.requests:
        assert r.prompt_tokens == len(_tokens(r))
        assert r.prompt_tokens + r.max_tokens <= 4096


def test_seeded_words_concatenate_token_exactly():
    tok = get_tokenizer()
    a, b = seeded_words(100, "a"), seeded_words(37, "b")
    assert tok.encode(a + b) == tok.encode(a) + tok.encode(b)
    assert count_tokens(a) == 100


def test_rag_requests_on_one_document_share_its_blocks():
    w = build_workload(WorkloadConfig(name="rag", requests=60, documents=4, doc_tokens_min=200, doc_tokens_max=300))
    by_doc = {}
    for r in w.requests:
        by_doc.setdefault(r.tags["doc"], []).append(r)
    hasher = BlockHasher()
    for doc, rs in by_doc.items():
        if len(rs) < 2:
            continue
        h0, h1 = hasher.hashes(_tokens(rs[0])), hasher.hashes(_tokens(rs[1]))
        common = next((i for i, (x, y) in enumerate(zip(h0, h1)) if x != y), min(len(h0), len(h1)))
        assert common >= 200 // 16 - 1
    assert Counter(r.tags["doc"] for r in w.requests).most_common(1)[0][0] == 0


def test_zipf_prefers_low_ranks():
    import random

    draw = zipf_sampler(10, 1.2, random.Random(0))
    counts = Counter(draw() for _ in range(5000))
    assert counts[0] > counts[1] > counts[5]
    assert set(counts) <= set(range(10))


def test_multiturn_each_turn_extends_the_previous_prompt():
    w = build_workload(WorkloadConfig(name="multiturn", requests=8, turns=4))
    chains = w.chains()
    assert [len(c) for c in chains] == [4, 4]
    for chain in chains:
        for prev, nxt in zip(chain, chain[1:]):
            p = prev.rendered_prompt()
            assert nxt.rendered_prompt().startswith(p)
            assert _tokens(nxt)[: len(_tokens(prev))] == _tokens(prev)
            assert nxt.think_time > 0 and nxt.api == "chat"


def test_prefix_sweep_caps_long_prefixes_and_says_so():
    w = build_workload(WorkloadConfig(name="prefix-sweep", requests=12, prefix_lengths=(0, 16, 4096)))
    lens = sorted({r.tags["prefix_len"] for r in w.requests})
    assert lens == [0, 16, 4096 - 48 - 64]
    assert w.notes and "capped" in w.notes[0]


def test_tenants_users_take_turns():
    w = build_workload(WorkloadConfig(name="tenants", requests=40, tenants=2, users_per_tenant=3))
    users = [r.tags["user"] for r in w.requests if r.tags["tenant"] == 0]
    assert users[:4] == [0, 1, 2, 0][: len(users[:4])]


def test_bad_config_is_rejected():
    with pytest.raises(ValueError):
        WorkloadConfig(name="nope")
    with pytest.raises(ValueError):
        WorkloadConfig(requests=0)


def test_b2b_saas_has_llm_d_shape_cycling_fixed_prompts():
    """C customers x U users fixed prompts (context + the user's own question), shuffled once, sent in
    turn: prompt i comes back at i + C x U; a customer's users share its context's blocks."""
    cfg = WorkloadConfig(name="b2b-saas", requests=40, b2b_customers=4, b2b_users=3, b2b_context_tokens=320,
                         b2b_question_tokens=64, b2b_output_tokens=8, b2b_stages="10:100")
    w = build_workload(cfg)
    assert len(w.requests) == 40 and all(r.prompt_tokens == 384 and r.max_tokens == 8 for r in w.requests)
    keys = [(r.tags["customer"], r.tags["user"]) for r in w.requests]
    assert len(set(keys[:12])) == 12 and keys[12:24] == keys[:12] and keys[24:36] == keys[:12]
    assert keys[:12] != sorted(keys[:12])  # shuffled once, as inference-perf's shared_prefix does
    by_key = {}
    for r, k in zip(w.requests, keys):
        assert by_key.setdefault(k, r.rendered_prompt()) == r.rendered_prompt()
    hasher = BlockHasher()
    same = [r for r, k in zip(w.requests, keys) if k[0] == keys[0][0]]
    h = [hasher.hashes(_tokens(r)) for r in same[:2]]
    other = next(r for r, k in zip(w.requests, keys) if k[0] != keys[0][0])
    assert h[0][:320 // 16] == h[1][:320 // 16] and h[0][-1] != h[1][-1]
    assert hasher.hashes(_tokens(other))[0] != h[0][0]
    assert w.params["resident_tokens"] == 4 * (320 + 3 * 64)


def test_b2b_saas_arrivals_ramp_through_the_stages():
    from loadgen.arrivals import TraceArrivals, make_arrivals

    cfg = WorkloadConfig(name="b2b-saas", requests=5000, b2b_customers=2, b2b_users=2, b2b_context_tokens=16,
                         b2b_question_tokens=16, b2b_output_tokens=4, b2b_stages="5:40,50:40")
    w = build_workload(cfg)
    t = [r.arrival for r in w.requests]
    assert t == sorted(t) and t[-1] < 80
    slow, fast = sum(x < 40 for x in t), sum(x >= 40 for x in t)
    assert 150 < slow < 250 and 1800 < fast < 2200  # ~5/s then ~50/s
    assert any("stages end after" in n for n in w.notes)  # fewer arrivals than --requests
    half = build_workload(WorkloadConfig(**{**cfg.__dict__, "b2b_stage_scale": 0.5}))
    assert half.requests[-1].arrival < 40 and len(half.requests) < len(w.requests) * 0.6
    arr = make_arrivals("b2b-saas", 0, 0, 0)
    assert isinstance(arr, TraceArrivals) and "stages" in arr.describe()
    assert arr.start_times(w.chains())[:5] == t[:5]
    assert not isinstance(make_arrivals("b2b-saas", 20, 0, 0), TraceArrivals)  # --rate: fixed Poisson


def test_b2b_saas_defaults_are_llm_d_benchmark_and_scale_into_small_models():
    d = WorkloadConfig(name="b2b-saas")
    assert (d.b2b_customers, d.b2b_context_tokens, d.b2b_users, d.b2b_question_tokens, d.b2b_output_tokens) == (
        150, 6000, 5, 1200, 1000)
    stages = d.b2b_stage_list
    assert stages[0] == (15, 50) and [r for r, _ in stages[1:]] == sorted(r for r, _ in stages[1:])
    assert stages[1][0] == 3 and stages[-1][0] == 60
    w = build_workload(WorkloadConfig(name="b2b-saas", requests=6, max_model_len=8448))
    assert all(r.prompt_tokens == 7200 and r.max_tokens == 1000 for r in w.requests) and not w.notes
    small = build_workload(WorkloadConfig(name="b2b-saas", requests=6))  # 4096: context and question shrink
    assert all(r.prompt_tokens + r.max_tokens <= 4096 for r in small.requests) and "scaled" in small.notes[0]
    with pytest.raises(ValueError, match="b2b_stages"):
        WorkloadConfig(name="b2b-saas", b2b_stages="3:x")


def test_token_ids_draw_what_randrange_draws():
    """The inlined draw keeps every seeded text (and so every published result) as it was."""
    import random

    from loadgen.text import token_ids, word_token_ids

    vocab = word_token_ids()
    for seed in range(5):
        a, b = random.Random(seed), random.Random(seed)
        assert token_ids(a, 3000) == [vocab[b.randrange(len(vocab))] for _ in range(3000)]
        assert a.random() == b.random()  # the generators are left in the same state
