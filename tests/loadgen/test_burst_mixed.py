"""The burst and mixed workloads and burst arrivals (issue #13's shapes)."""
from __future__ import annotations

from collections import Counter

from loadgen.arrivals import BurstArrivals, PoissonArrivals, make_arrivals
from loadgen.config import WorkloadConfig
from loadgen.workloads import build_workload


def test_burst_groups_share_a_prefix_and_arrive_together():
    cfg = WorkloadConfig(name="burst", requests=40, burst=5, burst_prefixes=3, burst_prefix_tokens=200,
                         burst_suffix_tokens=32)
    w = build_workload(cfg)
    prefixes = [r.tags["prefix"] for r in w.requests]
    for g in range(0, 40, 5):
        assert len(set(prefixes[g:g + 5])) == 1
    assert 2 <= len(set(prefixes)) <= 3
    assert len({r.prompt for r in w.requests}) == 40  # every suffix unique
    arr = make_arrivals("burst", 10.0, 0, 0, cfg.burst_size)
    assert isinstance(arr, BurstArrivals)
    starts = arr.start_times(w.chains())
    for g in range(0, 40, 5):
        assert starts[g + 4] - starts[g] < 0.01 < (starts[g + 5] - starts[g] if g + 5 < 40 else 1)
    # Mean rate as asked: 8 bursts of 5 at 10 req/s span ~3.5 s (7 gaps of mean 0.5 s); loosely bounded.
    assert 0.5 < starts[-1] < 12
    assert WorkloadConfig(name="burst").burst_size == 8 and WorkloadConfig(name="rag").burst_size == 1
    assert isinstance(make_arrivals("rag", 10.0, 0, 0, 1), PoissonArrivals)


def test_mixed_has_rag_chat_and_unique_requests_interleaved():
    cfg = WorkloadConfig(name="mixed", requests=60, documents=4, doc_tokens_min=200, doc_tokens_max=400, turns=3,
                         turn_tokens=40)
    w = build_workload(cfg)
    kinds = Counter(r.tags["kind"] for r in w.requests)
    assert kinds == {"rag": 24, "chat": 18, "unique": 18}
    assert [r.index for r in w.requests] == list(range(60))
    order = [r.tags["kind"] for r in w.requests]
    assert order[:20].count("rag") not in (0, 20)  # interleaved, not in blocks
    for chain in w.chains():
        if chain[0].tags["kind"] == "chat":
            assert [r.turn for r in chain] == list(range(len(chain)))
