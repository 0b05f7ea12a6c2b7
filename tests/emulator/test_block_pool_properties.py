"""Hypothesis-driven invariants of the block pool under random request lifecycles."""
from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvblocks import hash_to_int
from kvblocks.kv_events import BlockRemoved, BlockStored

from emulator.block_pool import BlockPool
from emulator.kv_cache_manager import KVCacheManager, KVSequence, cdiv

BS = 16
# A few shared prefixes so random requests hit each other's blocks.
PREFIXES = [[p * 1000 + i for i in range(80)] for p in range(3)]


class PoolMachine(RuleBasedStateMachine):
    """Requests start (with prefix hits), decode, get preempted, finish; the pool must stay consistent."""

    @initialize(num_blocks=st.integers(min_value=3, max_value=14))
    def setup(self, num_blocks: int) -> None:
        self.pool = BlockPool(num_blocks, BS, enable_kv_events=True)
        self.mgr = KVCacheManager(self.pool)
        self.active: list[KVSequence] = []
        self.next_id = 0
        self.next_token = 10**6
        self.mirror: Counter[int] = Counter()  # cached hashes as a KV-event subscriber would see them

    @rule(prefix=st.integers(0, 2), shared=st.integers(0, 80), extra=st.integers(0, 40))
    def start(self, prefix: int, shared: int, extra: int) -> None:
        tokens = PREFIXES[prefix][:shared] + [self._fresh() for _ in range(extra)]
        if not tokens:
            return
        seq = KVSequence(f"r{self.next_id}", tokens)
        self.next_id += 1
        hits, cached = self.mgr.get_computed_blocks(seq)
        assert cached % BS == 0
        assert cached <= BS * ((len(tokens) - 1) // BS), "hit must leave the last prompt token to compute"
        for i, blk in enumerate(hits):
            assert blk.block_hash == seq.block_hashes[i]
        if self.mgr.allocate_slots(seq, len(tokens) - cached, hits):
            self.active.append(seq)
            seq.token_ids.append(self._fresh())  # the token sampled by the prefill step

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def decode(self, data) -> None:
        seq = data.draw(st.sampled_from(self.active))
        if self.mgr.allocate_slots(seq, 1):
            seq.token_ids.append(self._fresh())
        else:  # preemption: free everything, as the scheduler does
            self.mgr.free(seq)
            self.active.remove(seq)

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def finish(self, data) -> None:
        seq = data.draw(st.sampled_from(self.active))
        self.mgr.free(seq)
        self.active.remove(seq)

    @rule()
    def reset(self) -> None:
        assert self.pool.reset_prefix_cache() == (not self.active)

    def _fresh(self) -> int:
        self.next_token += 1
        return self.next_token

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "pool"):
            return
        self.pool.check_invariants()
        holders = Counter(b.block_id for s in self.active for b in s.blocks)
        for b in self.pool.blocks[1:]:
            assert b.ref_cnt == holders.get(b.block_id, 0), "ref count must equal the number of holders"
            assert b.ref_cnt >= 0
        assert len(holders) <= self.pool.num_usable_blocks
        assert self.pool.num_referenced_blocks() == len(holders)
        assert 0.0 <= self.pool.get_usage() <= 1.0
        for ev in self.pool.take_events():
            if isinstance(ev, BlockStored):
                assert len(ev.token_ids) == BS * len(ev.block_hashes)
                self.mirror.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                self.mirror.subtract(ev.block_hashes)
            else:
                self.mirror.clear()
        self.mirror = +self.mirror
        cached = Counter(hash_to_int(b.block_hash) for b in self.pool.blocks if b.block_hash is not None)
        assert self.mirror == cached, "replaying the KV events must give the pool's cached hashes"
        for s in self.active:
            assert len(s.blocks) == cdiv(s.num_computed_tokens, BS)
            assert s.num_cached_blocks == min(s.num_computed_tokens, s.num_tokens) // BS

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        for s in list(self.active):
            self.mgr.free(s)
        self.pool.check_invariants()
        assert self.pool.num_referenced_blocks() == 0
        assert self.pool.num_free_blocks == self.pool.num_usable_blocks


PoolMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPoolMachine = PoolMachine.TestCase
