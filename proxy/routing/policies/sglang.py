"""sglang-router 0.3.2's `cache_aware` (the package on PyPI), with its defaults (peer-routers.md section 1).

1. load = in-flight requests the router dispatched. Imbalanced iff max-min > balance_abs (64) AND
   max > min * balance_rel (1.5): then the least loaded worker, ties to the first in worker order
   (`min_by_key(load)`; SMG later added `processed` to the key, which 0.3.2 does not have).
2. Otherwise match_rate = matched tokens / prompt tokens in the router's own approximate tree; if
   it is > cache_threshold (0.3) the worker owning the deepest match (the one that last inserted
   it); else the least loaded worker, again the first in order: each new prefix group goes to the
   first idle worker, so on bursts of new groups the first workers take them all (measured against
   the real sglang-router 0.3.2 on the same emulators: 0/0/160/160 where a `processed` tie-break
   spread 96/96/64/64).
3. The chosen worker's tree gets the whole prompt. The tree is the router's own, bounded only by
   max_tree_size (2^26 chars per worker, about 2^24 tokens): it does not mirror backend eviction.
Match rate is counted over 16-token blocks instead of characters.
"""
from __future__ import annotations

from collections.abc import Sequence

from ...backends.registry import Backend
from ...index.prefix_index import PrefixIndex
from .base import Decision, Policy, RequestContext

MAX_TREE_CHARS = 1 << 26
CHARS_PER_TOKEN = 4


class SGLangCacheAwarePolicy(Policy):
    """sglang-router 0.3.2's `cache_aware` rule with its defaults, as a baseline to beat: when loads are
    imbalanced (abs and rel thresholds) the least loaded; else the backend whose own prefix tree
    matches the prompt best if the match rate exceeds `cache_threshold`; else the least loaded."""

    name = "sglang"
    cache_threshold = 0.3
    balance_abs_threshold = 64
    balance_rel_threshold = 1.5

    def __init__(self, env) -> None:
        super().__init__(env)
        self._tree = PrefixIndex(MAX_TREE_CHARS // (CHARS_PER_TOKEN * env.block_size))
        self._last_insert: dict[str, int] = {}
        self._seq = 0

    def pick(self, ctx: RequestContext, candidates: Sequence[Backend]) -> Decision:
        """sglang's choice among `candidates`; needs the whole prompt (`ctx.full_hashes()`)."""
        loads = [b.in_flight for b in candidates]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            b = self._min_load(candidates)
            return Decision(b, ctx.matched(b), "imbalanced")
        tree_matches = self._tree.match(ctx.full_hashes())
        best_depth = 0
        best = None
        for b in candidates:
            d = tree_matches.get(b.url, 0)
            if d > best_depth or (d == best_depth and d and self._last_insert.get(b.url, 0) > self._last_insert.get(best.url, 0)):
                best, best_depth = b, d
        rate = best_depth * (ctx.block_size or self.env.block_size) / ctx.num_tokens if ctx.num_tokens else 0.0
        if best is not None and rate > self.cache_threshold:
            return Decision(best, ctx.matched(best), f"match_rate={rate:.2f}")
        b = self._min_load(candidates)
        return Decision(b, ctx.matched(b), f"match_rate={rate:.2f}<=threshold")

    @staticmethod
    def _min_load(candidates: Sequence[Backend]) -> Backend:
        return min(enumerate(candidates), key=lambda ib: (ib[1].in_flight, ib[0]))[1]

    def observe(self, ctx: RequestContext, backend: Backend) -> None:
        """Insert the whole prompt into `backend`'s tree (as sglang's router does on every routed request)."""
        self._tree.record_routed(backend.url, ctx.full_hashes())
        self._seq += 1
        self._last_insert[backend.url] = self._seq

    def reset(self) -> None:
        """Empty the trees."""
        self._tree.clear()
        self._last_insert.clear()

    def forget_backend(self, url: str) -> None:
        """Drop `url`'s tree."""
        self._tree.remove_backend(url)
        self._last_insert.pop(url, None)
