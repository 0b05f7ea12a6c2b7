"""The shared prefixes still in use, and the blocks they take: what copies of hot prefixes must fit.

A prefix stays live until it has been silent for `silence_gaps` times its own usual gap between
uses (an EWMA), at least `min_life_s` (a burst's gaps are ~0) and never longer than `horizon_s`. A fixed horizon alone could not tell a RAG
document asked for every 10 s (live: keep it) from a system prompt that was replaced 5 s ago after
30 uses in 3 s (dead): with a 60 s horizon, ~15 dead rotations looked like a full cache and no copy
was ever affordable again (docs/policies/kv_aware.md, `rotating-prefix`).

Invariants (`check_invariants`): `footprint` is the sum of the live entries' blocks; every live
entry has a heap key at its expiry; at most `max_entries` entries.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict


class HotPrefixes:
    """Live hot prefixes by their deepest block hash, with O(log n) updates and an O(1) footprint."""

    __slots__ = ("horizon_s", "silence_gaps", "min_life_s", "max_entries", "_entries", "_heap", "_footprint",
                 "typical_uses")

    def __init__(self, horizon_s: float, silence_gaps: float, max_entries: int = 65536, min_life_s: float = 0.0) -> None:
        self.horizon_s = horizon_s
        self.silence_gaps = silence_gaps
        self.min_life_s = min_life_s
        self.max_entries = max_entries
        # hash -> [blocks, last use, usual gap (None until a second use), expiry, uses]
        self._entries: OrderedDict[int, list] = OrderedDict()
        self._heap: list[tuple[float, int]] = []  # (expiry, hash); stale keys are skipped
        self._footprint = 0
        # Uses a hot prefix had in its life, averaged over the prefixes that died (EWMA; 0 = none yet):
        # how many uses a prefix seen once can expect, where this workload's prefixes come and go.
        self.typical_uses = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def touch(self, h: int, blocks: int, t: float, scale: float = 1.0) -> None:
        """Prefix `h` (`blocks` deep) was used at `t`; `scale` = wall seconds per emulated second."""
        e = self._entries.pop(h, None)
        horizon = self.horizon_s * scale
        if e is None:
            gap, uses = None, 1
            self._footprint += blocks
        else:
            old_blocks, last, gap, _, uses = e
            uses += 1
            seen = t - last
            gap = seen if gap is None else 0.5 * gap + 0.5 * seen
            self._footprint += blocks - old_blocks
        expiry = t + self._life(gap, scale)
        self._entries[h] = [blocks, t, gap, expiry, uses]
        heapq.heappush(self._heap, (expiry, h))
        while len(self._entries) > self.max_entries:
            _, old = self._entries.popitem(last=False)
            self._footprint -= old[0]
        if len(self._heap) > 4 * len(self._entries) + 1024:  # stale keys: rebuild, bounded memory
            self._heap = [(e[3], k) for k, e in self._entries.items()]
            heapq.heapify(self._heap)

    def life(self, h: int, scale: float = 1.0, gap: float | None = None) -> float:
        """How long prefix `h` stays live after a use: `silence_gaps` of its usual gap (or of `gap`, one
        sample, while it has none), at most the horizon."""
        e = self._entries.get(h)
        if e is not None and e[2] is not None:
            gap = e[2]
        return self._life(gap, scale)

    def _life(self, gap: float | None, scale: float) -> float:
        horizon = self.horizon_s * scale
        if gap is None:
            return horizon
        # A floor: a burst's requests come ~0 s apart, and the burst is not over when they are.
        return min(horizon, max(self.min_life_s * scale, self.silence_gaps * gap))

    def footprint(self, t: float) -> int:
        """Blocks of the prefixes live at `t`, each counted once; forgets the dead ones."""
        heap, entries = self._heap, self._entries
        while heap and heap[0][0] < t:
            expiry, h = heapq.heappop(heap)
            e = entries.get(h)
            if e is not None and e[3] == expiry:
                del entries[h]
                self._footprint -= e[0]
                u = self.typical_uses
                self.typical_uses = float(e[4]) if u == 0.0 else 0.8 * u + 0.2 * e[4]
        return self._footprint

    def clear(self) -> None:
        self.typical_uses = 0.0
        self._entries.clear()
        self._heap.clear()
        self._footprint = 0

    def check_invariants(self) -> None:
        assert self._footprint == sum(e[0] for e in self._entries.values()), "footprint != sum of live blocks"
        keys = set(self._heap)
        for h, e in self._entries.items():
            assert (e[3], h) in keys, f"live entry {h} has no heap key at its expiry"
        assert len(self._entries) <= self.max_entries
