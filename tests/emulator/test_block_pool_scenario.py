"""The A/B/C/D ground truth from vLLM's own KVCacheManager (vllm-facts.md), reproduced exactly."""
from __future__ import annotations

from kvblocks import BlockHasher, hash_to_int
from kvblocks.kv_events import BlockRemoved, BlockStored

from emulator.block_pool import BlockPool
from emulator.kv_cache_manager import KVCacheManager, KVSequence

HASHER = BlockHasher(16)


def ints(digests):
    return [hash_to_int(d) for d in digests]


def prefill(mgr: KVCacheManager, seq: KVSequence) -> int:
    hits, cached = mgr.get_computed_blocks(seq)
    assert mgr.allocate_slots(seq, seq.num_tokens - cached, hits)
    mgr.record_query(seq.num_tokens, cached)
    return cached


def block_ids(seq: KVSequence) -> list[int]:
    return [b.block_id for b in seq.blocks]


def test_abcd_scenario_matches_vllm():
    pool = BlockPool(6, enable_kv_events=True)  # null block 0 + usable blocks 1..5
    mgr = KVCacheManager(pool)
    a_tokens = list(range(1000, 1048))
    a_h = HASHER.hashes(a_tokens)

    a = KVSequence("A", list(a_tokens))
    assert prefill(mgr, a) == 0
    assert block_ids(a) == [1, 2, 3]
    assert pool.take_events() == [BlockStored(ints(a_h), None, a_tokens, 16)]
    a.token_ids.append(7)  # its one generated token, never computed
    mgr.free(a)
    assert pool.free_block_queue.block_ids() == [4, 5, 3, 2, 1]

    b_tokens = a_tokens[:32] + list(range(2000, 2016))
    b_h = HASHER.hashes(b_tokens)
    b = KVSequence("B", list(b_tokens))
    assert prefill(mgr, b) == 32
    assert block_ids(b) == [1, 2, 4]
    assert pool.take_events() == [BlockStored([hash_to_int(b_h[2])], hash_to_int(a_h[1]), b_tokens[32:], 16)]

    c_tokens = list(range(3000, 3032))
    c_h = HASHER.hashes(c_tokens)
    c = KVSequence("C", list(c_tokens))
    assert prefill(mgr, c) == 0
    assert block_ids(c) == [5, 3]
    assert pool.take_events() == [
        BlockRemoved([hash_to_int(a_h[2])]),
        BlockStored(ints(c_h), None, c_tokens, 16),
    ]
    mgr.free(b)
    mgr.free(c)
    assert pool.free_block_queue.block_ids() == [4, 2, 1, 3, 5]

    d_tokens = list(range(4000, 4040))
    d = KVSequence("D", list(d_tokens))
    assert prefill(mgr, d) == 0
    assert block_ids(d) == [4, 2, 1]
    d_h = HASHER.hashes(d_tokens)
    assert pool.take_events() == [
        BlockRemoved([hash_to_int(b_h[2])]),
        BlockRemoved([hash_to_int(a_h[1])]),
        BlockRemoved([hash_to_int(a_h[0])]),
        BlockStored(ints(d_h), None, d_tokens[:32], 16),  # the 8-token tail is not stored
    ]
    generated = list(range(5000, 5010))
    d.token_ids.append(generated[0])  # produced by the prefill step
    for k in range(1, 10):  # decode step k computes generated token k and samples token k+1
        assert mgr.allocate_slots(d, 1)
        events = pool.take_events()
        if k == 8:  # the 8th generated token fills the third block
            full = d_tokens + generated[:8]
            h3 = HASHER.hashes(full)[2]
            assert events == [BlockStored([hash_to_int(h3)], hash_to_int(d_h[1]), full[32:48], 16)]
        elif k == 9:  # the next token needs a fourth block: C's second block (in block 3) is evicted
            assert events == [BlockRemoved([hash_to_int(c_h[1])])]
        else:
            assert events == []
        d.token_ids.append(generated[k])
    assert block_ids(d) == [4, 2, 1, 3]
    mgr.free(d)
    assert pool.free_block_queue.block_ids() == [3, 5, 1, 2, 4]
    assert pool.num_referenced_blocks() == 0
    assert mgr.stats.queries == 48 + 48 + 32 + 40 and mgr.stats.hits == 32
    pool.check_invariants()


def test_fully_cached_prompt_reports_one_block_less():
    pool = BlockPool(10)
    mgr = KVCacheManager(pool)
    toks = list(range(32))
    first = KVSequence("x", list(toks))
    prefill(mgr, first)
    mgr.free(first)
    again = KVSequence("y", list(toks))
    assert prefill(mgr, again) == 16  # capped at n-1 tokens: the last block is recomputed
    mgr.free(again)
    assert pool.num_referenced_blocks() == 0


def test_reset_refused_while_referenced_then_clears():
    pool = BlockPool(4, enable_kv_events=True)
    mgr = KVCacheManager(pool)
    s = KVSequence("s", list(range(20)))
    prefill(mgr, s)
    pool.take_events()
    assert pool.reset_prefix_cache() is False
    mgr.free(s)
    assert pool.reset_prefix_cache() is True
    assert [type(e).__name__ for e in pool.take_events()] == ["AllBlocksCleared"]
    assert mgr.get_computed_blocks(KVSequence("t", list(range(20))))[1] == 0
