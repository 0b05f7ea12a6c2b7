"""Which backend holds which KV block, keyed by the 64-bit int form of vLLM's chained block hashes.

One global map `hash -> bitmask of backend slots` makes a lookup cost O(prompt blocks): walk the
prompt's hashes while any backend still matches. Each backend also has an LRU-ordered store so the
approximate mode (fed by routing decisions) can mirror the backend's capacity and eviction order:
the least recently used block goes first and, within one request, the deepest block first (vLLM
releases a finished request's blocks last-to-first), so shared prefixes outlive their suffixes.
The same store takes exact `stored`/`removed`/`clear` updates from KV events.

A routed prompt may be only partly hashed (`prompt_walk.py`): its untokenized rest is kept as a
pending tail anchored at its last known block, counted against the backend's capacity by its
estimated size, evicted just before its anchor (a request's deeper blocks go first), and resolved
into real blocks when a later prompt's chain reaches the anchor on that backend. On an event-fed
(exact) backend the tail is held for the KV-event follower instead (`hold_tail`): resolved blocks
go to it, never into the guessed LRU, and after the request it stays as a zero-size marker so a
chat's next turn still learns where the previous prompt ended.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvblocks.clock import monotonic

DEFAULT_CAPACITY_BLOCKS = 924
PROMPT_END_ENTRIES = 65536


@dataclass
class _BackendStore:
    slot: int
    capacity: int
    lru: OrderedDict[int, float] = field(default_factory=OrderedDict)  # block -> last touched, oldest first
    phantom: int = 0  # estimated blocks of pending tails, not in `lru`


@dataclass(eq=False)
class PendingTail:
    """The untokenized rest of a prompt routed to the backend in `slot`, after block `anchor`."""

    slot: int
    anchor: int  # hash of the last known block
    prompt: Any  # opaque to the index: what the router needs to finish hashing it
    blocks: int  # estimated size, counted in the backend's `phantom`
    # Exact backends: who takes the resolved blocks (the KV-event follower), instead of `record_routed`.
    on_resolve: Callable[[Sequence[int]], None] | None = None


class PrefixIndex:
    """Approximate or event-fed map from block hashes to the backends caching them."""

    def __init__(self, default_capacity: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        self.default_capacity = default_capacity
        self._owners: dict[int, int] = {}  # block hash -> bitmask of slots
        self._pending: dict[int, list[PendingTail]] = {}  # anchor hash -> tails
        self._prompt_ends: OrderedDict[int, None] = OrderedDict()  # last full block of recently routed prompts
        self._stores: dict[Hashable, _BackendStore] = {}
        self._slot_backend: dict[int, Hashable] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0

    # -- backends -------------------------------------------------------------------------------
    def _store(self, backend: Hashable) -> _BackendStore:
        st = self._stores.get(backend)
        if st is None:
            slot = self._free_slots.pop() if self._free_slots else self._alloc_slot()
            st = _BackendStore(slot, self.default_capacity)
            self._stores[backend] = st
            self._slot_backend[slot] = backend
        return st

    def _alloc_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def add_backend(self, backend: Hashable, capacity: int | None = None) -> None:
        """Give `backend` a slot (idempotent), with `capacity` blocks if given (else the default)."""
        self._store(backend)
        if capacity is not None:
            self.set_capacity(backend, capacity)

    def remove_backend(self, backend: Hashable) -> None:
        """Forget a backend entirely and free its slot for reuse."""
        if backend not in self._stores:
            return
        self.clear(backend)
        st = self._stores.pop(backend)
        del self._slot_backend[st.slot]
        self._free_slots.append(st.slot)

    def backends(self) -> list[Hashable]:
        """The backends with a slot, in the order they were added."""
        return list(self._stores)

    def set_capacity(self, backend: Hashable, blocks: int) -> None:
        """Mirror the backend's KV capacity (vllm:cache_config_info num_gpu_blocks); evicts if it shrank."""
        st = self._store(backend)
        st.capacity = max(1, int(blocks))
        self._evict_to(st, st.capacity)

    def capacity(self, backend: Hashable) -> int:
        """The blocks `backend` is believed to hold at most (its mirrored KV capacity)."""
        return self._store(backend).capacity

    def num_blocks(self, backend: Hashable) -> int:
        """Blocks the backend is believed to hold, pending tails included at their estimated size; at most
        its capacity. An event-fed backend's in-flight prompt blocks are indexed before the events of
        the evictions they cause arrive, and counted on top of a full cache they made kv_aware charge
        that backend for evictions a request there would not cause: requests left the backend holding
        their document (`benchmarks/kv_hit_rate.py`)."""
        st = self._stores.get(backend)
        return min(len(st.lru) + st.phantom, st.capacity) if st else 0

    def coldest_touch(self, backend: Hashable) -> float | None:
        """When the backend's least recently used block was last touched (None: it holds none): a copy
        that must evict finds nothing warmer than this at the head of the line."""
        st = self._stores.get(backend)
        if not st or not st.lru:
            return None
        return next(iter(st.lru.values()))

    def touched(self, backend: Hashable, h: int) -> float | None:
        """When block `h` was last touched on `backend` (None: not held there)."""
        st = self._stores.get(backend)
        return st.lru.get(h) if st else None

    def owners(self, h: int) -> int:
        """Bitmask of the slots holding block `h`."""
        return self._owners.get(h, 0)

    def pending_at(self, h: int) -> list[PendingTail] | None:
        """The untokenized tails anchored at block `h` (None if none): what a prompt reaching `h` may continue into."""
        return self._pending.get(h)

    def mark_prompt_end(self, h: int) -> None:
        """Block `h` ended a routed prompt: a later prompt matching exactly up to it continues that one (a chat turn)."""
        ends = self._prompt_ends
        ends.pop(h, None)
        ends[h] = None
        if len(ends) > PROMPT_END_ENTRIES:
            del ends[next(iter(ends))]

    def is_prompt_end(self, h: int) -> bool:
        """Whether block `h` ended a routed prompt (see `mark_prompt_end`)."""
        return h in self._prompt_ends

    def owner_map(self) -> dict[int, int]:
        """Block hash -> slot bitmask, for walkers that test many blocks (read only)."""
        return self._owners

    def pending_map(self) -> dict[int, list[PendingTail]]:
        """Anchor hash -> pending tails (read only)."""
        return self._pending

    def emit(self, out: dict[Hashable, int], bits: int, depth: int) -> None:
        """Record `depth` leading blocks for every backend whose slot bit is in `bits`."""
        _emit(out, bits, depth, self._slot_backend)

    def __len__(self) -> int:
        """Distinct block hashes held by at least one backend."""
        return len(self._owners)

    # -- updates --------------------------------------------------------------------------------
    def record_routed(self, backend: Hashable, hashes: Sequence[int], tail: Any = None, tail_blocks: int = 0) -> None:
        """Approximate mode: the backend is about to compute/hit these blocks; LRU-touch and evict to capacity.

        Touched deepest-first so block 0 ends most recently used, as vLLM's reverse-order release does.
        `tail` (with its estimated `tail_blocks`) is the prompt's untokenized rest after `hashes[-1]`.
        """
        st = self._store(backend)
        bit = 1 << st.slot
        lru = st.lru
        owners = self._owners
        t = monotonic()
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                owners[h] = owners.get(h, 0) | bit
            lru[h] = t
        if tail is not None and hashes:
            anchor = hashes[-1]
            tails = self._pending.setdefault(anchor, [])
            if not any(p.prompt is tail and p.slot == st.slot for p in tails):
                tails.append(PendingTail(st.slot, anchor, tail, tail_blocks))
                st.phantom += tail_blocks
        self._evict_to(st, st.capacity)

    def resolve(self, p: PendingTail, hashes: Sequence[int]) -> None:
        """A pending tail was hashed: its blocks (after the anchor) replace its estimate."""
        tails = self._pending.get(p.anchor)
        if tails is None or p not in tails:
            return
        tails.remove(p)
        if not tails:
            del self._pending[p.anchor]
        backend = self._slot_backend[p.slot]
        st = self._stores[backend]
        st.phantom -= p.blocks
        if p.on_resolve is not None:
            p.on_resolve(hashes)
        else:
            self.record_routed(backend, hashes)

    def hold_tail(self, backend: Hashable, anchor: int, prompt: Any, blocks: int, on_resolve: Callable[[Sequence[int]], None]) -> PendingTail:
        """Exact mode: a routed prompt's untokenized rest after block `anchor`, resolved through `on_resolve`.

        Counted at its estimate like the request's known in-flight blocks; nothing is evicted for it
        (the backend's own events report evictions)."""
        st = self._store(backend)
        p = PendingTail(st.slot, anchor, prompt, blocks, on_resolve)
        self._pending.setdefault(anchor, []).append(p)
        st.phantom += blocks
        return p

    def settle_tail(self, p: PendingTail) -> None:
        """Exact mode, the request ended: its blocks are the backend's events' business now, so the tail
        keeps no size and resolving it adds nothing; it still marks where the prompt ended (a chat's
        next turn resolves it), until its anchor is evicted."""
        tails = self._pending.get(p.anchor)
        if tails is None or p not in tails:
            return
        self._stores[self._slot_backend[p.slot]].phantom -= p.blocks
        p.blocks = 0
        p.on_resolve = _ignore

    def _drop_tails(self, st: _BackendStore, anchor: int) -> bool:
        """Forget the backend's pending tails at `anchor`; whether there were any."""
        tails = self._pending.get(anchor)
        if not tails:
            return False
        keep = [p for p in tails if p.slot != st.slot]
        if len(keep) == len(tails):
            return False
        for p in tails:
            if p.slot == st.slot:
                st.phantom -= p.blocks
        if keep:
            self._pending[anchor] = keep
        else:
            del self._pending[anchor]
        return True

    def stored(self, backend: Hashable, hashes: Iterable[int], parent: int | None = None, token_ids=None, block_size=None) -> None:
        """Exact mode (BlockStored): the backend cached these blocks; its own events report evictions.

        `parent`, `token_ids`, `block_size` (the event's other fields) are accepted for KV-event sinks and unused.
        """
        st = self._store(backend)
        bit = 1 << st.slot
        lru = st.lru
        owners = self._owners
        t = monotonic()
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                owners[h] = owners.get(h, 0) | bit
            lru[h] = t

    def removed(self, backend: Hashable, hashes: Iterable[int]) -> None:
        """Exact mode (BlockRemoved): the backend evicted these blocks."""
        st = self._stores.get(backend)
        if st is None:
            return
        for h in hashes:
            if h in st.lru:
                del st.lru[h]
                self._drop_owner(h, ~(1 << st.slot))
                if self._pending:
                    self._drop_tails(st, h)

    def clear(self, backend: Hashable | None = None) -> None:
        """Forget one backend's blocks (AllBlocksCleared, reset), or every backend's when None."""
        if backend is None:
            self._owners.clear()
            self._pending.clear()
            self._prompt_ends.clear()
            for st in self._stores.values():
                st.lru.clear()
                st.phantom = 0
            return
        st = self._stores.get(backend)
        if st is None:
            return
        keep = ~(1 << st.slot)
        for h in st.lru:
            self._drop_owner(h, keep)
            if self._pending:
                self._drop_tails(st, h)
        st.lru.clear()
        st.phantom = 0

    def _drop_owner(self, h: int, keep_mask: int) -> None:
        m = self._owners.get(h, 0) & keep_mask
        if m:
            self._owners[h] = m
        else:
            self._owners.pop(h, None)

    def _evict_to(self, st: _BackendStore, limit: int) -> None:
        lru = st.lru
        if len(lru) + st.phantom <= limit:
            return
        keep = ~(1 << st.slot)
        owners = self._owners
        pending = self._pending
        popitem = lru.popitem
        while lru and len(lru) + st.phantom > limit:
            if pending and self._drop_tails(st, next(iter(lru))):
                continue  # the anchor's tail goes first, as its deeper blocks would
            h = popitem(last=False)[0]
            m = owners[h] & keep
            if m:
                owners[h] = m
            else:
                del owners[h]

    # -- lookup ---------------------------------------------------------------------------------
    def match(self, hashes: Sequence[int]) -> dict[Hashable, int]:
        """Leading blocks of `hashes` each backend holds; backends with no match are absent.

        Cost: one dict lookup per block until no backend matches, plus one step per matching backend.
        """
        owners = self._owners
        if not hashes:
            return {}
        mask = owners.get(hashes[0], 0)
        if not mask:
            return {}
        out: dict[Hashable, int] = {}
        slot_backend = self._slot_backend
        i = 1
        n = len(hashes)
        while i < n:
            m = mask & owners.get(hashes[i], 0)
            if m != mask:
                _emit(out, mask & ~m, i, slot_backend)
                mask = m
                if not mask:
                    return out
            i += 1
        _emit(out, mask, n, slot_backend)
        return out

    def lru(self, backend: Hashable) -> list[int]:
        """The backend's blocks, least recently used first (a replica's snapshot for its peers)."""
        st = self._stores.get(backend)
        return list(st.lru) if st else []

    def tails(self) -> Iterator[tuple[Hashable, PendingTail]]:
        """Pending tails of approximate (routing-fed) entries, with their backend."""
        for tails in self._pending.values():
            for p in tails:
                if p.on_resolve is None:
                    yield self._slot_backend[p.slot], p

    def contains(self, backend: Hashable, h: int) -> bool:
        """Whether `backend` is believed to hold block `h` (False for an unknown backend)."""
        st = self._stores.get(backend)
        return st is not None and h in st.lru


def _ignore(hashes: Sequence[int]) -> None:
    """A settled tail's resolution: the blocks are already known from the backend's events."""


def _emit(out: dict[Hashable, int], bits: int, depth: int, slot_backend: dict[int, Hashable]) -> None:
    while bits:
        low = bits & -bits
        out[slot_backend[low.bit_length() - 1]] = depth
        bits ^= low
