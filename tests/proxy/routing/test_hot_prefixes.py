"""HotPrefixes: which shared prefixes are still live, and the blocks they take (kv_aware's copies)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.routing.policies.hot_prefixes import HotPrefixes


def test_a_prefix_used_often_dies_after_a_few_of_its_gaps_a_rare_one_lives_to_the_horizon():
    hot = HotPrefixes(horizon_s=60.0, silence_gaps=8.0)
    for i in range(30):  # a system prompt used every 0.1 s for 3 s
        hot.touch(1, 64, 100.0 + 0.1 * i)
    hot.touch(2, 150, 100.0)  # a document used every 10 s
    hot.touch(2, 150, 110.0)
    assert hot.footprint(103.5) == 214
    assert hot.footprint(104.0) == 150  # 8 x 0.1 s of silence after its last use at 102.9: dead
    assert hot.footprint(169.9) == 150  # min(60 s, 8 x 10 s) after 110
    assert hot.footprint(170.1) == 0
    assert len(hot) == 0
    hot.check_invariants()


def test_life_uses_one_gap_sample_until_the_prefix_has_its_own():
    hot = HotPrefixes(horizon_s=60.0, silence_gaps=8.0)
    assert hot.life(5) == 60.0
    assert hot.life(5, gap=0.2) == 8 * 0.2
    hot.touch(5, 10, 1.0)
    hot.touch(5, 10, 1.5)
    assert hot.life(5, gap=100.0) == 8 * 0.5  # its own gap wins over the sample
    assert hot.life(5, scale=0.01) == 60.0 * 0.01  # the horizon, in wall seconds at time scale 0.01


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 200), st.floats(0.0, 5.0), st.booleans()), max_size=300),
       st.integers(1, 40))
def test_footprint_is_always_the_sum_of_the_live_prefixes(ops, max_entries):
    hot = HotPrefixes(horizon_s=10.0, silence_gaps=4.0, max_entries=max_entries)
    t = 0.0
    for h, blocks, dt, look in ops:
        t += dt
        if look:
            fp = hot.footprint(t)
            assert fp == sum(e[0] for e in hot._entries.values())
            assert all(e[3] >= t for e in hot._entries.values())  # nothing dead is counted
        else:
            hot.touch(h, blocks, t)
        hot.check_invariants()
    assert hot.footprint(t + 11.0) == 0
