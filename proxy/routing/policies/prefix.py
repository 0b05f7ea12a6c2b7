"""The seed's cache-aware rule: the longest prefix match in blocks; ties and no match -> least loaded.

Pure affinity: when every request shares block 0 (a common system prompt, the Mooncake trace), it
sends everything to one backend. Kept as the baseline the load-aware default must beat.
"""
from __future__ import annotations

from collections.abc import Sequence

from ...backends.registry import Backend
from .base import Decision, Policy, RequestContext


class PrefixPolicy(Policy):
    """Longest prefix match in blocks; ties and no match to the least loaded."""

    name = "prefix"

    def pick(self, ctx: RequestContext, candidates: Sequence[Backend]) -> Decision:
        """The candidate holding the most leading blocks, then the fewest in flight (first in order on a tie)."""
        matches = ctx.matches
        best, key = None, None
        for b in candidates:
            k = (-matches.get(b.url, 0), b.in_flight)
            if key is None or k < key:
                best, key = b, k
        return Decision(best, -key[0], "longest_prefix" if key[0] else "least_loaded")
