"""Per-request block tables over the block pool (vLLM v1's `kv_cache_manager.py`, one attention group).

A request's prefix hit is the longest leading run of cached block hashes, capped so its last token is
always computed; slots for newly scheduled tokens come from the pool, and every block that becomes
full (prompt or generated tokens) is cached at scheduling time, extending the hash chain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvblocks import BlockHasher, ExtraKeys

from .block_pool import BlockPool, KVBlock


@dataclass(eq=False)
class KVSequence:
    """The cache-side state of one request: its tokens so far, their block hashes, its blocks."""

    request_id: str
    token_ids: list[int]
    extra_keys_block0: tuple[Any, ...] | None = None
    event_extra_keys_block0: tuple[Any, ...] | None = None  # what KV events publish for block 0 (untagged)
    keys: ExtraKeys | None = None  # LoRA adapter and/or cache_salt; when set, replaces the two fields above
    lora_name: str | None = None  # the adapter, as BlockStored names it
    lora_id: int | None = None
    skip_prefix_cache: bool = False  # vLLM's skip_reading_prefix_cache (prompt_logprobs): no lookup, no stats
    block_hashes: list[bytes] = field(default_factory=list)
    blocks: list[KVBlock] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_blocks: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class PrefixCacheStats:
    """Token counts behind vllm:prefix_cache_queries_total / _hits_total."""

    requests: int = 0
    queries: int = 0
    hits: int = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates, caches and frees the blocks of requests; the only caller of the pool's mutators."""

    def __init__(self, pool: BlockPool, hash_algo: str = "sha256") -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.hasher = BlockHasher(pool.block_size, hash_algo)
        self.stats = PrefixCacheStats()

    def update_block_hashes(self, seq: KVSequence) -> None:
        """Extend `seq.block_hashes` to every full block of its tokens (chained from the last one)."""
        have = len(seq.block_hashes)
        if len(seq.token_ids) // self.block_size <= have:
            return
        parent = seq.block_hashes[-1] if have else None
        seq.block_hashes.extend(
            self.hasher.hashes(seq.token_ids, parent=parent, start_block=have, extra_keys_block0=seq.extra_keys_block0,
                               keys=seq.keys)
        )

    def get_computed_blocks(self, seq: KVSequence) -> tuple[list[KVBlock], int]:
        """Cached leading blocks of `seq` and the tokens they cover, leaving the last token to compute."""
        self.update_block_hashes(seq)
        if seq.skip_prefix_cache:
            return [], 0
        max_hit_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for h in seq.block_hashes[:max_hit_blocks]:
            blk = self.pool.get_cached_block(h)
            if blk is None:
                break
            hits.append(blk)
        return hits, len(hits) * self.block_size

    def record_query(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        self.stats.requests += 1
        self.stats.queries += num_prompt_tokens
        self.stats.hits += num_cached_tokens

    def num_blocks_needed(
        self, seq: KVSequence, num_new_tokens: int, new_computed_blocks: list[KVBlock] = (), num_lookahead_tokens: int = 0
    ) -> int:
        """Free blocks `allocate_slots` would consume (hit blocks that are free count, they leave the queue)."""
        num_computed = seq.num_computed_tokens + len(new_computed_blocks) * self.block_size
        required = cdiv(num_computed + num_new_tokens + num_lookahead_tokens, self.block_size)
        new_blocks = max(0, required - len(seq.blocks) - len(new_computed_blocks))
        return new_blocks + sum(1 for b in new_computed_blocks if b.ref_cnt == 0)

    def can_admit(self, seq: KVSequence, new_computed_blocks: list[KVBlock] = ()) -> bool:
        """vLLM's admission gate (scheduler_reserve_full_isl, on by default): the whole sequence so far
        must fit the free blocks, not just its first chunk; no slot is reserved for the output token."""
        return self.num_blocks_needed(seq, seq.num_tokens - len(new_computed_blocks) * self.block_size,
                                      new_computed_blocks) <= self.pool.num_free_blocks

    def can_allocate(
        self, seq: KVSequence, num_new_tokens: int, new_computed_blocks: list[KVBlock] = (), num_lookahead_tokens: int = 0
    ) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens, new_computed_blocks, num_lookahead_tokens) <= self.pool.num_free_blocks

    def allocate_slots(
        self, seq: KVSequence, num_new_tokens: int, new_computed_blocks: list[KVBlock] = ()
    ) -> bool:
        """Schedule `num_new_tokens` more tokens of `seq`: take hit blocks and new blocks, cache full ones.

        Returns False (changing nothing) when the pool cannot supply the blocks.
        """
        bs = self.block_size
        if not new_computed_blocks:
            total = seq.num_computed_tokens + num_new_tokens
            if total <= len(seq.blocks) * bs:  # fast path (most decode steps): fits the last block
                seq.num_computed_tokens = total
                if total // bs > seq.num_cached_blocks:
                    self.cache_blocks(seq, min(total, seq.num_tokens))
                return True
        if not self.can_allocate(seq, num_new_tokens, new_computed_blocks):
            return False
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            seq.blocks.extend(new_computed_blocks)
            seq.num_computed_tokens += len(new_computed_blocks) * bs
            seq.num_cached_blocks = len(seq.blocks)
        total = seq.num_computed_tokens + num_new_tokens
        num_new_blocks = cdiv(total, bs) - len(seq.blocks)
        if num_new_blocks > 0:
            seq.blocks.extend(self.pool.get_new_blocks(num_new_blocks))
        seq.num_computed_tokens = total
        self.cache_blocks(seq, min(total, seq.num_tokens))
        return True

    def cache_blocks(self, seq: KVSequence, num_tokens: int) -> None:
        """Cache every block of `seq` that is full within its first `num_tokens` tokens."""
        if not self.pool.enable_caching:
            return
        num_full = num_tokens // self.block_size
        if num_full <= seq.num_cached_blocks:
            return
        self.update_block_hashes(seq)
        self.pool.cache_full_blocks(seq.blocks, seq.block_hashes, seq.num_cached_blocks, num_full, seq.token_ids,
                                    seq.event_extra_keys_block0, seq.keys, seq.lora_name, seq.lora_id)
        seq.num_cached_blocks = num_full

    def free(self, seq: KVSequence) -> None:
        """Release `seq`'s blocks last-first (so its deepest blocks are evicted first) and reset it."""
        blocks, seq.blocks = seq.blocks, []
        self.pool.free_blocks(reversed(blocks))
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
