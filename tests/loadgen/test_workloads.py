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
