"""The KV block pool with vLLM v1's exact semantics (`vllm/v1/core/block_pool.py`).

Blocks carry ref counts; a block whose count drops to 0 stays cached (still a prefix hit) until a new
allocation takes it from the front of the free queue (lazy eviction). The free queue order is the
eviction order: never-used blocks in id order, then blocks in the order they were released.
Block 0 is vLLM's null block and never handed out, so usable ids are 1..num_gpu_blocks-1.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kvblocks import ExtraKeys
from kvblocks.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, wire_hash


@dataclass(eq=False, slots=True)
class KVBlock:
    """One block of KV memory; `block_hash` is set once the block is full and cached."""

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    is_null: bool = False
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of ref-0 blocks: O(1) pop from the front, append, and removal from the middle.

    A block is in the queue exactly when its ref count is 0, so a hit on a free cached block can
    take it out wherever it sits (vLLM's FreeKVCacheBlockQueue).
    """

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        self.append_n(blocks)

    def popleft(self) -> KVBlock:
        first = self._head.next_free
        if first is self._tail or first is None:
            raise ValueError("no free blocks")
        self.remove(first)
        return first

    def popleft_n(self, n: int) -> list[KVBlock]:
        if n > self.num_free_blocks:
            raise ValueError(f"need {n} free blocks, have {self.num_free_blocks}")
        return [self.popleft() for _ in range(n)]

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise RuntimeError(f"block {block.block_id} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        self._link(last, block, self._tail)

    def appendleft(self, block: KVBlock) -> None:
        first = self._head.next_free
        assert first is not None
        self._link(self._head, block, first)

    def append_n(self, blocks: Iterable[KVBlock]) -> None:
        for b in blocks:
            self.append(b)

    def _link(self, prev: KVBlock, block: KVBlock, nxt: KVBlock) -> None:
        if block.prev_free is not None or block.next_free is not None:
            raise RuntimeError(f"block {block.block_id} is already in the free queue")
        prev.next_free = block
        block.prev_free = prev
        block.next_free = nxt
        nxt.prev_free = block
        self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        """Front-to-back ids: the order blocks would be reused (and their hashes evicted)."""
        out = []
        b = self._head.next_free
        while b is not None and b is not self._tail:
            out.append(b.block_id)
            b = b.next_free
        return out


class BlockPool:
    """All KV blocks of one engine, the hash -> block map, and the KV events the pool's changes cause."""

    def __init__(
        self,
        num_gpu_blocks: int,
        block_size: int = 16,
        enable_caching: bool = True,
        enable_kv_events: bool = False,
        use_int_hashes: bool = True,
    ) -> None:
        if num_gpu_blocks < 2:
            raise ValueError("num_gpu_blocks must be >= 2 (block 0 is the null block)")
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.enable_kv_events = enable_kv_events
        self.use_int_hashes = use_int_hashes
        self.blocks = [KVBlock(i) for i in range(num_gpu_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.null_block = self.free_block_queue.popleft()
        self.null_block.is_null = True
        # digest -> {block_id: block}: concurrent requests may compute and cache the same prefix twice.
        self.cached_block_hash_to_block: dict[bytes, dict[int, KVBlock]] = {}
        self._events: list[KVEvent] = []

    @property
    def num_usable_blocks(self) -> int:
        return self.num_gpu_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0 (never used, or cached and evictable)."""
        return self.free_block_queue.num_free_blocks

    def num_referenced_blocks(self) -> int:
        """Blocks in use by some request (ref count > 0); 0 when the engine is idle."""
        return self.num_usable_blocks - self.num_free_blocks

    def num_cached_blocks(self) -> int:
        return sum(len(v) for v in self.cached_block_hash_to_block.values())

    def get_usage(self) -> float:
        """vLLM's kv_cache_usage_perc: the fraction of usable blocks that are referenced."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        entry = self.cached_block_hash_to_block.get(block_hash)
        if not entry:
            return None
        return next(iter(entry.values()))

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on hit blocks; a free cached block leaves the free queue."""
        for b in blocks:
            if b.ref_cnt == 0 and not b.is_null:
                self.free_block_queue.remove(b)
            b.ref_cnt += 1

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Take blocks from the front of the free queue, evicting whatever hash they still carry."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot get {num_blocks} free blocks from the pool ({self.num_free_blocks} free)")
        out = self.free_block_queue.popleft_n(num_blocks)
        for b in out:
            if self.enable_caching:
                self._maybe_evict_cached_block(b)
            assert b.ref_cnt == 0
            b.ref_cnt = 1
        return out

    def _maybe_evict_cached_block(self, block: KVBlock) -> bool:
        h = block.block_hash
        if h is None:
            return False
        entry = self.cached_block_hash_to_block.get(h)
        if entry is None or entry.pop(block.block_id, None) is None:
            return False
        if not entry:
            del self.cached_block_hash_to_block[h]
        block.block_hash = None
        if self.enable_kv_events:
            self._events.append(BlockRemoved(block_hashes=[wire_hash(h, self.use_int_hashes)]))
        return True

    def cache_full_blocks(
        self,
        blocks: list[KVBlock],
        block_hashes: list[bytes],
        num_cached_blocks: int,
        num_full_blocks: int,
        token_ids: list[int],
        event_extra_keys_block0: tuple | None = None,
        keys: ExtraKeys | None = None,
        lora_name: str | None = None,
        lora_id: int | None = None,
    ) -> None:
        """Mark blocks[num_cached:num_full] as cached under their hashes; one BlockStored for them all.

        The event's extra_keys has one entry per block as vLLM publishes it: the untagged extra keys
        of block 0 (`(salt,)` for a salted prompt) when block 0 is among them, None for the others.
        """
        if num_cached_blocks >= num_full_blocks:
            return
        bs = self.block_size
        new_hashes: list[bytes] = []
        extra_keys: list[tuple | None] = []
        for i in range(num_cached_blocks, num_full_blocks):
            blk = blocks[i]
            if blk.is_null:
                continue
            h = block_hashes[i]
            assert blk.block_hash is None, f"block {blk.block_id} already cached"
            blk.block_hash = h
            self.cached_block_hash_to_block.setdefault(h, {})[blk.block_id] = blk
            new_hashes.append(h)
            if keys is not None:
                extra_keys.append(keys.event(i))  # an adapter's name on every block, a salt on block 0
            else:
                extra_keys.append(event_extra_keys_block0 if i == 0 else None)
        if self.enable_kv_events and new_hashes:
            parent = block_hashes[num_cached_blocks - 1] if num_cached_blocks > 0 else None
            self._events.append(
                BlockStored(
                    block_hashes=[wire_hash(h, self.use_int_hashes) for h in new_hashes],
                    parent_block_hash=None if parent is None else wire_hash(parent, self.use_int_hashes),
                    token_ids=list(token_ids[num_cached_blocks * bs : num_full_blocks * bs]),
                    block_size=bs,
                    # None encodes as [None] * n on the wire (kvblocks.kv_events), vLLM's unsalted shape.
                    extra_keys=extra_keys if any(k is not None for k in extra_keys) else None,
                    lora_id=lora_id,
                    lora_name=lora_name,
                )
            )

    def free_blocks(self, ordered_blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; ref-0 cached blocks go to the back, unhashed ones to the front."""
        blocks = list(ordered_blocks)
        for b in blocks:
            b.ref_cnt -= 1
            if b.ref_cnt < 0:
                raise RuntimeError(f"block {b.block_id} freed more often than taken")
        released = [b for b in blocks if b.ref_cnt == 0 and not b.is_null]
        for b in reversed([b for b in released if b.block_hash is None]):
            self.free_block_queue.appendleft(b)
        for b in released:
            if b.block_hash is not None:
                self.free_block_queue.append(b)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use, as in vLLM."""
        if self.num_referenced_blocks() != 0:
            return False
        self.cached_block_hash_to_block.clear()
        for b in self.blocks:
            b.block_hash = None
        if self.enable_kv_events:
            self._events.append(AllBlocksCleared())
        return True

    reset = reset_prefix_cache

    def take_events(self) -> list[KVEvent]:
        """Drain the KV events recorded since the last call (oldest first)."""
        ev, self._events = self._events, []
        return ev

    def check_invariants(self) -> None:
        """Raise AssertionError if the pool's bookkeeping disagrees with itself (used by tests)."""
        in_queue = set(self.free_block_queue.block_ids())
        assert len(in_queue) == self.num_free_blocks
        for b in self.blocks:
            if b.is_null:
                assert b.block_id not in in_queue
                continue
            assert b.ref_cnt >= 0, f"negative ref count on block {b.block_id}"
            assert (b.ref_cnt == 0) == (b.block_id in in_queue), f"block {b.block_id} free/referenced mismatch"
            if b.block_hash is not None:
                assert self.cached_block_hash_to_block[b.block_hash][b.block_id] is b
        for h, entry in self.cached_block_hash_to_block.items():
            assert entry, "empty hash entry"
            for b in entry.values():
                assert b.block_hash == h
