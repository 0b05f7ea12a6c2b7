"""Least estimated outstanding work: remaining prefill + decode seconds of in-flight requests.

Uses the backends' latency profile, so a backend busy with two long prompts counts as more loaded
than one with three short ones. Cache-blind, like least_loaded.
"""
from __future__ import annotations

from collections.abc import Sequence

from ...backends.registry import Backend, now
from .base import Decision, Policy, RequestContext


class LeastWorkPolicy(Policy):
    """Least estimated outstanding work (remaining prefill + decode, from the latency model); ties rotate."""

    name = "least_work"

    def __init__(self, env) -> None:
        super().__init__(env)
        self._turn = 0

    def pick(self, ctx: RequestContext, candidates: Sequence[Backend]) -> Decision:
        """The candidate whose in-flight requests have the least estimated work left, ties to the next in turn."""
        t = now()
        n = len(candidates)
        self._turn += 1
        best, best_work = None, float("inf")
        for k in range(n):
            b = candidates[(self._turn + k) % n]
            w = b.outstanding_work(t, self.env.profile, self.env.time_scale)
            if w < best_work:
                best, best_work = b, w
        return Decision(best, ctx.matched(best), f"work={best_work:.3f}s")
